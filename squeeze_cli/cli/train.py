"""`squeeze train CONFIG.yaml`: train the aggregator and the FLUX LoRA in two stages (see docs/training.md).

Thin: validates the config and the data (nothing loaded, nothing written), then hands over to
`squeeze_cli.train.loop.Trainer`, or to `squeeze_cli.train.estimate` for ``--dry-run``.
"""

from __future__ import annotations

from typing import Annotated

import typer

TRAIN_EPILOG = """\b
Exit codes:
  0    trained
  1    a file of the run could not be written (disk full; checkpoints kept)
  2    invalid config, data, output folder or usage (nothing written), or no intact
       checkpoint to resume
  130  stopped by Ctrl-C
  141  stdout or stderr closed (`| head -1`), as if by SIGPIPE
After 1, 130 or 141, continue with --resume latest.
Several GPUs or machines: accelerate launch -m squeeze_cli train CONFIG.yaml
"""


def train_command(
    config: Annotated[
        str,
        typer.Argument(
            metavar="CONFIG",
            help="Training config YAML, or a packaged preset: tiny, paper.",
            show_default=False,
        ),
    ],
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="latest|DIR",
            help="Continue from the newest intact checkpoint in the output folder (or this checkpoint).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Build the models on the meta device; print trainable parameters and GPU memory. "
            "Downloads, loads and writes nothing.",
        ),
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", metavar="PATH=VALUE", help="Override a config value (VALUE is YAML). Repeatable."
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Train the Dual Layer Aggregator and a FLUX LoRA (stage 1: MLLM only; stage 2: + references)."""
    from squeeze_cli.train.config import load_config

    loaded = load_config(config, set_ or ())
    if dry_run:
        from squeeze_cli.train.estimate import dry_run_report

        typer.echo(dry_run_report(loaded))
        return
    from squeeze_cli.train.exported import load_training_data

    data = load_training_data(loaded)  # every data problem, before any model loads
    from squeeze_cli.train.loop import Trainer

    recipe = Trainer(loaded, data, resume=resume).run(progress=not no_progress)
    if recipe is not None:  # the main process
        typer.echo(f"trained: squeeze gen MANIFEST.yaml --recipe {recipe}")
