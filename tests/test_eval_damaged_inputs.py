"""`squeeze eval` and `squeeze dreambench` on damaged, hostile or special files: each gives one clear line
(a `missing` entry, a note, or a one-line error) and the rest is still done; nothing hangs, nothing
writes `NaN`, and a killed eval's temporaries do not stay."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import struct
import zlib
from pathlib import Path

import pytest
from support import EXAMPLE_IMAGES, gen_example_run, one_error_line
from test_eval import MANIFEST, NUM_IMAGES


@pytest.fixture(scope="module")
def made_run(tmp_path_factory, squeeze) -> Path:
    return gen_example_run(tmp_path_factory.mktemp("project"), squeeze, MANIFEST)


@pytest.fixture
def run(made_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / "run"
    shutil.copytree(made_run, copy)
    return copy


class Blocked(BaseException):
    """Not an OSError: code that catches OSError must not mistake the safety net for a read error."""


@contextlib.contextmanager
def deadline(seconds: int = 20):
    """Fail (rather than hang) when the command blocks longer than `seconds` (a FIFO, /dev/zero)."""

    def expired(signum, frame):
        raise Blocked(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A small file whose header declares a huge grayscale image (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def eval_run(squeeze, *args: str, expect: int = 0):
    with deadline(20):  # a safety net only: the assertions are on the command's own result
        result = squeeze("eval", *args, "--metrics", "tiny")
    assert result.code == expect, (result.out[-2000:], result.err[-2000:])
    assert "Traceback" not in result.err
    return result


def last_line(stderr: str) -> str:
    """The error line (the first command of a session may print the tiny models' build above it)."""
    assert "Traceback" not in stderr, stderr
    return one_error_line(stderr.replace("\r", "\n").strip().splitlines()[-1])


def summary_of(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def edit_sidecar(run: Path, name: str, **fields) -> None:
    path = run / "dog" / name
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))


# ---------------------------------------------------------------------------------------------------
# A finished image that is not what its sidecar records
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda png: png.write_bytes(png.read_bytes()[:300]), "does not match its sidecar"),
        (lambda png: png.write_bytes(b"garbage"), "does not match its sidecar"),
        (lambda png: png.write_bytes(bomb_png()), "does not match its sidecar"),
    ],
    ids=["truncated", "garbage", "bomb"],
)
def test_a_damaged_finished_image_is_listed_missing_and_the_rest_scored(squeeze, run: Path, damage, reason):
    damage(run / "dog" / "000-s0.png")
    result = eval_run(squeeze, str(run))
    summary = summary_of(run)
    assert summary["images"] == NUM_IMAGES - 1
    assert (
        [line for line in summary["missing"] if line.startswith("dog/000-s0.png: ")]
        == [line for line in summary["missing"] if reason in line]
        != []
    )
    assert f"dog/000-s0.png: {reason}" in result.out.replace("\n", " ") or reason in result.out


