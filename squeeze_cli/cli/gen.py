"""`squeeze gen`: generate every image of a manifest that is not already done."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from squeeze_cli.cli.options import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    LimitOpt,
    ManifestArg,
    MaxJobsOpt,
    OffloadOpt,
    OnlyOpt,
    RecipeOpt,
    SetOpt,
    load_from_cli,
    only_patterns,
    parse_choice,
    print_json_failure,
    recipe_folder_name,
    split_recipes,
)
from squeeze_cli.cli.shard import SHARD_METAVAR, parse_shard
from squeeze_cli.logs import log_line
from squeeze_cli.params import Dtype, Offload

if TYPE_CHECKING:
    from squeeze_cli.manifest import LoadedManifest


def _out_dir(out: str | None) -> Path | None:
    """`--out`, absolute (from the current folder, as on any command line), if it can be a folder."""
    from squeeze_cli.errors import UsageError

    if out is None:
        return None
    if not out.strip():
        # An empty $OUT in a script must not scatter a run over the current folder.
        raise UsageError(
            f"--out {out!r}: the output folder is empty", "give the output folder, e.g. --out out"
        )
    from squeeze_cli.manifest.resolve import output_dir_problem

    out_dir = Path(out).expanduser().absolute()
    reason = output_dir_problem(out_dir)
    if reason is not None:
        raise UsageError(f"--out {out}: {reason}", "choose another --out")
    return out_dir


@dataclass(frozen=True)
class _Input:
    """The flags `gen` checks with the manifest, whatever the recipe and output folder."""

    manifest: str
    set_: list[str] | None
    max_jobs: int | None
    dtype: str | None
    device: str
    offload: str
    verify: bool
    allow_pickle: bool


def _check_input(flags: _Input, recipe: str | None, out: str | None) -> LoadedManifest:
    """Every check of the flags and the manifest that `gen` makes before loading anything (with
    `verify`, every reference photo read: the output folder's reference cache not trusted)."""
    from squeeze_cli.errors import UsageError
    from squeeze_cli.model_checks import device_problem

    dtype = parse_choice("--dtype", flags.dtype, Dtype) if flags.dtype is not None else None
    overrides = list(flags.set_ or ()) + ([f"model.dtype={dtype}"] if dtype is not None else [])
    out_dir = _out_dir(out)
    # The folder used from here on: the resolver keeps its images out of reference globs, and
    # `manifest.resolved.yaml` records it, so gen on that file finds the run.
    loaded = load_from_cli(
        flags.manifest,
        overrides,
        recipe,
        flags.max_jobs,
        allow_pickle=flags.allow_pickle,
        out=out_dir,
        reference_cache=not flags.verify,
    )
    from squeeze_cli.outputs import holds_recipes, runs_inside

    # One recipe's files in the folder of `gen --recipe A,B` would sit beside its runs, and `status` and
    # `eval` on it would see that one run only.
    if holds_recipes(loaded.output_dir):
        inside = runs_inside(loaded.output_dir)
        example = inside[0] if inside else loaded.output_dir / "<recipe>"
        raise UsageError(
            f"{loaded.output_dir} holds the run folders of `gen --recipe A,B`: a run of one recipe is "
            "written into a folder of its own",
            f"give one of them as --out (e.g. --out {example}), or another folder",
        )
    # A device that is not here is bad input: said now (a dry run too), not after loading the model.
    wrong_device = device_problem(flags.device, flags.offload)
    if wrong_device is not None:
        raise UsageError(*wrong_device)
    return loaded


def _check_recipes(flags: _Input, recipes: list[str], out: str | None) -> list[tuple[str, LoadedManifest]]:
    """`_check_input` for each of several recipes, each into its folder OUT/<recipe>/, and each plan made:
    every recipe's input is checked before any model loads."""
    from squeeze_cli.errors import UsageError
    from squeeze_cli.outputs import is_run_folder
    from squeeze_cli.plan import plan_jobs

    # --out, or the manifest's `output.dir`, which no recipe changes
    parent = (
        _out_dir(out)
        or load_from_cli(
            flags.manifest, flags.set_, recipes[0], flags.max_jobs, allow_pickle=flags.allow_pickle
        ).output_dir
    )
    if is_run_folder(parent):
        raise UsageError(
            f"{parent} is the run folder of one recipe: with several, each writes its own run folder "
            "inside OUT",
            "choose another --out",
        )
    for recipe in recipes:
        # Nothing is written through a link inside OUT (docs/outputs.md): a recipe's folder that is one
        # could lead to another recipe's folder, whose images it would then replace.
        folder = parent / recipe_folder_name(recipe)
        if folder.is_symlink():
            raise UsageError(
                f"{folder} is a symbolic link: with several recipes each writes a run folder of its own "
                "inside OUT, never through a link",
                "remove the link (or move the run it leads to there), or choose another --out",
            )
    runs = []
    for recipe in recipes:
        name = recipe_folder_name(recipe)
        loaded = _check_input(flags, recipe, str(parent / name))
        plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)
        runs.append((name, loaded))
    return runs


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
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Move the images of jobs this manifest no longer plans (with their sidecars and views) to "
            "OUT/.stale/<UTC time>/, remove the folders that leaves empty, and drop their index lines "
            "(default: keep them, and say how many).",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar=SHARD_METAVAR,
            help="Run only part I of N (0-based). From an array job's variables: `slurm`, `k8s/N` (an "
            "Indexed Job of N completions), `aws-batch`, `gcp-batch`, or `env:INDEX_VAR/COUNT_VAR`.",
        ),
    ] = None,
    only: OnlyOpt = None,
    limit: LimitOpt = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, metavar="N", help="Images per forward pass.")
    ] = 1,
    device: DeviceOpt = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            metavar="N",
            help="CPU threads for torch (default: OMP_NUM_THREADS, else the cores the load leaves idle).",
        ),
    ] = None,
    dtype: DtypeOpt = None,
    offload: OffloadOpt = Offload.none.value,
    allow_pickle: AllowPickleOpt = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Hash every finished image and channel variant to check it, and read every reference photo "
            "(default: trust a file whose size, mtime and inode are those its sidecar records, and a photo "
            "whose stat OUT/.squeeze-references.json records).",
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
    from squeeze_cli.errors import SqueezeError

    try:
        offload = parse_choice("--offload", offload, Offload)
        flags = _Input(manifest, set_, max_jobs, dtype, device, offload, verify, allow_pickle)
        recipes = split_recipes(recipe)
        if len(recipes) > 1:
            runs = _check_recipes(flags, recipes, out)
        else:
            runs = [("", _check_input(flags, recipe, out))]
        shard_part = parse_shard(shard)
    except SqueezeError as error:
        if json_output:  # stdout gets the document `validate --json` prints; stderr the usual lines
            print_json_failure(error, one_line=True)
        raise
    from squeeze_cli.processes import one_process_launch_warning

    one_process = one_process_launch_warning(os.environ)
    # A warning about a key that several recipes read is said once.
    warnings = dict.fromkeys(warning for _, loaded in runs for warning in loaded.warnings)
    if json_output:
        from squeeze_cli.gen.progress import Reporter

        for warning in warnings:
            Reporter.emit_json("warning", message=str(warning), problem=warning.to_dict())
        if one_process:
            Reporter.emit_json("warning", message=one_process)
    elif not quiet:
        for warning in warnings:
            log_line(f"warning: {warning}")
        if one_process:
            log_line(f"warning: {one_process}")
    from squeeze_cli.gen.runner import GenOptions, run_gen, run_recipes

    options = GenOptions(
        out=Path(out) if out is not None else None,
        overwrite=overwrite,
        prune=prune,
        shard=shard_part,
        only=only_patterns(only),
        limit=limit,
        batch_size=batch_size,
        device=device,
        offload=offload,
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        verify=verify,
        threads=threads,
        command=["squeeze", *sys.argv[1:]],
    )
    try:
        if len(runs) == 1:
            return run_gen(runs[0][1], options, json_events=json_output, quiet=quiet)
        if not dry_run:
            from squeeze_cli.outputs import real_folder, write_recipes

            # Before any recipe runs: `status OUT` can then name one that never ran.
            parent = real_folder(
                runs[0][1].output_dir.parent, "point it at a folder, or choose another --out"
            )
            write_recipes(parent, [name for name, _ in runs])
        # Each recipe's errors are reported as they happen, and the next recipe runs.
        return run_recipes(runs, options, json_events=json_output, quiet=quiet)
    except SqueezeError as error:
        # Found after loading (an instruction too long for the MLLM, a model that will not load, a busy
        # output folder, a full disk): the same document, after whatever events came before.
        if json_output:
            print_json_failure(error, one_line=True)
        raise
