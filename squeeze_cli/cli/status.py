"""`squeeze status OUT`: per subject done / failed / pending against the run's manifest; no model, no GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from squeeze_cli.cli.options import JsonOpt, VariantOpt, failures_as_json, require_rules_for_variant
from squeeze_cli.errors import EXIT_JOBS_FAILED

STATUS_EPILOG = """\b
Exit codes:
  0    complete: every planned image is done (and, with --rules, passes)
  1    incomplete: jobs pending or failed, or a recipe of `gen --recipe A,B` not run; with --rules,
       also an image that fails a rule
  2    not a run folder, or its manifest (or rule set) cannot be read
  141  stdout or stderr closed (`| head -1`), as if by SIGPIPE
"""


def status(
    out: Annotated[
        str,
        typer.Argument(
            metavar="OUT",
            help="The output folder of a `squeeze gen` run (or of `gen --recipe A,B`: each run in it).",
            show_default=False,
        ),
    ],
    json_output: JsonOpt = False,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Also rebuild OUT's index.jsonl, grids and contact sheets from the images on disk "
            "(the shards' included); generates nothing.",
        ),
    ] = False,
    rules: Annotated[
        str | None,
        typer.Option(
            "--rules",
            metavar="NAME|FILE",
            help="Also check the finished images against these rules, as `squeeze check` does.",
        ),
    ] = None,
    variant: VariantOpt = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Hash every finished image to check it and read every reference photo (default: trust an "
            "image whose size, mtime and inode are those its sidecar records, and a photo unchanged since "
            "gen); an image that fails counts as pending.",
        ),
    ] = False,
) -> int:
    """Say how far a run folder is: per subject done / failed / pending, shards included.

    On the folder of `gen --recipe A,B`, the same for each recipe's run folder in it."""
    from squeeze_cli.gen.status import format_status, merge_run, run_status
    from squeeze_cli.outputs import (
        check_run,
        format_report,
        holds_recipes,
        load_rules,
        missing_recipes,
        runs_inside,
    )

    require_rules_for_variant(rules, variant)
    root = Path(out).expanduser().absolute()
    several = holds_recipes(root)  # the folder of `gen --recipe A,B`, however many of its runs are there
    folders = runs_inside(root) if several else [Path(out)]
    with failures_as_json(json_output):
        missing = missing_recipes(root) if several else []
        found = [run_status(folder, verify=verify) for folder in folders]
        rule_set = load_rules(rules) if rules is not None else None  # bad rules: before any merge writes
        for run in found if merge else ():
            merge_run(run)
        checks = [
            check_run(run.out, rule_set, variant, run.plan) if rule_set is not None else None for run in found
        ]
    if json_output:
        documents = [
            {**run.to_dict(), "merged": merge, **({"checks": check.to_dict()} if check is not None else {})}
            for run, check in zip(found, checks, strict=True)
        ]
        documents += [
            {"out": str(root / name), "recipe": name, "complete": False, "problem": problem}
            for name, problem in missing
        ]
        typer.echo(json.dumps({"ok": True, **({"runs": documents} if several else documents[0])}, indent=2))
    else:
        typer.echo(
            "\n\n".join(
                [
                    format_status(run, merged=merge)
                    + (f"\n{format_report(check).splitlines()[-1]}" if check is not None else "")
                    for run, check in zip(found, checks, strict=True)
                ]
                + [f"recipe {name}: {root / name} is {problem}: not complete" for name, problem in missing]
            )
        )
    return max(
        [
            max(run.exit_code, EXIT_JOBS_FAILED) if check is not None and check.failed else run.exit_code
            for run, check in zip(found, checks, strict=True)
        ]
        + [EXIT_JOBS_FAILED for _ in missing]
    )
