"""`--where`: a small expression language over an export row's fields, e.g. `dino >= 0.6 and clip_t >= 0.28`.

Python's `ast` parses the text; only comparisons (`==`, `!=`, `<`, `<=`, `>`, `>=`, chains included),
`and`, `or`, `not`, parentheses, field names and number, text, `true`/`false`/`null` constants are accepted,
and the tree is walked here: nothing is ever evaluated by Python. Every field has a kind (number or text),
checked before any row is read. A comparison with a missing value (an image `squeeze eval` did not score)
is false, as in SQL.
"""

from __future__ import annotations

import ast
import io
import operator
import tokenize
from collections.abc import Callable, Mapping
from typing import Any

from squeeze_cli.errors import UsageError

Row = Mapping[str, Any]
Predicate = Callable[[Row], bool]

_COMPARISONS: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
# Lowercase, as in YAML and JSON; Python's spellings work too.
_NAMED_CONSTANTS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class WhereError(UsageError):
    """A `--where` expression that does not parse, or names a field an export row does not have."""


def parse_where(text: str, fields: Mapping[str, str], absent: Mapping[str, str] | None = None) -> Predicate:
    """A predicate over rows from `text`.

    Args:
        fields: `{name: "number" | "text"}`: the fields a row has, with their kind.
        absent: `{name: hint}`: fields the rows could have but do not (the eval scores of a run not
            evaluated), with what to do.

    Raises:
        `WhereError`: the text is not an expression of the language, or names an unknown field, or compares
            a number with text; the message gives the column.
    """
    try:
        tree = ast.parse(_spell_keywords(text), mode="eval")
    except SyntaxError as error:
        column = error.offset or 1
        raise WhereError(
            f"--where {text!r}: column {column}: not an expression ({error.msg})",
            "e.g. --where 'dino >= 0.6 and clip_t >= 0.28'",
        ) from None
    except RecursionError:  # `not not ... ` thousands deep: too deep for the parser itself
        tree = None
    if tree is None or _depth(tree) > MAX_DEPTH:
        # The predicate recurses as deep as the tree, on every row: bounded here, not by a RecursionError.
        raise WhereError(f"--where {text!r}: nested more than {MAX_DEPTH} deep", "write it flatter")
    return _Compiler(text, fields, absent or {}).predicate(tree.body)


MAX_DEPTH = 100  # of nested operators and parentheses: far beyond any filter a person writes


def _depth(tree: ast.AST) -> int:
    """How deep `tree` nests (walked without recursion)."""
    deepest = 0
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return deepest


# Fields named by a Python keyword, and the name (as long, so columns stay right) the parser is given.
_KEYWORD_FIELDS = {"class": "_cls_"}
_FIELD_OF_SPELLING = {spelling: field for field, spelling in _KEYWORD_FIELDS.items()}


def _spell_keywords(text: str) -> str:
    """`text` with every keyword field (`class`) outside quotes spelled as `ast` can parse it."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return text  # `ast.parse` says what is wrong
    spelled = list(text)
    line_starts = [0]  # where each line starts in `text` (an expression may span lines in parentheses)
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    for token in tokens:
        if token.type == tokenize.NAME and token.string in _KEYWORD_FIELDS:
            start = line_starts[token.start[0] - 1] + token.start[1]
            spelled[start : start + len(token.string)] = _KEYWORD_FIELDS[token.string]
    return "".join(spelled)


def _source(node: ast.AST) -> str:
    """The text of `node` as the user spells it."""
    text = ast.unparse(node)
    for spelling, field in _FIELD_OF_SPELLING.items():
        text = text.replace(spelling, field)
    return text


class _Compiler:
    def __init__(self, text: str, fields: Mapping[str, str], absent: Mapping[str, str]):
        self.text = text
        self.fields = fields
        self.absent = absent

    def error(self, node: ast.AST, message: str, hint: str | None = None) -> WhereError:
        column = getattr(node, "col_offset", 0) + 1
        return WhereError(f"--where {self.text!r}: column {column}: {message}", hint)

    def predicate(self, node: ast.expr) -> Predicate:
        if isinstance(node, ast.BoolOp):
            parts = [self.predicate(value) for value in node.values]
            if isinstance(node.op, ast.And):
                return lambda row: all(part(row) for part in parts)
            return lambda row: any(part(row) for part in parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.predicate(node.operand)
            return lambda row: not inner(row)
        if isinstance(node, ast.Compare):
            return self.comparison(node)
        raise self.error(
            node,
            f"`{_source(node)}` is not a condition",
            "compare a field: `dino >= 0.6`, `subject == 'dog'`",
        )

    def comparison(self, node: ast.Compare) -> Predicate:
        operands = [self.operand(node.left), *(self.operand(value) for value in node.comparators)]
        kinds = {kind for kind, _ in operands if kind is not None}
        if len(kinds) > 1:
            raise self.error(
                node,
                f"`{_source(node)}` compares a number with text",
                "compare a number field with a number (`seed > 2`), a text field with quoted text "
                "(`subject == 'dog'`)",
            )
        steps = []
        for op in node.ops:
            compare = _COMPARISONS.get(type(op))
            if compare is None:
                raise self.error(node, f"`{_source(node)}`: only == != < <= > >= compare")
            steps.append(compare)
        getters = [getter for _, getter in operands]

        def holds(row: Row) -> bool:
            values = [getter(row) for getter in getters]
            for compare, left, right in zip(steps, values, values[1:], strict=False):
                if left is None or right is None:
                    if compare not in (operator.eq, operator.ne):
                        return False  # a missing value is neither above nor below anything
                if not compare(left, right):
                    return False
            return True

        return holds

    def operand(self, node: ast.expr) -> tuple[str | None, Callable[[Row], Any]]:
        """(the kind of value: "number", "text" or None for null, a getter)."""
        if isinstance(node, ast.Name) and node.id not in _NAMED_CONSTANTS:
            name = _FIELD_OF_SPELLING.get(node.id, node.id)
            if name in self.absent:
                raise self.error(node, f"no field `{name}` in this run", self.absent[name])
            if name not in self.fields:
                raise self.error(node, f"unknown field `{name}`", f"fields: {', '.join(sorted(self.fields))}")
            return self.fields[name], lambda row: row.get(name)
        value = _constant(node)
        if value is _NOT_A_CONSTANT:
            raise self.error(
                node,
                f"`{_source(node)}` is not a field or a constant",
                "use field names, numbers, 'quoted text', true, false or null",
            )
        kind = None if value is None else "text" if isinstance(value, str) else "number"
        return kind, lambda row: value


_NOT_A_CONSTANT = object()


def _constant(node: ast.expr) -> Any:
    """The value of a constant operand (`0.6`, `-1`, `'dog'`, `true`, `null`), or `_NOT_A_CONSTANT`."""
    if isinstance(node, ast.Name):
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _constant(node.operand)
        is_number = isinstance(inner, (int, float)) and not isinstance(inner, bool)
        return -inner if is_number else _NOT_A_CONSTANT
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value  # bool is an int: true/false compare as 1/0
    return _NOT_A_CONSTANT
