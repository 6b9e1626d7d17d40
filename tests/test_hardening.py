"""Hostile file systems and careless scripts (issue 9, items 4-9): one shard layout per output folder,
nothing written or read through symbolic links, nothing that hangs on a special file or a directory
loop, damaged records treated as damaged, a file-size limit named as such, an empty --out refused, and
the output tree checked before the model loads. Each test fails without its fix."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_INVALID, EXIT_JOBS_FAILED, EXIT_OK
from squeeze_cli.images import MAX_REFERENCE_PIXELS, check_image, load_rgb, upright_size
from squeeze_cli.outputs import layout
from squeeze_cli.outputs.grids import PageViews, PromptViews
from squeeze_cli.reading import FileTooLargeError, NotARegularFileError, read_regular_file

REPO_ROOT = Path(__file__).resolve().parents[1]

# One subject, one prompt, four seeds: a --shard 0/2 and a --shard 1/2 each make part of the same grid.
MANIFEST = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  seeds: [0, 1, 2, 3]
subjects:
  - name: dog
    class: dog
    references: [images/dog/00.jpg]
    prompts:
      - a {class} in the snow
"""


@pytest.fixture(scope="module")
def tiny_cache() -> str:
    from squeeze_cli.loading import ensure_tiny_checkpoint

    ensure_tiny_checkpoint("internvl")
    return os.environ["SQUEEZE_CACHE"]


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=MANIFEST)


def env(cache: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SQUEEZE_CACHE": cache, "OMP_NUM_THREADS": "1"}


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def finishes(function, *args, timeout: float = 20.0):
    """`function(*args)` run in a thread: its result, failing the test if it blocks (a FIFO opened for
    reading waits for a writer forever)."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = function(*args)
        except BaseException as error:  # handed to the test
            result["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function.__name__} blocked"
    if "error" in result:
        raise result["error"]
    return result["value"]


@contextlib.contextmanager
def deadline(seconds: int = 60):
    """Fail (rather than hang) when the main thread blocks longer than `seconds`, e.g. opening a FIFO."""

    def expired(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# 9.4 One run per output folder, whatever the shard layout -----------------------------------------------

HOLD_LAYOUT = """
import sys, time
from pathlib import Path
from squeeze_cli.gen.lock import LayoutLock
shard = None if sys.argv[2] == "plain" else tuple(int(n) for n in sys.argv[2].split("/"))
LayoutLock(Path(sys.argv[1]), shard).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def hold_layout():
    """`hold_layout(out, "0/2")` (or "plain"): another process holding OUT with that shard layout."""
    holders = []

    def hold(out: Path, layout: str) -> subprocess.Popen:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LAYOUT, str(out), layout], stdout=subprocess.PIPE, text=True
        )
        holders.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "held, ours, refused",
    [
        ("0/2", [], True),  # a plain run while shards run: it would redo their jobs
        ("0/2", ["--shard", "0/3"], True),  # another layout overlaps too
        ("plain", ["--shard", "1/2"], True),
        ("plain", ["--shard", "0/1"], True),  # the same jobs as the plain run
        ("0/2", ["--shard", "1/2"], False),  # the shards of one layout share the folder
    ],
)
def test_runs_of_different_shard_layouts_exclude_each_other(
    project: Path, squeeze, hold_layout, held, ours, refused
) -> None:
    out = project / "out"
    out.mkdir()
    hold_layout(out, held)
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet", *ours)
    if refused:
        line = one_error_line(result.err)
        assert result.code == EXIT_INVALID
        assert line.startswith(f"error: {out} is in use by another squeeze gen with another shard layout")
        assert {Path(name).name for name in files_under(out)} <= {outputs.LAYOUT_LOCK_NAME, outputs.LOCK_NAME}
    else:
        assert result.code == EXIT_OK, result.err
        assert (out / "shards" / "1-of-2" / "run.json").exists()


HOLD_VIEWS = """
import sys, time
from pathlib import Path
from squeeze_cli.gen.lock import LayoutLock
lock = LayoutLock(Path(sys.argv[1]), (0, 2))
lock.acquire()
with lock.drawing_views():
    print("drawing", flush=True)
    sys.stdin.readline()
print("done", flush=True)
time.sleep(120)
"""


