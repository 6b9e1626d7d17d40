"""`squeeze gen`: generate every image of a manifest that is not already done."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from squeeze_cli.cli.options import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    ManifestArg,
    MaxJobsOpt,
    OffloadOpt,
    RecipeOpt,
    SetOpt,
    load_from_cli,
    parse_choice,
    print_json_failure,
    print_warnings,
)
from squeeze_cli.params import Dtype, Offload

if TYPE_CHECKING:
    from squeeze_cli.manifest import LoadedManifest


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    from squeeze_cli.errors import UsageError

    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise UsageError(f"--shard {value}: expected I/N with 0 <= I < N", "e.g. --shard 0/4 ... --shard 3/4")
    return int(index), int(count)


def _check_input(
    manifest: str,
    set_: list[str] | None,
    recipe: str | None,
    max_jobs: int | None,
    out: str | None,
    dtype: str | None,
    device: str,
    offload: str,
) -> LoadedManifest:
    """Every check of the flags and the manifest that `gen` makes before loading anything."""
    from pathlib import Path

    from squeeze_cli.errors import UsageError
    from squeeze_cli.model_checks import device_problem

    offload = parse_choice("--offload", offload, Offload)
    if dtype is not None:
        dtype = parse_choice("--dtype", dtype, Dtype)
    overrides = list(set_ or ()) + ([f"model.dtype={dtype}"] if dtype is not None else [])
    loaded = load_from_cli(manifest, overrides, recipe, max_jobs)
    if out is not None:
        from squeeze_cli.manifest.resolve import output_dir_problem

        reason = output_dir_problem(Path(out).expanduser().absolute())
        if reason is not None:
            raise UsageError(f"--out {out}: {reason}", "choose another --out")
    # A device that is not here is bad input: said now (a dry run too), not after loading the model.
    wrong_device = device_problem(device, offload)
    if wrong_device is not None:
        raise UsageError(*wrong_device)
    return loaded


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
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    offload: OffloadOpt = Offload.none.value,
    allow_pickle: AllowPickleOpt = False,
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

    from squeeze_cli.errors import SqueezeError

    try:
        loaded = _check_input(manifest, set_, recipe, max_jobs, out, dtype, device, offload)
        shard_part = _parse_shard(shard)
    except SqueezeError as error:
        if not json_output:
            raise
        print_json_failure(error)  # a script reading stdout gets the same document as `validate --json`
        raise typer.Exit(error.exit_code) from None
    if json_output:
        from squeeze_cli.gen.progress import Reporter

        for warning in loaded.warnings:
            Reporter.emit_json("warning", message=str(warning), problem=warning.to_dict())
    elif not quiet:
        print_warnings(loaded)
    from squeeze_cli.gen.runner import GenOptions, run_gen

    options = GenOptions(
        out=Path(out) if out is not None else None,
        overwrite=overwrite,
        shard=shard_part,
        batch_size=batch_size,
        device=device,
        offload=parse_choice("--offload", offload, Offload),
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        command=["squeeze", *sys.argv[1:]],
    )
    return run_gen(loaded, options, json_events=json_output, quiet=quiet)
