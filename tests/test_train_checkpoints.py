"""Training checkpoints on the tiny model: safetensors and JSON only (a pickle in one never runs), checked
against their record before `--resume` uses them (a damaged newest one falls back to the newest intact
one), written whole or not at all (a full disk keeps the earlier ones)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from support import deadline, finishes, gather_between_threads, one_error_line

from squeeze_cli import outputs
from squeeze_cli.train.checkpoints import (
    CheckpointWriteError,
    RunError,
    RunLock,
    checkpoint_problem,
    checkpoint_to_resume,
    load_checkpoint,
)
from squeeze_cli.train.config import load_config
from squeeze_cli.train.data import load_data
from squeeze_cli.train.loop import Trainer

SETTINGS = [
    "stages.stage1.steps=2",
    "stages.stage2.steps=2",
    "checkpointing={every: 2, keep: 3}",
    "validation.prompts=[]",
]
CHECKPOINT_FILES = ["trainable.safetensors", "optimizer.safetensors", "rng-0.safetensors", "train_state.json"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    out = tmp_path_factory.mktemp("checkpoints") / "run"
    loaded = load_config("tiny", [f"output_dir={out}", *SETTINGS])
    trainer = Trainer(loaded, load_data(loaded))
    trainer._setup()
    return trainer


@pytest.fixture(scope="module")
def template(trainer: Trainer) -> Path:
    """A training run's folder with the checkpoints of steps 2 and 4 (of different weights)."""
    out = trainer.output_dir
    outputs.atomic_write_json(out / "training.json", trainer.summary())
    for step in (2, 4):
        with torch.no_grad():
            for parameter in trainer.trainable_parameters().values():
                parameter.add_(0.01)
        trainer.state.step = step
        trainer.save_checkpoint()
    return out


