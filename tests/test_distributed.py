"""The commands under torchrun, as separate processes on this machine's CPU (gloo): the same figures with one
process as without torchrun, every test image counted once at two, rank 0 alone writing, the same figures
from two single-process nodes as from one two-process node, and the faults (a bad config, a killed rank)."""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reference import REPO_ROOT
from synthetic import make_synthetic

from branching import distributed
from branching.models.training import rank_steps, steps_per_epoch

CLASSES = ["beaver", "whale", "wolf", "sunflower", "forest"]
N_TEST = 11  # a class: 55 test images, odd, so two ranks cannot split them evenly
TREE = """
parent = { classes = ["beaver", "whale", "wolf", "sunflower", "forest"], hidden = [32, 16] }
branches.animals = { classes = ["beaver", "whale", "wolf"], layer = 1, hidden = [12] }
branches.plants = { classes = ["sunflower", "forest"], layer = 0, hidden = [5] }
branches.water = { from = "animals", classes = ["beaver", "whale"], layer = 0, hidden = [6] }
"""
CNN_TREE = """
parent = { classes = ["beaver", "whale", "wolf", "sunflower", "forest"], kind = "cnn", widths = [4, 8], depth = 1 }
branches.animals = { classes = ["beaver", "whale", "wolf"], layer = 1, hidden = [12] }
branches.plants = { classes = ["sunflower", "forest"], layer = 0, hidden = [5] }
"""
LIMIT_S = 120


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    data = make_synthetic(folder / "c100", CLASSES, n_train=40, n_test=N_TEST)
    (folder / "tree.toml").write_text(TREE)
    return folder, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "BRANCHING_DIST_TIMEOUT": "60"}


