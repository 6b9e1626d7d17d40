"""The `squeeze` command line: parses, dispatches, reports.

Heavy work lives elsewhere and is imported inside the commands: ``--help``, ``validate`` and ``recipes``
never import torch, diffusers or transformers (pydantic and PyYAML only when a command needs them).
`main` is the one place that turns known errors into ``error: ...`` lines and exit codes.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from squeeze_cli import __version__
from squeeze_cli.errors import EXIT_INVALID, EXIT_SIGINT, ManifestError, SqueezeError

if TYPE_CHECKING:
    from squeeze_cli.manifest.resolve import LoadedManifest
    from squeeze_cli.plan import Job

EPILOG = """\b
Exit codes:
  0    everything asked for was done
  1    the run finished but some jobs failed (see the run index)
  2    invalid input or usage: nothing was generated
  130  stopped by SIGINT (Ctrl-C) / 143 by SIGTERM, after the current batch
"""

app = typer.Typer(
    name="squeeze",
    help="Subject-driven image generation in batches: many images of one subject, from a YAML manifest.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # unknown errors keep their plain traceback
    rich_markup_mode=None,  # plain click help: no rich import on the way to --help
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options shared by the commands that read a manifest (`validate` here, `gen` in its own issue).
ManifestArg = Annotated[
    str, typer.Argument(metavar="MANIFEST", help="The manifest YAML file.", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="PATH=VALUE",
        help="Override a manifest value (VALUE is YAML), e.g. --set defaults.seeds=[0,1]. Repeatable.",
        show_default=False,
    ),
]
RecipeOpt = Annotated[
    str | None,
    typer.Option("--recipe", metavar="NAME|PATH", help="Model preset to use instead of the manifest's."),
]
MaxJobsOpt = Annotated[
    int | None,
    typer.Option("--max-jobs", min=1, metavar="N", help="Refuse plans with more jobs (default 100000)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document instead of text.")]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"squeeze {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Subject-driven image generation in batches: many images of one subject, from a YAML manifest."""


def load_from_cli(
    manifest: str, set_: Sequence[str] | None, recipe: str | None, max_jobs: int | None
) -> LoadedManifest:
    """`load_manifest` with the shared flags; for `validate` and `gen`."""
    from squeeze_cli.manifest.resolve import load_manifest

    return load_manifest(manifest, set_ or (), recipe=recipe, max_jobs=max_jobs)


@app.command()
def validate(
    manifest: ManifestArg,
    json_output: JsonOpt = False,
    max_jobs: MaxJobsOpt = None,
    set_: SetOpt = None,
    recipe: RecipeOpt = None,
) -> None:
    """Check a manifest and print its plan; loads no model and writes nothing."""
    from squeeze_cli.plan import plan_jobs

    try:
        loaded = load_from_cli(manifest, set_, recipe, max_jobs)
        jobs = plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)
    except ManifestError as error:
        if not json_output:
            raise
        typer.echo(json.dumps({"ok": False, "problems": [p.to_dict() for p in error.problems]}, indent=2))
        raise typer.Exit(EXIT_INVALID) from None
    summary = plan_summary(loaded, jobs)
    typer.echo(json.dumps({"ok": True, **summary}, indent=2) if json_output else format_summary(summary))


@app.command("recipes")
def recipes_command(
    name: Annotated[str | None, typer.Argument(help="Show this preset's YAML.")] = None,
) -> None:
    """List the packaged model presets, or show one."""
    from squeeze_cli.manifest.recipes import list_recipes, recipe_text

    if name is not None:
        typer.echo(recipe_text(name), nl=False)
        return
    presets = list_recipes()
    width = max(len(preset.name) for preset in presets)
    for preset in presets:
        typer.echo(f"{preset.name:<{width}}  {preset.description}")
    typer.echo("\nShow one with `squeeze recipes NAME`; use it with `recipe: NAME` or `--recipe NAME`.")


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    from squeeze_cli.errors import UsageError

    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise UsageError(f"--shard {value}: expected I/N with 0 <= I < N", "e.g. --shard 0/4 ... --shard 3/4")
    return int(index), int(count)


