"""`squeeze gen`: generate every image of a manifest that is not already done."""

from __future__ import annotations

import sys
from typing import Annotated

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
)
from squeeze_cli.params import Dtype, Offload


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    from squeeze_cli.errors import UsageError

    index, _, count = value.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise UsageError(f"--shard {value}: expected I/N with 0 <= I < N", "e.g. --shard 0/4 ... --shard 3/4")
    return int(index), int(count)


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

    from squeeze_cli.errors import UsageError

    offload = parse_choice("--offload", offload, Offload)
    if dtype is not None:
        dtype = parse_choice("--dtype", dtype, Dtype)
    overrides = list(set_ or ()) + ([f"model.dtype={dtype}"] if dtype is not None else [])
    if out is not None and not out.strip():
        # An empty $OUT in a script must not scatter a run over the current folder.
        raise UsageError(
            f"--out {out!r}: the output folder is empty", "give the output folder, e.g. --out out"
        )
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
