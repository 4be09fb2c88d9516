"""What a model file records beside its weights: a typed, versioned schema.

A node of a tree (the parent or a branch) records a NodeMeta, a self-evaluation branch a JudgeMeta. On disk they
are plain dicts (torch.load(weights_only=True) reads nothing else) with the same keys as the fields, and the
payload's "meta_schema" says which version of this schema wrote them:

- 1: files written before the schema had a number (no "meta_schema"). They are read: a temperature kept apart in
  "calibration" joins "acceptance", and a frozen parent's "module"/"weights"/"weights_sha256" go to `files`.
- 2: this schema.

A file of a later schema is refused in one line that says to update branching, and a file whose meta lacks what
its kind needs, or holds a key this schema does not know, is refused as damaged (checkpoint.read_model says what
to do). `path` is where the file was read from, never written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import numpy as np

__all__ = ["DEFAULT_THRESHOLD", "META_SCHEMA", "JudgeMeta", "MetaError", "NodeMeta", "meta_from_dict", "meta_to_dict"]

META_SCHEMA = 2
DEFAULT_THRESHOLD = 0.96  # routing threshold of parents saved before their recipe's was recorded (schema 1)
_ROWS = ("train_rows", "val_rows", "new_class_val_rows", "calibration_rows")
_FILE_KEYS = ("module", "weights", "weights_sha256")  # a frozen module parent's, flat in schema 1


class MetaError(ValueError):
    """A model file's meta that this schema cannot read (the message says why)."""


@dataclass
class NodeMeta:
    """A tree node's record: the parent's (kind "parent") or a branch's (kind "branch").

    Every node: name, classes (in output order), hidden widths, seed, recipe (Recipe.to_dict), history (Model.fit's),
    acceptance (Acceptance.to_dict; None for a parent without a head), acceptance_note, augmentation ({"flip",
    "crop"}), tree (TreeConfig.to_dict of the tree it was trained in), train_rows and val_rows (rows of the training
    split), fingerprint (Model.fingerprint of the weights).
    A parent: normalization (Normalizer.to_dict), new_class_val_rows (held out of classes it does not know),
    calibration_rows (held out of every node, on which a tree's exits are fitted together: branching.tree.cascade),
    files (what a frozen parent was loaded from, with sha256).
    A branch: source, layer, where, pool (the tap it reads), tap (that tap's name), source_fingerprint and
    parent_fingerprint (the models it was trained on), validation ("parent" or "own")."""
    kind: str
    name: str
    classes: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    seed: int | None = None
    recipe: dict | None = None
    history: dict | None = None
    acceptance: dict | None = None
    acceptance_note: str | None = None
    augmentation: dict | None = None
    tree: dict | None = None
    train_rows: np.ndarray | None = None
    val_rows: np.ndarray | None = None
    fingerprint: str | None = None
    normalization: dict | None = None
    new_class_val_rows: np.ndarray | None = None
    calibration_rows: np.ndarray | None = None
    files: dict | None = None
    source: str | None = None
    layer: int | str | None = None
    where: str | None = None
    pool: str | None = None
    tap: str | None = None
    source_fingerprint: str | None = None
    parent_fingerprint: str | None = None
    validation: str | None = None
    path: str | None = field(default=None, compare=False)  # where it was read from; not written

    def __post_init__(self):
        if self.kind not in ("parent", "branch"):
            raise MetaError(f"kind must be 'parent' or 'branch'; got {self.kind!r}")
        for name in _ROWS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.int64).reshape(-1))

    @property
    def is_branch(self) -> bool:
        return self.kind == "branch"

    @property
    def read(self) -> tuple:
        """A branch's read of its source: (source, layer, where, pool)."""
        return self.source, self.layer, self.where, self.pool

    def replace(self, **changes) -> "NodeMeta":
        return dataclasses.replace(self, **changes)