@app.command(epilog=EPILOG)
def gen(
    manifest: ManifestArg,
    recipe: RecipeOpt = None,
    out: Annotated[
        str | None,
        typer.Option("--out", metavar="DIR", help="Output directory (default: the manifest's output.dir)."),
    ] = None,
    set_: SetOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Regenerate every job (default: resume, skipping finished ones)."),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard", metavar="I/N", help="Run only part I of N (0-based), e.g. one task of a job array."
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, metavar="N", help="Images per forward pass.")
    ] = 1,
    device: Annotated[
        str, typer.Option("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:1, ...")
    ] = "auto",
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", metavar="float32|bfloat16|float16", help="Overrides the preset's dtype."),
    ] = None,
    offload: Annotated[
        str, typer.Option("--offload", metavar="none|model|sequential", help="CPU offloading on a GPU.")
    ] = "none",
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle", help="Accept pickle-based (.bin) weights; safetensors only by default."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan and report what would run; load nothing.")
    ] = False,
    max_jobs: MaxJobsOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="One JSON event per line on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")] = False,
) -> int:
    """Generate every image of a manifest that is not already done.

    Precedence: preset < manifest < --set < explicit flags. Run it again after a crash or Ctrl-C: finished
    images are kept and skipped. For several GPUs: accelerate launch --multi_gpu --num_processes N -m
    squeeze_cli gen MANIFEST.
    """
    from pathlib import Path

    from squeeze_cli.errors import UsageError

    if offload not in ("none", "model", "sequential"):
        raise UsageError(f"--offload {offload}: expected none, model or sequential")
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype {dtype}: expected float32, bfloat16 or float16")
    overrides = list(set_ or ()) + ([f"model.dtype={dtype}"] if dtype is not None else [])
    loaded = load_from_cli(manifest, overrides, recipe, max_jobs)
    if out is not None:
        from squeeze_cli.manifest.resolve import output_dir_problem

        reason = output_dir_problem(Path(out).expanduser().absolute())
        if reason is not None:
            raise UsageError(f"--out {out}: {reason}", "choose another --out")
    from squeeze_cli.gen.runner import GenOptions, run_gen

    options = GenOptions(
        out=Path(out) if out is not None else None,
        overwrite=overwrite,
        shard=_parse_shard(shard),
        batch_size=batch_size,
        device=device,
        offload=offload,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        command=["squeeze", *sys.argv[1:]],
    )
    return run_gen(loaded, options, json_events=json_output, quiet=quiet)


# Reporting -------------------------------------------------------------------------------------------


def plan_summary(loaded: LoadedManifest, jobs: Sequence[Job]) -> dict:
    """The JSON-able summary `validate` prints: subjects, references, jobs, images per size."""
    per_subject = Counter(job.subject_index for job in jobs)
    sizes = Counter(f"{job.params.width}x{job.params.height}" for job in jobs)
    return {
        "manifest": str(loaded.path),
        "recipe": loaded.recipe.source if loaded.recipe is not None else None,
        "model_identity": loaded.model_identity,
        "dtype": loaded.model.dtype,
        "output_dir": str(loaded.output_dir),
        "subjects": [
            {
                "name": subject.name,
                "class": subject.class_noun,
                "references": len(subject.references),
                "prompts": len(subject.prompts),
                "jobs": per_subject[subject.index],
            }
            for subject in loaded.subjects
        ],
        "jobs": len(jobs),
        "max_jobs": loaded.max_jobs,
        "images_per_size": dict(sorted(sizes.items())),
        "estimated_cost": round(sum(job.cost for job in jobs), 3),
    }


def format_summary(summary: dict) -> str:
    recipe = summary["recipe"] or "(model from the manifest)"
    lines = [
        f"manifest  {summary['manifest']}",
        f"recipe    {recipe} (model {summary['model_identity']}, {summary['dtype']})",
        f"output    {summary['output_dir']}",
        f"subjects  {len(summary['subjects'])}",
    ]
    width = max(len(subject["name"]) for subject in summary["subjects"])
    for subject in summary["subjects"]:
        noun = f"class {subject['class']}" if subject["class"] else "no class"
        lines.append(
            f"  {subject['name']:<{width}}  {noun}: {subject['references']} references, "
            f"{subject['prompts']} prompts, {subject['jobs']} jobs"
        )
    lines.append(f"jobs      {summary['jobs']:,} (limit {summary['max_jobs']:,})")
    lines.append("images    " + ", ".join(f"{size}: {n:,}" for size, n in summary["images_per_size"].items()))
    lines.append("ok: the manifest is valid; nothing was generated")
    return "\n".join(lines)


def _report(error: SqueezeError) -> None:
    """Every known error is one `error: ...` line (with its hint); manifest problems one line each."""
    if isinstance(error, ManifestError):
        for problem in error.problems:
            typer.echo(f"error: {problem}", err=True)
        if len(error.problems) > 1:
            files = list(dict.fromkeys(p.file for p in error.problems if not p.file.startswith("--")))
            if any(p.file.startswith("--") for p in error.problems):
                files.append("the command line")
            typer.echo(f"error: {len(error.problems)} problems in {', '.join(files)}", err=True)
        return
    typer.echo(f"error: {error.message}" + (f" (hint: {error.hint})" if error.hint else ""), err=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the app; known errors become ``error: ...`` and an exit code."""
    try:
        code = app(args=argv, prog_name="squeeze", standalone_mode=False)
    except SqueezeError as error:
        _report(error)
        code = error.exit_code
    except typer.TyperException as error:  # click's usage errors: the message with usage, exit 2
        show = getattr(error, "show", None)
        show() if show else typer.echo(f"error: {error.format_message()}", err=True)
        code = error.exit_code
    except typer.Abort:  # Ctrl-C before a run started: nothing was written
        typer.echo("stopped by SIGINT: nothing was generated", err=True)
        code = EXIT_SIGINT
    sys.exit(code if isinstance(code, int) else 0)
