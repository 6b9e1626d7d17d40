"""Code taken from diffusers stays what it says it is: every `# Copied from diffusers.X` method in
squeeze_cli is compared with the installed diffusers' X (as syntax trees, so formatting and comments may
differ, nothing else); where squeeze uses diffusers' function as it is, it is the same object."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "squeeze_cli"
MARKER = re.compile(r"#\s*Copied from (diffusers(?:\.\w+)+)")


def _copies() -> list[tuple[str, int, str]]:
    """(file, line, diffusers dotted name) of every `# Copied from diffusers.…` marker."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = MARKER.search(line)
            if match:
                found.append((str(path.relative_to(PACKAGE.parent)), number, match.group(1)))
    return found


def _resolve(dotted: str) -> object:
    """The object a dotted name such as `diffusers.pipelines.flux.pipeline_flux.FluxPipeline._pack_latents`
    names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = inspect.getattr_static(target, name)
        return getattr(target, "__func__", target)
    raise ImportError(dotted)


def _function_after(path: Path, line: int) -> ast.FunctionDef:
    """The first function defined after `line` (the marker's) in `path`."""
    tree = ast.parse(path.read_text())
    functions = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.lineno > line
    ]
    return min(functions, key=lambda node: node.lineno)


def _shape(function: ast.FunctionDef) -> str:
    """The function's arguments and body as a syntax tree, without its name, decorators or docstring."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    return ast.dump(ast.Module(body=[function.args, *body], type_ignores=[]))


def differs_from_original(copy: ast.FunctionDef, dotted: str) -> bool:
    original = ast.parse(textwrap.dedent(inspect.getsource(_resolve(dotted)))).body[0]
    return _shape(copy) != _shape(original)


def test_every_copy_matches_the_installed_diffusers() -> None:
    """Every marker, today none (the FLUX helpers are used as they are): a copy added later is checked."""
    for where, line, dotted in _copies():
        copy = _function_after(PACKAGE.parent / where, line)
        assert not differs_from_original(copy, dotted), (
            f"{where}:{line}: `{copy.name}` is marked as copied from {dotted} but differs from the installed "
            "diffusers: copy it again, or mark it `# Adapted from` and say what differs"
        )


def test_the_check_tells_a_changed_copy() -> None:
    """The comparison is not vacuous: the original passes, a one-token change does not."""
    dotted = "diffusers.pipelines.flux.pipeline_flux.FluxPipeline._pack_latents"
    source = textwrap.dedent(inspect.getsource(_resolve(dotted)))
    exact = ast.parse(source).body[0]
    changed = ast.parse(source.replace("permute(0, 2, 4, 1, 3, 5)", "permute(0, 2, 4, 1, 5, 3)")).body[0]
    reformatted = ast.parse(source.replace("(height // 2) * (width // 2)", "(height//2)*(width//2)")).body[0]
    assert not differs_from_original(exact, dotted)
    assert not differs_from_original(reformatted, dotted)
    assert differs_from_original(changed, dotted)


def test_flux_helpers_are_diffusers_own() -> None:
    """The squeeze pipeline packs latents and numbers positions with FLUX.1's own functions, not copies."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    from squeeze_cli.pipelines.squeeze import SqueezePipeline

    for name in ("_prepare_latent_image_ids", "_pack_latents", "_unpack_latents"):
        assert getattr(SqueezePipeline, name) is getattr(FluxPipeline, name)
