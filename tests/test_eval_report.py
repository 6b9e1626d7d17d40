"""report.html in a real browser: headless Chromium, driven over the DevTools protocol on 127.0.0.1.

What is checked is what a person sees: the summary, the plots, the gallery's rows and their order (worst
first, then after a mouse click on a column header), typing into the filter, and that every thumbnail loads
when scrolled to (they load lazily) and links its full image. Skipped when Chromium or the `websockets`
package is missing (.ci/run installs Chromium).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import random
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from squeeze_cli.eval.report import mean_metrics, write_report

websockets_sync = pytest.importorskip("websockets.sync.client", reason="needs the websockets package")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None
)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")

MANIFEST = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  seeds: [0, 1, 2]
subjects:
  - name: dog
    class: dog
    references: [images/dog/00.jpg, images/dog/02.jpg]
    prompts:
      - a {class} in the snow
      - a {class} on the beach
"""


# How often the browser harness looks before it gives up on a hang: counted, never timed.
HANG_GUARD_POLLS = 6000


class Browser:
    """One headless Chromium page, driven with DevTools protocol commands."""

    def __init__(self, profile: Path):
        self.process = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        # A hang guard that counts polls, not seconds: a busy machine starting Chromium slowly only polls on.
        for _ in range(HANG_GUARD_POLLS):
            if (port_file.is_file() and port_file.read_text().strip()) or self.process.poll() is not None:
                break
            time.sleep(0.1)
        if not (port_file.is_file() and port_file.read_text().strip()):
            raise RuntimeError("Chromium did not start its DevTools server")
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=300) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.stack = contextlib.ExitStack()
        self.socket = self.stack.enter_context(
            websockets_sync.connect(page["webSocketDebuggerUrl"], max_size=None)
        )
        self.ids = itertools.count(1)

    def send(self, method: str, **params) -> dict:
        message_id = next(self.ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.socket.recv(timeout=300))  # a hang guard
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        ready = "document.readyState === 'complete' && document.body.dataset.loaded === '1'"
        for _ in range(HANG_GUARD_POLLS):  # counted polls: the page's speed is never asserted
            if self.evaluate(ready) is True:
                return
            time.sleep(0.05)
        raise AssertionError(f"the page did not finish loading in {HANG_GUARD_POLLS:,} polls")

    def load_every_image(self) -> list[int]:
        """Scroll to each image in turn (lazy thumbnails load when near the viewport) and wait for its
        `load` or `error`; the natural widths (0: it could not be loaded)."""
        return self.evaluate(
            "(async () => { for (const img of document.images) { img.scrollIntoView();"
            " if (!img.complete) await new Promise(done => {"
            " img.addEventListener('load', done, {once: true});"
            " img.addEventListener('error', done, {once: true});"
            " }); } return [...document.images].map(i => i.naturalWidth); })()"
        )

    def click(self, selector: str) -> None:
        """A person's click: the mouse pressed and released at the element's centre."""
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
            " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def type_text(self, selector: str, text: str) -> None:
        self.click(selector)
        self.send("Input.insertText", text=text)

    def close(self) -> None:
        self.stack.close()
        self.process.terminate()
        self.process.wait(timeout=300)  # a hang guard


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, squeeze) -> Path:
    project = tmp_path_factory.mktemp("report")
    shutil.copytree(REPO / "examples" / "images", project / "images")
    (project / "m.yaml").write_text(MANIFEST)
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(project / "run"), "--quiet").code == 0
    result = squeeze("eval", str(project / "run"), "--metrics", "tiny")
    assert result.code == 0, result.err
    return project / "run"


@pytest.fixture
def browser(tmp_path: Path):
    opened = Browser(tmp_path / "profile")
    yield opened
    opened.close()


GALLERY_ROWS = "[...document.querySelectorAll('table.gallery tbody tr')]"
SUMMARY_ROWS = "[...document.querySelectorAll('table.summary tbody tr')]"


def visible_keys(browser: Browser) -> list[str]:
    return browser.evaluate(f"{GALLERY_ROWS}.filter(r => !r.hidden).map(r => r.dataset.key)")


def keys_sorted_by(run: Path, metric: str, reverse: bool = False) -> list[str]:
    """The gallery's rows (one per prompt, keyed `subject/prompt`) in the order of the prompt's mean `metric`
    (metrics.json)."""
    prompts = json.loads((run / "metrics.json").read_text())["prompts"]
    prompts.sort(key=lambda p: p[metric], reverse=reverse)
    return [f"{p['subject']}/{p['prompt']}" for p in prompts]


