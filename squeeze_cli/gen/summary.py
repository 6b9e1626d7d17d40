"""What a run reports about itself: the dry-run plan and `run.json` (docs/outputs.md lists its fields)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from squeeze_cli import outputs
from squeeze_cli.gen.progress import Reporter
from squeeze_cli.logs import counted
from squeeze_cli.pipelines.stages import stage_plan
from squeeze_cli.plan import Job
from squeeze_cli.processes import this_machine


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def describe_plan(jobs: Sequence[Job], done: set[str], *, staged: bool = True) -> dict[str, Any]:
    """What a dry run reports: counts, images per size, and the stage plan of each parameter set (for a
    pipeline that denoises in stages, `staged`)."""
    sizes: dict[str, int] = {}
    stages: dict[str, list[int]] = {}
    for job in jobs:
        params = job.params
        size = f"{params.width}x{params.height}"
        sizes[size] = sizes.get(size, 0) + 1
        if not staged:
            continue
        key = (
            f"{size}, {params.num_inference_steps} steps, thresholds {params.stage_thresholds[0]}/"
            f"{params.stage_thresholds[1]}"
        )
        if key not in stages:
            plan = stage_plan(
                params.num_inference_steps, params.height, params.width, params.stage_thresholds
            )
            stages[key] = list(plan.counts)
    return {
        "jobs": len(jobs),
        "done": sum(job.job_id in done for job in jobs),
        "pending": sum(job.job_id not in done for job in jobs),
        "subjects": len({job.subject for job in jobs}),
        "images_per_size": sizes,
        "steps_per_stage": stages,
    }


def report_dry_run(reporter: Reporter, report: dict[str, Any], json_events: bool) -> None:
    """Print the plan `describe_plan` made; a `--shard I/N` dry run says whose it is, as the run would."""
    shard = reporter.shard
    if shard is not None:
        report = {"shard": list(shard), **report}
    if json_events:
        reporter.emit_json(**report)
        return
    lines = [
        f"dry run: {counted(report['jobs'], 'job')} over {counted(report['subjects'], 'subject')}, "
        f"{report['done']} already done, {report['pending']} to generate → {report['out']}",
        *(f"  {size}: {counted(count, 'image')}" for size, count in report["images_per_size"].items()),
        *(
            f"  {key}: steps per stage {counts[0]}/{counts[1]}/{counts[2]}"
            for key, counts in report["steps_per_stage"].items()
        ),
    ]
    if report["stale"]:
        lines.append(
            f"  stale: {counted(report['stale'], 'image')} of jobs this manifest does not plan "
            "(`--prune` moves them)"
        )
    prefix = f"shard {shard[0]}/{shard[1]}: " if shard is not None else ""
    print("\n".join(prefix + line for line in lines))


def starting_summary(
    *,
    command: list[str],
    shard: tuple[int, int] | None,
    out_dir: str,
    model_record: dict[str, Any],
    timing_names: Sequence[str],
    num_processes: int,
    planned: int,
    skipped: int,
    started_at: str,
) -> dict[str, Any]:
    """`run.json` as written when the run starts: `running` until the end, so one still saying so after
    its process is gone tells of a killed run. See docs/outputs.md for the fields."""
    return {
        "status": "running",
        "command": command,
        "pid": os.getpid(),
        "host": this_machine(),  # where `pid` is a process: `squeeze status` tells a killed run by it
        "started_at": started_at,
        "finished_at": None,
        "out": out_dir,
        "jobs": {"planned": planned, "skipped": skipped, "succeeded": 0, "failed": 0},
        "failures": [],
        "timings": {"total": None, **{name: None for name in timing_names}},
        "images_per_second": None,
        **model_record,
        "processes": num_processes,
        "shard": list(shard) if shard else None,
    }


def finish_summary(
    summary: dict[str, Any],
    status: str,
    results: list[dict[str, Any]],
    failures: list[dict[str, Any]],
    succeeded: int,
    started: float,
    write_error: outputs.OutputWriteError | None,
) -> None:
    """Fill in the end of the run; per-stage timings are the slowest process's."""
    generate_seconds = max(result["timings"]["generate"] for result in results)
    summary.update(
        status=status,
        finished_at=now(),
        failures=failures,
        images_per_second=round(succeeded / generate_seconds, 4) if generate_seconds else None,
    )
    summary["jobs"].update(succeeded=succeeded, failed=len(failures))
    summary["timings"] = {
        "total": round(time.perf_counter() - started, 3),
        **{
            name: round(max(result["timings"][name] for result in results), 3)
            for name in results[0]["timings"]
        },
    }
    step_cache = {
        name: sum(result["step_cache"][name] for result in results) for name in results[0]["step_cache"]
    }
    summary["step_cache"] = step_cache if step_cache["images"] else None
    if write_error is not None:
        summary["error"] = write_error.one_line()
