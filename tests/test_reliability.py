"""Crash safety of `squeeze gen`: kill -9 at random moments, SIGINT/SIGTERM, one run per output
directory, and a full disk or a permission error while writing. What a user must be able to rely on
(docs/reliability.md): every finished image stays finished, no file is ever half there, and running the
same command again completes the rest with the same pixels."""

from __future__ import annotations

import errno
import fnmatch
import itertools
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import poll_until, signal_and_wait, unstamped

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_INVALID, EXIT_JOBS_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM
from squeeze_cli.outputs import layout

# 2 subjects x 2 prompts x 3 seeds = 12 jobs of 32x32 in 2 steps: the tiny model does one in ~50 ms.
MANIFEST = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  seeds: {seeds}
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts:
      - a {{class}} in the snow
      - a {{class}} on the beach
  - name: backpack
    class: backpack
    references: [images/backpack/00.jpg]
    prompts:
      - a {{class}} on a table
      - a {{class}} in a forest
"""
NUM_JOBS = 12


@pytest.fixture(scope="module")
def tiny_cache() -> str:
    """The tiny checkpoint built once, before any kill, so no kill lands in its build."""
    from squeeze_cli.loading import ensure_tiny_checkpoint

    ensure_tiny_checkpoint("internvl")
    return os.environ["SQUEEZE_CACHE"]


@pytest.fixture
def project(make_project) -> Path:
    return make_project(m=MANIFEST.format(seeds="[0, 1, 2]"), long=MANIFEST.format(seeds="{count: 40}"))


@pytest.fixture
def gen(squeeze):
    """`squeeze gen ARGS` in this process; returns (exit code, stderr)."""

    def run(*args: str) -> tuple[int, str]:
        result = squeeze("gen", *args)
        return result.code, result.err

    return run


# Subprocesses ---------------------------------------------------------------------------------------


def subprocess_env(cache: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SQUEEZE_CACHE": cache, "OMP_NUM_THREADS": "1", **extra}


# Loaded by the child Python through PYTHONPATH: every batch after the first says so in `<gate>.waiting` and
# waits until the gate file exists, so a test can signal a run at a known point however loaded the machine is.
GATE_HOOK = """
import os, time
from squeeze_cli.gen import worker

_generate, _calls = worker.Worker._generate, []


def _gated(self, batch, condition):
    if _calls:
        open(os.environ["SQUEEZE_TEST_GATE"] + ".waiting", "w").close()
        for _ in range(30_000):  # a hang guard that counts looks: the test opens the gate
            if os.path.exists(os.environ["SQUEEZE_TEST_GATE"]):
                break
            time.sleep(0.02)
    _calls.append(batch)
    return _generate(self, batch, condition)


worker.Worker._generate = _gated
"""


# For the kill storm's last try at a phase: the run waits, where `SQUEEZE_TEST_GATE_AT` says (before a batch
# is generated, or before the final index merge), after saying so in `<gate>.waiting`, until it is killed.
STORM_GATE_HOOK = """
import os, time
from squeeze_cli.gen import runner, worker


def _gated(owner, name):
    real = getattr(owner, name)

    def gated(*args, **kwargs):
        open(os.environ["SQUEEZE_TEST_GATE"] + ".waiting", "w").close()
        for _ in range(30_000):  # a hang guard that counts looks: the test kills the run here
            time.sleep(0.02)
        return real(*args, **kwargs)

    setattr(owner, name, gated)