def test_shards_draw_their_views_one_at_a_time(tmp_path: Path) -> None:
    import fcntl

    from squeeze_cli.gen.lock import LayoutLock

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_VIEWS, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "drawing"
        ours = LayoutLock(tmp_path, (1, 2))
        ours.acquire()  # the same layout: shares the folder
        with pytest.raises(OSError) as busy:  # but not the drawing of the views
            fcntl.lockf(ours._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        assert busy.value.errno in (errno.EACCES, errno.EAGAIN)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "done"
        with ours.drawing_views():  # free again
            pass
        ours.release()
    finally:
        holder.kill()
        holder.wait()


def test_after_the_shards_finish_every_grid_shows_every_image(project: Path, squeeze, plan_of) -> None:
    from squeeze_cli.plan import shard_jobs

    jobs = plan_of(project / "m.yaml")
    assert shard_jobs(jobs, 0, 2) and shard_jobs(jobs, 1, 2)  # one prompt's seeds split over both shards
    out = project / "out"
    for shard in ("0/2", "1/2"):
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", shard, "--quiet")
        assert result.code == EXIT_OK, result.err

    # Nothing left to redraw, and the grid and contact sheet as drawn from every image.
    finished = outputs.find_finished(out, jobs)
    assert len(finished) == len(jobs) and outputs.plan_views(out, jobs, finished) == []
    expected = project / "expected"
    entries = tuple((job.seed, str(layout.image_path(out, job))) for job in jobs)
    prompt = PromptViews(0, jobs[0].prompt, entries, grid_inputs="every image")
    page = PageViews("dog", 1, tuple(jobs[0].references), (prompt,), sheet_inputs="every image")
    outputs.draw_views(expected, [page], lambda: False)
    for name in ("grid-000.png", "contact-sheet.png"):
        drawn = np.asarray(Image.open(out / "dog" / name).convert("RGB"))
        complete = np.asarray(Image.open(expected / "dog" / name).convert("RGB"))
        assert drawn.shape == complete.shape and (drawn == complete).all(), name


# 9.5 Nothing written through a symbolic link ----------------------------------------------------------


@pytest.mark.parametrize("name", [".squeeze.lock", "run.json", "index.jsonl", "manifest.resolved.yaml"])
def test_a_run_file_that_is_a_symlink_is_refused_and_its_target_untouched(
    project: Path, squeeze, name
) -> None:
    out = project / "out"
    out.mkdir()
    victim = project / "victim.txt"
    victim.write_text("precious\n")
    (out / name).symlink_to(victim)
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    line = one_error_line(result.err)
    assert result.code == EXIT_INVALID
    assert line.startswith(f"error: {out / name} is a symbolic link, not a regular file (hint: remove it")
    assert victim.read_text() == "precious\n"
    assert files_under(out) == [name]


def test_a_shard_folder_that_is_a_symlink_is_refused(project: Path, squeeze) -> None:
    out, elsewhere = project / "out", project / "elsewhere"
    elsewhere.mkdir()
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "0-of-2").symlink_to(elsewhere)
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", "0/2", "--quiet")
    line = one_error_line(result.err)
    assert result.code == EXIT_INVALID
    assert line.startswith(
        f"error: {out / 'shards' / '0-of-2'} is a symbolic link (hint: replace it by a real"
    )
    assert list(elsewhere.iterdir()) == []
    assert files_under(out) == ["shards", "shards/0-of-2"]


def test_a_subject_folder_that_is_a_symlink_inside_out_is_refused(project: Path, squeeze) -> None:
    out = project / "out"
    (out / "cat").mkdir(parents=True)
    (out / "dog").symlink_to(out / "cat")
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err).startswith(f"error: {out / 'dog'} is a symbolic link")
    assert list((out / "cat").iterdir()) == []


def test_an_atomic_write_never_goes_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    # A link at the file's own name is replaced by the new file, not written through.
    (out / "run.json").symlink_to(victim)
    outputs.atomic_write_text(out / "run.json", "new")
    assert not (out / "run.json").is_symlink() and (out / "run.json").read_text() == "new"
    assert victim.read_text() == "precious"
    # A link in place of the folder is refused.
    (out / "dog").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(outputs.UnsafeOutputPathError, match="it is a symbolic link"):
        outputs.atomic_write_bytes(out / "dog" / "000-s0.png", b"data")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_the_lock_file_is_never_opened_through_a_link(tmp_path: Path) -> None:
    from squeeze_cli.gen.lock import DirectoryLock, LayoutLock

    victim = tmp_path / "victim"
    victim.write_text("precious")
    for lock, name in (
        (DirectoryLock(tmp_path), ".squeeze.lock"),
        (LayoutLock(tmp_path, None), ".squeeze-layout.lock"),
    ):
        (tmp_path / name).symlink_to(victim)
        with pytest.raises(outputs.OutputWriteError, match="symbolic links"):
            lock.acquire()
    assert victim.read_text() == "precious"


