"""`squeeze status OUT`: per subject done / failed / pending against the run's manifest; no model, no GPU."""

from __future__ import annotations

import json
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
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Hash every finished image to check it (default: trust an image whose size, mtime and inode "
            "are those its sidecar records); one that fails counts as pending.",
        ),
    ] = False,
) -> int:
    """Say how far a run folder is: per subject done / failed / pending, shards included."""
    from squeeze_cli.gen.status import format_status, merge_run, run_status

    try:
        found = run_status(out, verify=verify)
        if merge:
            merge_run(found)
    except SqueezeError as error:
        if not json_output:
            raise
        print_json_failure(error)
        raise typer.Exit(error.exit_code) from None
    if json_output:
        typer.echo(json.dumps({"ok": True, **found.to_dict(), "merged": merge}, indent=2))
    else:
        typer.echo(format_status(found, merged=merge))
    return found.exit_code
