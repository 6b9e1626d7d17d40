"""One shard layout per output folder: runs of different `--shard` layouts exclude each other, the shards
of one layout share the folder and draw its views one at a time, and once they all finish every grid and
contact sheet shows every image."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import FOUR_SEEDS, TWO_SUBJECTS, files_under, one_error_line, poll_until

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_INVALID, EXIT_OK
from squeeze_cli.outputs import layout
from squeeze_cli.outputs.grids import PageViews, PromptViews


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=FOUR_SEEDS)


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


def _views_on_disk(out: Path) -> set[str]:
    return {
        f"{path.parent.name}/{path.name}"
        for path in out.glob("*/*.png")
        if path.name.startswith(("grid-", "contact-sheet"))
    }


def test_a_shard_draws_only_the_views_of_its_own_prompts(make_project, squeeze, plan_of) -> None:
    from squeeze_cli.plan import shard_jobs

    project = make_project(m=TWO_SUBJECTS)
    jobs = plan_of(project / "m.yaml")
    out = project / "out"
    shards = [shard_jobs(jobs, index, 4) for index in range(4)]
    assert all(shards)  # one prompt each: every shard holds one grid of the four

    result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", "0/4")
    assert result.code == EXIT_OK, result.err
    held = {(job.subject, job.prompt_index) for job in shards[0]}
    expected = {f"{subject}/grid-{prompt:03d}.png" for subject, prompt in held}
    expected |= {f"{subject}/contact-sheet.png" for subject, _ in held}
    assert _views_on_disk(out) == expected  # not the other shards' three grids and the other sheet
    # Its lines say which shard wrote them (a job array's logs land side by side).
    # squeeze's lines, not a library's own warnings on its first import (`[transformers] ...`).
    lines = [line for line in (result.err + result.out).splitlines() if line.strip() and line[0] != "["]
    # (Off a terminal each line starts with its UTC time stamp, then the shard.)
    shard_line = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ )?shard 0/4: ")
    assert lines and all(shard_line.match(line) for line in lines), lines

    for shard in ("2/4", "3/4", "1/4"):  # in any order: the last to finish a view draws it complete
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", shard, "--quiet")
        assert result.code == EXIT_OK, result.err
    finished = outputs.find_finished(out, jobs)
    assert len(finished) == len(jobs) and outputs.plan_views(out, jobs, finished) == []


def test_a_shard_s_json_events_carry_the_shard(make_project, squeeze) -> None:
    project = make_project(m=TWO_SUBJECTS)
    result = squeeze(
        "gen", str(project / "m.yaml"), "--out", str(project / "out"), "--shard", "1/4", "--json"
    )
    assert result.code == EXIT_OK, result.err
    import json

    events = [json.loads(line) for line in result.out.splitlines()]
    assert events and all(event["shard"] == [1, 4] for event in events)


def test_status_merge_draws_every_view_the_shards_left(make_project, squeeze, plan_of) -> None:
    project = make_project(m=TWO_SUBJECTS)
    jobs = plan_of(project / "m.yaml")
    out = project / "out"
    for shard in ("0/4", "1/4", "2/4", "3/4"):
        assert squeeze("gen", str(project / "m.yaml"), "--out", str(out), "--shard", shard, "-q").code == 0
    for view in out.glob("*/grid-*.png"):
        view.unlink()
    assert squeeze("status", str(out), "--merge").code == EXIT_OK
    finished = outputs.find_finished(out, jobs)
    assert outputs.plan_views(out, jobs, finished) == []
    assert len(_views_on_disk(out)) == 4 + 2


HOLD_DRAWING = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, 0)  # byte 0: a shard drawing its views
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="waiting on a lock is seen in /proc/locks")
def test_status_merge_draws_after_a_drawing_shard_with_the_images_found_then(
    make_project, squeeze, plan_of
) -> None:
    """`status --merge` drew from the images it read before its lock, without the shards' drawing lock: a
    shard that finished meanwhile had its fuller views replaced by views without its images."""
    from squeeze_cli.gen.status import merge_run, run_status

    project = make_project(m=TWO_SUBJECTS)
    jobs = plan_of(project / "m.yaml")
    out = project / "out"
    gen = ("gen", str(project / "m.yaml"), "--out", str(out), "-q", "--shard")
    assert squeeze(*gen, "0/2").code == EXIT_OK
    status = run_status(out)  # what merge reads first: shard 1 has not run yet
    assert squeeze(*gen, "1/2").code == EXIT_OK  # its views show every image
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DRAWING, str(out / layout.LAYOUT_LOCK_NAME)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        merged = threading.Thread(target=merge_run, args=(status,))
        merged.start()
        # A lock request that waits shows in /proc/locks as `N: -> POSIX ...`.
        waits = lambda: "->" in Path("/proc/locks").read_text()  # noqa: E731
        assert poll_until(lambda: waits() or not merged.is_alive())
        assert merged.is_alive() and waits(), "merge did not wait for the shard drawing"
        holder.stdin.write("\n")
        holder.stdin.flush()
        merged.join(timeout=120)
        assert not merged.is_alive()
    finally:
        holder.kill()
        holder.wait()
    assert outputs.plan_views(out, jobs, outputs.find_finished(out, jobs)) == []
