"""`branching serve`: over loopback, answers equal the Python API's, concurrent requests are batched, bad bodies get
a 4xx with one line and harm nothing, a client that goes away mid-request harms no other, a port in use is one
line, and the page treats the tree's names as text."""

import io
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import branching
from branching.api.serve import in_thread
from branching.cli import main as cli
from branching.data.cifar import load_split

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_tree_file, small_data_dir):
    """The small tree (three epochs a node) behind a server on a free port, and PNG files of its test split."""
    out = tmp_path_factory.mktemp("serve") / "out"
    tree = branching.fit(small_tree_file, small_data_dir, out, max_epochs=3, device="cpu", progress=False, report=False)
    pngs = []
    for row in load_split(small_data_dir, "test").images[:40]:
        buffer = io.BytesIO()
        Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    with in_thread(tree, max_batch=16, max_wait=0.05, max_bytes=100_000) as url:
        yield tree, url, pngs


def post(url, body, content_type="image/png"):
    return httpx.post(f"{url}/predict", content=body, headers={"Content-Type": content_type}, timeout=30)


def test_concurrent_requests_are_batched_and_answered_as_the_api_does(served):
    tree, url, pngs = served
    before = httpx.get(f"{url}/health").json()
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda png: post(url, png), pngs))
    assert all(r.status_code == 200 for r in replies)
    expected = tree(pngs)
    for reply, answer in zip(replies, expected):
        (got,) = reply.json()["answers"]
        assert (got["label"], got["guess"], got["accepted"], got["node"], tuple(got["path"])) == (
            answer.label, answer.guess, answer.accepted, answer.node, answer.path)
        assert got["score"] == pytest.approx(answer.score, abs=1e-5)  # batched otherwise: float rounding
    after = httpx.get(f"{url}/health").json()
    assert after["answered"] - before["answered"] == len(pngs)
    assert after["batches"] - before["batches"] < len(pngs)  # some requests shared a batch


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"x" * 100_001, "image/png", 413, "more than the limit of 100,000"),
    (b"not an image", "image/png", 400, "not an image (Pillow cannot identify it)"),
    (b"", "image/png", 400, "an empty body; send an image file"),
    (b'{"texts": ["a film"]}', "application/json", 415, "this tree reads images"),
])
def test_a_bad_body_gets_a_4xx_with_one_line_and_the_server_goes_on(served, body, content_type, status, message):
    _, url, pngs = served
    reply = post(url, body, content_type)
    assert reply.status_code == status and message in reply.json()["error"]
    assert "\n" not in reply.json()["error"]
    assert post(url, pngs[0]).status_code == 200


def test_a_body_larger_than_its_header_says_is_cut_at_the_limit(served):
    _, url, _ = served

    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    reply = httpx.post(f"{url}/predict", content=chunks(), headers={"Content-Type": "image/png"}, timeout=30)
    assert reply.status_code == 413


def test_a_client_that_leaves_mid_request_harms_no_other(served):
    _, url, pngs = served
    host, port = url.removeprefix("http://").split(":")
    for _ in range(5):  # half a body, then gone
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000\r\n\r\n"
                      + pngs[0][:100])
    with ThreadPoolExecutor(8) as pool:  # and clients that give up while their answers are computed
        quitters = [pool.submit(_quit_early, url, png) for png in pngs[:8]]
        replies = list(pool.map(lambda png: post(url, png), pngs[8:24]))
        [q.result() for q in quitters]
    assert all(r.status_code == 200 for r in replies)
    assert httpx.get(f"{url}/health").json()["pending"] == 0


def _quit_early(url, png):
    try:
        post_with_timeout = httpx.post(f"{url}/predict", content=png, headers={"Content-Type": "image/png"},
                                       timeout=0.001)
        return post_with_timeout.status_code
    except httpx.TimeoutException:
        return None


def test_the_page_reads_the_names_from_health_and_sets_them_as_text_only(served):
    _, url, _ = served
    page = httpx.get(url).text
    assert 'id="drop"' in page and 'fetch("predict"' in page and "textContent" in page
    assert "innerHTML" not in page  # a class or node name is never markup
    assert httpx.get(f"{url}/health").json()["classes"] == ["beaver", "whale", "wolf", "sunflower"]


def test_busy_and_failing_answers_are_one_line_and_the_server_goes_on(served, monkeypatch):
    tree, _, pngs = served
    with in_thread(tree, max_pending=0) as url:
        reply = post(url, pngs[0])
        assert reply.status_code == 503 and "requests are in progress (the limit is 0)" in reply.json()["error"]
    with in_thread(tree) as url:
        monkeypatch.setattr(tree, "forward", lambda *a, **k: 1 / 0)
        reply = post(url, pngs[0])
        assert reply.status_code == 500 and reply.json()["error"] == "ZeroDivisionError: division by zero"
        monkeypatch.undo()
        assert post(url, pngs[0]).status_code == 200
        form = httpx.post(f"{url}/predict", files={"image": ("a.png", pngs[0], "image/png")})
        assert form.status_code == 415 and "send the file itself as the body" in form.json()["error"]


def test_a_port_in_use_is_one_line_before_loading(tmp_path, capsys):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        assert cli.main(["serve", "--models", str(tmp_path / "none"), "--port", str(port)]) == 2
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use; pass another --port" in err and len(err.splitlines()) == 1


def test_the_server_reads_an_exported_tree(served, tmp_path):
    tree, _, pngs = served
    from branching.api.export import export
    export(tree, tmp_path / "tree.onnx")
    graph = branching.load(tmp_path / "tree.onnx")
    with in_thread(graph) as url:
        replies = [post(url, png).json()["answers"][0] for png in pngs[:10]]
    assert [r["guess"] for r in replies] == [a.guess for a in tree(pngs[:10])]
    assert np.allclose([r["score"] for r in replies], [a.score for a in tree(pngs[:10])], atol=1e-4)
    assert threading.active_count() < 50
