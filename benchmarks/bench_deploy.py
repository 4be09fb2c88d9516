"""A trained tree out of the command line, measured (docs/deploy.md): the Python API, the exported ONNX graph and
the server give the same answers, at what speed, and the server under load.

    python benchmarks/bench_deploy.py same  --models runs/pretrained --data ../shared/data/cifar100-6
    python benchmarks/bench_deploy.py speed --models runs/pretrained --data ../shared/data/cifar100-6
    python benchmarks/bench_deploy.py load  --models runs/pretrained --data ../shared/data/cifar100-6 --seconds 60
    python benchmarks/bench_deploy.py same  --models runs/rt-tree --data runs/rt        # a text parent's tree

A text tree's inputs are its test split's texts (predict reads them one a line from --texts, the server as JSON
{"texts": [one]}) where an image tree's are PNG files.

same: every test image of the split, written as a PNG file: `branching predict` on the folder against
branching.load(RUN) on the files (class, score, acceptance, path: equal); the exported graph under onnxruntime
against PyTorch (class and acceptance equal, the largest probability difference); the server over loopback
against the API (equal).

speed: images per second at batch sizes 1, 32 and 256 on the split's first images, already decoded and resized
(what the tree itself costs): PyTorch eager (Tree.encode + forward) and onnxruntime (the exported graph), each
the median of --repeats runs, alternating; and the server over loopback with that many concurrent clients, each
sending one PNG a request (decoding included).

load: --clients concurrent clients (default 50) send PNGs to `branching serve` (a process of its own) for
--seconds; the failed requests, the requests answered, and the server's resident memory at the start, its
peak and at the end. Half way, --quitters clients give up on their requests after 10 ms.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import branching  # noqa: E402
from branching.api.export import export  # noqa: E402
from branching.api.serve import in_thread  # noqa: E402


def test_inputs(tree, data: str, limit: int | None = None) -> tuple[list[bytes], object, str]:
    """The test split as request bodies (PNG files' bytes, or JSON of one text each), as the tree reads it (pixels
    decoded and resized, or the texts), and the bodies' content type."""
    if tree.reads == "texts":
        from branching.data.texts import read_folder
        texts = list(read_folder(data).splits["test"].texts[:limit])
        return [json.dumps({"texts": [t]}).encode() for t in texts], texts, "application/json"
    from PIL import Image

    from branching.data.cifar import load_split
    images = load_split(data, "test").images[:limit]
    pngs = []
    for row in images:
        buffer = io.BytesIO()
        Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs, tree.read(pngs).vectors, "image/png"