_gated(*{"generation": (worker.Worker, "_generate"), "final": (runner, "_merge_index")}[
    os.environ["SQUEEZE_TEST_GATE_AT"]
])
"""


_STDERR_NUMBERS = itertools.count()


class GenProcess:
    """`python -m squeeze_cli gen ... --json` with its JSON events timestamped as they arrive."""

    def __init__(self, manifest: Path, out: Path, cache: str, *extra: str, env: dict[str, str] | None = None):
        self.started = time.monotonic()
        self.stderr_path = out.parent / f"{out.name}.{next(_STDERR_NUMBERS)}.stderr"  # one per process
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "squeeze_cli",
                    "gen",
                    str(manifest),
                    "--out",
                    str(out),
                    "--json",
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=subprocess_env(cache, **(env or {})),
            )
        self.events: queue.Queue = queue.Queue()
        self.seen: list[tuple[float, dict]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.put((time.monotonic() - self.started, json.loads(line)))
        self.events.put(None)  # end of output: the process is exiting

    def wait_for(self, name: str, count: int = 1, timeout: float = 600) -> dict | None:
        """The `count`-th event called `name` (counting every one seen so far), or None at exit."""
        while sum(event["event"] == name for _, event in self.seen) < count:
            item = self.events.get(timeout=timeout)  # a hang guard on each event, not a speed check
            if item is None:
                self.events.put(None)
                return None
            self.seen.append(item)
        return [event for _, event in self.seen if event["event"] == name][count - 1]

    def finish(self, timeout: float = 600) -> int:  # timeouts here guard against hangs only
        code = self.proc.wait(timeout=timeout)
        while self.wait_for("__end__", timeout=timeout) is not None:  # the rest of its output
            pass
        return code

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


# Checks ---------------------------------------------------------------------------------------------


def temp_files(out: Path) -> list[str]:
    return [
        os.path.join(root, name) for root, _, names in os.walk(out) for name in names if name.endswith(".tmp")
    ]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_complete(out: Path, jobs) -> None:
    """Every job's image exactly once, decodable, with its sidecar and one index line; no temporary file."""
    expected = {layout.image_name(job) for job in jobs}
    found = {str(p.relative_to(out)) for p in out.glob("*/[0-9]*-s*.png")}
    assert found == expected
    for job in jobs:
        with Image.open(layout.image_path(out, job)) as image:
            image.load()  # decodes every pixel: a truncated PNG raises here
        record = json.loads(layout.sidecar_path(out, job).read_text())
        assert record["job_id"] == job.job_id
    data = (out / "index.jsonl").read_bytes()
    assert data.endswith(b"\n")
    lines = [json.loads(line) for line in data.decode().splitlines()]  # raises on a broken line
    assert sorted(line["job_id"] for line in lines) == sorted(job.job_id for job in jobs)  # no duplicate
    assert {line["status"] for line in lines} == {"ok"}
    assert temp_files(out) == []
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def assert_finished_intact(out: Path, jobs, finished_ids: set[str]) -> None:
    """What a stopped run leaves: the finished jobs whole (image, sidecar, index line), nothing partial."""
    assert set(outputs.finished_job_ids(out, jobs)) == finished_ids
    for job in jobs:
        if job.job_id in finished_ids:
            with Image.open(layout.image_path(out, job)) as image:
                image.load()
    data = (out / "index.jsonl").read_bytes() if (out / "index.jsonl").exists() else b""
    assert data == b"" or data.endswith(b"\n")
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert len(lines) == len({line["job_id"] for line in lines})
    assert {line["job_id"] for line in lines} <= finished_ids
    assert temp_files(out) == []


