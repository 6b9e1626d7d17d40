"""Options and arguments shared by several commands, declared once."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from squeeze_cli.logs import log_line
from squeeze_cli.params import Dtype, Offload, choices

if TYPE_CHECKING:
    from squeeze_cli.errors import SqueezeError
    from squeeze_cli.manifest import LoadedManifest

EPILOG = """\b
Exit codes:
  0    everything asked for was done
  1    the run finished but some jobs failed (see the run index), or, with several
       recipes, one recipe's run stopped with an error
  2    invalid input or usage: nothing was generated
  130  stopped by SIGINT (Ctrl-C) / 143 by SIGTERM, after the current batch
  141  stdout or stderr closed (`| head -1`), as if by SIGPIPE; gen stops after the
       current batch
"""

# `squeeze --help`: gen's codes, and what 1 means for the commands that judge a run.
APP_EPILOG = EPILOG.replace(
    "recipes, one recipe's run stopped with an error\n",
    "recipes, one recipe's run stopped with an error; for status, the run is incomplete;\n"
    "       for check (and status --rules), an image fails a rule\n",
)

# Options shared by the commands that read a manifest.
ManifestArg = Annotated[
    str, typer.Argument(metavar="MANIFEST", help="The manifest YAML file.", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="PATH=VALUE",
        help="Override a manifest value (VALUE is YAML), e.g. --set defaults.seeds=[0,1]. Repeatable.",
        show_default=False,
    ),
]
RecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        metavar="NAME|PATH[,...]",
        help="Model preset to use instead of the manifest's; several, comma-separated, each into its own "
        "OUT/<recipe>/.",
    ),
]
MaxJobsOpt = Annotated[
    int | None,
    typer.Option("--max-jobs", min=1, metavar="N", help="Refuse plans with more jobs (default 100000)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON document instead of text.")]
# A slice of the plan, to try a feed: job ids do not change, so a slice and the whole run share images.
OnlyOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--only",
        metavar="PATTERN[,PATTERN]",
        help="Only the subjects whose names match a pattern (globs such as 'SKU-1*', any case). Repeatable.",
        show_default=False,
    ),
]
LimitOpt = Annotated[
    int | None,
    typer.Option("--limit", min=1, metavar="N", help="Only the first N subjects (after --only)."),
]


# Which images `squeeze check`, and `status` and `eval` with `--rules`, check.
VariantOpt = Annotated[
    str | None,
    typer.Option(
        "--variant",
        metavar="NAME",
        help="Check this channel variant (output.variants) of each image instead of the PNG masters.",
    ),
]


def require_rules_for_variant(rules: str | None, variant: str | None) -> None:
    """`status` and `eval` check images only with `--rules`: a `--variant` without it would be ignored.

    Raises:
        `typer.BadParameter`: `variant` without `rules` (exit code 2).
    """
    if variant is not None and rules is None:
        raise typer.BadParameter("--variant says which images --rules checks: give --rules too")


def only_patterns(only: Sequence[str] | None) -> tuple[str, ...]:
    """`--only` values as patterns: each may hold several, separated by commas."""
    return tuple(pattern.strip() for value in only or () for pattern in value.split(",") if pattern.strip())


DeviceOpt = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:1, ...")]
# Enum-valued flags are read as text and checked by `parse_choice`, so a wrong value gets our one-line error.
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", metavar="|".join(Dtype.__members__), help="Overrides the preset's dtype."),
]
OffloadOpt = Annotated[
    str, typer.Option("--offload", metavar="|".join(Offload.__members__), help="CPU offloading on a GPU.")
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Accept pickle-based (.bin) weights; safetensors only by default."),
]


def load_from_cli(
    manifest: str,
    set_: Sequence[str] | None,
    recipe: str | None,
    max_jobs: int | None,
    *,
    check_sources: bool = True,
    allow_pickle: bool = False,
    out: Path | None = None,
    reference_cache: bool = True,
) -> LoadedManifest:
    """`load_manifest` with the shared flags (`out`: `--out`, absolute; `reference_cache`: not with
    `--verify`; `allow_pickle`: `--allow-pickle`)."""
    from squeeze_cli.manifest.resolve import load_manifest

    if Path(manifest).is_dir():  # a run folder given for its manifest: name the one that reproduces the run
        _refuse_a_run_folder(manifest)
    return load_manifest(
        manifest,
        set_ or (),
        recipe=recipe,
        max_jobs=max_jobs,
        check_sources=check_sources,
        allow_pickle=allow_pickle,
        output_dir=out,
        reference_cache=reference_cache,
    )


def _refuse_a_run_folder(manifest: str) -> None:
    """The folder `manifest`, when it is a run's, refused with the manifest it recorded named; any other
    folder is left to the manifest's reader."""
    from squeeze_cli.errors import ManifestError, Problem
    from squeeze_cli.outputs import RESOLVED_MANIFEST_NAME

    recorded = Path(manifest) / RESOLVED_MANIFEST_NAME
    if recorded.is_file():
        raise ManifestError(
            [
                Problem(
                    manifest,
                    None,
                    None,
                    "",
                    "cannot read the manifest: it is the folder of a squeeze run",
                    f"give the manifest it recorded, {recorded}, which reproduces the run",
                )
            ]
        )