@pytest.mark.parametrize(
    "content, reason",
    [(bomb_png(), "too large"), (b"garbage", "not a readable image")],
    ids=["bomb", "garbage"],
)
def test_an_image_its_sidecar_vouches_for_that_does_not_decode_is_listed_missing(
    squeeze, run: Path, content: bytes, reason: str
):
    """Sidecar edited to match: the size and hash agree, the image still does not decode."""
    import hashlib

    (run / "dog" / "000-s0.png").write_bytes(content)
    edit_sidecar(
        run, "000-s0.json", png={"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    )
    eval_run(squeeze, str(run))
    summary = summary_of(run)
    assert summary["images"] == NUM_IMAGES - 1
    assert any(line.startswith("dog/000-s0.png: ") and reason in line for line in summary["missing"]), summary


# ---------------------------------------------------------------------------------------------------
# References: FIFOs, devices, bombs, files that are no image
# ---------------------------------------------------------------------------------------------------


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo.png"
    os.mkfifo(path)
    return str(path)


def _bomb(tmp_path: Path) -> str:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    return str(path)


def _not_an_image(tmp_path: Path) -> str:
    path = tmp_path / "notes.png"
    path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    return str(path)


@pytest.mark.parametrize(
    "make, reason",
    [
        (_fifo, "FIFO"),
        (lambda tmp: "/dev/zero", "character device"),
        (_bomb, "too large"),
        (_not_an_image, "not a readable image"),
    ],
    ids=["fifo", "dev-zero", "bomb", "not-an-image"],
)
def test_a_bad_reference_in_a_sidecar_is_left_out_with_a_note(
    squeeze, run: Path, tmp_path: Path, make, reason
):
    reference = make(tmp_path)
    edit_sidecar(run, "000-s0.json", references=[reference])
    eval_run(squeeze, str(run))
    summary = summary_of(run)
    assert summary["images"] == NUM_IMAGES
    notes = [note for note in summary["notes"] if reference in note]
    assert notes and reason in notes[0] and "left out" in notes[0], summary["notes"]
    rows = {
        json.loads(line)["image"]: json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
    }
    assert rows["dog/000-s0.png"]["dino"] is None and rows["dog/000-s0.png"]["clip_t"] is not None
    assert rows["dog/000-s1.png"]["dino"] is not None


@pytest.mark.parametrize(
    "make, reason",
    [(_fifo, "FIFO"), (_bomb, "too large"), (_not_an_image, "not a readable image")],
    ids=["fifo", "bomb", "not-an-image"],
)
def test_a_bad_file_in_a_references_folder_is_left_out_with_a_note(
    squeeze, run: Path, tmp_path: Path, make, reason
):
    folder = tmp_path / "dataset" / "dog"
    folder.mkdir(parents=True)
    shutil.copy(EXAMPLE_IMAGES / "dog" / "00.jpg", folder / "00.jpg")
    bad = Path(make(folder))
    eval_run(squeeze, str(run), "--references", str(tmp_path / "dataset"))
    summary = summary_of(run)
    assert summary["images"] == NUM_IMAGES
    notes = [note for note in summary["notes"] if str(folder / bad.name) in note]
    assert notes and reason in notes[0], summary["notes"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    dog = [row for row in rows if row["subject"] == "dog"]
    assert all(row["references"] == [str(folder / "00.jpg")] and row["dino"] is not None for row in dog)


def test_hidden_files_in_a_references_folder_are_no_photos(squeeze, run: Path, tmp_path: Path):
    """macOS's `._00.jpg` (AppleDouble metadata) beside `00.jpg` counted as a reference that cannot be
    read."""
    folder = tmp_path / "dataset" / "dog"
    folder.mkdir(parents=True)
    shutil.copy(EXAMPLE_IMAGES / "dog" / "00.jpg", folder / "00.jpg")
    (folder / "._00.jpg").write_bytes(b"\0\5\26\7" + bytes(100))
    eval_run(squeeze, str(run), "--references", str(tmp_path / "dataset"))
    assert not [note for note in summary_of(run)["notes"] if "._00.jpg" in note]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(row["references"] == [str(folder / "00.jpg")] for row in rows if row["subject"] == "dog")


# ---------------------------------------------------------------------------------------------------
# Sidecar fields of the wrong type
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt_index": "abc"},
        {"prompt_index": None},
        {"prompt_index": True},
        {"seed": [1]},
        {"seed": 1e400},
        {"seed": 1.5},
        {"class_noun": ["dog"]},
        {"class_noun": {"a": 1}},
    ],
    ids=lambda fields: json.dumps(fields, allow_nan=True),
)
def test_sidecar_fields_of_the_wrong_type_list_the_image_as_damaged(squeeze, run: Path, fields):
    path = run / "dog" / "000-s0.json"
    record = json.loads(path.read_text())
    record.update(fields)
    path.write_text(json.dumps(record))  # 1e400 is written as Infinity
    eval_run(squeeze, str(run))
    summary = summary_of(run)
    assert summary["images"] == NUM_IMAGES - 1
    (line,) = [line for line in summary["missing"] if "dog/000-s0" in line]
    assert "sidecar" in line and next(iter(fields)) in line, line


def test_references_of_the_wrong_type_in_a_sidecar_are_ignored(squeeze, run: Path):
    edit_sidecar(run, "000-s0.json", references=[1, None, {"a": 1}])
    eval_run(squeeze, str(run))
    assert summary_of(run)["images"] == NUM_IMAGES


# ---------------------------------------------------------------------------------------------------
# metrics-cache.json: a damaged cache counts as no cache; NaN never reaches a file
# ---------------------------------------------------------------------------------------------------


def _cache_endless(path: Path) -> None:
    path.symlink_to("/dev/zero")


def _cache_deep(path: Path) -> None:
    path.write_text("[" * 100000)


def _cache_wrong_types(path: Path) -> None:
    data = json.loads(path.read_text())
    for number, key in enumerate(data["scores"]):
        data["scores"][key] = [5, "x", None, {"identity": "x"}, {"per_reference": 3}][number % 5]
    path.write_text(json.dumps(data))


def _cache_nan(path: Path) -> None:
    data = json.loads(path.read_text())
    for scores in data["scores"].values():
        for name in scores:
            scores[name] = [math.nan] if name == "per_reference" else math.nan
    path.write_text(json.dumps(data))


def _cache_out_of_range(path: Path) -> None:  # a cosine cannot be 1e308: that DINO was reported as such
    data = json.loads(path.read_text())
    for scores in data["scores"].values():
        for name in scores:
            scores[name] = [1e308] if name == "per_reference" else 1e308
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage",
    [_cache_endless, _cache_deep, _cache_wrong_types, _cache_nan, _cache_out_of_range],
    ids=["endless", "deep", "wrong-types", "nan", "out-of-range"],
)
def test_a_damaged_metrics_cache_counts_as_no_cache(squeeze, run: Path, damage):
    eval_run(squeeze, str(run))
    expected = (run / "metrics.jsonl").read_text()
    cache = run / "metrics-cache.json"
    if damage is _cache_endless:
        cache.unlink()
    damage(cache)
    result = eval_run(squeeze, str(run))
    assert "scores: " in result.out and "scores: 0 computed" not in result.out
    assert (run / "metrics.jsonl").read_text() == expected
    assert cache.is_file() and not cache.is_symlink()  # a link there (to /dev/zero) is replaced
    for name in ("metrics.jsonl", "metrics.json", "metrics-cache.json"):
        text = (run / name).read_text()
        assert "NaN" not in text and "Infinity" not in text, name