@pytest.fixture
def run(template: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(template, copy)
    return copy


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def _rewrite_record(folder: Path) -> None:
    """What an attacker can do too: a record that matches whatever the folder now holds."""
    record = json.loads((folder / "train_state.json").read_text())
    record["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in folder.iterdir()
        if p.name != "train_state.json"
    }
    (folder / "train_state.json").write_text(json.dumps(record))


def test_a_checkpoint_is_safetensors_and_json_only(template: Path) -> None:
    folder = _checkpoint(template, 4)
    assert sorted(p.name for p in folder.iterdir()) == sorted(CHECKPOINT_FILES)
    assert checkpoint_problem(folder) is None
    assert sorted(p.name for p in (template / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated": _truncate,
    "garbled": _garble,
    "emptied": lambda path: path.write_bytes(b""),
    "missing": Path.unlink,
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(
    run: Path, name: str, damage: str
) -> None:
    DAMAGES[damage](_checkpoint(run, 4) / name)
    start = checkpoint_to_resume(run, "latest")
    assert start.checkpoint == _checkpoint(run, 2)
    [(skipped, problem)] = start.skipped
    assert skipped == _checkpoint(run, 4) and problem
    # Asked for by name, the damaged checkpoint is one line, not a fall-back.
    with pytest.raises(RunError, match=r"step-0000004 is (damaged: |not a squeeze checkpoint)"):
        checkpoint_to_resume(run, str(_checkpoint(run, 4)))


def test_empty_and_foreign_checkpoint_folders_are_passed_over(run: Path) -> None:
    (run / "checkpoints" / "step-abc").mkdir()  # not squeeze's name: ignored
    (run / "checkpoints" / "step-٣").mkdir()  # a non-ASCII digit: not squeeze's either
    (run / "checkpoints" / "step-9999999").mkdir()  # squeeze's name, no checkpoint in it
    for path in _checkpoint(run, 4).iterdir():
        path.unlink()
    start = checkpoint_to_resume(run, "latest")
    assert start.checkpoint == _checkpoint(run, 2)
    assert [folder.name for folder, _ in start.skipped] == ["step-9999999", "step-0000004"]
    assert all("has no train_state.json" in problem for _, problem in start.skipped)


@pytest.mark.parametrize("record", ["[1, 2]", '{"step": 4}', '{"step": "4", "files": {}}', "[" * 100000])
def test_a_record_that_is_no_checkpoint_record_is_damage(run: Path, record: str) -> None:
    (_checkpoint(run, 4) / "train_state.json").write_text(record)
    start = checkpoint_to_resume(run, "latest")
    assert start.checkpoint == _checkpoint(run, 2)
    assert "train_state.json" in start.skipped[0][1]


def test_no_intact_checkpoint_is_one_line(run: Path) -> None:
    for step in (2, 4):
        _garble(_checkpoint(run, step) / "trainable.safetensors")
    with pytest.raises(RunError, match=r"no intact checkpoint in .*step-0000004, is damaged: trainable"):
        checkpoint_to_resume(run, "latest")


def test_resuming_loads_the_checkpoint_exactly(trainer: Trainer, template: Path) -> None:
    saved = {k: v.clone() for k, v in trainer.trainable_parameters().items()}  # as at step 4
    with torch.no_grad():
        for parameter in trainer.trainable_parameters().values():
            parameter.zero_()
    step = load_checkpoint(
        _checkpoint(template, 4),
        trainer.accelerator,
        trainer.trainable_parameters(),
        trainer.optimizer,
        trainer.scheduler,
    )
    assert step == 4
    assert all(torch.equal(saved[k], v) for k, v in trainer.trainable_parameters().items())


class _Payload:
    """Unpickling this creates the file `path`."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("where", ["beside", "instead"])
def test_resuming_never_unpickles(trainer: Trainer, run: Path, tmp_path: Path, where: str) -> None:
    """Pickles in a checkpoint, with a record that vouches for them: ignored beside squeeze's files (the
    names accelerate's checkpoints used), refused in place of them; never run."""
    folder, marker = _checkpoint(run, 4), tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    assert not marker.exists()
    if where == "beside":
        for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
            (folder / name).write_bytes(payload)
    else:
        for name in ("trainable.safetensors", "optimizer.safetensors", "rng-0.safetensors"):
            torch.save(_Payload(marker), folder / name)
    _rewrite_record(folder)
    assert checkpoint_to_resume(run, "latest").checkpoint == folder
    parameters = trainer.trainable_parameters()
    if where == "beside":
        load_checkpoint(folder, trainer.accelerator, parameters, trainer.optimizer, trainer.scheduler)
    else:
        with pytest.raises(RunError, match=r"step-0000004 cannot be read"):
            load_checkpoint(folder, trainer.accelerator, parameters, trainer.optimizer, trainer.scheduler)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("code", "fix"),
    [
        (errno.ENOSPC, "free some space (or raise the quota) on the disk that holds the output directory"),
        (errno.EACCES, "make {folder} writable for this user (or write to another output folder)"),
        (errno.EFBIG, "raise the limit (ulimit -f unlimited)"),
    ],
    ids=["ENOSPC", "EACCES", "EFBIG"],
)
def test_a_failed_checkpoint_write_keeps_the_earlier_checkpoints_and_says_what_to_fix(
    trainer: Trainer, run: Path, monkeypatch, code: int, fix: str
) -> None:
    """The hint said "free some space on that disk (or make it writable)" whatever the error: under
    `ulimit -f` too. Its first half is gen's for the same errno (`outputs.write_fix`)."""
    from squeeze_cli.outputs import files

    before = {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()}
    write = outputs.atomic_write_bytes
    monkeypatch.setattr(files, "file_size_limit", lambda: 3000)  # EFBIG from a `ulimit -f` of 3000 bytes
    failed = run / "checkpoints" / ".partial-step-0000006" / "optimizer.safetensors"

    def write_fails(path, data):
        if Path(path) == failed:
            raise outputs.OutputWriteError.from_os_error(Path(path), OSError(code, os.strerror(code)))
        return write(path, data)

    monkeypatch.setattr(outputs, "atomic_write_bytes", write_fails)
    monkeypatch.setattr(trainer, "output_dir", run)
    monkeypatch.setattr(trainer.state, "step", 6)
    with pytest.raises(CheckpointWriteError) as raised:
        trainer.save_checkpoint()
    assert raised.value.exit_code == 1
    assert raised.value.one_line() == (
        f"cannot write checkpoint {_checkpoint(run, 6)}: {os.strerror(code)} (hint: "
        f"{fix.format(folder=failed.parent)} and continue with `--resume latest`, from step-0000004)"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert {p: p.read_bytes() for p in (run / "checkpoints").rglob("*") if p.is_file()} == before


def test_a_log_replaced_by_a_fifo_mid_run_says_to_remove_it_then_resume(
    run: Path, squeeze, monkeypatch
) -> None:
    """A write error's own fix was replaced by a full disk's ("free some space ..."), for a FIFO put in
    place of the log too: the hint now keeps what to fix, then says how to go on."""
    import squeeze_cli.train.loop

    log = squeeze_cli.train.loop.Trainer._log

    def log_into_a_fifo(self, record) -> None:
        (run / "log.jsonl").unlink(missing_ok=True)
        os.mkfifo(run / "log.jsonl")
        log(self, record)

    shutil.rmtree(_checkpoint(run, 4))  # steps 3 and 4 to train again
    monkeypatch.setattr(squeeze_cli.train.loop.Trainer, "_log", log_into_a_fifo)
    settings = [arg for s in [*SETTINGS, "logging.every=1"] for arg in ("--set", s)]
    with deadline():
        result = squeeze(
            "train", "tiny", "--no-progress", "--set", f"output_dir={run}", *settings, "--resume", "latest"
        )
    assert result.code == 1, result.err
    line = result.err.strip().splitlines()[-1]  # after the models' loading bars
    assert "(hint: remove it: squeeze writes that file itself" in line, line
    assert line.endswith("and continue with `--resume latest`, from step-0000002)"), line


def test_tensorboards_events_are_written_when_training_stops(run: Path, squeeze, monkeypatch) -> None:
    """The TensorBoard writer was closed only after the last step: a Ctrl-C or a failed write left its
    queued events (up to two minutes of them) unwritten."""
    import importlib.util
    import sys
    import types

    import squeeze_cli.train.loop

    closed = []

    class SummaryWriter:  # as torch.utils.tensorboard's, which needs the tensorboard package
        def __init__(self, log_dir: str) -> None:
            pass

        def add_scalar(self, *args) -> None:
            pass

        def close(self) -> None:
            closed.append(True)

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: name == "tensorboard" or find_spec(name, *a)
    )
    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )

    def interrupted(self, *args) -> None:
        raise KeyboardInterrupt

    shutil.rmtree(_checkpoint(run, 4))  # steps 3 and 4 to train again
    monkeypatch.setattr(squeeze_cli.train.loop.Trainer, "save_checkpoint", interrupted)
    settings = [arg for s in [*SETTINGS, "logging.tensorboard=true"] for arg in ("--set", s)]
    result = squeeze(
        "train", "tiny", "--no-progress", "--set", f"output_dir={run}", *settings, "--resume", "latest"
    )
    assert result.code == 130, result.err
    assert closed == [True]


def test_disk_full_while_exporting_is_one_line_saying_resume(run: Path, squeeze, monkeypatch) -> None:
    """The stage export writes through diffusers and safetensors, which raise their own errors: a full disk
    there was a SafetensorError traceback, its `.partial-stage2` left taking the space."""
    import safetensors.torch
    from safetensors import SafetensorError

    save_file = safetensors.torch.save_file

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    settings = [arg for s in SETTINGS for arg in ("--set", s)]
    args = ("train", "tiny", "--no-progress", "--set", f"output_dir={run}", *settings, "--resume", "latest")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    result = squeeze(*args)  # resumes at the last step: only the final export is left to do
    assert result.code == 1 and "Traceback" not in result.err, result.err
    line = result.err.strip().splitlines()[-1]  # after the models' loading bars
    assert line.startswith(
        f"error: cannot write {run / 'stage2'}: Error while serializing: I/O error: No space"
    )
    assert "(hint: free some space" in line  # safetensors' "(os error 28)": a full disk's hint
    assert line.endswith("continue with `--resume latest`, from step-0000004)"), line
    assert not list(run.glob(".partial-*")) and not (run / "stage2").exists()
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert squeeze(*args).code == 0
    assert (run / "stage2" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_disk_full_while_drawing_a_grid_says_resume_not_gens_hint(run: Path, squeeze, monkeypatch) -> None:
    shutil.rmtree(_checkpoint(run, 4))  # steps 3 and 4 to train again, a grid at the end of each stage

    def full_disk(path, *args):
        raise outputs.OutputWriteError.from_os_error(
            Path(path), OSError(errno.ENOSPC, "No space left on device")
        )

    monkeypatch.setattr(outputs, "write_validation_grid", full_disk)
    settings = [arg for s in SETTINGS if not s.startswith("validation") for arg in ("--set", s)]
    result = squeeze(
        "train", "tiny", "--no-progress", "--set", f"output_dir={run}", *settings, "--resume", "latest"
    )
    assert result.code == 1 and "Traceback" not in result.err, result.err
    line = result.err.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write {run / 'validation'}"), line
    assert "finished images" not in line and "continue with `--resume latest`, from step-0000002" in line


def test_a_second_run_on_the_same_output_dir_is_refused(run: Path, squeeze) -> None:
    """Two runs on one folder both went on: every step logged twice, each saving over the other's
    checkpoints, both exiting 0."""
    shutil.rmtree(_checkpoint(run, 4))  # steps 3 and 4 left to train
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = RunLock(run)
    other.acquire()  # a run on that folder, still training
    try:
        settings = [arg for s in SETTINGS for arg in ("--set", s)]
        result = squeeze(
            "train", "tiny", "--no-progress", "--set", f"output_dir={run}", *settings, "--resume", "latest"
        )
    finally:
        other.release()
    assert result.code == 2, result.err
    assert result.err.strip().splitlines()[-1] == (
        f"error: {run} is in use by another squeeze train (hint: wait for it to finish, or set another "
        "`output_dir`)"
    )
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".squeeze-train.lock"}
    assert after == before


def test_an_output_dir_that_cannot_be_made_is_not_a_run_to_resume(tmp_path: Path, squeeze) -> None:
    """Before its lock, a run has written nothing: an `output_dir` that cannot be made said to free some
    space and continue with `--resume latest` (exit 1)."""
    (tmp_path / "file").touch()
    out = tmp_path / "file" / "run"
    settings = [arg for s in SETTINGS for arg in ("--set", s)]
    result = squeeze("train", "tiny", "--no-progress", "--set", f"output_dir={out}", *settings)
    assert result.code == 2, result.err
    assert result.err.strip().splitlines()[-1] == (
        f"error: cannot create the directory {out}: Not a directory (hint: set `output_dir` to a folder "
        "this user can write, on a disk with space)"
    )


class Started(Exception):
    """Where the sketch of `Trainer.run` ends: the run record and config are written."""


def _two_processes(monkeypatch, output_dir: Path, barrier) -> dict[int, BaseException]:
    """`Trainer.run` up to its first log trim in two threads as the two processes of a launch (no models;
    `barrier` stands for the process group's); the exception each ended with."""
    import threading
    from types import SimpleNamespace

    def trim_log(self) -> None:
        raise Started

    gather_between_threads(monkeypatch, barrier)
    for name in ("_setup", "check_fits"):
        monkeypatch.setattr(Trainer, name, lambda self: None)
    monkeypatch.setattr(Trainer, "summary", lambda self: {})
    monkeypatch.setattr(Trainer, "_trim_log", trim_log)
    errors: dict[int, BaseException] = {}

    def process(rank: int) -> None:
        trainer = Trainer.__new__(Trainer)
        trainer.output_dir, trainer.resume = output_dir, None
        trainer.loaded = SimpleNamespace(text="version: 1\n")
        trainer.accelerator = SimpleNamespace(
            is_main_process=rank == 0, process_index=rank, num_processes=2, wait_for_everyone=barrier.wait
        )
        try:
            trainer.run(progress=False)
        except BaseException as error:  # noqa: BLE001 - told to the test's thread
            errors[rank] = error

    threads = [threading.Thread(target=process, args=(rank,), name=str(rank)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors


def test_every_process_looks_at_output_dir_before_the_main_one_writes(tmp_path: Path, monkeypatch) -> None:
    """Under `accelerate launch`, each process looks at the output folder again once the main one holds the
    lock. The main one wrote its run record as soon as it had looked: another process that looked after
    that was refused ("already holds a training run"), and the launch failed."""
    import threading

    from squeeze_cli.train import loop

    barrier = threading.Barrier(2, timeout=60)
    written = threading.Event()
    atomic_write_json, checkpoint_to_resume_ = outputs.atomic_write_json, loop.checkpoint_to_resume
    looks = {0: 0, 1: 0}

    def write_json(path, data):
        atomic_write_json(path, data)
        written.set()

    def look(output_dir, resume):
        rank = int(threading.current_thread().name)
        looks[rank] += 1
        if rank == 1 and looks[rank] == 2:  # the other process looks late: until the main one writes or waits
            while not written.is_set() and barrier.n_waiting == 0:
                written.wait(0.01)
        return checkpoint_to_resume_(output_dir, resume)

    monkeypatch.setattr(outputs, "atomic_write_json", write_json)
    monkeypatch.setattr(loop, "checkpoint_to_resume", look)
    errors = _two_processes(monkeypatch, tmp_path / "run", barrier)
    assert {rank: type(error) for rank, error in errors.items()} == {0: Started, 1: Started}, errors
    assert (tmp_path / "run" / "training.json").is_file()


def test_a_refusal_of_the_main_process_ends_every_process(tmp_path: Path, monkeypatch) -> None:
    """Under `accelerate launch`, the main process refused (the folder's lock held by another run) and
    exited 2 while the others waited at a barrier for it, until torchrun ended them by SIGTERM. Now every
    process ends with the refusal's exit code; only the main one says it."""
    import threading

    from squeeze_cli.errors import OtherProcessError

    other = RunLock(tmp_path / "run")
    other.acquire()  # a run on that folder, still training
    try:
        errors = _two_processes(monkeypatch, tmp_path / "run", threading.Barrier(2, timeout=30))
    finally:
        other.release()
    assert {rank: type(error) for rank, error in errors.items()} == {0: RunError, 1: OtherProcessError}
    assert "in use by another squeeze train" in str(errors[0])
    assert errors[1].exit_code == errors[0].exit_code == 2
    assert not (tmp_path / "run" / "training.json").exists()


@pytest.mark.parametrize("damage", ["garbage", "empty", "no target"])
def test_a_damaged_latent_cache_entry_is_made_again(
    trainer: Trainer, tmp_path: Path, monkeypatch, damage
) -> None:
    """A cache entry that does not load was a SafetensorError traceback at its sample's first batch."""
    from safetensors.torch import save

    monkeypatch.setattr(trainer.config.training, "cache_latents", True)
    monkeypatch.setattr(trainer, "output_dir", tmp_path)
    bucket = trainer.config.training.buckets[0]
    fresh = trainer.prepare_sample(0, bucket)
    entry = trainer._cache_path(fresh.id, bucket)
    entry.write_bytes(
        {"garbage": os.urandom(100), "empty": b"", "no target": save({"x": torch.zeros(1)})}[damage]
    )
    again = trainer.prepare_sample(0, bucket)
    assert torch.equal(again.target_latents, fresh.target_latents)
    assert trainer._cached_latents(fresh.id, bucket) is not None  # stored again, whole


def test_a_checkpoint_of_another_lora_rank_is_one_line(run: Path, squeeze) -> None:
    settings = [arg for s in SETTINGS for arg in ("--set", s)]
    result = squeeze(
        "train", "tiny", "--no-progress", "--set", f"output_dir={run}", *settings, "--set", "lora.rank=4",
        "--resume", "latest",
    )  # fmt: skip
    assert result.code == 2
    assert "does not match this config's trainable parameters" in result.err
    assert "Traceback" not in result.err


def test_resume_falls_back_and_logs_each_step_once(run: Path, squeeze) -> None:
    _truncate(_checkpoint(run, 4) / "optimizer.safetensors")
    settings = [arg for s in SETTINGS for arg in ("--set", s)]
    # A log with steps past the checkpoint it resumes from, and a line cut short by a crash.
    (run / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo'
    )
    result = squeeze(
        "train", "tiny", "--no-progress", "--set", f"output_dir={run}", *settings, "--resume", "latest"
    )
    assert result.code == 0, result.err
    assert f"skipping the damaged checkpoint {_checkpoint(run, 4)}: optimizer.safetensors is " in result.out
    assert f"resumed from {_checkpoint(run, 2)} at step 2" in result.out
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert checkpoint_problem(_checkpoint(run, 4)) is None  # written again


def test_resume_without_a_checkpoint_starts_the_log_again(run: Path, squeeze) -> None:
    shutil.rmtree(run / "checkpoints")
    (run / "log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2)))
    settings = [arg for s in SETTINGS for arg in ("--set", s)]
    result = squeeze(
        "train", "tiny", "--no-progress", "--set", f"output_dir={run}", *settings, "--resume", "latest"
    )
    assert result.code == 0, result.err
    assert "no checkpoint to resume from: starting a new run" in result.out
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def _trim_log(output_dir: Path, step: int) -> None:
    """`Trainer._trim_log` of the main process of a run resumed at `step` (no models)."""
    from types import SimpleNamespace

    from squeeze_cli.train.checkpoints import TrainState

    trainer = Trainer.__new__(Trainer)
    trainer.output_dir, trainer.state = output_dir, TrainState(step)
    trainer.accelerator = SimpleNamespace(is_main_process=True)
    trainer._trim_log()


def _log_lines(steps) -> str:
    return "".join(json.dumps({"step": s, "stage": "stage1", "loss": 1.0}) + "\n" for s in steps)


@pytest.mark.parametrize(
    "tail",
    ["", '{"step": 99, "lo', '{"step": 99999, "loss": 1.0}', "not json\n", "\0" * 200_000, "\n" * 5],
    ids=["nothing", "cut short", "no newline", "garbage line", "long torn write", "empty lines"],
)
@pytest.mark.parametrize("lines", [10, 20_000])  # one chunk, many
def test_resuming_trims_the_log_to_the_checkpoints_step(tmp_path: Path, tail: str, lines: int) -> None:
    step = lines // 2
    kept = _log_lines(range(1, step + 1))
    (tmp_path / "log.jsonl").write_text(kept + _log_lines(range(step + 1, lines + 1)) + tail)
    _trim_log(tmp_path, step)
    assert (tmp_path / "log.jsonl").read_text() == kept
    _trim_log(tmp_path, 0)  # resumed without a checkpoint: every step runs again
    assert (tmp_path / "log.jsonl").read_bytes() == b""


@pytest.mark.parametrize("tail", ["", "\0" * 8 * 2**20], ids=["whole lines", "a long torn write"])
def test_trimming_the_log_does_not_read_it_whole(tmp_path: Path, tail: str) -> None:
    """The log was read whole into memory (as text, then as lines) at every start: a long run's is GBs.
    Its end is read backwards in chunks: the memory it takes does not grow with the log."""
    import tracemalloc

    log = tmp_path / "log.jsonl"
    log.write_text(_log_lines(range(1, 100_001)) + tail)  # 5 MB
    size = log.stat().st_size
    tracemalloc.start()
    try:
        _trim_log(tmp_path, 99_990)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 * 2**20, peak
    assert log.stat().st_size == size - len(_log_lines(range(99_991, 100_001))) - len(tail)


@pytest.mark.parametrize("kind", ["FIFO", "link to /dev/zero"])
def test_a_log_that_is_no_regular_file_is_refused_before_resuming(run: Path, squeeze, kind) -> None:
    shutil.rmtree(_checkpoint(run, 4))  # steps 3 and 4 to train again
    log = run / "log.jsonl"
    if kind == "FIFO":
        os.mkfifo(log)  # the first append used to wait for a reader for ever
    else:
        log.symlink_to("/dev/zero")  # every line used to be lost
    settings = [arg for s in [*SETTINGS, "logging.every=1"] for arg in ("--set", s)]
    with deadline():
        result = squeeze(
            "train", "tiny", "--no-progress", "--set", f"output_dir={run}", *settings, "--resume", "latest"
        )
    assert result.code == 2
    what = "a FIFO (named pipe)" if kind == "FIFO" else "a symbolic link"
    line = one_error_line(result.err)
    assert line.startswith(f"error: {log} is {what}, not a regular file (hint: remove it")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]  # nothing trained


def test_a_log_replaced_by_a_fifo_during_the_run_is_a_write_error(
    trainer: Trainer, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(trainer, "output_dir", tmp_path)
    monkeypatch.setattr(trainer, "tensorboard", None, raising=False)
    trainer._log({"step": 1, "loss": 1.0})
    (tmp_path / "log.jsonl").unlink()
    os.mkfifo(tmp_path / "log.jsonl")
    with pytest.raises(outputs.OutputWriteError, match="not a regular file"):
        finishes(trainer._log, {"step": 2, "loss": 1.0})
