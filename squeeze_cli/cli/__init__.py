"""The `squeeze` command line: parses, dispatches, reports. One module per command.

Heavy work lives elsewhere and is imported inside the commands: ``--help``, ``validate`` and ``recipes``
never import torch, diffusers or transformers (pydantic and PyYAML only when a command needs them).
`main` is the one place that turns known errors into ``error: ...`` lines and exit codes; with
``SQUEEZE_DEBUG=1`` it also prints the traceback of the error and of what caused it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from squeeze_cli import __version__
from squeeze_cli.cli import check, gen, recipes, status, validate
from squeeze_cli.cli.eval import DREAMBENCH_EPILOG, EVAL_EPILOG, dreambench_command, eval_command
from squeeze_cli.cli.export import EXPORT_EPILOG, export_command
from squeeze_cli.cli.options import APP_EPILOG, EPILOG
from squeeze_cli.cli.train import TRAIN_EPILOG, train_command
from squeeze_cli.errors import EXIT_SIGINT, EXIT_SIGPIPE, ManifestError, OtherProcessError, SqueezeError
from squeeze_cli.logs import closed_streams, log_line, to_devnull

if TYPE_CHECKING:  # the click that typer vendors (typer 0.29): what TyperCommand's methods take
    from typer._click import Context as ClickContext
    from typer._click import HelpFormatter


class _Group(typer.core.TyperGroup):
    """A command whose stdout or stderr lost its reader (`squeeze recipes | head -1`) exits 141, as if
    by SIGPIPE, before click's own handling turns the BrokenPipeError into exit 1 ("jobs failed")."""

    def parse_args(self, ctx: ClickContext, args: list[str]) -> list[str]:
        with _exit_on_closed_pipe():  # the root's own --help and --version
            return super().parse_args(ctx, args)

    def invoke(self, ctx: ClickContext) -> Any:
        with _exit_on_closed_pipe():
            return super().invoke(ctx)


@contextmanager
def _exit_on_closed_pipe() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError as error:
        raise typer.Exit(_closed_pipe_exit(error)) from None


def _closed_pipe_exit(error: BrokenPipeError) -> int:
    """141, the streams that lost their reader pointed at os.devnull so that nothing more is written to
    them; a broken pipe that is not stdout's or stderr's is raised again."""
    closed = closed_streams()
    if not closed:
        raise error
    for stream in closed:
        to_devnull(stream)
    return EXIT_SIGPIPE


app = typer.Typer(
    name="squeeze",
    cls=_Group,
    help="Subject-driven image generation in batches: many images of one subject, from a YAML manifest.",
    epilog=APP_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # unknown errors keep their plain traceback
    rich_markup_mode=None,  # plain click help: no rich import on the way to --help
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"squeeze {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Subject-driven image generation in batches: many images of one subject, from a YAML manifest."""


class _Command(typer.core.TyperCommand):
    """Help as people write it: `squeeze gen [OPTIONS] MANIFEST`, not Typer's `{MANIFEST}` in the usage
    line and `MANIFEST <str>` in the list of arguments."""

    def collect_usage_pieces(self, ctx: ClickContext) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]

    def format_options(self, ctx: ClickContext, formatter: HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"argument": [], "option": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and param.param_type_name in sections:
                name, text = record
                if param.param_type_name == "argument":
                    name = name.split(" <", 1)[0]
                sections[param.param_type_name].append((name, text))
        for title, rows in (("Arguments", sections["argument"]), ("Options", sections["option"])):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app.command("validate", epilog=validate.VALIDATE_EPILOG, cls=_Command)(validate.validate)
app.command("gen", epilog=EPILOG, cls=_Command)(gen.gen)
app.command("recipes", epilog=recipes.RECIPES_EPILOG, cls=_Command)(recipes.recipes_command)
app.command("status", epilog=status.STATUS_EPILOG, cls=_Command)(status.status)
app.command("check", epilog=check.CHECK_EPILOG, cls=_Command)(check.check)
app.command("eval", epilog=EVAL_EPILOG, cls=_Command)(eval_command)
app.command("dreambench", epilog=DREAMBENCH_EPILOG, cls=_Command)(dreambench_command)
app.command("train", epilog=TRAIN_EPILOG, cls=_Command)(train_command)
app.command("export", epilog=EXPORT_EPILOG, cls=_Command)(export_command)


def _report(error: SqueezeError) -> None:
    """Every known error is one `error: ...` line (with its hint); manifest problems one line each."""
    if isinstance(error, OtherProcessError):  # its own process says it
        return
    if isinstance(error, ManifestError):
        for problem in error.problems:
            log_line(f"error: {problem}")
        if len(error.problems) > 1:
            files = list(dict.fromkeys(p.file for p in error.problems if not p.file.startswith("--")))
            if any(p.file.startswith("--") for p in error.problems):
                files.append("the command line")
            log_line(f"error: {len(error.problems)} problems in {', '.join(files)}")
        return
    log_line(f"error: {error.one_line()}")
    if os.environ.get("SQUEEZE_DEBUG") == "1":  # the traceback, with the chained cause a one-liner hides
        traceback.print_exception(error, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run the app; known errors become ``error: ...`` and an exit code."""
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit (ulimit -f) must fail the write (EFBIG), not kill us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from squeeze_cli.logs import is_terminal
    from squeeze_cli.processes import end_process_group, exit_with_launcher, exit_without_teardown

    if not is_terminal(sys.stderr):  # no library bars (loading, writing shards) redrawn with `\r` in a log
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    exit_with_launcher(os.environ)  # a worker of a killed `accelerate launch` must not run on alone
    interrupt = _Interrupt()
    # Not where SIGINT is ignored (a script's background job): Python leaves it ignored there too.
    watched = (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if watched:
        signal.signal(signal.SIGINT, interrupt)
    code = None
    try:
        code = app(args=argv, prog_name="squeeze", standalone_mode=False)
    except SqueezeError as error:
        code = error.exit_code
        if not interrupt.seen:
            try:
                _report(error)
            except BrokenPipeError as broken:  # `squeeze validate bad.yaml 2>&1 | head -1`
                code = _closed_pipe_exit(broken)
    except typer.TyperException as error:  # click's usage errors: the message with usage, exit 2
        show = getattr(error, "show", None)
        show() if show else log_line(f"error: {error.format_message()}")
        code = error.exit_code
    except BaseException as error:
        if not interrupt.seen:
            raise
        if os.environ.get("SQUEEZE_DEBUG") == "1":  # what the interrupt cut short, which the line hides
            traceback.print_exception(error, file=sys.stderr)
    finally:
        if watched:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        in_process_group = end_process_group()
    if interrupt.seen:
        log_line("stopped by SIGINT (Ctrl-C)")
        code = EXIT_SIGINT
    code = code if isinstance(code, int) else 0
    if in_process_group:
        exit_without_teardown(code)
    sys.exit(code)


class _Interrupt:
    """Ctrl-C outside a run's own handling (gen's `StopSignal`, train's loop): noted, then the usual
    KeyboardInterrupt. typer turns that into a silent exit 130, and an import it cuts short may lose it
    and fail another way (a RecursionError in numpy): either way `main` says the command was stopped."""

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, signum: int, frame: object) -> None:
        self.seen = True
        raise KeyboardInterrupt
