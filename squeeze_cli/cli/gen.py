"""`squeeze gen`: generate every image of a manifest that is not already done."""

from __future__ import annotations

import os
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


# More shards than a plan has jobs (100,000 by default) only adds empty ones: a larger count is a typo,
# refused before the plan is cut (cutting it walks every shard's boundary).
MAX_SHARDS = 100_000


def _number(text: str) -> int | None:
    """`text` as a whole number if it is ASCII digits, else None; one too long for any count (thousands of
    digits, which `int` refuses) is `MAX_SHARDS + 1`, too large for any shard's place or count."""
    if not (text.isascii() and text.isdigit()):  # isdigit alone accepts '²' and '١', which int refuses
        return None
    return int(text) if len(text.lstrip("0")) <= 18 else MAX_SHARDS + 1


def _too_many_shards(flag: str, count: int) -> None:
    from squeeze_cli.errors import UsageError

    if count > MAX_SHARDS:
        raise UsageError(
            f"{flag}: more than {MAX_SHARDS:,} shards", "give the number of tasks, e.g. --shard 0/8"
        )


def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    from squeeze_cli.errors import UsageError

    if value == "slurm":
        return _slurm_shard()
    shown = value if len(value) <= 40 else f"{value[:37]}..."  # 5000 digits make no error line
    index_text, _, count_text = value.partition("/")
    index, count = _number(index_text), _number(count_text)
    if index is None or count is None or not 0 <= index < count:
        raise UsageError(f"--shard {shown}: expected I/N with 0 <= I < N", "e.g. --shard 0/4 ... --shard 3/4")
    _too_many_shards(f"--shard {shown}", count)
    return index, count


def _slurm_shard() -> tuple[int, int]:
    """`--shard slurm`: this task's part of a Slurm job array, from the variables Slurm sets.

    With ``--array=1-8`` (or ``0-30:2``) the tasks are numbered from SLURM_ARRAY_TASK_MIN in steps of
    SLURM_ARRAY_TASK_STEP; the shard is the task's position among them, of SLURM_ARRAY_TASK_COUNT."""
    import os

    from squeeze_cli.errors import UsageError

    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")
    defaults = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1"}
    values = {name: os.environ.get(name, defaults.get(name, "")) for name in names}
    numbers = {name: _number(text) for name, text in values.items()}
    bad = [name for name, number in numbers.items() if number is None]
    if bad:
        raise UsageError(
            f"--shard slurm: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not set to a number",
            "run it as a task of a job array (sbatch --array=0-N), or use --shard I/N",
        )
    task, count, first, step = (int(numbers[name] or 0) for name in names)
    index, off_step = divmod(task - first, max(step, 1))
    _too_many_shards("--shard slurm: SLURM_ARRAY_TASK_COUNT", count)
    if off_step or not 0 <= index < count:
        raise UsageError(
            f"--shard slurm: task {values['SLURM_ARRAY_TASK_ID'][:40]} is not one of {count} tasks "
            f"from {first} in steps of {step}",
            "use --shard I/N",
        )
    return index, count


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
    if out is not None and not out.strip():
        # An empty $OUT in a script must not scatter a run over the current folder.
        raise UsageError(
            f"--out {out!r}: the output folder is empty", "give the output folder, e.g. --out out"
        )
    out_dir = None
    if out is not None:
        from squeeze_cli.manifest.resolve import output_dir_problem

        out_dir = Path(out).expanduser().absolute()  # from the current folder, as on any command line
        reason = output_dir_problem(out_dir)
        if reason is not None:
            raise UsageError(f"--out {out}: {reason}", "choose another --out")
    # The folder used from here on: the resolver keeps its images out of reference globs, and
    # `manifest.resolved.yaml` records it, so gen on that file finds the run.
    loaded = load_from_cli(manifest, overrides, recipe, max_jobs, out=out_dir)
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
    prune: Annotated[
        bool,
        typer.Option(
            "--prune",
            help="Move the images of jobs this manifest no longer plans (with their sidecars and views) to "
            "OUT/.stale/<UTC time>/, and drop their index lines (default: keep them, and say how many).",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="I/N|slurm",
            help="Run only part I of N (0-based); `slurm` reads it from the Slurm job array's variables.",
        ),
    ] = None,
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
            help="Hash every finished image to check it (default: trust an image whose size, mtime and inode "
            "are those its sidecar records).",
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

    from squeeze_cli.errors import SqueezeError

    try:
        loaded = _check_input(manifest, set_, recipe, max_jobs, out, dtype, device, offload)
        shard_part = _parse_shard(shard)
    except SqueezeError as error:
        if json_output:  # stdout gets the document `validate --json` prints; stderr the usual lines
            print_json_failure(error, one_line=True)
        raise
    from squeeze_cli.processes import one_process_launch_warning

    one_process = one_process_launch_warning(os.environ)
    if json_output:
        from squeeze_cli.gen.progress import Reporter

        for warning in loaded.warnings:
            Reporter.emit_json("warning", message=str(warning), problem=warning.to_dict())
        if one_process:
            Reporter.emit_json("warning", message=one_process)
    elif not quiet:
        print_warnings(loaded)
        if one_process:
            typer.echo(f"warning: {one_process}", err=True)
    from squeeze_cli.gen.runner import GenOptions, run_gen

    options = GenOptions(
        out=Path(out) if out is not None else None,
        overwrite=overwrite,
        prune=prune,
        shard=shard_part,
        batch_size=batch_size,
        device=device,
        offload=parse_choice("--offload", offload, Offload),
        dry_run=dry_run,
        allow_pickle=allow_pickle,
        verify=verify,
        threads=threads,
        command=["squeeze", *sys.argv[1:]],
    )
    try:
        return run_gen(loaded, options, json_events=json_output, quiet=quiet)
    except SqueezeError as error:
        # Found after loading (an instruction too long for the MLLM, a model that will not load, a busy
        # output folder, a full disk): the same document, after whatever events came before.
        if json_output:
            print_json_failure(error, one_line=True)
        raise
