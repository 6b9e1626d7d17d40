"""`squeeze recipes`: list the packaged model presets, or show one."""

from __future__ import annotations

from typing import Annotated

import typer

RECIPES_EPILOG = """\b
Exit codes:
  0    listed (or shown)
  2    no preset of that name
  141  stdout or stderr closed (`| head -1`), as if by SIGPIPE
"""


def recipes_command(
    name: Annotated[str | None, typer.Argument(metavar="NAME", help="Show this preset's YAML.")] = None,
) -> None:
    """List the packaged model presets with their weights' licences, or show one."""
    from squeeze_cli.manifest.recipes import list_recipes, recipe_text

    if name is not None:
        typer.echo(recipe_text(name), nl=False)
        return
    presets = list_recipes()
    width = max(len(preset.name) for preset in presets)
    commercial = {True: "yes", False: "no", None: "unknown"}
    for preset in presets:
        typer.echo(f"{preset.name:<{width}}  {preset.description}")
        license = preset.license
        typer.echo(
            f"{'':<{width}}  licence: {license.name}; commercial use: {commercial[license.commercial_use]}"
        )
    typer.echo("\nShow one with `squeeze recipes NAME`; use it with `recipe: NAME` or `--recipe NAME`.")
