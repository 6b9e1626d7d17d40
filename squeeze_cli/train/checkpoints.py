"""A training run's checkpoints: `checkpoints/step-N` folders holding only the trained parameters (and
accelerate's optimiser, schedule and RNG states), each written whole, and the one `--resume` continues."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from squeeze_cli import outputs
from squeeze_cli.errors import SqueezeError

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINABLE_FILE = "trainable.safetensors"
# The run record, the first file a run writes: a folder holding it is a squeeze training run, the only kind
# of existing folder training writes into (it replaces and deletes files there).
RUN_RECORD = "training.json"


class RunError(SqueezeError):
    """The output folder or a checkpoint cannot be used as asked."""


@dataclass
class TrainState:
    """The run's position, saved in every checkpoint (accelerate `register_for_checkpointing`)."""

    step: int = 0  # optimiser steps done

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a partial one is a `.partial-` folder, never listed)."""
    folder = output_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def check_output_dir(output_dir: Path) -> None:
    """Refuses an `output_dir` that exists and is neither empty nor a squeeze training run (`RUN_RECORD`)."""
    hint = "set `output_dir` to a new or empty folder"
    if not output_dir.exists() or (output_dir / RUN_RECORD).is_file():
        return
    if not output_dir.is_dir():
        raise RunError(f"output_dir {output_dir} is not a folder", hint)
    try:
        empty = next(output_dir.iterdir(), None) is None
    except OSError as error:
        raise RunError(f"cannot read output_dir {output_dir}: {error.strerror or error}", hint) from None
    if not empty:
        raise RunError(
            f"output_dir {output_dir} is not empty and is not a squeeze training run "
            f"(it has no {RUN_RECORD})",
            f"{hint}: training writes and deletes files in it",
        )


def checkpoint_to_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from (`resume`: "latest", a checkpoint folder, or None for a new run);
    refuses an output folder that is not a training run's, and to mix a new run into an old one."""
    check_output_dir(output_dir)
    existing = checkpoint_dirs(output_dir)
    if resume is None:
        if (output_dir / RUN_RECORD).exists():
            raise RunError(
                f"{output_dir} already holds a training run",
                "pass --resume latest to continue it, or set another `output_dir`",
            )
        return None
    if resume == "latest":
        return existing[-1] if existing else None
    path = Path(resume).expanduser().absolute()
    if not (path / "train_state.json").is_file():
        raise RunError(
            f"{path} is not a squeeze checkpoint", "use --resume latest or a checkpoints/step-N folder"
        )
    return path


def save_trainable(state: dict[str, torch.Tensor], folder: str) -> None:
    """The trained parameters into a checkpoint folder (the frozen base would be 24 GB per checkpoint for
    FLUX)."""
    from safetensors.torch import save_file

    save_file({k: v.cpu() for k, v in state.items()}, os.path.join(folder, TRAINABLE_FILE))


def load_trainable(params: dict[str, torch.nn.Parameter], folder: str) -> None:
    """The trained parameters from a checkpoint folder into `params`, which must be the same names."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, TRAINABLE_FILE))
    if set(state) != set(params):
        raise RunError(
            f"the checkpoint {folder} does not match this config's trainable parameters",
            "resume with the config the run was started with",
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_checkpoint(accelerator: Any, output_dir: Path, step: int, keep: int) -> Path:
    """`checkpoints/step-N`, written as `.partial-step-N` and renamed when complete; all but the `keep`
    newest pruned. Every process calls it."""
    folder = output_dir / CHECKPOINTS
    name = f"{CHECKPOINT_PREFIX}{step:07d}"
    partial = folder / f".partial-{name}"
    final = folder / name
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        outputs.ensure_dir(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        outputs.atomic_write_json(partial / "train_state.json", {"step": step})
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
