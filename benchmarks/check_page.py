"""The page at `/` of `branching serve` (docs/deploy.md), checked in a real headless browser (Chromium, through
PyQt6-WebEngine; optional, not in CI):

    QT_QPA_PLATFORM=offscreen python benchmarks/check_page.py
    QT_QPA_PLATFORM=offscreen python benchmarks/check_page.py --models runs/c6 --text-models runs/rt-tree

images: --images test images of --data (half that the tree accepts, half it is uncertain of), each a PNG given
to the page as a person would (chosen in the file input, or dropped on the drop zone, in turn); the answer the page
renders (the label, or "uncertain" and the best guess; the score; the path) against branching.load(RUN)'s.
texts: --texts test texts of --text-data typed into the text box and sent with its button, likewise (skipped, with
a note, when --text-models is missing).
names: the class and node names reach the page as text only. The line naming the classes equals /health's names
and holds no element; then the tree is served under names that are markup (<img onerror> and <b>): after an image
is answered no element was made from them, none of their script ran, and the page shows them literally.

Prints a line a check; exits 1 when one fails, 2 when PyQt6-WebEngine is not installed.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import branching  # noqa: E402
from branching.api.serve import in_thread  # noqa: E402

ANSWER = """JSON.stringify([...document.getElementById("answer").children].map(
  c => ({cls: c.className, text: c.textContent, elements: c.children.length})))"""
GIVE_IMAGE = """(() => {
  const bytes = Uint8Array.from(atob("%s"), c => c.charCodeAt(0)), data = new DataTransfer();
  data.items.add(new File([bytes], "image.png", {type: "image/png"}));
  document.getElementById("answer").textContent = "";
  if ("%s" === "file") {  // chosen in the file input
    const input = document.getElementById("file"); input.files = data.files;
    input.dispatchEvent(new Event("change", {bubbles: true}));
  } else {  // dragged over and dropped on the drop zone
    for (const type of ["dragenter", "dragover", "drop"]) document.getElementById("drop").dispatchEvent(
      new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
  }
})()"""
GIVE_TEXT = """(() => {
  const box = document.getElementById("text"); box.focus(); box.value = %s;
  box.dispatchEvent(new Event("input", {bubbles: true}));
  document.getElementById("answer").textContent = "";
  document.getElementById("send").click();
})()"""


class Browser:
    """One headless Chromium page, driven synchronously: open a URL, run JavaScript, wait for a condition."""

    def __init__(self):
        from PyQt6.QtWebEngineCore import QWebEnginePage
        from PyQt6.QtWebEngineWidgets import QWebEngineView
        from PyQt6.QtWidgets import QApplication

        class Page(QWebEnginePage):  # the page's console (its JavaScript errors), for the report
            def javaScriptConsoleMessage(page, level, message, line, source):
                self.console.append(f"{source}:{line}: {message}")

        self.app, self.console = QApplication.instance() or QApplication(sys.argv[:1]), []
        self.view = QWebEngineView()
        self.view.setPage(Page(self.view))
        self.view.show()

    def _run(self, start, seconds: float):
        from PyQt6.QtCore import QEventLoop, QTimer
        loop, out = QEventLoop(), []
        start(lambda *result: (out.append(result), loop.quit()))
        QTimer.singleShot(int(seconds * 1000), loop.quit)
        loop.exec()
        if not out:
            raise TimeoutError(f"no answer from the browser in {seconds} s")
        return out[0][0] if out[0] else None

    def open(self, url: str) -> None:
        from PyQt6.QtCore import QUrl
        ok = self._run(lambda done: (self.view.loadFinished.connect(done), self.view.load(QUrl(url))), 30)
        self.view.loadFinished.disconnect()
        if not ok:
            raise RuntimeError(f"the browser could not load {url}")

    def js(self, code: str):
        return self._run(lambda done: self.view.page().runJavaScript(code, done), 30)

    def pause(self, seconds: float) -> None:  # the page runs meanwhile
        from PyQt6.QtCore import QTimer
        self._run(lambda done: QTimer.singleShot(int(seconds * 1000), done), seconds + 1)

    def wait(self, condition: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not self.js(condition):
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {seconds} s for: {condition}")
            self.pause(0.05)


def rendered(browser: Browser) -> list[dict]:
    """The answer the page rendered, once it has (two lines, or an error)."""
    browser.wait('document.getElementById("answer").children.length === 2 || '
                 'document.getElementById("answer").textContent.startsWith("error")', 10)
    return json.loads(browser.js(ANSWER))


def differences(lines: list[dict], answer) -> list[str]:
    """Where the rendered answer differs from the API's (empty: it is the same)."""
    if len(lines) != 2:
        return [f"the page shows {lines!r}"]
    head = re.fullmatch(r"(?:uncertain: best guess )?(.*) \(score (-?[0-9.]+)\)", lines[0]["text"])
    if not head:
        return [f"unreadable answer line {lines[0]['text']!r}"]
    page = {"accepted": not lines[0]["text"].startswith("uncertain: "), "class": head[1], "score": float(head[2]),
            "style": lines[0]["cls"], "path": lines[1]["text"], "elements": lines[0]["elements"] + lines[1]["elements"]}
    api = {"accepted": answer.accepted, "class": answer.label if answer.accepted else answer.guess,
           "score": answer.score, "style": "yes" if answer.accepted else "no",
           "path": "path: " + " > ".join(answer.path), "elements": 0}
    if abs(page["score"] - api["score"]) <= 6e-5:  # shown to 4 decimals
        page["score"] = api["score"]
    return [f"{key}: page {page[key]!r}, API {api[key]!r}" for key in api if page[key] != api[key]]


def pick(tree, inputs: list, n: int) -> list[int]:
    """n inputs' indices: half the tree accepts, half it is uncertain of (as many as there are)."""
    accepted = [a.accepted for a in tree(inputs)]
    uncertain = [i for i, yes in enumerate(accepted) if not yes][:n // 2]
    return sorted(uncertain + [i for i, yes in enumerate(accepted) if yes][:n - len(uncertain)])


class Marked:
    """A tree served under class and node names that are markup: what the page must show as text."""

    def __init__(self, tree):
        self._tree = tree
        self._names = {n: f'<img src="x" onerror="window.injected=1" data-injected><b data-injected>{n}</b>'
                       for n in (*tree.classes, *tree.nodes)}
        self.classes = tuple(self._names[c] for c in tree.classes)
        self.nodes = tuple(self._names[n] for n in tree.nodes)

    def __getattr__(self, name):
        return getattr(self._tree, name)

    def rename(self, a):
        name = self._names.get
        return dataclasses.replace(a, label=a.label and name(a.label), guess=a.guess and name(a.guess),
                                   node=a.node and name(a.node), rejected_at=a.rejected_at and name(a.rejected_at),
                                   path=tuple(map(name, a.path)))

    def postprocess(self, prepared, predictions):
        return [self.rename(a) for a in self._tree.postprocess(prepared, predictions)]


def open_page(browser: Browser, url: str, reads: str) -> dict:
    """Open the page, wait for it to show the tree, and return /health."""
    browser.open(url + "/")
    browser.wait('!document.getElementById("about").textContent.startsWith("Loading")')
    if browser.js(f'document.getElementById("{reads}").hidden'):
        raise RuntimeError(f"the page does not show its {reads} input")
    with urllib.request.urlopen(url + "/health") as r:
        return json.load(r)


def names_as_text(browser: Browser, health: dict) -> list[str]:
    """Where the names did not reach the page as text only (empty: they did)."""
    about = json.loads(browser.js('JSON.stringify({text: document.getElementById("about").textContent, '
                                  'elements: document.getElementById("about").children.length, '
                                  'made: document.querySelectorAll("[data-injected]").length, '
                                  'ran: window.injected === 1})'))
    expected = f"A tree of {len(health['nodes'])} nodes over {len(health['classes'])} classes: " \
               f"{', '.join(health['classes'])}."
    return ([f"the classes' line is {about['text']!r}, not {expected!r}"] * (about["text"] != expected) +
            [f"{about['elements']} elements in the classes' line"] * bool(about["elements"]) +
            [f"{about['made']} elements made from names"] * bool(about["made"]) +
            ["a name's script ran"] * about["ran"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=str(REPO / "runs" / "c6"), help="an image tree's run folder")
    parser.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "cifar100-6"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--text-models", default=str(REPO / "runs" / "rt-tree"), help="skipped if missing")
    parser.add_argument("--text-data", default=str(REPO / "runs" / "rt"), help="its text folder (test.csv)")
    parser.add_argument("--texts", type=int, default=6)
    args = parser.parse_args()
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("QTWEBENGINE_CHROMIUM_FLAGS", "--no-sandbox --disable-gpu")
    try:
        import PyQt6.QtWebEngineWidgets  # noqa: F401 - the browser
    except ImportError:
        print("PyQt6-WebEngine is not installed; pip install PyQt6 PyQt6-WebEngine", file=sys.stderr)
        sys.exit(2)
    from PIL import Image

    from branching.data.cifar import load_split
    browser, results = Browser(), {}

    def check(name: str, items: list, answers: list, give, note: str = "") -> None:
        wrong = []
        for k, (item, answer) in enumerate(zip(items, answers)):
            browser.js(give(k, item))
            try:
                wrong += [f"  {name} {k}: {d}" for d in differences(rendered(browser), answer)]
            except TimeoutError:
                wrong.append(f"  {name} {k}: no answer rendered in 10 s")
        results[name] = not wrong
        print(f"{name}: {'pass' if not wrong else 'FAIL'}: {len(items) - len({w.split(':')[0] for w in wrong})} of "
              f"{len(items)} answered as the API does{note}", *wrong, sep="\n")

    tree = branching.load(args.models, "cpu")
    pngs = []
    for row in load_split(args.data, "test").images[:200]:  # as PNG files: what a person has
        Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).save(buffer := io.BytesIO(), "PNG")
        pngs.append(buffer.getvalue())
    pngs = [pngs[i] for i in pick(tree, pngs, args.images)]
    answers = tree(pngs)
    give_image = lambda k, png: GIVE_IMAGE % (base64.b64encode(png).decode(), ("file", "drop")[k % 2])  # noqa: E731
    with in_thread(tree) as url:
        health = open_page(browser, url, "images")
        check("images", pngs, answers, give_image,
              f" ({sum(a.accepted for a in answers)} accepted, {sum(not a.accepted for a in answers)} uncertain; "
              f"half by the file input, half dropped)")
        wrong = names_as_text(browser, health)
    marked = Marked(tree)
    with in_thread(marked) as url:
        health = open_page(browser, url, "images")
        browser.js(give_image(0, pngs[0]))
        shown = rendered(browser)
        browser.pause(0.5)  # time for a broken <img> made from a name to fire its onerror
        wrong += names_as_text(browser, health) + differences(shown, marked.rename(answers[0]))
    results["names"] = not wrong
    print(f"names: {'pass' if not wrong else 'FAIL'}: set as text (the classes' line, and an answer under names "
          f"that are markup: no element made, no script run)", *[f"  {w}" for w in wrong], sep="\n")

    if not Path(args.text_models).is_dir():
        print(f"texts: skipped ({args.text_models} is missing)")
    else:
        from branching.data.texts import read_folder
        text_tree = branching.load(args.text_models, "cpu")
        texts = list(read_folder(args.text_data).splits["test"].texts[:200])
        texts = [texts[i] for i in pick(text_tree, texts, args.texts)]
        answers = text_tree(texts)
        with in_thread(text_tree) as url:
            open_page(browser, url, "texts")
            check("texts", texts, answers, lambda k, text: GIVE_TEXT % json.dumps(text),
                  f" ({sum(a.accepted for a in answers)} accepted, {sum(not a.accepted for a in answers)} uncertain)")
    if browser.console:
        print("the page's console:", *[f"  {m}" for m in browser.console], sep="\n")
    sys.exit(0 if all(results.values()) else 1)


if __name__ == "__main__":
    main()