def cmd_same(args) -> None:
    tree = branching.load(args.models, "cpu")
    bodies, inputs, content_type = test_inputs(tree, args.data)
    with tempfile.TemporaryDirectory() as folder:
        if tree.reads == "texts":  # one a line, for predict --texts
            files = [Path(folder, "texts.txt")]
            files[0].write_text("\n".join(" ".join(t.split()) for t in inputs) + "\n")
            given, asked = ["--texts", str(files[0])], [" ".join(t.split()) for t in inputs]
        else:
            for i, png in enumerate(bodies):
                Path(folder, f"{i:04d}.png").write_bytes(png)
            given, asked = [folder], sorted(Path(folder).glob("*.png"))
        out = Path(folder) / "predict.json"
        done = subprocess.run([sys.executable, "-m", "branching", "predict", "--models", args.models, *given, "--out",
                               str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        rows = json.loads(out.read_text())["predictions"]
        answers = tree(asked)
        same = sum((r["predicted_class"], r["confidence"], bool(r["accepted"]), r["path"]) ==
                   (a.guess, a.score, a.accepted, " > ".join(a.path)) for r, a in zip(rows, answers))
        print(f"API against branching predict: {same} of {len(rows)} {tree.reads} answered alike (class, score, "
              f"acceptance, path)")
        graph_file = Path(folder) / "tree.onnx"
        checked = export(tree, graph_file)
        graph = branching.load(graph_file)
        ours, theirs = tree(inputs), graph(inputs)
        alike = sum((a.guess, a.accepted, a.path) == (b.guess, b.accepted, b.path) for a, b in zip(ours, theirs))
        difference = float(np.nanmax(np.abs(tree.predict_proba(inputs) - graph.predict_proba(inputs))))
        print(f"ONNX graph against PyTorch: {alike} of {len(ours)} {tree.reads} alike (class, acceptance, path); largest "
              f"probability difference {difference:.1e} (export's own check: {checked.difference:.1e}, PyTorch "
              f"against itself between batch sizes {checked.own:.1e})")
    with in_thread(tree) as url, ThreadPoolExecutor(16) as pool:
        replies = [r.json() for r in pool.map(Clients(url, content_type=content_type).post, bodies)]
    api, got = tree(inputs), [r["answers"][0] for r in replies]
    served = sum((g["guess"], g["accepted"], tuple(g["path"]), g["node"]) == (a.guess, a.accepted, a.path, a.node)
                 for g, a in zip(got, api))
    difference = max(abs(g["score"] - a.score) for g, a in zip(got, api))
    print(f"server (16 concurrent clients) against the API: {served} of {len(api)} {tree.reads} alike (class, "
          f"acceptance, path, node); largest score difference {difference:.1e} (the batches differ: float rounding)")


class Clients:
    """One kept-alive HTTP client per thread, posting bodies to a server's /predict."""

    def __init__(self, url: str, timeout: float = 300, content_type: str = "image/png"):
        self.url, self.timeout, self.local, self.content_type = url, timeout, threading.local(), content_type

    def post(self, body: bytes):
        import httpx
        if not hasattr(self.local, "client"):
            self.local.client = httpx.Client(timeout=self.timeout)
        return self.local.client.post(f"{self.url}/predict", content=body, headers={"Content-Type": self.content_type})


def rate(run, n: int) -> float:
    start = time.perf_counter()
    run()
    return n / (time.perf_counter() - start)


def cmd_speed(args) -> None:
    tree = branching.load(args.models, "cpu")
    pngs, pixels, content_type = test_inputs(tree, args.data, max(args.sizes) * 2)
    with tempfile.TemporaryDirectory() as folder:
        export(tree, Path(folder) / "tree.onnx")
        graph = branching.load(Path(folder) / "tree.onnx")
        print(f"{tree!r}; {tree.reads}/s (median of {args.repeats}), {os.cpu_count()} CPUs, torch threads "
              f"{__import__('torch').get_num_threads()}")
        print(f"{'batch':>6} {'eager':>9} {'onnxruntime':>12} {'ratio':>6} {'server':>9}")
        for size in args.sizes:
            n = min(len(pixels), max(size, 4 * size if size > 1 else 64))  # what the figures count is what ran
            batch = pixels[:n]
            ways = {"eager": lambda: [tree.forward(tree.encode(batch[i:i + size]), size) for i in range(0, n, size)],
                    "onnx": lambda: [graph.forward(batch[i:i + size], size) for i in range(0, n, size)]}
            for run in ways.values():
                run()  # warm
            rates = {k: [] for k in ways}
            for _ in range(args.repeats):
                for k, run in ways.items():
                    rates[k].append(rate(run, n))
            with in_thread(tree, max_batch=size) as url, ThreadPoolExecutor(size) as pool:
                clients = Clients(url, content_type=content_type)
                list(pool.map(clients.post, pngs[:size]))  # warm: every client connected
                served = rate(lambda: list(pool.map(clients.post, pngs[:n])), n)
            eager, onnx = statistics.median(rates["eager"]), statistics.median(rates["onnx"])
            print(f"{size:>6} {eager:>9.1f} {onnx:>12.1f} {onnx / eager:>6.2f} {served:>9.1f}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cmd_load(args) -> None:
    import httpx
    tree = branching.load(args.models, "cpu")
    pngs, _, content_type = test_inputs(tree, args.data, 200)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile()  # the server's messages (a pipe nobody read would stall it once full)
    server = subprocess.Popen([sys.executable, "-m", "branching", "serve", "--models", args.models, "--port", str(port),
                               "--device", "cpu"], stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            log.seek(0)
            raise SystemExit(f"the server did not start: {log.read().decode(errors='replace')[-500:]}")
        httpx.post(f"{url}/predict", content=pngs[0], headers={"Content-Type": content_type}, timeout=60)
        start_rss, peak = rss_mb(server.pid), [rss_mb(server.pid)]
        stop, counts, lock = time.monotonic() + args.seconds, {"ok": 0, "failed": 0, "gave up": 0}, threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(timeout=120) as c:
                i = k
                while time.monotonic() < stop:
                    try:
                        status = c.post(f"{url}/predict", content=pngs[i % len(pngs)],
                                        headers={"Content-Type": content_type}).status_code
                        key = "ok" if status == 200 else "failed"
                    except httpx.HTTPError:
                        key = "failed"
                    with lock:
                        counts[key] += 1
                    i += args.clients

        def quitter() -> None:
            time.sleep(args.seconds / 2)
            for png in pngs[:args.quitters]:
                try:
                    httpx.post(f"{url}/predict", content=png, headers={"Content-Type": content_type}, timeout=0.01)
                except httpx.TimeoutException:
                    with lock:
                        counts["gave up"] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        threads.append(threading.Thread(target=quitter))
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak.append(rss_mb(server.pid))
            time.sleep(0.5)
        end_rss = rss_mb(server.pid)
        health = httpx.get(f"{url}/health").json()
        print(f"{args.clients} clients for {args.seconds} s: {counts['ok']} answered ({counts['ok'] / args.seconds:.1f}/s), "
              f"{counts['failed']} failed, {counts['gave up']} clients gave up after 10 ms; server memory {start_rss:.0f} MB "
              f"at the start, {max(peak):.0f} MB at the peak, {end_rss:.0f} MB at the end; "
              f"{health['answered']} inputs answered in {health['batches']} batches, {health['pending']} pending")
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("same", "speed", "load"):
        p = sub.add_parser(name)
        p.add_argument("--models", required=True, help="a run's folder")
        p.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "cifar100-6"))
    sub.choices["speed"].add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32, 256])
    sub.choices["speed"].add_argument("--repeats", type=int, default=3)
    sub.choices["load"].add_argument("--clients", type=int, default=50)
    sub.choices["load"].add_argument("--seconds", type=float, default=60)
    sub.choices["load"].add_argument("--quitters", type=int, default=20)
    args = parser.parse_args()
    {"same": cmd_same, "speed": cmd_speed, "load": cmd_load}[args.command](args)


if __name__ == "__main__":
    main()
