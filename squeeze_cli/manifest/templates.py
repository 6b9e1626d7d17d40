"""Prompt templates: ``a {class} in {color}`` with `{name}` placeholders, and `{{`/`}}` for literal braces.

A template is read once (`Template`: its placeholder names, or why it is malformed) and filled per subject
(`Template.fill`: a feed's scene is filled for every row); which names are known, and what an empty value
means, is the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping

from squeeze_cli.manifest.schema import PLACEHOLDER_RE


class Template:
    def __init__(self, text: str):
        self.text = text
        self.names: list[str] = []  # the placeholders, in order
        self.problems: list[tuple[str, str]] = []  # (message, hint) of each lone brace
        # The text as (literal, placeholder or None) pieces: filling joins them, with no regex per subject.
        self._pieces: list[tuple[str, str | None]] = []
        literal, end = [], 0
        for match in PLACEHOLDER_RE.finditer(text) if "{" in text or "}" in text else ():
            literal.append(text[end : match.start()])
            end = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                literal.append(token[0])
            elif token in ("{", "}"):
                literal.append(token)
                self.problems.append(
                    (
                        f"unmatched {token} at character {match.start() + 1}",
                        f"write {token}{token} for a literal brace, or close it: {{subject}}, {{class}}",
                    )
                )
            else:
                self.names.append(match.group(1))
                self._pieces.append(("".join(literal), match.group(1)))
                literal = []
        literal.append(text[end:])
        self._pieces.append(("".join(literal), None))

    def fill(self, values: Mapping[str, str | None]) -> str:
        """The text with each placeholder replaced by its value (one without a value is left as written)."""
        if len(self._pieces) == 1:
            return self._pieces[0][0]
        parts = []
        for literal, name in self._pieces:
            parts.append(literal)
            if name is not None:
                value = values.get(name)
                parts.append(f"{{{name}}}" if value is None else value)
        return "".join(parts)


def literal(text: str) -> str:
    """A template that fills to `text` itself (its braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")
