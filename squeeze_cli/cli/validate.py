"""`squeeze validate`: check a manifest and print its plan."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer

from squeeze_cli.cli.options import (
    JsonOpt,
    LimitOpt,
    ManifestArg,
    MaxJobsOpt,
    OnlyOpt,
    RecipeOpt,
    SetOpt,
    load_from_cli,
    only_patterns,
    parse_choice,
    print_json_failure,
    print_warnings,
)
from squeeze_cli.errors import ManifestError, SqueezeError, UsageError
from squeeze_cli.params import Offload

if TYPE_CHECKING:
    from squeeze_cli.manifest import LoadedManifest
    from squeeze_cli.plan import Job


def validate(
    manifest: ManifestArg,
    json_output: JsonOpt = False,
    max_jobs: MaxJobsOpt = None,
    set_: SetOpt = None,
    recipe: RecipeOpt = None,
    only: OnlyOpt = None,
    limit: LimitOpt = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device", metavar="DEVICE", help="Also check that `gen --device DEVICE` would find it here."
        ),
    ] = None,
    offload: Annotated[
        str | None,
        typer.Option(
            "--offload", metavar="|".join(Offload.__members__), help="Also check this `gen --offload` mode."
        ),
    ] = None,
) -> None:
    """Check a manifest and print its plan; loads no model and writes nothing.

    The plan is printed also when the model's weights are missing or the device is not here (exit 2).
    With --only or --limit, the plan is that slice's (the whole manifest is checked all the same).
    """
    from squeeze_cli.plan import plan_jobs, select_jobs

    not_ready: SqueezeError | None  # the manifest's, or the device check's
    try:
        loaded, not_ready = _load(manifest, set_, recipe, max_jobs)
        planned = plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)
        jobs = select_jobs(planned, only_patterns(only), limit)
        if not_ready is None and (device is not None or offload is not None):
            from squeeze_cli.model_checks import device_problem  # the same check as at the start of `gen`

            mode = parse_choice("--offload", offload, Offload) if offload is not None else "none"
            wrong_device = device_problem(device or "auto", mode)
            if wrong_device is not None:
                not_ready = UsageError(*wrong_device)
    except SqueezeError as error:
        if not json_output:
            raise
        print_json_failure(error)
        raise typer.Exit(error.exit_code) from None
    summary = plan_summary(loaded, jobs)
    if len(jobs) != len(planned):
        summary["jobs_in_the_whole_plan"] = len(planned)
    if json_output:
        warnings = [warning.to_dict() for warning in loaded.warnings]
        if not_ready is None:
            typer.echo(json.dumps({"ok": True, **summary, "warnings": warnings}, indent=2))
            return
        print_json_failure(not_ready, plan={**summary, "warnings": warnings})
        raise typer.Exit(not_ready.exit_code)
    print_warnings(loaded)
    if not_ready is None:
        typer.echo(format_summary(summary))
        return
    cause = (
        "the model's weights are not ready"
        if isinstance(not_ready, ManifestError)
        else "`gen` cannot run it on this device"
    )
    typer.echo(format_summary(summary, verdict=f"not ok: the plan is valid, but {cause} (see the errors)"))
    raise not_ready


def _load(
    manifest: str, set_: list[str] | None, recipe: str | None, max_jobs: int | None
) -> tuple[LoadedManifest, ManifestError | None]:
    """The manifest, and its problems when they are only about the model's weights (a folder not trained
    yet, a hub id not downloaded): such a manifest still has a plan to show. Any other problem raises."""
    try:
        return load_from_cli(manifest, set_, recipe, max_jobs), None
    except ManifestError as error:
        try:
            loaded = load_from_cli(manifest, set_, recipe, max_jobs, check_sources=False)
        except SqueezeError:
            raise error from None
        return loaded, error


def plan_summary(loaded: LoadedManifest, jobs: Sequence[Job]) -> dict:
    """The JSON-able summary `validate` prints: subjects, references, jobs, images per size."""
    from squeeze_cli.pipelines.cost import COST_UNIT

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
            if per_subject[subject.index]  # (every subject has jobs; those of a slice, only its own)
        ],
        "jobs": len(jobs),
        "max_jobs": loaded.max_jobs,
        "images_per_size": dict(sorted(sizes.items())),
        # Transformer work, in images' worth (`pipelines.cost`); `estimated_cost_unit` says what 1 is.
        "estimated_cost": round(sum(job.cost for job in jobs), 3),
        "estimated_cost_unit": COST_UNIT,
    }


def format_summary(summary: dict, verdict: str = "ok: the manifest is valid; nothing was generated") -> str:
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
    whole = summary.get("jobs_in_the_whole_plan")
    of_whole = f" (a slice of the {whole:,} planned: --only, --limit)" if whole is not None else ""
    lines.append(f"jobs      {summary['jobs']:,}{of_whole} (limit {summary['max_jobs']:,})")
    lines.append("images    " + ", ".join(f"{size}: {n:,}" for size, n in summary["images_per_size"].items()))
    cost, unit = summary["estimated_cost"], summary["estimated_cost_unit"]
    lines.append(f"work      about {cost:,.1f} units (1 unit = {unit})")
    lines.append(verdict)
    return "\n".join(lines)