def test_the_report_shows_every_prompt_worst_first_and_sorts_on_a_click(
    evaluated_run: Path, browser: Browser
):
    browser.open((evaluated_run / "report.html").as_uri())

    # A row per prompt, worst mean DINO first: its references, then the run's image of every seed.
    assert visible_keys(browser) == keys_sorted_by(evaluated_run, "dino")
    first = "document.querySelector('table.gallery tbody tr')"
    assert browser.evaluate(f"{first}.querySelectorAll('td.refs img').length") == 2
    seeds = browser.evaluate(f"[...{first}.querySelectorAll('td.shots figcaption')].map(c => c.textContent)")
    assert [caption.split("DINO")[0] for caption in seeds] == ["s0", "s1", "s2"]

    # Every thumbnail is lazy, links its full image, and loads once scrolled to: 2 × (2 references + 3 seeds).
    assert browser.evaluate(
        "[...document.images].every(i => i.loading === 'lazy' && i.closest('a').href === i.src)"
    )
    widths = browser.load_every_image()
    assert len(widths) == 2 * (2 + 3) and all(width > 0 for width in widths)
    assert browser.evaluate("document.getElementById('broken').textContent") == ""

    assert browser.evaluate("document.querySelector('th.sorted-asc').dataset.column") == "dino"
    browser.click("th[data-column='dino']")  # already worst first: a click shows the best first
    assert visible_keys(browser) == keys_sorted_by(evaluated_run, "dino", reverse=True)

    browser.click("th[data-column='clip_t']")
    assert visible_keys(browser) == keys_sorted_by(evaluated_run, "clip_t")
    browser.click("th[data-column='clip_t']")
    assert visible_keys(browser) == keys_sorted_by(evaluated_run, "clip_t", reverse=True)
    column = browser.evaluate("document.querySelector(\"th[data-column='clip_t']\").cellIndex")
    shown = browser.evaluate(f"{GALLERY_ROWS}.map(r => r.cells[{column}].textContent)")
    assert shown == sorted(shown, reverse=True)  # what a person reads is in order too

    browser.type_text("#filter", "beach")
    assert visible_keys(browser) == ["dog/a dog on the beach"]
    assert browser.evaluate("document.getElementById('shown').textContent") == "1"
    # The filter keeps to the gallery: the summary still shows the subject and the overall row.
    assert browser.evaluate(f"{SUMMARY_ROWS}.filter(r => !r.hidden).map(r => r.cells[0].textContent)") == [
        "dog",
        "overall",
    ]


@pytest.mark.parametrize("column", ["dino", "clip_t"])
@pytest.mark.parametrize("desc", [False, True], ids=["lowest-first", "desc"])
def test_the_address_opens_the_gallery_sorted(evaluated_run: Path, browser: Browser, column: str, desc: bool):
    """`report.html#sort=COLUMN` opens sorted lowest first, `&desc` highest first. On the column the page
    starts sorted by (the first metric), both came out reversed: the address clicked an already sorted
    column."""
    browser.open(f"{(evaluated_run / 'report.html').as_uri()}#sort={column}{'&desc' if desc else ''}")
    assert visible_keys(browser) == keys_sorted_by(evaluated_run, column, reverse=desc)


def test_the_summary_and_the_distributions(evaluated_run: Path, browser: Browser):
    browser.open((evaluated_run / "report.html").as_uri())
    summary = json.loads((evaluated_run / "metrics.json").read_text())
    cells = browser.evaluate(f"{SUMMARY_ROWS}.map(r => [...r.cells].map(c => c.textContent))")
    assert [row[:3] for row in cells] == [["dog", "run", "6"], ["overall", "run", "6"]]
    assert cells[1][3] == f"{summary['overall']['dino']:.3f}"
    # One plot per metric, each with one histogram per run, as many images as the run has values.
    plots = browser.evaluate(
        "[...document.querySelectorAll('figure.dist')].map(f => [f.dataset.metric,"
        " [...f.querySelectorAll('rect title')].reduce((n, t) => n + Number(t.textContent), 0)])"
    )
    assert plots == [[metric, 6] for metric in summary["metrics"]]


def test_runs_side_by_side_in_the_gallery(evaluated_run: Path, browser: Browser, tmp_path: Path, squeeze):
    run, other = tmp_path / "run", tmp_path / "other"  # copies: the module's run keeps its own report
    for copy in (run, other):
        shutil.copytree(evaluated_run, copy)  # the same images (and scores, cached) under two names
    assert squeeze("eval", str(run), str(other), "--metrics", "tiny").code == 0
    browser.open((other / "report.html").as_uri())
    shots = browser.evaluate(
        f"{GALLERY_ROWS}.map(r => [...r.querySelectorAll('td.shots')]"
        ".map(cell => cell.querySelectorAll('img').length))"
    )
    assert shots == [[3, 3], [3, 3]]
    runs = browser.evaluate(f"{SUMMARY_ROWS}.map(r => r.cells[1].textContent)")
    assert runs == ["run", "other", "run", "other"]
    assert browser.evaluate("document.querySelectorAll('figure.dist svg text').length") > 0
    assert len(browser.load_every_image()) == 2 * (2 + 3 + 3)


