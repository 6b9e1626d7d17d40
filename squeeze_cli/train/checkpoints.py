"""A training run's checkpoints: `checkpoints/step-N` folders holding what training changes, each written
whole and checked before `--resume` uses it.

A checkpoint is safetensors and JSON only, never a pickle, so resuming a checkpoint someone else wrote
cannot run code: the trained parameters (`trainable.safetensors`), the optimiser's tensors with its groups,
the LR schedule and the fp16 loss scale in the file's metadata (`optimizer.safetensors`), and each
process's torch RNG states (`rng-P.safetensors`). `train_state.json`, written last, holds the step and the
size and SHA-256 of every other file: a checkpoint whose files do not match it is damaged, and `--resume
latest` falls back to the newest intact one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_JOBS_FAILED, SqueezeError
from squeeze_cli.reading import MiB, file_kind, read_regular_file
from squeeze_cli.train.config import user_path

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"
STATE_FILE = "train_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
# The run record, the first file a run writes: a folder holding it is a squeeze training run, the only kind
# of existing folder training writes into (it replaces and deletes files there).
RUN_RECORD = "training.json"
LOG_FILE = "log.jsonl"  # a line every `logging.every` steps, appended by the main process
LOCK_FILE = ".squeeze-train.lock"  # one run per output folder


class RunError(SqueezeError):
    """The output folder or a checkpoint cannot be used as asked."""


class CheckpointWriteError(RunError):
    """A checkpoint, or another file of the run, could not be written (disk full, ...): the run stops;
    earlier checkpoints are kept."""

    exit_code = EXIT_JOBS_FAILED


def resume_hint(output_dir: Path, fix: str, exclude: Path | None = None) -> str:
    """What to do after a failed write: `fix` it (`OutputWriteError.fix`, the first half of gen's hint),
    then `--resume latest`, from the newest checkpoint (not `exclude`, the one that failed). The same
    command again would be refused: the folder holds a run."""
    saved = [d.name for d in checkpoint_dirs(output_dir) if d != exclude]
    since = f"from {saved[-1]}" if saved else "from the start (no checkpoint yet)"
    return f"{fix} and continue with `--resume latest`, {since}"


@dataclass
class TrainState:
    """The run's position."""

    step: int = 0  # optimiser steps done


def rng_file(process: int) -> str:
    return f"rng-{process}.safetensors"


def _step_of(folder: Path) -> int | None:
    """N of a `step-N` folder name (ASCII digits only); None for any other name."""
    suffix = folder.name[len(CHECKPOINT_PREFIX) :]
    if folder.name.startswith(CHECKPOINT_PREFIX) and suffix.isascii() and suffix.isdigit():
        return int(suffix)
    return None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """The `step-N` folders, oldest first (a partial one is a `.partial-` folder, never listed; other names
    are not squeeze's and are left alone)."""
    folder = output_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _step_of(p) is not None and p.is_dir()]
    return sorted(found, key=lambda p: _step_of(p) or 0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(16 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with checkpoint `folder` (None when every file `train_state.json` lists is there, with
    its size and SHA-256)."""
    try:
        record = json.loads(read_regular_file(folder / STATE_FILE, MiB))
    except FileNotFoundError:
        return f"it has no {STATE_FILE}"
    except (OSError, ValueError, RecursionError):
        return f"its {STATE_FILE} cannot be read"
    files = record.get("files") if isinstance(record, dict) else None
    if (
        not isinstance(files, dict)
        or not isinstance(record.get("step"), int)
        or not {TRAINABLE_FILE, OPTIMIZER_FILE} <= set(files)
    ):
        return f"its {STATE_FILE} is not a checkpoint record"
    for name, expected in files.items():
        path = folder / name
        if os.path.basename(name) != name or not isinstance(expected, dict) or not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} is {size} bytes, not the {expected.get('bytes')} written"
        if _sha256(path) != expected.get("sha256"):
            return f"{name} has changed since it was written (SHA-256)"
    return None


class RunLock:
    """One `squeeze train` per output folder: two would log every step twice and save over each other's
    checkpoints. A `filelock` lock, which the OS releases when its process dies, even by kill -9."""

    def __init__(self, output_dir: Path) -> None:
        import filelock

        self.path = output_dir / LOCK_FILE
        self._lock = filelock.FileLock(self.path, fallback_to_soft=False)

    def acquire(self) -> None:
        import filelock

        outputs.ensure_dir(self.path.parent)
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout:
            raise RunError(
                f"{self.path.parent} is in use by another squeeze train",
                "wait for it to finish, or set another `output_dir`",
            ) from None
        except OSError as error:  # no permission, a file system without locks
            raise outputs.OutputWriteError.from_os_error(self.path, error, "create the lock file") from error

    def release(self) -> None:
        self._lock.release()


@dataclass(frozen=True)
class Resume:
    """Where a run starts: `checkpoint` (None: from scratch) and the damaged checkpoints passed over."""

    checkpoint: Path | None
    skipped: list[tuple[Path, str]]


def check_output_dir(output_dir: Path) -> None:
    """Refuses an `output_dir` that exists and is neither empty nor a squeeze training run (`RUN_RECORD`)."""
    hint = "set `output_dir` to a new or empty folder"
    if not output_dir.exists() or (output_dir / RUN_RECORD).is_file():
        return
    if not output_dir.is_dir():
        raise RunError(f"output_dir {output_dir} is not a folder", hint)
    # A run killed while writing its first record left only that record's temporary file: still ours.
    outputs.remove_stale_temp_files(output_dir, only={RUN_RECORD})
    try:  # the lock alone is a run's that was killed before its record
        empty = all(entry.name == LOCK_FILE for entry in output_dir.iterdir())
    except OSError as error:
        raise RunError(f"cannot read output_dir {output_dir}: {error.strerror or error}", hint) from None
    if not empty:
        raise RunError(
            f"output_dir {output_dir} is not empty and is not a squeeze training run "
            f"(it has no {RUN_RECORD})",
            f"{hint}: training writes and deletes files in it",
        )


def check_log_file(output_dir: Path) -> None:
    """Refuses a `log.jsonl` that is not a regular file before a resumed run loads anything: the first
    append would block on a FIFO, and a link (to /dev/zero, say) would swallow the log."""
    path = output_dir / LOG_FILE
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return  # missing (started again), or unreadable: the first append reports it, naming the file
    if not stat.S_ISREG(mode):
        raise RunError(
            f"{path} is {file_kind(mode)}, not a regular file",
            "remove it: training writes its log there itself (never through a link), and resumes it from "
            "the checkpoint's step",
        )


# The log is read backwards in chunks of this size; a "line" longer than a record can be is damage, passed
# over without being held whole (a record is a few hundred bytes).
LOG_CHUNK = 64 * 1024
LONGEST_LOG_LINE = 64 * 1024


def trim_log(output_dir: Path, step: int) -> None:
    """Cut the log back to its last record of a step <= `step`: the lines after it (steps run again, a
    line cut short by a crash) are dropped. The log only grows by whole lines and each resume trims it,
    so those lines are its end: it is read backwards in bounded chunks (a long run's log is large), then
    truncated in place and fsynced. A crash leaves it trimmed or not, and the next resume trims it.

    Raises:
        `OutputWriteError`: the log could not be read or truncated.
    """
    path = output_dir / LOG_FILE
    if not path.is_file():
        return
    try:
        with open(path, "r+b", buffering=0, opener=_no_follow) as file:
            length = _kept_length(file, step)
            if length < file.seek(0, os.SEEK_END):
                file.truncate(length)
                os.fsync(file.fileno())
    except OSError as error:
        raise outputs.OutputWriteError.from_os_error(path, error) from error


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def _kept_length(file: BinaryIO, step: int) -> int:
    """The byte length of `file`'s lines up to its last record of a step <= `step` (0: none)."""
    for start, line in _lines_from_the_end(file):
        if line is None or not line.endswith(b"\n"):  # too long to be a record, or cut short
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # damaged
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            return start + len(line)
    return 0


def _lines_from_the_end(file: BinaryIO) -> Iterator[tuple[int, bytes | None]]:
    """`file`'s lines, the last first, each as (its offset, its bytes with the newline); None in place of
    the bytes of a line longer than `LONGEST_LOG_LINE`, which is never held whole."""
    position = file.seek(0, os.SEEK_END)
    data = b""  # the file's bytes from `position` to the end of the next line to yield

    def read_before() -> bytes:
        nonlocal position
        size = min(LOG_CHUNK, position)
        position -= size
        file.seek(position)
        return file.read(size)

    while data or position > 0:
        # The line's start: after the last newline before its own (its last byte).
        newline = data.rfind(b"\n", 0, len(data) - 1)
        while newline < 0 and position > 0 and len(data) <= LONGEST_LOG_LINE:
            data = read_before() + data
            newline = data.rfind(b"\n", 0, len(data) - 1)
        if newline < 0 and position > 0:  # too long: its start is looked for without keeping it
            while newline < 0 and position > 0:
                data = read_before()
                newline = data.rfind(b"\n")
            yield position + newline + 1, None
        else:
            yield position + newline + 1, data[newline + 1 :]
        data = data[: newline + 1]


def checkpoint_to_resume(output_dir: Path, resume: str | None) -> Resume:
    """Where to start (`resume`: "latest", a checkpoint folder, or None for a new run); refuses an output
    folder that is not a training run's, a new run into an old one, a resumed run's log that is not a
    regular file, and a damaged checkpoint asked for by name. "latest" passes over damaged checkpoints to
    the newest intact one."""
    check_output_dir(output_dir)
    if resume is None:
        if (output_dir / RUN_RECORD).exists():
            raise RunError(
                f"{output_dir} already holds a training run",
                "pass --resume latest to continue it, or set another `output_dir`",
            )
        return Resume(None, [])
    check_log_file(output_dir)
    if resume == "latest":
        skipped: list[tuple[Path, str]] = []
        for folder in reversed(checkpoint_dirs(output_dir)):
            problem = checkpoint_problem(folder)
            if problem is None:
                return Resume(folder, skipped)
            skipped.append((folder, problem))
        if skipped:
            folder, problem = skipped[0]
            raise RunError(
                f"no intact checkpoint in {output_dir / CHECKPOINTS}: the newest, {folder.name}, is damaged: "
                f"{problem}",
                "move the damaged checkpoints away to start the run again",
            )
        return Resume(None, [])
    try:
        path = user_path(resume).absolute()
    except ValueError as error:
        raise RunError(f"--resume: {error}", "use --resume latest or a checkpoints/step-N folder") from None
    if not (path / STATE_FILE).is_file():
        raise RunError(
            f"{path} is not a squeeze checkpoint", "use --resume latest or a checkpoints/step-N folder"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise RunError(f"checkpoint {path} is damaged: {problem}", "use --resume latest or another step-N")
    return Resume(path, [])


# Writing and reading -----------------------------------------------------------------------------------


def _tensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> bytes:
    from safetensors.torch import save

    text = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=text)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        metadata = {k: json.loads(v) for k, v in (file.metadata() or {}).items()}
        return {k: file.get_tensor(k) for k in file.keys()}, metadata


def _optimizer_file(optimizer: Any, scheduler: Any, scaler: Any) -> bytes:
    """The optimiser's state as tensors (`state.<param>.<name>`), its groups, the LR schedule and the fp16
    loss scale as JSON metadata."""
    state = optimizer.state_dict()
    tensors, values = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                values[f"{index}.{name}"] = value
    metadata = {
        "param_groups": state["param_groups"],
        "state_values": values,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    return _tensors_bytes(tensors, metadata)


def _rng_state() -> dict[str, torch.Tensor]:
    # The batches, noise, σ and dropout draws have their own generators; the global torch RNG is what is
    # left (dropout layers in the trained modules). Python's and numpy's are not used by training.
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def save_checkpoint(
    accelerator: Any,
    output_dir: Path,
    step: int,
    keep: int,
    trainable: Mapping[str, torch.Tensor],
    optimizer: Any,
    scheduler: Any,
) -> Path:
    """`checkpoints/step-N`, written as `.partial-step-N` and renamed when complete; the older ones but the
    `keep` - 1 newest pruned. Every process calls it. A failed write raises `CheckpointWriteError` with the
    partial folder removed and every earlier checkpoint as it was."""
    folder = output_dir / CHECKPOINTS
    name = f"{CHECKPOINT_PREFIX}{step:07d}"
    partial = folder / f".partial-{name}"
    final = folder / name
    try:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            outputs.ensure_dir(partial)
        accelerator.wait_for_everyone()
        outputs.atomic_write_bytes(
            partial / rng_file(accelerator.process_index), _tensors_bytes(_rng_state())
        )
        if accelerator.is_main_process:
            outputs.atomic_write_bytes(partial / TRAINABLE_FILE, _tensors_bytes(trainable))
            outputs.atomic_write_bytes(
                partial / OPTIMIZER_FILE, _optimizer_file(optimizer, scheduler, accelerator.scaler)
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {
                p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in sorted(partial.iterdir())
                if p.is_file() and p.name != STATE_FILE
            }
            record = {"step": step, "processes": accelerator.num_processes, "files": files}
            outputs.atomic_write_json(partial / STATE_FILE, record)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(partial, final)
    except (outputs.OutputWriteError, OSError) as error:
        shutil.rmtree(partial, ignore_errors=True)
        reason = os.strerror(error.errno) if error.errno else str(error)
        if isinstance(error, outputs.OutputWriteError):
            fix = error.fix
        else:
            fix = outputs.write_fix(Path(error.filename or partial), error.errno)
        raise CheckpointWriteError(
            f"cannot write checkpoint {final}: {reason}", resume_hint(output_dir, fix, exclude=final)
        ) from None
    if accelerator.is_main_process:
        older = [d for d in checkpoint_dirs(output_dir) if (_step_of(d) or 0) < step]
        for old in older[: max(len(older) - (keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    folder: Path,
    accelerator: Any,
    params: dict[str, torch.nn.Parameter],
    optimizer: Any,
    scheduler: Any,
) -> int:
    """Restore what `save_checkpoint` wrote into `params`, the optimiser, the schedule, the loss scale and
    this process's RNG; returns the step. Raises `RunError` when the checkpoint is of another config."""
    try:
        return _load_checkpoint(folder, accelerator, params, optimizer, scheduler)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        # Intact by its record, yet not what squeeze writes: written by hand, or by another program.
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise RunError(
            f"the checkpoint {folder} cannot be read: {reason}", "use another checkpoint"
        ) from None


def _load_checkpoint(
    folder: Path,
    accelerator: Any,
    params: dict[str, torch.nn.Parameter],
    optimizer: Any,
    scheduler: Any,
) -> int:
    mismatch = RunError(
        f"the checkpoint {folder} does not match this config's trainable parameters",
        "resume with the config the run was started with",
    )
    record = json.loads(read_regular_file(folder / STATE_FILE, MiB))
    rng = folder / rng_file(accelerator.process_index)
    if not rng.is_file():
        raise RunError(
            f"the checkpoint {folder} was written by {record.get('processes')} processes",
            "resume with as many processes as the run was started with",
        )
    state, _ = _read_tensors(folder / TRAINABLE_FILE)
    if set(state) != set(params) or any(state[k].shape != params[k].shape for k in params):
        raise mismatch
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    tensors, metadata = _read_tensors(folder / OPTIMIZER_FILE)
    entries: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *((f"state.{k}", v) for k, v in metadata["state_values"].items())]:
        _, index, name = key.split(".", 2)
        entries.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict({"state": entries, "param_groups": metadata["param_groups"]})
    except (ValueError, KeyError, RuntimeError):
        raise mismatch from None
    scheduler.load_state_dict(metadata["scheduler"])
    if accelerator.scaler is not None and metadata["scaler"] is not None:
        accelerator.scaler.load_state_dict(metadata["scaler"])
    states, _ = _read_tensors(rng)
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in states]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return int(record["step"])
