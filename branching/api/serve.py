"""`branching serve`: a trained tree behind HTTP (FastAPI on uvicorn), answering as branching.load does.

    GET  /          a small page: drop an image (or type a text) and see its path through the tree
    GET  /health    {"status": "ok", "reads", "classes", "nodes", "cascade" (a tree with early exits: its exits,
                    threshold and rule; else null), "pending", "answered", "batches"}
    POST /predict   one image file as the body (Content-Type image/* or application/octet-stream), or texts as
                    JSON {"texts": [...]} for a text parent's tree; answers {"answers": [{"label", "score",
                    "accepted", "guess", "node", "path", "rejected_at", "rejected_score"}]}, one per input

Concurrent requests are batched: each request's inputs are read (decoded) on its own, then a single worker
takes what is queued, up to `max_batch` inputs or `max_wait` seconds after the first, runs them through the
tree together in one thread, and hands each request its answers. A request whose client went away is
answered with the others and dropped. Bad bodies get a 4xx with {"error": one line}: 413 past `max_bytes`,
415 for a body that is not an image (or not texts), 400 for an image that cannot be decoded; 503 while
`max_pending` requests are in progress or inputs wait; 500 with one line if answering failed.
"""

import asyncio  # no `from __future__ import annotations`: FastAPI reads the handlers' annotations as classes
import contextlib
import errno
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from branching.api.tree import Answer, Prepared, Tree
from branching.errors import BranchingError, ConfigError, DataError, MissingPackageError

MAX_BYTES = 20 * 2**20
MAX_TEXTS = 256  # texts in one request
MAX_TEXT_CHARS = 100_000  # characters in one text