EVAL_FILES = ("metrics-cache.json", "metrics.jsonl", "metrics.json", "report.html")


@pytest.mark.parametrize("name", EVAL_FILES)
def test_a_link_at_an_eval_file_is_replaced_never_written_through(squeeze, run: Path, tmp_path: Path, name):
    """Eval's files are the run's own: a link there (a shared cache elsewhere, a report kept elsewhere)
    is neither read nor written through but replaced. It used to stop eval after every score was
    computed ("it resolves to ..., outside the output directory")."""
    eval_run(squeeze, str(run))
    shared = tmp_path / "elsewhere" / name
    shared.parent.mkdir()
    (run / name).rename(shared)
    before = shared.read_bytes()
    (run / name).symlink_to(shared)
    result = eval_run(squeeze, str(run))
    computed = 2 * NUM_IMAGES if name == "metrics-cache.json" else 0  # the linked cache is not read
    assert f"scores: {computed} computed" in result.out
    assert not (run / name).is_symlink() and (run / name).stat().st_size > 0
    assert shared.read_bytes() == before
    assert summary_of(run)["images"] == NUM_IMAGES


@pytest.mark.parametrize("name", EVAL_FILES)
@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_at_an_eval_file_is_refused_before_scoring(squeeze, run: Path, name, kind):
    """The rename would fail after every score was computed (exit 1 with gen's "finished images are
    kept"): refused first, one line naming the file and eval's fix, exit 2."""
    path = run / name
    path.mkdir() if kind == "folder" else os.mkfifo(path)
    result = eval_run(squeeze, str(run), expect=2)
    line = last_line(result.err)
    assert f"{path} is {'a folder' if kind == 'folder' else 'a FIFO'}" in line
    assert "squeeze eval writes" in line and "finished images" not in line and "--out" not in line
    assert not {"metrics-cache.json", "metrics.json"} & {p.name for p in run.iterdir() if p != path}
    if name == "report.html":  # not written with --no-report: nothing in the way
        eval_run(squeeze, str(run), "--no-report")
        assert summary_of(run)["images"] == NUM_IMAGES


def test_a_run_folder_eval_cannot_write_in_is_refused_before_scoring(squeeze, run: Path, monkeypatch):
    """A run on a read-only file system (or another user's): eval used to score every image, then stop
    at the first write with gen's hint ("write to another output folder ... finished images are kept",
    exit 1). Refused first: one line naming the folder and eval's fix, exit 2, nothing scored."""
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # any file created in the run fails, as on `mount -o ro`
        if flags & os.O_CREAT and Path(path).parent == run:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    result = eval_run(squeeze, str(run), expect=2)
    line = last_line(result.err)
    assert f"{run}: cannot write there (Read-only file system)" in line
    assert f"cp -r {run} COPY" in line and "finished images" not in line
    assert "computed" not in result.out
    assert not {"metrics-cache.json", "metrics.json", "metrics.jsonl", "report.html"} & {
        p.name for p in run.iterdir()
    }


def test_nan_scores_are_written_as_null(squeeze, run: Path, monkeypatch):
    from squeeze_cli.eval import scoring

    original = scoring.score_images

    def with_nan(*args, **kwargs):
        results = original(*args, **kwargs)
        for scores in results:
            for name in scores:
                scores[name] = [math.nan] if name == "per_reference" else math.nan
        return results

    monkeypatch.setattr(scoring, "score_images", with_nan)
    eval_run(squeeze, str(run))
    for name in ("metrics.jsonl", "metrics.json", "metrics-cache.json"):
        text = (run / name).read_text()
        assert "NaN" not in text and "Infinity" not in text, name
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["dino"] is None and row["clip_t"] is None


# ---------------------------------------------------------------------------------------------------
# Temporaries of a killed eval
# ---------------------------------------------------------------------------------------------------