def test_a_sidecar_or_index_that_is_a_link_is_not_read_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text('{"job_id": "a"}\n')
    (tmp_path / "000-s0.json").symlink_to(outside)
    assert outputs.read_sidecar(tmp_path / "000-s0.json") is None
    (tmp_path / "index.jsonl").symlink_to(outside)
    with pytest.raises(outputs.OutputWriteError, match="symbolic links"):
        outputs.read_index(tmp_path)


# 9.6 Nothing hangs or eats the memory -----------------------------------------------------------------


def squeeze_subprocess(*args: str, cwd: Path, cache: str | None = None) -> subprocess.CompletedProcess:
    """`squeeze ARGS` with 2 GB of address space at most: a read of /dev/zero fails fast, not the machine."""

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-m", "squeeze_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_memory,
        env=env(cache or os.environ["SQUEEZE_CACHE"]),
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["validate", "/dev/zero"],
            "error: /dev/zero: cannot read the manifest: not a regular file (a character",
        ),
        (
            ["validate", "zero.yaml"],
            "error: zero.yaml:2:9: recipe: cannot read recipe file '/dev/zero': not a ",
        ),
        (
            ["validate", "m.yaml", "--recipe", "/dev/urandom"],
            "recipe file '/dev/urandom': not a regular file",
        ),
    ],
)
def test_a_device_as_manifest_or_recipe_is_refused_at_once(project: Path, args, expected) -> None:
    (project / "zero.yaml").write_text(MANIFEST.replace("recipe: tiny", "recipe: /dev/zero"))
    result = squeeze_subprocess(*args, cwd=project)
    assert result.returncode == EXIT_INVALID
    assert expected in one_error_line(result.stderr)


def test_a_folder_linked_to_itself_under_a_double_star_glob_counts_each_photo_once(
    project: Path, make_image
) -> None:
    from squeeze_cli.manifest import load_manifest

    make_image("photos/a.jpg")
    make_image("photos/sub/b.jpg")
    (project / "photos" / "loop").symlink_to(project / "photos")  # a link to itself
    (project / "photos" / "sub" / "up").symlink_to(project / "photos")  # a link to a parent
    (project / "photos" / "same.jpg").symlink_to(project / "photos" / "a.jpg")  # one file, two names
    (project / "g.yaml").write_text(
        MANIFEST.replace("[images/dog/00.jpg]", "[photos/**/*.jpg, photos/a.jpg, ./photos/sub/b.jpg]")
    )
    loaded = finishes(load_manifest, project / "g.yaml")
    assert loaded.subjects[0].references == (
        str(project / "photos" / "a.jpg"),
        str(project / "photos" / "sub" / "b.jpg"),
    )


def test_a_double_star_glob_still_finds_photos_behind_a_link_to_another_folder(
    project: Path, make_image
) -> None:
    from squeeze_cli.manifest.globs import glob_paths

    make_image("library/x.png")
    (project / "photos").mkdir()
    (project / "photos" / "library").symlink_to(project / "library")
    assert glob_paths(str(project / "photos" / "**" / "*.png")) == [str(project / "photos/library/x.png")]


def test_special_files_are_refused_without_blocking(tmp_path: Path, make_image) -> None:
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    assert finishes(check_image, str(fifo)) == "not a regular file (a FIFO (named pipe))"
    for reader in (upright_size, load_rgb):
        with pytest.raises(NotARegularFileError, match="FIFO"):
            finishes(reader, fifo)
    os.mkfifo(tmp_path / "000-s0.json")
    assert finishes(outputs.read_sidecar, tmp_path / "000-s0.json") is None
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2000)
    with pytest.raises(FileTooLargeError, match="limit"):
        read_regular_file(big, 1000)


def test_a_reference_swapped_for_a_fifo_after_validation_is_one_line(
    project: Path, monkeypatch, squeeze
) -> None:
    from squeeze_cli.gen import runner

    load = runner.Runner.load
    reference = project / "images" / "dog" / "00.jpg"

    def swap_during_load(self) -> None:  # what another program could do while the model loads
        load(self)
        reference.unlink()
        os.mkfifo(reference)

    monkeypatch.setattr(runner.Runner, "load", swap_during_load)
    with deadline():
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), "--quiet")
    assert result.code == EXIT_INVALID
    assert (
        "subjects[0].references: a reference cannot be read any more: NotARegularFileError"
        in one_error_line(result.err)
    )
    assert not (project / "out").exists()