# kill -9 ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments(project: Path, tiny_cache: str, plan_of) -> None:
    manifest = project / "m.yaml"
    jobs = plan_of(manifest)

    # One uninterrupted run: the reference pixels, and the timeline the kills are scaled to.
    reference = GenProcess(manifest, project / "reference", tiny_cache)
    assert reference.finish() == EXIT_OK, reference.stderr[-3000:]
    times = {}
    for at, event in reference.seen:
        times.setdefault(event["event"], at)
        if event["event"] == "job_finished":
            times["last_job_finished"] = at
    per_job = (times["last_job_finished"] - times["run_started"]) / NUM_JOBS
    final_phase = times["run_summary"] - times["last_job_finished"]  # index repair, grids, run.json

    rng = random.Random(20240501)
    # In this order in each lane, so that every kill has something to interrupt: a run with nothing left to
    # do skips the model load and ends in a second or two. The moment within each phase is random.
    phases = ["start-up"] * 4 + ["generation"] * 3 + ["final"]
    lanes = {project / "lane0": phases, project / "lane1": phases}
    killed: list[str] = []
    completed: list[str] = []  # a kill that came too late: the run had already finished

    hook = project / "storm-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STORM_GATE_HOOK)

    def gated_trial(out: Path, phase: str) -> GenProcess:
        """A run killed at a gate in `phase`: the last try, which no machine's speed can make too late."""
        gate = out.parent / f"{out.name}.gate"
        env = {"PYTHONPATH": str(hook), "SQUEEZE_TEST_GATE": str(gate), "SQUEEZE_TEST_GATE_AT": phase}
        process = GenProcess(manifest, out, tiny_cache, env=env)
        waiting = Path(f"{gate}.waiting")
        poll_until(lambda: waiting.exists() or process.proc.poll() is not None)  # it waits at the gate
        waiting.unlink(missing_ok=True)
        return process

    def one_trial(out: Path, phase: str, rng: random.Random, scale: float | None) -> bool:
        """One run killed at a random moment of `phase` (its window scaled by `scale`; None: at a gate in
        it); whether the kill landed before the run ended."""
        if scale is None:
            process = gated_trial(out, phase)
        else:
            process = GenProcess(manifest, out, tiny_cache)
            if phase == "start-up":  # imports, model load, lock, index repair
                time.sleep(rng.uniform(0.0, scale * times["run_started"]))
            else:
                started = process.wait_for("run_started")
                pending = started["jobs"] if started else 0
                if phase == "generation":
                    assert pending, process.stderr[-3000:]  # `lane` starts it with work left
                    # 0-2 jobs in (the final trial needs work left: grids are drawn when images are new),
                    # then somewhere inside a job: generating, encoding the PNG, writing, appending the index.
                    jobs_in = rng.randrange(min(pending, 3))
                    if jobs_in:
                        process.wait_for("job_finished", jobs_in)
                    time.sleep(rng.uniform(0.0, scale * per_job))
                else:
                    if pending:
                        process.wait_for("job_finished", pending)
                    time.sleep(rng.uniform(0.0, scale * final_phase))
        if process.proc.poll() is None:
            process.proc.send_signal(signal.SIGKILL)
        code = process.finish()
        if code == -signal.SIGKILL:
            killed.append(phase)
            return True
        assert code == EXIT_OK, process.stderr[-3000:]
        completed.append(phase)
        return False

    def lane(out: Path, lane_phases: list[str], seed: int) -> None:
        lane_rng = random.Random(seed)
        for phase in lane_phases:
            if phase == "generation" and len(outputs.finished_job_ids(out, jobs)) == NUM_JOBS:
                shutil.rmtree(out)  # an earlier kill came after the last image: nothing left to generate
            # The moments come from the reference run's timeline, and this machine may be faster or slower
            # now: a kill that came after the run ended is tried again on a fresh folder, in a window half
            # as wide each time, and at last at a gate in the phase (start-up: its first moment), where the
            # run waits to be killed however busy the machine is.
            last: float | None = 0.0 if phase == "start-up" else None
            for scale in (1.0, 0.5, 0.25, 0.125, last):
                if one_trial(out, phase, lane_rng, scale):
                    break
                shutil.rmtree(out)

    # Two lanes of trials side by side (the machine has two cores), each on its own output directory.
    errors: list[BaseException] = []

    def guarded(*args) -> None:
        try:
            lane(*args)
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)

    threads = [
        threading.Thread(target=guarded, args=(out, lane_phases, rng.randrange(2**32)))
        for out, lane_phases in lanes.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()  # each trial's own waits are bounded
    if errors:
        raise errors[0]
    # Each phase of each lane ends in exactly one kill, however fast the machine: its last try waits at a gate
    # (start-up: the kill comes as the process starts). The clock above only picks the moments.
    assert sorted(killed) == sorted(phase for lane_phases in lanes.values() for phase in lane_phases), (
        killed,
        completed,
    )

    # Then each directory runs to completion: everything once, whole, and the same pixels.
    finals = [GenProcess(manifest, out, tiny_cache) for out in lanes]
    for process in finals:
        assert process.finish() == EXIT_OK, process.stderr[-3000:]
    reference_pixels = {
        layout.image_name(job): pixels(layout.image_path(project / "reference", job)) for job in jobs
    }
    for out in lanes:
        assert_complete(out, jobs)
        for job in jobs:
            difference = np.abs(
                pixels(layout.image_path(out, job)) - reference_pixels[layout.image_name(job)]
            )
            assert difference.max() <= 1, layout.image_name(job)
        for grid in out.glob("*/grid-*.png"):
            Image.open(grid).load()


# SIGINT / SIGTERM -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_and_sigterm_stop_after_the_current_batch(project: Path, tiny_cache: str, plan_of) -> None:
    manifest = project / "m.yaml"
    jobs = plan_of(manifest)
    hook = project / "gate-hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GATE_HOOK)
    runs, gates = {}, {}
    for signum, name in ((signal.SIGINT, "int"), (signal.SIGTERM, "term")):
        gates[signum] = project / f"{name}.gate"
        env = {"PYTHONPATH": str(hook), "SQUEEZE_TEST_GATE": str(gates[signum])}
        runs[signum] = GenProcess(manifest, project / name, tiny_cache, env=env)
    for signum, process in runs.items():
        # The first job is done and the second waits at the gate: the signal lands during the second batch.
        waiting = Path(f"{gates[signum]}.waiting")
        poll_until(lambda w=waiting, p=process: w.exists() or p.proc.poll() is not None)
        assert waiting.exists(), process.stderr[-3000:]
        process.proc.send_signal(signum)
        # The gate opens once the run has taken the signal in (or has ended: the asserts below say why).
        poll_until(
            lambda p=process: "stopping after the current batch" in p.stderr or p.proc.poll() is not None
        )
        gates[signum].touch()
    for signum, process in runs.items():
        code = process.finish()
        out = project / ("int" if signum == signal.SIGINT else "term")
        assert code == (EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM), process.stderr[-3000:]
        assert "stopping after the current batch" in process.stderr
        assert "Traceback" not in process.stderr
        summary = json.loads((out / "run.json").read_text())
        finished = [event for _, event in process.seen if event["event"] == "job_finished"]
        assert summary["status"] == "interrupted"
        assert summary["jobs"]["succeeded"] == len(finished) == 2
        assert summary["jobs"]["planned"] == NUM_JOBS and summary["jobs"]["failed"] == 0
        assert process.seen[-1][1]["event"] == "run_summary"
        assert_finished_intact(out, jobs, {event["job_id"] for event in finished})
        assert not list(out.glob("*/grid-*.png"))  # a stopped run does not wait for its grids

    reruns = {
        signum: GenProcess(manifest, project / out, tiny_cache)
        for signum, out in ((signal.SIGINT, "int"), (signal.SIGTERM, "term"))
    }
    for signum, process in reruns.items():
        assert process.finish() == EXIT_OK, process.stderr[-3000:]
        out = project / ("int" if signum == signal.SIGINT else "term")
        summary = json.loads((out / "run.json").read_text())
        stopped = runs[signum].seen[-1][1]["jobs"]["succeeded"]
        assert summary["jobs"]["skipped"] == stopped and summary["jobs"]["succeeded"] == NUM_JOBS - stopped
        assert_complete(out, jobs)
        assert len(list(out.glob("*/grid-*.png"))) == 4


def test_a_signal_before_anything_is_written_stops_at_once_and_a_second_one_too() -> None:
    from squeeze_cli.gen.signals import StopNow, StopSignal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        with pytest.raises(StopNow) as stopped:  # loading the model: nothing to save, stop now
            signal_and_wait(signal.SIGTERM)
        assert stopped.value.signum == signal.SIGTERM
        stop.graceful = True
        os.kill(os.getpid(), signal.SIGINT)  # generating: finish the batch first
        assert poll_until(lambda: stop.signum == signal.SIGINT)
        with pytest.raises(StopNow):
            signal_and_wait(signal.SIGINT)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # restored


def test_a_signal_handler_set_during_the_run_is_kept() -> None:
    """`processes.together` ignores SIGTERM once every process of a launch ends on a refusal, so that the
    launcher's SIGTERM to those left does not replace their exit code; leaving the run put the handler from
    before it back over that, and the launcher reported -15 for them again."""
    from squeeze_cli.gen.signals import StopSignal

    before = signal.getsignal(signal.SIGTERM)
    try:
        with StopSignal():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_the_process_that_met_a_refusal_raises_its_own_error_with_its_cause(monkeypatch) -> None:
    """`processes.together` raised, in the process that met the refusal, the copy of its error that came back
    from the gather (torch pickles every process's part, its own too): without its cause or traceback, which
    SQUEEZE_DEBUG=1 prints."""
    import pickle

    from squeeze_cli import processes
    from squeeze_cli.errors import UsageError

    monkeypatch.setattr(
        processes, "_all_gather", lambda value, count: [pickle.loads(pickle.dumps(value)), None]
    )
    raised = UsageError("refused")

    def check() -> None:
        raise raised from OSError("the cause")

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(UsageError) as caught:
            processes.together(check, 0, 2)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert caught.value is raised and isinstance(caught.value.__cause__, OSError)


@pytest.mark.parametrize("then", ["fails", "loads"])
def test_a_signal_a_library_loses_while_loading_still_stops_the_run(project, gen, monkeypatch, then) -> None:
    """Ctrl-C in the first second of `gen` landed in an import inside diffusers, which lost the StopNow and
    then failed with a RecursionError wrapped in RuntimeError: a traceback and exit code 1. A library that
    loses it and loads all the same let the run go on as if no one had pressed Ctrl-C."""
    import squeeze_cli.loading

    load_pipeline = squeeze_cli.loading.load_pipeline

    def loses_the_signal(*args, **kwargs):
        try:
            signal_and_wait(signal.SIGINT)
        except BaseException:  # noqa: BLE001 - as the library did
            pass
        if then == "fails":
            raise RuntimeError("Failed to import diffusers.loaders.lora_pipeline")
        return load_pipeline(*args, **kwargs)

    monkeypatch.setattr(squeeze_cli.loading, "load_pipeline", loses_the_signal)
    code, err = gen(str(project / "m.yaml"), "--out", str(project / "out"))
    assert code == EXIT_SIGINT, err
    assert err.strip().splitlines()[-1] == "stopped at once by SIGINT: nothing was generated"
    assert not (project / "out" / "index.jsonl").exists()
    assert not list((project / "out").glob("*/*.png"))


# One run per output directory ------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_gen_on_a_directory_in_use_is_refused(project: Path, tiny_cache: str) -> None:
    out = project / "out"
    # The first run waits at a gate after its first image, so it is still running however slowly the
    # second one starts.
    hook, gate = project / "gate-hook", project / "in-use.gate"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(GATE_HOOK)
    env = {"PYTHONPATH": str(hook), "SQUEEZE_TEST_GATE": str(gate)}
    first = GenProcess(project / "long.yaml", out, tiny_cache, env=env)
    assert first.wait_for("job_finished") is not None, first.stderr[-3000:]
    second = subprocess.run(
        [sys.executable, "-m", "squeeze_cli", "gen", str(project / "long.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=subprocess_env(tiny_cache),
        timeout=600,  # a hang guard
    )
    assert first.proc.poll() is None, "the first run ended before the second one was refused"
    assert second.returncode == EXIT_INVALID
    lines = unstamped(second.stderr).strip().splitlines()
    assert lines == [
        f"error: {out} is in use by another squeeze gen (pid {first.proc.pid}) "
        "(hint: wait for it to finish, or choose another --out)"
    ]
    first.proc.send_signal(signal.SIGTERM)
    poll_until(lambda: "stopping after the current batch" in first.stderr or first.proc.poll() is not None)
    gate.touch()
    assert first.finish() == EXIT_SIGTERM
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"  # the first run's


def test_a_lock_left_by_a_killed_process_is_taken_over(project: Path, gen, plan_of) -> None:
    out = project / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            f"fd = os.open({str(out / '.squeeze.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, str(os.getpid()).encode())\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",  # holds the lock until killed, however long gen takes to get there
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    code, stderr = gen(str(project / "m.yaml"), "--out", str(out))
    assert code == EXIT_INVALID and f"(pid {holder.pid})" in stderr
    assert not (out / "index.jsonl").exists()

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdin.close()
    holder.stdout.close()
    code, stderr = gen(str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert code == EXIT_OK, stderr
    assert "in use" not in stderr and "lock" not in stderr.lower()  # taken over silently
    assert (out / ".squeeze.lock").read_text() == str(os.getpid())
    assert_complete(out, plan_of(project / "m.yaml"))


def test_a_stale_lock_file_with_a_dead_pid_is_taken_over(project: Path, gen, plan_of) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = project / "out"
    out.mkdir()
    (out / ".squeeze.lock").write_text(str(dead.pid))
    code, stderr = gen(str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert code == EXIT_OK, stderr
    assert "in use" not in stderr
    assert_complete(out, plan_of(project / "m.yaml"))


# Disk full / permission denied -----------------------------------------------------------------------


def fail_writes(
    monkeypatch, out: Path, *, call: str, after: int, error: int, persistent: bool, target: str = ".png"
) -> dict:
    """Make `os.replace` or `os.write` fail for files under `out`.

    The first `after` calls on files whose name matches `target` succeed; the next one fails with `error`
    (`os.write` first writes half its bytes, like a disk filling up mid-write). With `persistent`, every
    later write under `out` fails too (the disk stays full); otherwise only that one.
    """
    state = {"count": 0, "failing": False, "failed_path": None}
    real_replace, real_write = os.replace, os.write
    roots = (str(out) + os.sep, str(out.resolve()) + os.sep)

    def should_fail(path: str) -> bool:
        if not path.startswith(roots):
            return False
        if state["failing"]:
            return persistent
        if fnmatch.fnmatch(os.path.basename(path), target):
            state["count"] += 1
            if state["count"] > after:
                state["failing"], state["failed_path"] = True, path
                return True
        return False

    def replace(source, destination):
        if should_fail(str(destination)):
            raise OSError(error, os.strerror(error))
        return real_replace(source, destination)

    def write(fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if should_fail(path):
            first_time = state["failed_path"] == path and state.get("short") is None
            state["short"] = True
            if first_time and len(data) > 1:
                return real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(error, os.strerror(error))
        return real_write(fd, data)

    monkeypatch.setattr(os, call, replace if call == "replace" else write)
    return state


@pytest.mark.parametrize(
    "call, target, error, persistent",
    [
        ("replace", "[0-9]*-s*.png", errno.ENOSPC, True),  # the disk fills up while writing an image
        ("replace", "[0-9]*-s*.json", errno.EACCES, False),  # one sidecar refused, then writes work again
        ("write", "index.jsonl", errno.ENOSPC, True),  # a half-written index line, then nothing fits
        ("write", ".[0-9]*-s*.png.*.tmp", errno.ENOSPC, True),  # a half-written temporary PNG
    ],
    ids=["png-enospc", "sidecar-eacces", "index-short-write", "png-short-write"],
)
def test_a_write_error_stops_the_run_and_keeps_what_finished(
    project: Path, gen, monkeypatch, call, target, error, persistent, plan_of
) -> None:
    out = project / "out"
    jobs = plan_of(project / "m.yaml")
    state = fail_writes(
        monkeypatch, out, call=call, after=3, error=error, persistent=persistent, target=target
    )
    code, stderr = gen(str(project / "m.yaml"), "--out", str(out), "--quiet")
    monkeypatch.undo()  # the disk is freed

    assert code == EXIT_JOBS_FAILED
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    reason = os.strerror(error)
    failed = Path(state["failed_path"])
    if failed.name.endswith(".tmp"):  # the message names the file being written, not its temporary file
        failed = failed.with_name(failed.name[1:].rsplit(".", 2)[0])
    failed = out / failed.relative_to(out.resolve() if not str(failed).startswith(str(out)) else out)
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {failed}: {reason}"), stderr
    assert "(hint: " in errors[0] and errors[0] == stderr.strip().splitlines()[-1]

    # Three images finished before the error (four when only the index line failed): whole, and only them.
    finished = {job.job_id for job in jobs[: 4 if target == "index.jsonl" else 3]}
    assert_finished_intact(out, jobs, finished)
    summary = json.loads((out / "run.json").read_text())
    if persistent:  # run.json could not be rewritten either: it still says `running`, and the error says so
        assert "run.json could not be updated either" in errors[0]
        assert summary["status"] == "running"
    else:
        assert summary["status"] == "failed" and summary["jobs"]["succeeded"] == 3
        assert reason in summary["error"]
    kept = {
        layout.image_name(job): layout.image_path(out, job).stat().st_mtime_ns
        for job in jobs
        if job.job_id in finished
    }

    code, stderr = gen(str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert code == EXIT_OK, stderr
    assert_complete(out, jobs)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # finished work is not redone


def test_a_read_only_output_directory_is_one_clear_line(project: Path, gen, monkeypatch) -> None:
    out = project / "out"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # a directory without write permission (even for root)
        if str(path).startswith(str(out) + os.sep) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, stderr = gen(str(project / "m.yaml"), "--out", str(out), "--quiet")
    assert code == EXIT_JOBS_FAILED and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"error: cannot create the lock file {out}/.squeeze.lock: Permission denied (hint: "
    )
    assert list(out.iterdir()) == []


def test_a_short_index_append_is_cut_back_off(tmp_path: Path, monkeypatch) -> None:
    outputs.append_index(tmp_path, {"job_id": "a", "status": "ok"})
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:7]))
    with pytest.raises(outputs.OutputWriteError, match="index.jsonl"):
        outputs.append_index(tmp_path, {"job_id": "b", "status": "ok"})
    monkeypatch.undo()
    assert (tmp_path / "index.jsonl").read_bytes() == b'{"job_id": "a", "status": "ok"}\n'


def test_an_interrupted_atomic_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "run.json").write_text("old")

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        outputs.atomic_write_text(tmp_path / "run.json", "new")
    monkeypatch.undo()
    assert (tmp_path / "run.json").read_text() == "old" and temp_files(tmp_path) == []
