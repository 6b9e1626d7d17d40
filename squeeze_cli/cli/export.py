"""`squeeze export OUT -o DIR`: a run's finished images as a dataset (imagefolder, parquet, webdataset)."""

from __future__ import annotations

from typing import Annotated

import typer

EXPORT_EPILOG = """\b
Exit codes:
  0    exported (or nothing new to add)
  1    a file could not be written (the previous export is kept)
  2    invalid input: a bad flag or --where, not a run folder, -o holds something else
  141  stdout or stderr closed (`| head -1`), as if by SIGPIPE
"""


def export_command(
    out: Annotated[
        str,
        typer.Argument(metavar="OUT", help="The output folder of a `squeeze gen` run.", show_default=False),
    ],
    output: Annotated[
        str,
        typer.Option("-o", "--output", metavar="DIR", help="The export folder (new, or an earlier export)."),
    ],
    export_format: Annotated[
        str, typer.Option("--format", metavar="imagefolder|parquet|webdataset", help="The dataset layout.")
    ] = "imagefolder",
    where: Annotated[
        str | None,
        typer.Option(
            "--where",
            metavar="EXPR",
            help="Keep the rows that match, e.g. 'dino >= 0.6 and clip_t >= 0.28' (see docs/datasets.md).",
        ),
    ] = None,
    subjects: Annotated[
        str | None, typer.Option("--subjects", metavar="PATTERN", help="Only subjects matching this glob.")
    ] = None,
    split: Annotated[
        list[str] | None,
        typer.Option(
            "--split",
            metavar="NAME=FRACTION",
            help="Put this fraction of the subjects into split NAME (val, validation, test); the rest is "
            "train. Repeatable.",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the split by subject.")] = 0,
    with_references: Annotated[
        bool,
        typer.Option("--with-references", help="Put the reference images in the dataset, not their paths."),
    ] = False,
) -> None:
    """Export a run's finished images (current plan only, no views) as a dataset with a dataset card."""
    from squeeze_cli.export.folder import export_run

    result = export_run(
        out,
        output,
        export_format=export_format,
        where=where,
        subjects=subjects,
        splits=split or (),
        seed=seed,
        with_references=with_references,
    )
    for item in result.left_out:  # worded as `squeeze eval` lists the images it leaves out
        typer.echo(f"missing: {item}")
    splits = ", ".join(f"{name} {count}" for name, count in sorted(result.splits.items()))
    count = len(result.left_out)
    missing = f"; {count} damaged image{'s' if count > 1 else ''} left out (listed above)" if count else ""
    typer.echo(
        f"exported {result.added} new images to {result.folder} ({result.total} in all: {splits or 'none'})"
        + missing
    )
