"""`squeeze status OUT`: per subject done / failed / pending against the run's manifest; no model, no GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from squeeze_cli.cli.options import JsonOpt, print_json_failure
from squeeze_cli.errors import SqueezeError

STATUS_EPILOG = """\b
Exit codes:
  0    complete: every planned image is done
  1    incomplete: jobs pending or failed
  2    not a run folder, or its manifest cannot be read
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
) -> int:
    """Say how far a run folder is: per subject done / failed / pending, shards included.

    On the folder of `gen --recipe A,B`, the same for each recipe's run folder in it."""
    from squeeze_cli.gen.status import format_status, merge_run, run_status
    from squeeze_cli.outputs import runs_inside

    folders = runs_inside(Path(out).expanduser().absolute()) or [Path(out)]
    try:
        found = [run_status(folder) for folder in folders]
        for run in found if merge else ():
            merge_run(run)
    except SqueezeError as error:
        if not json_output:
            raise
        print_json_failure(error)
        raise typer.Exit(error.exit_code) from None
    documents = [{**run.to_dict(), "merged": merge} for run in found]
    if json_output:
        document = documents[0] if len(found) == 1 else {"runs": documents}
        typer.echo(json.dumps({"ok": True, **document}, indent=2))
    else:
        typer.echo("\n\n".join(format_status(run, merged=merge) for run in found))
    return max(run.exit_code for run in found)
