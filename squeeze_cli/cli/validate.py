"""`squeeze validate`: check a manifest and print its plan."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from squeeze_cli.cli.options import (
    AllowPickleOpt,
    DtypeOpt,
    JsonOpt,
    LimitOpt,
    ManifestArg,
    MaxJobsOpt,
    OnlyOpt,
    RecipeOpt,
    SetOpt,
    failures_as_json,
    json_problems,
    load_from_cli,
    only_patterns,
    parse_choice,
    print_warnings,
    recipe_folder_name,
    split_recipes,
)
from squeeze_cli.errors import ManifestError, SqueezeError, UsageError
from squeeze_cli.logs import counted
from squeeze_cli.params import Dtype, Offload

if TYPE_CHECKING:
    from squeeze_cli.manifest import LoadedManifest
    from squeeze_cli.plan import Job


VALIDATE_EPILOG = """\b
Exit codes:
  0    the manifest is valid, and the weights it names are there
  2    a problem (each one located); the plan is still printed when the only problems are the
       model's weights or the device
  141  stdout or stderr closed (`| head -1`), as if by SIGPIPE
"""


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
    dtype: DtypeOpt = None,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Check a manifest and print its plan; loads no model and writes nothing.

    The plan is printed also when the model's weights are missing or the device is not here (exit 2).
    With several recipes (`--recipe A,B`), each one's plan, as `gen` would run it into OUT/<recipe>/.
    With --only or --limit, the plan is that slice's (the whole manifest is checked all the same).
    """
    from squeeze_cli.plan import plan_jobs, select_jobs

    checked: list[tuple[LoadedManifest, dict, SqueezeError | None]] = []
    if dtype is not None:  # as `gen --dtype` sets it: the model's identity, so the job ids, follow it
        set_ = [*(set_ or ()), f"model.dtype={parse_choice('--dtype', dtype, Dtype)}"]
    with failures_as_json(json_output):
        recipes: list[str | None] = [*split_recipes(recipe)] or [None]
        parent = (
            _load(manifest, set_, recipes[0], max_jobs, allow_pickle=allow_pickle)[0].output_dir
            if len(recipes) > 1
            else None
        )
        for name in recipes:
            out = parent / recipe_folder_name(name) if parent is not None and name is not None else None
            loaded, ready_error = _load(manifest, set_, name, max_jobs, out, allow_pickle=allow_pickle)
            not_ready: SqueezeError | None = ready_error
            planned = plan_jobs(loaded, model_identity=loaded.model_identity, max_jobs=loaded.max_jobs)
            jobs = select_jobs(planned, only_patterns(only), limit)
            if not_ready is None and (device is not None or offload is not None):
                from squeeze_cli.model_checks import device_problem  # the same check as at the start of `gen`

                mode = parse_choice("--offload", offload, Offload) if offload is not None else "none"
                wrong_device = device_problem(device or "auto", mode)
                if wrong_device is not None:
                    not_ready = UsageError(*wrong_device)
            summary = plan_summary(loaded, jobs)
            if len(jobs) != len(planned):
                summary["jobs_in_the_whole_plan"] = len(planned)
            checked.append((loaded, summary, not_ready))
    if json_output:
        documents = [
            {"ok": not_ready is None, **summary, "warnings": [w.to_dict() for w in loaded.warnings]}
            | ({} if not_ready is None else {"problems": json_problems(not_ready)})
            for loaded, summary, not_ready in checked
        ]
        typer.echo(
            json.dumps(
                documents[0]
                if len(documents) == 1
                else {"ok": all(d["ok"] for d in documents), "recipes": documents},
                indent=2,
            )
        )
    else:
        for place, (loaded, summary, not_ready) in enumerate(checked):
            print_warnings(loaded)
            typer.echo(("\n" if place else "") + format_summary(summary, verdict=_verdict(not_ready)))
    failure = next((error for *_, error in checked if error is not None), None)
    if failure is not None:
        if json_output:
            raise typer.Exit(failure.exit_code)
        raise failure


def _verdict(not_ready: SqueezeError | None) -> str:
    if not_ready is None:
        return "ok: the manifest is valid; nothing was generated"
    cause = (
        "the model's weights are not ready"
        if isinstance(not_ready, ManifestError)
        else "`gen` cannot run it on this device"
    )
    return f"not ok: the plan is valid, but {cause} (see the errors)"


def _load(
    manifest: str,
    set_: list[str] | None,
    recipe: str | None,
    max_jobs: int | None,
    out: Path | None = None,
    *,
    allow_pickle: bool = False,
) -> tuple[LoadedManifest, ManifestError | None]:
    """The manifest, and its problems when they are only about the model's weights (a folder not trained
    yet, a hub id not downloaded): such a manifest still has a plan to show. Any other problem raises."""
    try:
        return load_from_cli(manifest, set_, recipe, max_jobs, allow_pickle=allow_pickle, out=out), None
    except ManifestError as error:
        try:
            loaded = load_from_cli(manifest, set_, recipe, max_jobs, check_sources=False, out=out)
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


def format_summary(summary: dict, verdict: str) -> str:
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
            f"  {subject['name']:<{width}}  {noun}: {counted(subject['references'], 'reference')}, "
            f"{counted(subject['prompts'], 'prompt')}, {counted(subject['jobs'], 'job')}"
        )
    whole = summary.get("jobs_in_the_whole_plan")
    of_whole = f" (a slice of the {whole:,} planned: --only, --limit)" if whole is not None else ""
    lines.append(f"jobs      {summary['jobs']:,}{of_whole} (limit {summary['max_jobs']:,})")
    lines.append("images    " + ", ".join(f"{size}: {n:,}" for size, n in summary["images_per_size"].items()))
    cost, unit = summary["estimated_cost"], summary["estimated_cost_unit"]
    lines.append(f"work      about {cost:,.1f} units (1 unit = {unit})")
    lines.append(verdict)
    return "\n".join(lines)
