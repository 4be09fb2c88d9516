"""A pretrained transformer on texts (kind = "text"): all-MiniLM-L6-v2 or any BERT-like encoder found on this
machine (branching.models.encoder), frozen; every text is encoded once into every pooling (mean, cls, max,
last over the attention mask) of its embeddings and of each layer up to the deepest the tree reads."""

from __future__ import annotations

import numpy as np
import torch

from branching.models import encoder
from branching.models.kinds.base import register_kind
from branching.models.kinds.encoded import HEAD_KEYS, EncodedKind
from branching.models.text import DEFAULT_MAX_LENGTH, MAX_LENGTHS, TEXT_POOLS, tap_names

TRUNK_KEYS = ("model", "files_sha256", "max_length", "width", "layers")  # then the head's (HEAD_KEYS)


@register_kind
class Text(EncodedKind):
    name = "text"
    reads = "texts"
    config_keys = encoder.CONFIG_KEYS
    wheres = TEXT_POOLS
    default_pool = "mean"
    last_probe = "sentence_embedding"
    compare_methods = ("finetune_layer",)

    def tap_widths(self, shape: dict) -> list[tuple[str, int]]:
        return [(name, shape["width"]) for name in tap_names(shape["layers"])]

    def check_shape(self, shape: dict) -> dict:
        if not isinstance(shape, dict) or set(shape) - {*TRUNK_KEYS, *HEAD_KEYS}:
            unknown = sorted(set(shape) - {*TRUNK_KEYS, *HEAD_KEYS}) if isinstance(shape, dict) else shape
            raise ValueError(f"unknown text parent keys {unknown}; a text parent records "
                             f"{', '.join((*TRUNK_KEYS, *HEAD_KEYS))}")
        out = {"model": shape.get("model"), "files_sha256": shape.get("files_sha256", ""),
               "max_length": shape.get("max_length", DEFAULT_MAX_LENGTH), "width": shape.get("width"),
               "layers": shape.get("layers")}
        if not isinstance(out["model"], str) or not out["model"]:
            raise ValueError("a text parent needs model: an installed package that ships a model, or a local folder")
        for key, low in (("width", 1), ("layers", 1), ("max_length", MAX_LENGTHS[0])):
            if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < low:
                raise ValueError(f"text parent {key} must be an integer >= {low}; got {out[key]!r}")
        return self.check_head(shape, out)

    def files(self, shape: dict) -> str:
        return f"the files of model {shape['model']!r}"

    def encode_to(self, shape: dict, inputs, device, depth: int, progress: bool):
        found = encoder.cached(shape["model"], shape["max_length"], device)
        return found.encode(list(inputs), depth, progress=progress)[0]

    def export_encoder(self, shape: dict, depth: int):
        depth = max(1, min(depth, shape["depth"]))  # as encode runs it
        found = encoder.cached(shape["model"], shape["max_length"], torch.device("cpu"))
        return encoder.Exported(found, depth, self.input_width(shape))

    def describe(self, shape: dict) -> str:
        return f"the transformer {shape['model']}"

    def tap_costs(self, shape: dict, texts, device=None) -> np.ndarray:
        """The transformer's FLOPs to each tap (embeddings, layer0, ...) for each text, (N, taps), at its own number
        of tokens L: torch's count of a layer at 8 and 16 tokens, its term in L^2 at least attention's 2 x 2 x width
        (the counter leaves out a fused attention)."""
        found = encoder.cached(shape["model"], shape["max_length"], device or torch.device("cpu"))
        lengths = np.array([len(ids) for ids in found.tokenize(list(texts))[0]], np.float64)
        (embeddings, c8), (_, c16) = found.layer_flops(8), found.layer_flops(16)
        square = max((c16 - 2 * c8) / 128, 4 * found.width)
        per_layer = lengths * (c8 - 64 * max((c16 - 2 * c8) / 128, 0)) / 8 + square * lengths ** 2
        return embeddings / 8 * lengths[:, None] + per_layer[:, None] * np.arange(found.n_layers + 1)[None, :]

    def parse(self, table, classes, image_size, hidden=(), activation="relu") -> dict:
        return {**encoder.parse_keys(table, bool(classes)), "hidden": list(hidden), "activation": activation}

    def config_dict(self, shape, classes, hidden) -> dict:
        d = {"classes": list(classes)} if shape["head"] else {}
        return {**d, "kind": self.name, "model": shape["model"], "max_length": shape["max_length"],
                **self.head_config(shape, hidden)}
