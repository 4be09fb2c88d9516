"""One TOML table at a time: its keys checked against those allowed, each value read with a one-line
error that names the file, the table, the key and the fix."""

from __future__ import annotations

import math
import tomllib
from typing import Any

from branching.errors import ConfigError, did_you_mean


def parse_toml(text: str, origin: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{origin}: invalid TOML: {one_line(e)}; fix the syntax there") from None


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def show(value: Any) -> str:
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Table:
    """One TOML table with its name, for lookups and one-line error messages."""

    def __init__(self, origin: str, name: str, data: Any, allowed: tuple[str, ...]):
        self.origin, self.name = origin, name
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: [{name}] must be a table, got {show(data)}; "
                              f"write it as a [{name}] section")
        self.data = {k: v for k, v in data.items() if v is not None}
        for key in self.data:
            if key not in allowed:
                where = "at the top level" if name == "top level" else f"in [{name}]"
                raise ConfigError(f"{origin}: unknown key {key!r} {where}{did_you_mean(key, allowed)}; "
                                  f"allowed: {', '.join(allowed)}")

    def error(self, key: str, problem: str, fix: str) -> ConfigError:
        value = f", got {show(self.data[key])}" if key in self.data else ""
        return ConfigError(f"{self.origin}: [{self.name}] {key}: {problem}{value}; {fix}")

    def line(self, message: str) -> ConfigError:
        """A one-line error about the table as a whole: `message` says what is wrong and the fix."""
        return ConfigError(f"{self.origin}: [{self.name}] {message}")

    def require(self, key: str, fix: str) -> Any:
        if key not in self.data:
            raise self.error(key, "is required", fix)
        return self.data[key]

    def classes(self) -> tuple[str, ...]:
        fix = 'write e.g. classes = ["crab", "shark"]'
        value = self.require("classes", fix)
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise self.error("classes", "must be a list of strings", fix)
        if len(value) < 2:
            raise self.error("classes", "needs at least 2 classes", fix)
        if any(not c.strip() for c in value):
            raise self.error("classes", "contains an empty name", "remove it or name the class")
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise self.error("classes", f"lists {', '.join(map(repr, dupes))} more than once",
                             "list each class once")
        return tuple(value)

    def hidden(self, default: tuple[int, ...], allow_empty: bool) -> tuple[int, ...]:
        fix = "write e.g. hidden = [1024, 512]" + (" or hidden = []" if allow_empty else "")
        value = self.data.get("hidden", list(default))
        if not isinstance(value, list) or not all(is_int(h) and h >= 1 for h in value):
            raise self.error("hidden", "must be a list of layer sizes (integers >= 1)", fix)
        if not value and not allow_empty:
            raise self.error("hidden", "needs at least one hidden layer", fix)
        return tuple(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
        value = self.data.get(key, default)
        if value is not None and value not in choices:
            raise self.error(key, "is not a known choice", f"use one of: {', '.join(choices)}")
        return value

    def number(self, key: str, lo: float, hi: float, lo_open: bool, hi_open: bool,
               default: float | None = None) -> float | None:
        if key not in self.data:
            return default
        value = self.data[key]
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and (lo < value if lo_open else lo <= value)
              and (value < hi if hi_open else value <= hi))
        if not ok:
            raise self.error(key, f"must be a number in {interval}", f"set {key} to a value in {interval}")
        return float(value)

    def flag(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.error(key, "must be true or false", f"write {key} = true or {key} = false")
        return value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
