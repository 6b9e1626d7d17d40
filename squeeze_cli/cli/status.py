"""`squeeze status OUT`: per subject done / failed / pending against the run's manifest; no model, no GPU."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from squeeze_cli.cli.check import VariantOpt
from squeeze_cli.cli.options import JsonOpt, print_json_failure
from squeeze_cli.errors import EXIT_JOBS_FAILED, SqueezeError

STATUS_EPILOG = """\b
Exit codes:
  0    complete: every planned image is done (and, with --rules, passes)
  1    incomplete: jobs pending or failed; with --rules, also an image that fails a rule
  2    not a run folder, or its manifest (or rule set) cannot be read
"""


def status(
    out: Annotated[
        str,
        typer.Argument(metavar="OUT", help="The output folder of a `squeeze gen` run.", show_default=False),
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
) -> int:
    """Say how far a run folder is: per subject done / failed / pending, shards included."""
    from squeeze_cli.gen.status import format_status, merge_run, run_status
    from squeeze_cli.outputs import check_run, format_report, load_rules

    if variant is not None and rules is None:
        raise typer.BadParameter("--variant says which images --rules checks: give --rules too")
    try:
        found = run_status(out)
        if merge:
            merge_run(found)
        checks = check_run(out, load_rules(rules), variant) if rules is not None else None
    except SqueezeError as error:
        if not json_output:
            raise
        print_json_failure(error)
        raise typer.Exit(error.exit_code) from None
    if json_output:
        checked = {"checks": checks.to_dict()} if checks is not None else {}
        typer.echo(json.dumps({"ok": True, **found.to_dict(), "merged": merge, **checked}, indent=2))
    else:
        typer.echo(format_status(found, merged=merge))
        if checks is not None:
            typer.echo(format_report(checks).splitlines()[-1])
    if checks is not None and checks.failed:
        return max(found.exit_code, EXIT_JOBS_FAILED)
    return found.exit_code