class Batcher:
    """Prepared inputs of concurrent requests, answered together (see the module docstring)."""

    def __init__(self, tree: Tree, max_batch: int = 64, max_wait: float = 0.005, max_pending: int = 1024):
        self.tree, self.max_batch, self.max_wait, self.max_pending = tree, max_batch, max_wait, max_pending
        self.queue: asyncio.Queue | None = None
        self.pending = self.answered = self.batches = self.requests = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="branching-batch")  # one batch at a time, off the loop

    async def answer(self, prepared: Prepared) -> list:
        n = len(prepared.readable)
        if self.pending + n > self.max_pending:
            raise Busy(f"{self.pending} inputs are waiting (the limit is {self.max_pending}); try again shortly")
        future = asyncio.get_running_loop().create_future()
        self.pending += n
        await self.queue.put((prepared, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            rows = len(items[0][0].readable)
            deadline = loop.time() + self.max_wait
            while rows < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                rows += len(items[-1][0].readable)
            try:
                answers = await loop.run_in_executor(self.pool, self._answer, [p for p, _ in items])
            except Exception as e:  # noqa: BLE001 - one bad batch fails its requests, never the server
                for _, future in items:
                    if not future.done():
                        future.set_exception(e)
            else:
                for (_, future), part in zip(items, answers):
                    if not future.done():  # a client that went away: its answers are dropped
                        future.set_result(part)
            finally:
                self.pending -= rows
                self.answered += rows
                self.batches += 1

    def _answer(self, parts: list[Prepared]) -> list[list]:
        tree = self.tree
        raw = (sum((list(p.vectors) for p in parts), []) if tree.reads == "texts"
               else np.concatenate([p.vectors for p in parts]))
        together = Prepared([p.names[i] for p in parts for i in p.readable], tree.encode(raw), list(range(len(raw))),
                            {})
        answers = iter(tree.postprocess(together, tree.forward(together)))
        return [[Answer.unreadable(p.errors[i]) if i in p.errors else next(answers) for i in range(len(p.names))]
                for p in parts]


class Busy(Exception):
    """Too many inputs are waiting."""


def create_app(tree: Tree, max_batch: int = 64, max_wait: float = 0.005, max_bytes: int = MAX_BYTES,
               max_pending: int = 1024):
    """The FastAPI application serving `tree`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.requests import ClientDisconnect

    batcher = Batcher(tree, max_batch, max_wait, max_pending)

    @asynccontextmanager
    async def lifespan(app):
        batcher.queue = asyncio.Queue()
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        batcher.pool.shutdown(wait=False)

    app = FastAPI(title="Neural Branching", lifespan=lifespan)

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(message.split())}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "reads": tree.reads, "classes": list(tree.classes), "nodes": list(tree.nodes),
                "cascade": tree.cascade, "pending": batcher.pending, "answered": batcher.answered, "batches": batcher.batches}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    @app.post("/predict")
    async def predict(request: Request):
        if batcher.requests >= max_pending:  # reading and decoding count too: memory stays bounded
            return refuse(503, f"{batcher.requests} requests are in progress (the limit is {max_pending}); try again "
                               f"shortly")
        batcher.requests += 1
        try:
            return await answer(request)
        except ClientDisconnect:  # the client went away: nobody to answer
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - one line for the client, whatever failed; the server goes on
            return refuse(400 if isinstance(e, BranchingError) else 500, f"{type(e).__name__}: {e}")
        finally:
            batcher.requests -= 1

    async def answer(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return refuse(413, f"the body is {int(declared):,} bytes, more than the limit of {max_bytes:,}")
        body = bytearray()
        async for chunk in request.stream():  # read no more than the limit, whatever the header said
            body += chunk
            if len(body) > max_bytes:
                return refuse(413, f"the body is more than the limit of {max_bytes:,} bytes")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            inputs = read_body(tree, kind, bytes(body))
            prepared = await asyncio.get_running_loop().run_in_executor(None, tree.read, inputs)
        except Unsupported as e:
            return refuse(415, str(e))
        except DataError as e:
            return refuse(400, str(e))
        if prepared.errors and not prepared.readable:  # nothing to answer; else the others are (their error said)
            return refuse(400, next(iter(prepared.errors.values())))
        try:
            answers = await batcher.answer(prepared)
        except Busy as e:
            return refuse(503, str(e))
        return {"answers": [a.as_dict() for a in answers]}

    return app


class Unsupported(Exception):
    """A body of a type this tree cannot read."""


def read_body(tree: Tree, content_type: str, body: bytes) -> list:
    """The inputs of a request's body: [image bytes] for an image tree, the texts for a text tree."""
    if not body:
        raise DataError("an empty body; send an image file" if tree.reads == "images" else
                        'an empty body; send JSON {"texts": ["..."]}')
    if content_type.startswith("multipart/"):
        raise Unsupported("a form upload; send the file itself as the body (curl --data-binary @photo.jpg -H "
                          "'Content-Type: image/jpeg' URL/predict)" if tree.reads == "images" else
                          "a form upload; send JSON as the body (curl --json '{\"texts\": [\"...\"]}' URL/predict)")
    if tree.reads == "images":
        if content_type.startswith("text/") or content_type == "application/json":
            raise Unsupported(f"the body is {content_type}, and this tree reads images; send an image file as the body "
                              f"(Content-Type image/* or application/octet-stream)")
        return [body]
    if content_type == "text/plain":
        texts = [body.decode("utf-8", "replace")]
        if len(texts[0]) > MAX_TEXT_CHARS:
            raise DataError(f"a text of {len(texts[0]):,} characters, more than the limit of {MAX_TEXT_CHARS:,} (the "
                            f"model reads its first tokens only); send a shorter one")
        return texts
    if content_type != "application/json":
        raise Unsupported(f"the body is {content_type or 'untyped'}, and this tree reads texts; send JSON "
                          f'{{"texts": ["..."]}} or one text as text/plain')
    try:
        texts = json.loads(body)
    except ValueError:
        raise DataError('the body is not valid JSON; send {"texts": ["...", ...]}') from None
    texts = texts.get("texts") if isinstance(texts, dict) else None
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise DataError('send JSON {"texts": ["...", ...]}: a list of strings')
    if len(texts) > MAX_TEXTS:
        raise DataError(f"{len(texts)} texts in one request, more than the limit of {MAX_TEXTS}; send fewer")
    if max(map(len, texts)) > MAX_TEXT_CHARS:
        raise DataError(f"a text of {max(map(len, texts)):,} characters, more than the limit of {MAX_TEXT_CHARS:,} "
                        f"(the model reads its first tokens only); send a shorter one")
    return texts


def check_port(host: str, port: int) -> None:
    """A one-line error, before the tree is loaded, when the port cannot be taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use; pass another --port, or stop what holds it") from None
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --host or --port") from None


@contextlib.contextmanager
def in_thread(tree: Tree, **options):
    """The server on a free loopback port in a background thread, for tests and benchmarks: yields its URL."""
    import uvicorn
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(tree, **options), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server stopped while starting")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


def serve(tree: Tree, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """Serve `tree` until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise MissingPackageError("uvicorn is not installed; pip install fastapi uvicorn (branching serve needs "
                                  "them)") from None
    uvicorn.run(create_app(tree, **options), host=host, port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Neural Branching</title>
<style>body{font:16px system-ui,sans-serif;max-width:42em;margin:2em auto;padding:0 1em}
#drop{border:2px dashed #888;padding:2em;text-align:center;border-radius:8px}
#drop.over{background:#eef}textarea{width:100%}img{max-width:12em;display:block;margin:1em auto}
#answer{margin-top:1em;font-size:1.2em}.no{color:#a50}.yes{color:#070}</style></head>
<body><h1>Neural Branching</h1><p id="about">Loading the tree...</p>
<div id="images" hidden><div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<img id="preview" alt="" hidden></div>
<div id="texts" hidden><textarea id="text" rows="4" placeholder="Type a text"></textarea>
<button id="send">Classify</button></div>
<div id="answer" aria-live="polite"></div>
<script>
const $ = id => document.getElementById(id);
function show(answer) {  // textContent only: labels and names are data, never markup
  const box = $("answer"); box.textContent = "";
  const line = document.createElement("div");
  line.className = answer.accepted ? "yes" : "no";
  line.textContent = answer.accepted ? `${answer.label} (score ${answer.score.toFixed(4)})`
    : `uncertain: best guess ${answer.guess} (score ${answer.score.toFixed(4)})`;
  const path = document.createElement("div");
  path.textContent = "path: " + answer.path.join(" > ");
  box.append(line, path);
}
async function ask(body, type) {
  $("answer").textContent = "...";
  let r, data;
  try {
    r = await fetch("predict", {method: "POST", headers: {"Content-Type": type}, body});
    data = await r.json();
  } catch (e) { $("answer").textContent = "error: no answer from the server (" + e + ")"; return; }
  if (!r.ok) { $("answer").textContent = "error: " + data.error; return; }
  show(data.answers[0]);
}
function send(file) {
  $("preview").src = URL.createObjectURL(file); $("preview").hidden = false;
  ask(file, file.type || "application/octet-stream");
}
fetch("health").then(r => r.json()).then(h => {
  $("about").textContent = `A tree of ${h.nodes.length} nodes over ${h.classes.length} classes: ${h.classes.join(", ")}.`;
  $(h.reads).hidden = false;
});
$("file").onchange = e => e.target.files.length && send(e.target.files[0]);
const drop = $("drop");
drop.ondragover = e => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = e => { e.preventDefault(); drop.classList.remove("over"); e.dataTransfer.files.length && send(e.dataTransfer.files[0]); };
$("send").onclick = () => ask(JSON.stringify({texts: [$("text").value]}), "application/json");
</script></body></html>
"""
