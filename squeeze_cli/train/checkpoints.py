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


def checkpoint_to_resume(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from (`resume`: "latest", a checkpoint folder, or None for a new run);
    refuses to mix a new run into an old one."""
    existing = checkpoint_dirs(output_dir)
    if resume is None:
        if existing or (output_dir / "recipe.yaml").exists():
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
