"""Typed errors that the CLI turns into one-line messages and documented exit codes.

Exit codes (also in the README and ``squeeze --help``):
    0  everything asked for was done
    1  the run finished but some jobs failed (they are recorded in the run index)
       (`check`: some image fails a marketplace rule; several recipes: one recipe's run stopped
       with an error, the others ran)
    2  invalid input or usage: nothing was generated
    130 / 143  stopped by SIGINT / SIGTERM after the current batch
    141  stdout or stderr lost its reader (`| head -1`), as if by SIGPIPE: gen stops after the
         current batch
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_JOBS_FAILED = 1
EXIT_INVALID = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
EXIT_SIGPIPE = 141  # 128 + SIGPIPE, as the shell reports a process SIGPIPE killed


def with_hint(text: str, hint: str | None) -> str:
    """The one way squeeze writes a message with its fix: ``text (hint: fix)``."""
    return f"{text} (hint: {hint})" if hint else text


def describe_exception(error: BaseException) -> str:
    """An unexpected exception as one line, for the run index: ``TypeName: first line of its message``."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class SqueezeError(Exception):
    """A known failure with a message a user can act on.

    ``hint`` is the fix, when there is an obvious one; ``exit_code`` is what ``squeeze`` exits with.
    """

    exit_code = EXIT_INVALID

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return with_hint(self.message, self.hint)

    def __reduce__(self) -> tuple:
        # Rebuilt without calling __init__ (subclasses add keyword arguments): an error raised in a worker
        # process (the grid drawing pool) reaches the main process whole.
        return _rebuild_error, (type(self), self.args, self.__dict__)


def _rebuild_error(cls: type[SqueezeError], args: tuple, state: dict) -> SqueezeError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class OtherProcessError(SqueezeError):
    """The error another process of the run met and reports (`processes.together`): this process ends
    with the same exit code and says nothing, so the line is printed once."""

    def __init__(self, error: SqueezeError):
        super().__init__(error.message, error.hint)
        self.exit_code = error.exit_code


class UsageError(SqueezeError):
    """Bad flags or arguments."""


class RecipeError(SqueezeError):
    """An unknown or broken model preset."""


class ModelLoadError(SqueezeError):
    """A model could not be loaded (missing offline, wrong id, unsafe format)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, located as precisely as we can."""

    file: str
    line: int | None  # 1-based; None when the problem has no single YAML node (e.g. a missing key)
    column: int | None  # 1-based
    field: str  # e.g. "subjects[2].prompts[0].seeds"; "" for the whole document
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return with_hint(f"{where}: {self.field + ': ' if self.field else ''}{self.message}", self.hint)

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "field": self.field,
            "message": self.message,
            "hint": self.hint,
        }


class ManifestError(SqueezeError):
    """A manifest with one or more problems; all of them are reported at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        first = str(self.problems[0]) if self.problems else "invalid manifest"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(first + more)
