"""Helpers for the tests that run the `squeeze` command on the tiny recipe: small manifests, the one-line
error squeeze must print, the files a run left, and time limits for calls that could block."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path

# One subject, one prompt, four seeds: a --shard 0/2 and a --shard 1/2 each make part of the same grid.
FOUR_SEEDS = """\
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


# One subject, one prompt, the tiny recipe's seed: one image.
ONE_IMAGE = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
subjects:
  - name: dog
    class: dog
    references: [images/dog/00.jpg]
    prompts: ["a {class} in the snow"]
"""

# The same subject with two prompts of two seeds: four images.
TWO_PROMPTS = ONE_IMAGE.replace(
    'prompts: ["a {class} in the snow"]',
    'prompts: ["a {class} in the snow", "a {class} at sea"]\n    seeds: [0, 1]',
)


# The smallest whole .safetensors file (an empty header): a weights file the checks before loading pass.
EMPTY_SAFETENSORS = (2).to_bytes(8, "little") + b"{}"


def write_checkpoint_layout(folder: Path) -> None:
    """A squeeze pipeline folder as the checks before loading see it (its index and a folder per
    component), without any weights."""
    for part in ("mllm", "tokenizer", "image_processor", "aggregator", "transformer", "vae", "scheduler"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")


def env(cache: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SQUEEZE_CACHE": cache, "OMP_NUM_THREADS": "1"}


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# Off a terminal squeeze starts every log line with its UTC time (squeeze_cli/logs.py; tests/test_logs.py).
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", re.MULTILINE)


def unstamped(text: str) -> str:
    """`text` without the UTC time stamps that start its lines, for tests that read what was said."""
    return STAMP.sub("", text)


def one_error_line(stderr: str) -> str:
    lines = unstamped(stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


# A hang guard's patience, counted in looks (30,000 × 20 ms ≥ 10 min), never read off a clock: a busy
# machine only makes the guard wait longer, so no test depends on how fast it is.
HANG_GUARD_LOOKS = 30_000


def poll_until(ready, interval: float = 0.02, looks: int = HANG_GUARD_LOOKS) -> bool:
    """Whether `ready()` came true, looking at most `looks` times, `interval` apart (a hang guard)."""
    for _ in range(looks):
        if ready():
            return True
        time.sleep(interval)
    return bool(ready())


def signal_and_wait(signum: int) -> None:
    """Send `signum` to this process and wait for its handler to raise (StopNow, KeyboardInterrupt), which
    ends the wait; a handler that does not raise leaves it after `HANG_GUARD_LOOKS` looks."""
    os.kill(os.getpid(), signum)
    poll_until(lambda: False)


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


# Two subjects of two prompts and two seeds: eight images, four grids, two contact sheets.
TWO_SUBJECTS = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
  reference_size: 32
  seeds: [0, 1]
subjects:
  - name: dog
    class: dog
    references: [images/dog/00.jpg]
    prompts: ["a {class} in the snow", "a {class} on a beach"]
  - name: cat
    class: cat
    references: [images/dog/00.jpg]
    prompts: ["a {class} in the snow", "a {class} on a beach"]
"""


EXAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "examples" / "images"


def gen_example_run(project: Path, squeeze, manifest: str) -> Path:
    """`project/run`: one `squeeze gen` of `manifest` (saved as `project/m.yaml`) with the example photos
    copied to `project/images`, for tests that read a finished run."""
    import shutil

    shutil.copytree(EXAMPLE_IMAGES, project / "images")
    (project / "m.yaml").write_text(manifest)
    result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "run"), "--quiet")
    assert result.code == 0, result.err
    return project / "run"


def write_in_place(path: Path, at: int, data: bytes) -> None:
    """Overwrite the bytes at `at` (negative: from the end) with `data`, keeping the file's size and inode
    and putting its mtime back: only reading the file tells that it changed (what `--verify` is for)."""
    before = os.stat(path)
    with open(path, "r+b") as handle:
        handle.seek(at, os.SEEK_SET if at >= 0 else os.SEEK_END)
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


def flip_byte_in_place(path: Path, at: int) -> None:
    """`write_in_place` of the byte at `at`, inverted."""
    write_in_place(path, at, bytes([path.read_bytes()[at] ^ 0xFF]))


class ThreadProcesses:
    """`processes.Processes` for a thread standing for one of two processes of a launch (`in_two_threads`:
    its name is its index); `barrier` stands for the process group's."""

    def __init__(self, barrier: threading.Barrier) -> None:
        self.index, self.count, self._barrier = int(threading.current_thread().name), 2, barrier

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        self._barrier.wait()

    def gather(self, value):
        from squeeze_cli import processes

        return processes._all_gather(value, self.count)

    @contextlib.contextmanager
    def main_first(self):
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def threads_as_processes(monkeypatch):
    """Make `processes.together` and `ThreadProcesses` gather between the two threads of `in_two_threads`;
    returns the `Processes` to put in place of the real one."""
    barrier = threading.Barrier(2, timeout=30)  # a process left waiting fails the test, not hangs it
    gather_between_threads(monkeypatch, barrier)
    return lambda: ThreadProcesses(barrier)


def gather_between_threads(monkeypatch, barrier: threading.Barrier) -> None:
    """Make `processes.together` gather between threads named by their rank, which meet at `barrier`."""
    from squeeze_cli import processes

    gathered: dict[int, object] = {}

    def all_gather(value, count):
        gathered[int(threading.current_thread().name)] = value
        barrier.wait()
        values = [gathered[rank] for rank in range(count)]
        barrier.wait()
        return values

    monkeypatch.setattr(processes, "_all_gather", all_gather)


def _loading_patches() -> list[tuple[object, str, object]]:
    """What model loading patches while it runs, as (owner, name, value) now: transformers' `no_tie_weights`
    and `no_init_weights` (`PreTrainedModel.tie_weights`, `init_weights`, torch's init functions) and
    accelerate's `init_empty_weights` (`nn.Module.register_parameter`, `register_buffer`). Each restores what
    it found, so two threads loading at once can leave a patch in place for good: every model built later in
    the test session would be untied and left uninitialised (a model's size counted 0.4 B too large)."""
    import sys

    import torch
    from transformers import PreTrainedModel

    try:  # where transformers 5 lists what `no_init_weights` patches; a later one may move it
        from transformers.initialization import TORCH_INIT_FUNCTIONS, TORCH_MODULES_TO_PATCH
    except ImportError:
        TORCH_INIT_FUNCTIONS, TORCH_MODULES_TO_PATCH = {}, ()  # noqa: N806 - the same names as above

    owners = {PreTrainedModel: ("tie_weights", "init_weights")}
    owners[torch.nn.Module] = ("register_parameter", "register_buffer")
    for module in filter(None, map(sys.modules.get, TORCH_MODULES_TO_PATCH)):
        owners[module] = tuple(name for name in TORCH_INIT_FUNCTIONS if hasattr(module, name))
    return [(owner, name, getattr(owner, name)) for owner, names in owners.items() for name in names]


def in_two_threads(work) -> dict[int, object]:
    """`work()` in two threads named 0 and 1, standing for two processes; what each returned or raised.
    What their model loads patch at once is put back after (`_loading_patches`): real processes share none."""
    ended: dict[int, object] = {}
    patched = _loading_patches()

    def process(rank: int) -> None:
        try:
            ended[rank] = work()
        except BaseException as error:  # noqa: BLE001 - told to the test's thread
            ended[rank] = error

    threads = [threading.Thread(target=process, args=(rank,), name=str(rank)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for owner, name, value in patched:
        setattr(owner, name, value)
    return ended