def test_a_fifo_at_a_sidecar_path_is_refused_before_anything_runs(project: Path, squeeze) -> None:
    out = project / "out"
    (out / "dog").mkdir(parents=True)
    os.mkfifo(out / "dog" / "000-s1.json")
    with deadline():
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err).startswith(
        f"error: {out / 'dog' / '000-s1.json'} is a FIFO (named pipe), not a regular file (hint: remove it"
    )


# 9.7 Damaged records are damaged files; a file-size limit is named -------------------------------------


def test_deeply_nested_sidecars_and_index_lines_count_as_damaged(project: Path, squeeze, plan_of) -> None:
    out = project / "out"
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet").code == EXIT_OK
    jobs = plan_of(project / "m.yaml")
    layout.sidecar_path(out, jobs[0]).write_text("[" * 100000)
    with open(out / "index.jsonl", "a") as index:
        index.write("[" * 100000 + "\n")
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_OK, result.err
    assert outputs.read_sidecar(layout.sidecar_path(out, jobs[0]))["job_id"] == jobs[0].job_id  # redone
    lines = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]  # all parse
    assert sorted(line["job_id"] for line in lines) == sorted(job.job_id for job in jobs)


FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # what a parent may hand down; squeeze must not die of it
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from squeeze_cli.cli import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_file_size_limit_is_reported_as_such(project: Path, tiny_cache: str) -> None:
    out = project / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FILE_SIZE_LIMIT,
            "3000",
            "gen",
            str(project / "m.yaml"),
            "--out",
            str(out),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(tiny_cache),
    )
    assert result.returncode == EXIT_JOBS_FAILED, result.stderr  # not killed by SIGXFSZ
    line = result.stderr.strip().splitlines()[-1]
    assert "file too large (a file-size limit, ulimit -f, of 3000 bytes)" in line, result.stderr
    assert "No space left" not in result.stderr and "Traceback" not in result.stderr
    assert "(hint: raise the limit (ulimit -f unlimited)" in line


def test_writes_under_a_file_size_limit_say_so(tmp_path: Path) -> None:
    code = (
        "import resource, sys\n"
        "from squeeze_cli import outputs\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))\n"
        "for write in (\n"
        f"    lambda: outputs.append_index({str(tmp_path)!r}, {{'job_id': 'a', 'prompt': 'x' * 200}}),\n"
        f"    lambda: outputs.atomic_write_bytes({str(tmp_path / 'run.json')!r}, b'x' * 200),\n"
        "):\n"
        "    try:\n"
        "        write()\n"
        "    except outputs.OutputWriteError as error:\n"
        "        print(error.one_line(), error.errno)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stderr
    for line in lines:
        assert "file too large (a file-size limit, ulimit -f, of 100 bytes)" in line
        assert line.split()[-1] == str(errno.EFBIG)
    assert (tmp_path / "index.jsonl").read_bytes() == b""  # the cut-off line was removed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index.jsonl"]  # no temporary file


# 9.8 An empty --out ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_out_is_refused(project: Path, squeeze, monkeypatch, value) -> None:
    work = project / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    result = squeeze("gen", str(project / "m.yaml"), "--out", value, "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err) == (
        f"error: --out {value!r}: the output folder is empty (hint: give the output folder, e.g. --out out)"
    )
    assert list(work.iterdir()) == []


# 9.9 Checks before anything is written -----------------------------------------------------------------


def test_a_file_where_a_subject_folder_goes_is_refused_before_loading(
    project: Path, squeeze, monkeypatch
) -> None:
    from squeeze_cli.gen import runner

    def must_not_load(self) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner.Runner, "load", must_not_load)
    out = project / "out"
    out.mkdir()
    (out / "dog").write_text("not a folder")
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert result.code == EXIT_INVALID
    assert one_error_line(result.err) == (
        f"error: {out / 'dog'} is a regular file, not a folder (hint: move or remove it: the images of "
        f"subject 'dog' go in the folder {out / 'dog'})"
    )
    assert files_under(out) == ["dog"]


def test_the_documented_reference_limit_is_the_checked_one(tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.new("RGB", (9000, 16)).save(wide)  # wider than 8192, far fewer pixels than the limit
    assert check_image(str(wide)) is None
    docs = (REPO_ROOT / "docs" / "manifest.md").read_text()
    assert f"at most {MAX_REFERENCE_PIXELS:,} pixels in all" in docs
