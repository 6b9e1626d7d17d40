"""The layout's rules (docs/architecture.md): no import cycles, torch-free layers stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

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


EXAMPLES = PACKAGE.parent / "examples"
MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "peft")


def _modules_after(*argv: str) -> set[str]:
    """The modules a fresh `squeeze ARGV` process has imported when it exits."""
    code = (
        "import sys\n"
        "from squeeze_cli.cli import main\n"
        "try:\n"
        "    main(sys.argv[2:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "open(sys.argv[1], 'w').write('\\n'.join(sys.modules))\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "modules.txt"
        subprocess.run([sys.executable, "-c", code, str(listing), *argv], capture_output=True, check=True)
        return set(listing.read_text().split("\n"))


@pytest.fixture(scope="module")
def pending_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder `squeeze status` reads: the demo's resolved manifest, nothing generated yet."""
    out = tmp_path_factory.mktemp("run")
    text = (EXAMPLES / "demo.yaml").read_text().replace("images/", f"{EXAMPLES}/images/")
    (out / "manifest.resolved.yaml").write_text(text)
    return out


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["gen", "--help"],
        ["eval", "--help"],
        ["train", "--help"],
        ["dreambench", "--help"],
        ["validate", str(EXAMPLES / "demo.yaml")],
        ["status", "RUN"],
        ["recipes"],
    ],
    ids=" ".join,
)
def test_the_light_commands_import_no_model_library(argv: list[str], pending_run: Path) -> None:
    modules = _modules_after(*(str(pending_run) if arg == "RUN" else arg for arg in argv))
    assert "squeeze_cli.cli" in modules
    assert sorted(name for name in MODEL_LIBRARIES if name in modules) == []


def test_validate_imports_no_numpy() -> None:
    # Its cost estimate reads the stage plan, which is pure Python: numpy would add ~0.1 s to every start.
    modules = _modules_after("validate", str(EXAMPLES / "demo.yaml"))
    assert "squeeze_cli.pipelines.stages" in modules and "numpy" not in modules


def test_status_without_merge_imports_no_filelock(pending_run: Path) -> None:
    # Only `--merge` takes the run's lock; filelock costs every other `squeeze status` ~10 ms.
    modules = _modules_after("status", str(pending_run))
    assert "squeeze_cli.outputs" in modules
    assert "filelock" not in modules


def test_validating_webp_and_tiff_references_loads_only_their_pil_plugins(make_image, write_file) -> None:
    make_image("dog-0.webp")
    make_image("dog-1.tiff")
    manifest = write_file(
        "version: 1\nrecipe: tiny\nsubjects:\n  - name: dog\n    references: [dog-0.webp, dog-1.tiff]\n"
        "    prompts:\n      - a photo of a dog\n"
    )
    modules = _modules_after("validate", str(manifest))
    plugins = {name for name in modules if name.startswith("PIL.") and name.endswith("ImagePlugin")}
    # Not PIL's ~45 plugins (`Image.init()`): the six formats `check_image` accepts, and PPM (`preinit()`).
    reference_plugins = {
        f"PIL.{name}ImagePlugin" for name in ("Bmp", "Gif", "Jpeg", "Png", "Ppm", "Tiff", "WebP")
    }
    assert {"PIL.TiffImagePlugin", "PIL.WebPImagePlugin"} <= plugins <= reference_plugins


def test_a_rerun_with_every_image_done_imports_no_model_library(tmp_path: Path) -> None:
    # Resuming a finished run of 100k images must take seconds and little memory: no torch (~0.2 GB).
    out, demo = tmp_path / "out", str(EXAMPLES / "demo.yaml")
    first = subprocess.run(
        [sys.executable, "-m", "squeeze_cli", "gen", demo, "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr
    modules = _modules_after("gen", demo, "--out", str(out), "--quiet")
    assert "squeeze_cli.gen.runner" in modules
    assert sorted(name for name in MODEL_LIBRARIES if name in modules) == []