def torchrun(*launch, command, timeout=LIMIT_S, **kwargs):
    """`python -m torch.distributed.run LAUNCH -m branching COMMAND` (torchrun), waited for."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch, "-m", "branching", *command],
                          capture_output=True, text=True, timeout=timeout, env=environment(), **kwargs)


def run_args(folder, data, out, *extra):
    return ["run", "--config", str(folder / "tree.toml"), "--data", str(data), "--no-download", "--out", str(out),
            "--max-epochs", "3", "--device", "cpu", "--no-report", "--quiet", *extra]


def figures(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    nodes = {"parent": metrics["parent"], **metrics["branches"], "tree": metrics["tree"]}
    return {name: (m["test_accuracy"], m["test_samples"], m.get("test_coverage")) for name, m in nodes.items()}


def predictions(out: Path, name: str) -> list[dict]:
    with open(out / "predictions" / f"{name}.csv") as f:
        return list(csv.DictReader(f))


def test_shards_cover_every_row_once_in_order(monkeypatch):
    monkeypatch.setattr(distributed, "sharding", lambda: True)
    for world in (1, 2, 3, 4):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for n in (0, 1, 2, 5, 55, 101):
            shares = []
            for rank in range(world):
                monkeypatch.setenv("RANK", str(rank))
                shares.append(distributed.shard(n))
            rows = [i for s in shares for i in range(n)[s]]
            assert rows == list(range(n))
            assert max(len(range(n)[s]) for s in shares) - min(len(range(n)[s]) for s in shares) <= 1


def test_every_rank_takes_equal_steps_covering_every_row(monkeypatch):
    for n, batch, world in ((55, 16, 2), (7, 4, 3), (2, 8, 5), (1, 3, 4), (128, 128, 2), (10, 3, 1)):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
        ranks = [list(rank_steps(order, batch, rank, world)) for rank in range(world)]
        assert len({len(steps) for steps in ranks}) == 1 == len({steps_per_epoch(n, batch, world), len(ranks[0])})
        for step in zip(*ranks):  # the same rows a rank at each step, none empty
            assert len({len(part) for part in step}) == 1 and len(step[0]) > 0
        seen = torch.cat([part for steps in ranks for part in steps])
        assert set(seen.tolist()) == set(range(n)) and len(seen) == -(-n // world) * world  # padded, no row lost
    order = torch.randperm(30)
    assert [p.tolist() for p in rank_steps(order, 8)] == [p.tolist() for p in order.split(8)]  # one process: plain


def test_one_process_under_torchrun_gives_the_plain_figures(tree, tmp_path):
    folder, data = tree
    plain = subprocess.run([sys.executable, "-m", "branching", *run_args(folder, data, tmp_path / "plain")],
                           capture_output=True, text=True, timeout=LIMIT_S, env=environment())
    assert plain.returncode == 0, plain.stderr[-2000:]
    one = torchrun("--standalone", "--nproc-per-node", "1", command=run_args(folder, data, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert figures(tmp_path / "one") == figures(tmp_path / "plain")
    for name in ("parent", "animals", "plants", "water"):
        assert predictions(tmp_path / "one", name) == predictions(tmp_path / "plain", name)


def test_two_processes_count_every_test_image_once_and_only_rank_0_writes(tree, tmp_path):
    folder, data = tree
    plain = subprocess.run([sys.executable, "-m", "branching", *run_args(folder, data, tmp_path / "plain")],
                           capture_output=True, text=True, timeout=LIMIT_S, env=environment())
    assert plain.returncode == 0, plain.stderr[-2000:]
    runs = []
    for attempt in ("a", "b"):
        result = torchrun("--standalone", "--nproc-per-node", "2",
                          command=run_args(folder, data, tmp_path / attempt), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(result)
    assert figures(tmp_path / "a") == figures(tmp_path / "b")  # the same seed and world size: the same figures
    assert figures(tmp_path / "a")["parent"][1] == len(CLASSES) * N_TEST
    for name, spec_classes in (("parent", CLASSES), ("plants", ["sunflower", "forest"])):
        mine, reference = predictions(tmp_path / "a", name), predictions(tmp_path / "plain", name)
        assert len(mine) == len(spec_classes) * N_TEST
        assert sorted(row["index"] for row in mine) == sorted(row["index"] for row in reference)  # each once
    assert runs[0].stdout.count("wrote ") == 1 and runs[0].stderr.count("training 4 nodes") == 1  # rank 0 speaks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "plain"]  # nothing else written beside OUT
    # predict --data at two processes: each rank routes its share, rank 0 writes every answer once
    command = ["predict", "--models", str(tmp_path / "a"), "--data", str(data), "--split", "test", "--device", "cpu"]
    shared = torchrun("--standalone", "--nproc-per-node", "2", command=[*command, "--out", str(tmp_path / "two.csv")])
    alone = subprocess.run([sys.executable, "-m", "branching", *command, "--out", str(tmp_path / "one.csv")],
                           capture_output=True, text=True, timeout=LIMIT_S, env=environment())
    assert shared.returncode == 0 == alone.returncode, shared.stderr[-2000:] + alone.stderr[-2000:]
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert len((tmp_path / "two.csv").read_text().splitlines()) == 1 + len(CLASSES) * N_TEST


def test_two_single_process_nodes_give_the_figures_of_one_two_process_node(tree, tmp_path):
    folder, data = tree
    together = torchrun("--standalone", "--nproc-per-node", "2", command=run_args(folder, data, tmp_path / "together"))
    assert together.returncode == 0, together.stderr[-2000:]
    endpoint = f"127.0.0.1:{free_port()}"  # both "machines" write to the same --out; whichever holds rank 0 does
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "two-nodes", "-m", "branching", *run_args(folder, data, tmp_path / "nodes")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=LIMIT_S) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert figures(tmp_path / "nodes") == figures(tmp_path / "together")
    assert sum(stdout.count("wrote ") for stdout, _ in outputs) == 1


def test_a_cnn_parent_is_the_same_model_on_every_rank(tree, tmp_path):
    """Batch norm's running statistics are rank 0's everywhere: a branch trained on rank 1 reads the parent that
    rank 0 saved, so the models load and predict together."""
    folder, data = tree
    (tmp_path / "tree.toml").write_text(CNN_TREE)
    result = torchrun("--standalone", "--nproc-per-node", "2", command=run_args(tmp_path, data, tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = subprocess.run([sys.executable, "-m", "branching", "predict", "--models", str(tmp_path / "out"),
                                "--data", str(data), "--split", "test"], capture_output=True, text=True,
                               timeout=LIMIT_S, env=environment())
    assert predicted.returncode == 0, predicted.stderr[-2000:]  # lineage: every branch's parent is the saved one
    assert f"{len(CLASSES) * N_TEST} images of the tree's classes" in predicted.stderr


def test_a_bad_config_is_reported_once_and_every_rank_exits_2(tree, tmp_path):
    folder, data = tree
    (tmp_path / "bad.toml").write_text(TREE.replace("hidden = [5]", "hiden = [5]"))
    command = ["run", "--config", str(tmp_path / "bad.toml"), "--data", str(data), "--no-download",
               "--out", str(tmp_path / "out"), "--device", "cpu"]
    result = torchrun("--standalone", "--nproc-per-node", "2", command=command)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hiden" in errors[0]
    # each rank on its own (as torchrun starts them, without its agent, which stops the others once one exits)
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-m", "branching", *command], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**environment(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in (0, 1)]
    outputs = [rank.communicate(timeout=LIMIT_S) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [2, 2]
    assert outputs[0][1].startswith("error:") and "hiden" in outputs[0][1] and outputs[1] == ("", "")
    assert not (tmp_path / "out").exists()


def test_a_killed_rank_ends_the_job_soon_and_leaves_out_as_it_was(tree, tmp_path):
    folder, data = tree
    big = TREE.replace("hidden = [32, 16]", "hidden = [1024, 512]")
    (tmp_path / "big.toml").write_text(big)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"an": "earlier run"}')  # OUT holds an earlier run's output
    command = ["run", "--config", str(tmp_path / "big.toml"), "--data", str(data), "--no-download", "--out", str(out),
               "--recipe", "original", "--device", "cpu", "--no-report"]
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "branching", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=environment(), start_new_session=True)
    try:
        deadline = time.monotonic() + LIMIT_S
        while not list(out.parent.glob(".out.*.new")) and time.monotonic() < deadline:  # rank 0 has staged OUT
            time.sleep(0.2)
        time.sleep(3)  # into the parent's training
        assert job.poll() is None, "the run ended before a rank could be killed"
        rank1 = [pid for pid in worker_pids(job.pid) if environ_of(pid).get("RANK") == "1"]
        assert rank1, "no rank 1 worker found"
        killed = time.monotonic()
        os.kill(rank1[0], signal.SIGKILL)
        job.communicate(timeout=LIMIT_S)
        assert job.returncode != 0
        assert time.monotonic() - killed < 60
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert json.loads((out / "metrics.json").read_text()) == {"an": "earlier run"}
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def worker_pids(root: int) -> list[int]:
    """Every process below `root`."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        pending += [int(c) for c in children]
    return found


def environ_of(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