def test_a_missing_image_is_visible_in_the_report(evaluated_run: Path, browser: Browser, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    shutil.copytree(evaluated_run.parent / "images", tmp_path / "images")  # references are linked relatively
    (run / "dog" / "000-s0.png").unlink()  # deleted after the report was written
    browser.open((run / "report.html").as_uri())
    widths = browser.load_every_image()  # lazily loaded: counted when its own request fails
    assert widths.count(0) == 1
    assert re.fullmatch(
        r"1 image\(s\) could not be loaded", browser.evaluate("document.getElementById('broken').textContent")
    )
    assert browser.evaluate("document.querySelector('img.broken').closest('figure').dataset.image") == (
        "dog/000-s0.png"
    )


def synthetic_evaluations(root: Path, subjects: int, prompts: int, seeds: int, runs: int) -> list:
    """`render_report`'s input for `runs` runs of subjects × prompts × seeds images, written as tiny PNGs
    (a few colours, so the browser decodes real files) with random scores: the report without scoring."""
    metrics = ["dino", "clip_i", "clip_t", "copy"]
    colours = []
    for shade in range(8):
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (30 * shade, 120, 255 - 30 * shade)).save(buffer, "PNG")
        colours.append(buffer.getvalue())
    references = {}
    for subject in range(subjects):
        folder = root / "references" / f"subject{subject:02d}"
        folder.mkdir(parents=True)
        references[subject] = [str(folder / f"{n}.png") for n in range(4)]
        for n, path in enumerate(references[subject]):
            Path(path).write_bytes(colours[n])
    generator = random.Random(0)
    evaluations = []
    for run in range(runs):
        run_dir = root / f"run{run}"
        rows = []
        for subject, prompt, seed in itertools.product(range(subjects), range(prompts), range(seeds)):
            image = f"subject{subject:02d}/{prompt:03d}-s{seed}.png"
            (run_dir / image).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / image).write_bytes(colours[(subject + prompt + seed) % len(colours)])
            rows.append(
                {
                    "subject": f"subject{subject:02d}",
                    "prompt_index": prompt,
                    "seed": seed,
                    "prompt": f"a photo of subject{subject:02d} in scene {prompt}",
                    "image": image,
                    "references": references[subject],
                    "gated": False,
                    **{metric: generator.uniform(0.2, 0.9) for metric in metrics},
                }
            )
        by_subject: dict[str, list] = {}
        by_prompt: dict[tuple[str, int], list] = {}
        for row in rows:
            by_subject.setdefault(row["subject"], []).append(row)
            by_prompt.setdefault((row["subject"], row["prompt_index"]), []).append(row)
        summary = {
            "protocol": {"metric_set": "dreambench", "references": "conditioning"},
            "metrics": metrics,
            "images": len(rows),
            "recipe": f"recipe{run}",
            "gate": None,
            "overall": mean_metrics(rows, metrics),
            "subjects": {
                name: {"images": len(group), **mean_metrics(group, metrics)}
                for name, group in by_subject.items()
            },
            "prompts": [
                {"subject": subject, "prompt_index": prompt, **mean_metrics(group, metrics)}
                for (subject, prompt), group in by_prompt.items()
            ],
            "failed": [],
            "missing": [],
        }
        evaluations.append((f"run{run}", run_dir, summary, rows))
    return evaluations


@pytest.mark.slow
def test_a_dreambench_size_report_opens_in_chromium(tmp_path: Path, browser: Browser):
    """3,000 images × 3 runs (DreamBench's 30 subjects × 25 prompts × 4 seeds): the time to the page's
    `load` is printed for BENCHMARKS.md; only a hang guard is asserted."""
    evaluations = synthetic_evaluations(tmp_path, subjects=30, prompts=25, seeds=4, runs=3)
    report = write_report(evaluations, evaluations[0][1])
    browser.open(report.as_uri())  # waits (up to a hang guard) for the page's load event
    timing = browser.evaluate(
        "(() => { const n = performance.getEntriesByType('navigation')[0];"
        " return [n.domContentLoadedEventEnd, n.loadEventEnd]; })()"
    )
    assert browser.evaluate(f"{GALLERY_ROWS}.length") == 30 * 25
    assert browser.evaluate("document.querySelectorAll('td.shots img').length") == 3 * 3000
    assert browser.evaluate("document.getElementById('broken').textContent") == ""
    print(
        f"\nreport of 3,000 images x 3 runs: {report.stat().st_size / 1e6:.1f} MB of HTML; "
        f"DOMContentLoaded {timing[0]:.0f} ms, load {timing[1]:.0f} ms"
    )
    # The load event fired (its time is printed above, never asserted): no clock in the check.
    assert browser.evaluate("document.readyState") == "complete"
