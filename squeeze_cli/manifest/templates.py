"""Prompt templates: ``a {class} in {color}`` with `{name}` placeholders, and `{{`/`}}` for literal braces.

A template is read once (`placeholders`: its names, or why it is malformed) and filled per subject
(`fill`); which names are known, and what an empty value means, is the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping

from squeeze_cli.manifest.schema import PLACEHOLDER_RE


def placeholders(template: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The placeholder names in `template`, in order, and its brace problems as (message, hint)."""
    names: list[str] = []
    problems: list[tuple[str, str]] = []
    if "{" not in template and "}" not in template:
        return names, problems
    for match in PLACEHOLDER_RE.finditer(template):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if token in ("{", "}"):
            problems.append(
                (
                    f"unmatched {token} at character {match.start() + 1}",
                    f"write {token}{token} for a literal brace, or close it: {{subject}}, {{class}}",
                )
            )
        else:
            names.append(match.group(1))
    return names, problems


def fill(template: str, values: Mapping[str, str | None]) -> str:
    """`template` with each known placeholder replaced by its value (unknown ones are left as written)."""
    if "{" not in template and "}" not in template:
        return template

    def replace(match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        value = values.get(match.group(1) or "")
        return token if value is None else value

    return PLACEHOLDER_RE.sub(replace, template)


def literal(text: str) -> str:
    """A template that fills to `text` itself (its braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")
