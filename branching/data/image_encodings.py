"""A pretrained image parent's data (kind "pretrained"): the tree's images (CIFAR-100's files, or image folders
decoded at the network's input size) run once through its frozen trunk on the device, and every pooling of every
tap up to the deepest the tree reads kept in the encodings cache (branching.data.encodings): the test images, the
training images, and (with the parent's `mirrors = true`) the training images mirrored, so that training with
mirror images reads known vectors. A manifest records what they depend on: the network, the sha256 of its weights, the input size, the
poolings, the data (the files' sha256, or the image cache's manifest), torch's version and the kind of device.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import torch

from branching import distributed
from branching.console import log
from branching.data.cifar import Split
from branching.data.encodings import load_or_encode
from branching.data.image_cache import cache_root
from branching.models import trunks
from branching.models.device import CPU

VERSION = 1


def manifest(data, shape: dict, device: torch.device) -> dict:
    return {"version": VERSION, "model": shape["model"], "weights_sha256": shape["weights_sha256"],
            "input_size": shape["input_size"], "pools": list(trunks.IMAGE_POOLS), "resize": "bilinear-antialias",
            "data": data.fingerprint(), "rows": {"train": len(data.train.images), "test": len(data.test.images)},
            "torch": torch.__version__, "device": torch.device(device).type}


def encode_tree_data(config, data, device=CPU, progress: bool = True):
    """`data` (a TreeData of pixels) with its images replaced by their encodings to the parent's depth (the
    training split's mirror images in `mirrored`); encoded once, then read from the cache."""
    shape = config.parent.shape_dict
    wanted = manifest(data, shape, device)
    key = hashlib.sha256(f"{wanted['data']}|{shape['weights_sha256']}|{shape['input_size']}|{wanted['device']}"
                         .encode()).hexdigest()[:16]  # a CPU's and a GPU's encodings differ in their last bits
    where = cache_root() / f"encoded-{key}"
    found = load_or_encode(where, wanted, shape["depth"],
                           lambda allocate, depth, arrays: _encode(data, shape, depth, arrays, where, device, progress,
                                                                   allocate),
                           ("vectors", "mirrored") if shape["mirrors"] else ("vectors",))
    widths = trunks.tap_widths(shape["model"], shape["input_size"])
    columns = trunks.columns(shape["model"], shape["input_size"], shape["depth"])
    vectors = found.arrays["vectors"]
    mirrored = found.arrays["mirrored"][:, :columns] if shape["mirrors"] else None
    n = len(data.train.images)
    facts = {"model": shape["model"], "input_size": shape["input_size"], "taps": shape["depth"],
             "deepest": widths[shape["depth"] - 1][0], "encoded_now": found.encoded,
             "seconds": found.index.get("seconds")}
    return replace(data, train=Split(vectors[:n, :columns], data.train.fine_labels, data.train.filenames),
                   test=Split(vectors[n:, :columns], data.test.fine_labels, data.test.filenames),
                   mirrored=mirrored, encodings=facts,
                   raw_images={"train": data.train.images, "test": data.test.images},
                   _fingerprint={**data.fingerprint(), "encodings_sha256": found.manifest_sha256[:16]})


def _encode(data, shape: dict, depth: int, arrays: tuple, where, device, progress: bool, allocate) -> dict:
    """The test and training images (and, where `arrays` has "mirrored", the training images mirrored) to `depth`
    taps through the trunk into the arrays `allocate` gives (under torchrun each rank encodes its share of each);
    returns the index."""
    start = time.perf_counter()
    trunk = trunks.load_trunk(shape, device)
    columns = trunks.columns(shape["model"], shape["input_size"], depth)
    mirrors = "mirrored" in arrays
    train, test = data.train.images, data.test.images
    log(f"encoding {len(train) + len(test)} images" + (f" and the {len(train)} training images mirrored"
                                                        if mirrors else "")
        + f" with {shape['model']} on {device} (cached under {where.parent})")
    vectors = allocate("vectors", (len(train) + len(test), columns))
    jobs = [(train, vectors, False, "training images", 0), (test, vectors, False, "test images", len(train))]
    if mirrors:
        jobs.append((train, allocate("mirrored", (len(train), columns)), True, "mirrored training images", 0))
    for images, out, mirror, desc, offset in jobs:
        if distributed.sharding():
            out[offset:offset + len(images)] = distributed.over_shards(
                len(images), lambda rows: trunks.encode_images(trunk, images[rows], depth, mirror=mirror,
                                                               progress=progress, desc=desc))
        else:
            trunks.encode_images(trunk, images, depth, out[offset:offset + len(images)], mirror, progress, desc)
    return {"depth": depth, "seconds": time.perf_counter() - start}
