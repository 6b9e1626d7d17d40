"""`squeeze check OUT --rules NAME`: a run's images against a marketplace's rules; no model, no GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from squeeze_cli.cli.options import JsonOpt, VariantOpt, failures_as_json
from squeeze_cli.errors import EXIT_JOBS_FAILED, EXIT_OK

CHECK_EPILOG = """\b
Exit codes:
  0    every image passes
  1    some image fails a rule (or its variant is missing)
  2    not a run folder, an unknown rule set, or a rules file with problems
  141  stdout or stderr closed (`| head -1`), as if by SIGPIPE
"""

RulesOpt = Annotated[
    str,
    typer.Option(
        "--rules",
        metavar="NAME|FILE",
        help="A packaged rule set (amazon-main) or the path of your own rules .yaml.",
        show_default=False,
    ),
]


def check(
    out: Annotated[
        str,
        typer.Argument(metavar="OUT", help="The output folder of a `squeeze gen` run.", show_default=False),
    ],
    rules: RulesOpt,
    variant: VariantOpt = None,
    json_output: JsonOpt = False,
) -> int:
    """Check a run's images against a marketplace's rules: per image pass or fail, with the numbers."""
    from squeeze_cli.outputs import check_run, format_report, load_rules, run_plan_if_any

    with failures_as_json(json_output):
        rule_set = load_rules(rules)
        report = check_run(out, rule_set, variant, run_plan_if_any(Path(out)))
    if json_output:
        typer.echo(json.dumps({"ok": True, **report.to_dict()}, indent=2))
    else:
        typer.echo(format_report(report))
    return EXIT_JOBS_FAILED if report.failed else EXIT_OK