def test_a_killed_evals_temporaries_are_removed_by_the_next_eval(squeeze, run: Path):
    dead = 2**22 + 12345  # above the default pid_max: no live process
    left = [
        run / f".{name}.{dead}.tmp"
        for name in ("metrics-cache.json", "metrics.jsonl", "metrics.json", "report.html")
    ]
    for path in left:
        path.write_text("half")
    gens = run / "dog" / f".000-s0.png.{dead}.tmp"  # gen's: gen removes it, under its lock
    gens.write_text("half")
    eval_run(squeeze, str(run))
    assert not any(path.exists() for path in left)
    assert gens.exists()
    assert not list(run.glob(".*.tmp"))


def test_a_killed_eval_leaves_no_temporaries_once_rerun(run: Path, tmp_path: Path):
    """A real kill in the middle of an eval, then a rerun: the temporaries are gone, the metrics whole."""
    import subprocess
    import sys
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "squeeze_cli", "eval", str(run), "--metrics", "tiny"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    (run / f".metrics-cache.json.{process.pid}.tmp").write_text("half")  # as if killed while writing
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert not list(run.glob(".*.tmp"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == NUM_IMAGES


# ---------------------------------------------------------------------------------------------------
# squeeze dreambench on a bad prompts file
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    from test_eval_dreambench import PROMPTS_FILE

    folder = tmp_path / "dataset"
    (folder / "dog").mkdir(parents=True)
    shutil.copy(PROMPTS_FILE, folder)
    shutil.copy(EXAMPLE_IMAGES / "dog" / "00.jpg", folder / "dog" / "00.jpg")
    return folder


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda path: path.write_bytes(b"\xff\xfe" + path.read_bytes()), "not UTF-8"),
        (lambda path: path.unlink() or os.mkfifo(path), "FIFO"),
        (lambda path: path.unlink() or path.symlink_to("/dev/zero"), "character device"),
        (lambda path: path.unlink() or path.mkdir(), "folder"),
    ],
    ids=["not-utf8", "fifo", "dev-zero", "folder"],
)
def test_dreambench_on_a_bad_prompts_file_is_a_one_line_error(
    squeeze, dataset: Path, tmp_path: Path, damage, message
):
    prompts = dataset / "prompts_and_classes.txt"
    damage(prompts)
    with deadline(20):
        result = squeeze("dreambench", str(dataset), "-o", str(tmp_path / "m.yaml"))
    assert result.code == 2, result.err
    line = one_error_line(result.err)
    assert str(prompts) in line and message in line, line
    assert not (tmp_path / "m.yaml").exists()


@pytest.mark.parametrize("choice", ["²", "٣", "0", "-1"])
def test_dreambench_references_that_are_not_a_count_are_a_one_line_error(
    squeeze, dataset: Path, tmp_path: Path, choice
):
    result = squeeze("dreambench", str(dataset), "-o", str(tmp_path / "m.yaml"), "--references", choice)
    assert result.code == 2, result.err
    assert "--references" in one_error_line(result.err)


def test_the_reports_sort_from_the_address_never_builds_a_selector_from_it(squeeze, run: Path):
    """`report.html#sort="]x`: the column named in the address is compared, not put in a CSS selector
    (where a quote threw a SyntaxError)."""
    eval_run(squeeze, str(run))
    page = (run / "report.html").read_text()
    assert "th.dataset.column===col" in page
    assert "'+col+'" not in page


# ---------------------------------------------------------------------------------------------------
# Messages that say what is wrong
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [b"garbage\n", b"", b'[1, 2]\n{"job_id": 3}\n'], ids=["garbage", "empty", "wrong"]
)
def test_a_folder_whose_index_has_no_valid_line_is_not_evaluated(squeeze, tmp_path: Path, content: bytes):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "index.jsonl").write_bytes(content)
    result = squeeze("eval", str(folder), "--metrics", "tiny")
    assert result.code == 2, (result.out, result.err)
    line = last_line(result.err)
    assert str(folder) in line and "no valid line" in line, line
    assert sorted(p.name for p in folder.iterdir()) == ["index.jsonl"]  # nothing written there


def test_an_index_over_the_size_limit_says_so(squeeze, run: Path, monkeypatch):
    from squeeze_cli.outputs import index

    monkeypatch.setattr(index, "INDEX_MAX_BYTES", 100)
    result = squeeze("eval", str(run), "--metrics", "tiny")
    assert result.code != 0
    line = last_line(result.err)
    assert "index.jsonl" in line and "limit" in line and "file system" not in line, line
    # eval does not rebuild an index: the hint names the commands that do.
    assert "`squeeze status OUT --merge` or the run's `squeeze gen` rebuilds" in line, line
