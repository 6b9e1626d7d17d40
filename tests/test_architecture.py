"""The layout's rules (docs/architecture.md): no import cycles, torch-free layers stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "squeeze_cli"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """The squeeze_cli modules a file imports when it is imported (top level, absolute or relative)."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("squeeze_cli"):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("squeeze_cli"))
    return found


def test_no_import_cycles() -> None:
    graph = {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            cycles.append(" -> ".join([*stack[stack.index(module) :], module]))
            return
        for target in graph.get(module, ()):
            # A package importing its own submodules (or a submodule its package) is not a cycle.
            related = target == module or module.startswith(target + ".") or target.startswith(module + ".")
            if target in graph and not related:
                visit(target, [*stack, module])

    for module in graph:
        visit(module, [])
    assert cycles == []


def test_the_torch_free_layers_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import squeeze_cli.cli, squeeze_cli.manifest, squeeze_cli.plan, squeeze_cli.outputs\n"
        "import squeeze_cli.gen.runner, squeeze_cli.params\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