def split_recipes(value: str | None) -> list[str]:
    """`--recipe A,B,C` as its recipes, in order (none without the flag)."""
    from squeeze_cli.errors import UsageError

    if value is None or "," not in value:
        return [] if value is None else [value]
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise UsageError(f"--recipe {value}: an empty recipe name", "e.g. --recipe tiny,tiny-kontext")
    folders = [recipe_folder_name(name).casefold() for name in names]  # one folder on macOS
    for place, folder in enumerate(folders):
        if folder in folders[:place]:
            raise UsageError(
                f"--recipe {value}: two recipes would share the folder OUT/{folder}/",
                "name each recipe once (a recipe file's folder is its file name without the extension)",
            )
    return list(names)


def recipe_folder_name(recipe: str) -> str:
    """The folder under OUT that a run of several recipes gives `recipe`: a preset's name, or a recipe
    file's name without its extension."""
    from squeeze_cli.manifest.recipes import RECIPE_SUFFIXES

    path = Path(recipe)
    return path.stem if path.suffix in RECIPE_SUFFIXES else path.name


def parse_choice(flag: str, value: str, enum: type[Enum]) -> str:
    """`value` if it names a member of `enum`; otherwise a `UsageError` listing the choices."""
    from squeeze_cli.errors import UsageError

    if value not in enum.__members__:
        raise UsageError(f"{flag} {value}: expected {choices(enum)}")
    return value


def print_json_failure(error: SqueezeError, *, one_line: bool = False, plan: dict | None = None) -> None:
    """`{"ok": false, "problems": [...]}` on stdout: what `validate --json` and `gen --json` print for bad
    input (`gen`'s on one line, as its events are). A manifest's problems keep their locations; any other
    known error is one problem without one. `plan`'s keys come first when there is a plan to show."""
    import json

    from squeeze_cli.errors import OtherProcessError

    if isinstance(error, OtherProcessError):  # its own process prints it
        return
    document = {"ok": False, **(plan or {}), "problems": json_problems(error)}
    typer.echo(json.dumps(document, ensure_ascii=False) if one_line else json.dumps(document, indent=2))


@contextmanager
def failures_as_json(json_output: bool) -> Iterator[None]:
    """With --json, a known error inside is the `{"ok": false, ...}` document on stdout and the error's exit
    code, not an `error:` line (`validate`, `status`, `check`)."""
    from squeeze_cli.errors import SqueezeError

    try:
        yield
    except SqueezeError as error:
        if not json_output:
            raise
        print_json_failure(error)
        raise typer.Exit(error.exit_code) from None


def json_problems(error: SqueezeError) -> list[dict]:
    """A manifest's problems with their locations; any other known error as one problem without one."""
    from squeeze_cli.errors import ManifestError, Problem

    if isinstance(error, ManifestError):
        return [problem.to_dict() for problem in error.problems]
    return [Problem("", None, None, "", error.message, error.hint).to_dict()]


def print_warnings(loaded: LoadedManifest) -> None:
    """A manifest's warnings on stderr, one `warning: FILE:LINE: ...` line each."""
    for warning in loaded.warnings:
        log_line(f"warning: {warning}")