@dataclass
class JudgeMeta:
    """A self-evaluation branch's record (kind "selfeval"): the node it judges and that node's fingerprint, the
    taps it reads ([source, layer, where, pool] each) and their widths, whether it reads the node's logits, the
    standardisation of its inputs, its seed, history, cross-fit (CrossFit.record), recipe name and spec
    (SelfEvalSpec.to_dict)."""
    judges: str
    reads: list
    logits: bool
    feature_mean: np.ndarray
    feature_std: np.ndarray
    tap_widths: list | None = None  # absent in judges written before it was recorded
    seed: int | None = None
    history: dict | None = None
    node_fingerprint: str | None = None
    crossfit: dict | None = None
    recipe: str | None = None
    spec: dict | None = None
    fingerprint: str | None = None
    kind: str = "selfeval"
    path: str | None = field(default=None, compare=False)

    def __post_init__(self):
        self.reads = [tuple(r) for r in self.reads]
        self.feature_mean = np.asarray(self.feature_mean, dtype=np.float32)
        self.feature_std = np.asarray(self.feature_std, dtype=np.float32)

    def replace(self, **changes) -> "JudgeMeta":
        return dataclasses.replace(self, **changes)


_REQUIRED = {"parent": ("name", "classes", "normalization"), "branch": ("name", "classes", "source", "layer", "where"),
             "selfeval": ("judges", "reads", "logits", "feature_mean", "feature_std")}


def meta_to_dict(meta) -> dict:
    """The plain dict a file holds: every field but `path`."""
    if meta is None:
        return {}
    if not isinstance(meta, (NodeMeta, JudgeMeta)):
        raise TypeError(f"meta must be a NodeMeta, a JudgeMeta or None; got {type(meta).__name__}")
    out = {}
    for f in fields(meta):
        value = getattr(meta, f.name)
        if f.name == "path":
            continue
        out[f.name] = [list(r) for r in value] if f.name == "reads" else value
    return out


def meta_from_dict(d: dict, schema: int | None):
    """A file's meta as a NodeMeta or JudgeMeta (None for a file recording none); `schema`: the payload's
    "meta_schema" (None: written before it had a number, schema 1). A MetaError says what is wrong."""
    version = 1 if schema is None else schema
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MetaError(f"its meta_schema {schema!r} is not a schema version")
    if version > META_SCHEMA:
        raise MetaError(f"it was written by a newer branching (model-file schema {version}; this one reads up to "
                        f"{META_SCHEMA}); update branching (pip install -U neural-branching) to read it")
    if not isinstance(d, dict):
        raise MetaError(f"its meta is a {type(d).__name__}, not a dict")
    if not d:
        return None
    d = _upgrade(dict(d)) if version == 1 else dict(d)
    kind = d.get("kind")
    if kind not in _REQUIRED:
        raise MetaError(f"its meta records kind {kind!r}, not 'parent', 'branch' or 'selfeval'")
    missing = [k for k in _REQUIRED[kind] if k not in d]
    if missing:
        raise MetaError(f"its {kind} meta lacks {', '.join(missing)}")
    cls = JudgeMeta if kind == "selfeval" else NodeMeta
    known = {f.name for f in fields(cls)} - {"path"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise MetaError(f"its {kind} meta holds keys this schema (version {META_SCHEMA}) does not know: "
                        f"{', '.join(unknown)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise MetaError(f"its {kind} meta is malformed ({e})") from None


def _upgrade(d: dict) -> dict:
    """Schema 1 to 2: the temperature kept in "calibration" joins "acceptance" (a parent recorded no acceptance
    then: its recipe's threshold routed, 0.96 before recipes recorded one); a frozen parent's files get a key."""
    old = d.pop("calibration", None)
    if old is not None:
        threshold = ((d.get("recipe") or {}).get("parent") or {}).get("threshold", DEFAULT_THRESHOLD)
        acceptance = dict(d.get("acceptance") or {"rule": None, "threshold": threshold})
        acceptance.update(temperature=old.get("temperature", 1.0), calibrated=old.get("calibrated", False),
                          calibration={k: v for k, v in old.items() if k not in ("temperature", "calibrated")})
        d["acceptance"] = acceptance
    files = {k: d.pop(k) for k in _FILE_KEYS if k in d}
    if files:
        d["files"] = files
    return d
