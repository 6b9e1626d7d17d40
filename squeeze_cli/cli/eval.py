"""`squeeze eval` and `squeeze dreambench`: the command-line shells; the work is in `squeeze_cli.eval`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from squeeze_cli.cli.options import VariantOpt, require_rules_for_variant
from squeeze_cli.logs import log_line

EVAL_EPILOG = """\b
Exit codes:
  0    every run scored (images failing --rules do not change it)
  1    a file of eval's could not be written
  2    invalid input: a bad flag, not a run folder, a run eval cannot write in, a metric model
       not downloaded; nothing is scored
  130  stopped by SIGINT (Ctrl-C) / 143 by SIGTERM
  141  stdout or stderr closed (`| head -1`), as if by SIGPIPE
"""


def eval_command(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_DIR",
            help="Output folders of `squeeze gen` runs (the folder of `gen --recipe A,B`: each run in it).",
            show_default=False,
        ),
    ],
    metrics: Annotated[
        str,
        typer.Option(
            "--metrics",
            metavar="SET",
            help="dreambench: DINO ViT-S/16 + CLIP (real models, downloaded once); "
            "tiny: random tiny models built offline (checks the plumbing; the numbers mean nothing).",
        ),
    ] = "dreambench",
    clip: Annotated[
        str | None,
        typer.Option(
            "--clip",
            metavar="b32|l14|ID",
            help="CLIP for CLIP-I/CLIP-T: ViT-B/32 (the default), ViT-L/14, or a hub id.",
            show_default=False,
        ),
    ] = None,
    dinov2: Annotated[bool, typer.Option("--dinov2", help="Add a DINOv2-small identity column.")] = False,
    clip_t_weight: Annotated[
        float,
        typer.Option(
            "--clip-t-weight",
            metavar="W",
            help="CLIP-T = W * max(cos, 0): 1 as DreamBench, 2.5 as CLIPScore.",
        ),
    ] = 1.0,
    references: Annotated[
        str,
        typer.Option(
            "--references",
            metavar="conditioning|DIR",
            help="Compare with the images that conditioned each generation, or with every image of "
            "DIR/<subject>/ (DreamBench: all references).",
        ),
    ] = "conditioning",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, metavar="N", help="Images per model call.")
    ] = 16,
    device: Annotated[
        str | None,
        typer.Option("--device", metavar="DEVICE", help="cuda, cpu, ... (default: cuda when there is one)."),
    ] = None,
    allow_gated: Annotated[
        bool,
        typer.Option(
            "--allow-gated",
            help="Score runs made with gen's identity gate (`quality:`) under --metrics dreambench, marked "
            "as gated: the gate keeps the best DINO of several seeds, so these are not DreamBench protocol "
            "numbers (without it: exit 2).",
        ),
    ] = False,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write report.html in each run.")
    ] = True,
    rules: Annotated[
        str | None,
        typer.Option(
            "--rules",
            metavar="NAME|FILE",
            help="Also check each image against these marketplace rules, as `squeeze check` does: pass or "
            "fail with the numbers in the report, the counts in metrics.json.",
        ),
    ] = None,
    variant: VariantOpt = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Hash and check every image and read every reference photo (default: trust an image whose "
            "size, mtime and inode are those its sidecar records, and a photo unchanged since gen, as gen "
            "does); an image that fails is listed missing, not scored.",
        ),
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print a JSON document instead of text.")
    ] = False,
) -> None:
    """Score a run's images (DINO, CLIP-I, CLIP-T, copy) and write metrics.json, metrics.jsonl, report.html.

    With several runs, also print them side by side. Scores are cached in each run: a re-run computes
    only new images. Several GPUs: accelerate launch --multi_gpu --num_processes N -m squeeze_cli eval
    RUN_DIR.
    """
    from squeeze_cli.eval.report import format_comparison, format_run
    from squeeze_cli.eval.scoring import evaluate_runs, read_runs
    from squeeze_cli.metrics.protocol import make_protocol
    from squeeze_cli.processes import one_process_launch_warning

    if one_process := one_process_launch_warning(os.environ):
        log_line(f"warning: {one_process}")
    require_rules_for_variant(rules, variant)

    if references != "conditioning" and not Path(references).is_dir():
        from squeeze_cli.errors import UsageError

        raise UsageError(
            f"--references {references}: not a folder",
            "use `conditioning` or a folder with one sub-folder per subject",
        )
    if references != "conditioning":
        references = str(Path(references).resolve())  # the protocol names the folder unambiguously
    from squeeze_cli.outputs import holds_recipes, load_rules, missing_recipes, runs_inside

    rule_set = load_rules(rules) if rules is not None else None  # a bad rule set stops before any work
    # The folder of `gen --recipe A,B` stands for its runs, compared side by side; a recipe of it that
    # never ran is said, not silently left out of the comparison.
    for folder in run_dirs:
        for name, problem in missing_recipes(folder) if holds_recipes(folder) else ():
            log_line(f"warning: recipe {name}: {folder / name} is {problem}: not evaluated")
    run_dirs = [run for folder in run_dirs for run in runs_inside(folder.expanduser().absolute()) or [folder]]
    runs = read_runs(run_dirs, report=report, verify=verify)  # a bad folder is said before the models build
    protocol = make_protocol(
        metrics, clip=clip, dinov2=dinov2, clip_t_weight=clip_t_weight, references=references
    )
    evaluations = evaluate_runs(
        runs,
        protocol,
        batch_size=batch_size,
        device=device,
        report=report,
        progress=not json_output,
        allow_gated=allow_gated,
        rules=rule_set,
        variant=variant,
        verify=verify,
    )
    if not evaluations:
        return  # another process of `accelerate launch`: the main one reports
    summaries = [evaluation.summary for evaluation in evaluations]
    if json_output:
        typer.echo(json.dumps({"runs": summaries}, indent=2))
        return
    typer.echo("\n\n".join(format_run(summary) for summary in summaries))
    if len(evaluations) > 1:
        typer.echo(
            "\n" + format_comparison(summaries, [e.name for e in evaluations], [e.rows for e in evaluations])
        )
    computed = sum(e.computed for e in evaluations)
    reused = sum(e.reused for e in evaluations)
    typer.echo(f"\nscores: {computed} computed, {reused} from the cache")
    if report:
        typer.echo("report: " + ", ".join(str(e.contents.path / "report.html") for e in evaluations))


DREAMBENCH_EPILOG = """\b
Exit codes:
  0    the manifest is written
  1    it could not be written
  2    not a DreamBench dataset folder, or a bad flag
  141  stdout or stderr closed (`| head -1`), as if by SIGPIPE
"""


def dreambench_command(
    dataset_dir: Annotated[
        Path,
        typer.Argument(metavar="DATASET_DIR", help="The DreamBench `dataset` folder.", show_default=False),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", metavar="FILE", help="Where to write the manifest.")
    ],
    references: Annotated[
        str,
        typer.Option(
            "--references", metavar="first|N|all", help="Which images of a subject condition generation."
        ),
    ] = "first",
    seeds: Annotated[
        int, typer.Option("--seeds", min=1, metavar="N", help="Seeds per prompt (DreamBench: 4).")
    ] = 4,
    recipe: Annotated[
        str, typer.Option("--recipe", metavar="NAME", help="The manifest's model preset.")
    ] = "paper-internvl3-flux",
    force: Annotated[bool, typer.Option("--force", help="Replace FILE if it exists.")] = False,
) -> None:
    """Write the full DreamBench manifest (every subject x its 25 prompts x 4 seeds) from the dataset."""
    from squeeze_cli.eval.dreambench import write_dreambench_manifest

    summary = write_dreambench_manifest(
        dataset_dir, output, references=references, seeds=seeds, recipe=recipe, force=force
    )
    typer.echo(summary)
