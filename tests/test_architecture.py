"""The layout's rules (docs/architecture.md): the import floors and no import cycles, over every import
(deferred ones inside functions included), and torch-free commands stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "squeeze_cli"

# The import floors, top to bottom (docs/architecture.md draws the same table). A module may import its
# own unit and any unit on a lower floor; the units of one floor never import each other.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("gen", "eval", "train", "export"),
    ("outputs", "metrics"),
    ("plan", "loading"),
    ("manifest",),
    ("pipelines",),
    ("vocabulary",),
)
# Each unit's modules, named below `squeeze_cli` (a package stands for its submodules; `__init__` is the
# root package). Every module must be in one unit: a new top-level module is placed here on purpose.
UNITS: dict[str, tuple[str, ...]] = {
    "cli": ("cli", "__main__"),
    "gen": ("gen",),
    "eval": ("eval",),
    "train": ("train",),
    "export": ("export",),
    "outputs": ("outputs",),
    "metrics": ("metrics",),
    "plan": ("plan",),
    "loading": ("loading",),
    # model_checks checks the manifest's model section (`ModelSpec`) for `manifest.resolve`.
    "manifest": ("manifest", "model_checks"),
    "pipelines": ("pipelines",),
    "vocabulary": ("__init__", "params", "errors", "images", "reading", "processes", "logs"),
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(module: str, source: str, modules: Collection[str], is_package: bool = False) -> dict[str, int]:
    """The squeeze_cli modules that `module` (whose file holds `source`) imports anywhere in it: at the
    top, inside functions, under `TYPE_CHECKING`; each with the line of its first import.

    `from package import name` imports the submodule `package.name` when there is one, else `package`
    itself (its `__init__`); relative imports are resolved against the module's package. Imports by name
    (`importlib.import_module` over the pipeline registry's `module:Class` strings) are not seen: they
    stay inside `pipelines/`.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            if target == "squeeze_cli" or target.startswith("squeeze_cli."):
                found.setdefault(target, node.lineno)
    return found


GRAPH = {
    module: _imports(module, path.read_text(), MODULES, path.name == "__init__.py")
    for module, path in MODULES.items()
}


def _cycles(graph: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """One path per import cycle a depth-first walk closes (`a -> b -> a`); empty when there is none."""
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> None:
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target in stack:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in done and target in graph:
                visit(target, stack)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [])
    return cycles


def _unit_of(module: str, units: Mapping[str, tuple[str, ...]]) -> str | None:
    """The unit that holds `module` (the longest matching name wins), or None."""
    short = module.partition(".")[2] or "__init__"
    best = None
    for unit, names in units.items():
        for name in names:
            if (short == name or short.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (unit, name)
    return best[0] if best else None


def _layer_violations(
    graph: Mapping[str, Mapping[str, int]],
    floors: tuple[tuple[str, ...], ...],
    units: Mapping[str, tuple[str, ...]],
) -> list[str]:
    """Every import that goes up a floor or sideways to another unit of its floor; every unplaced module."""
    floor = {unit: level for level, row in enumerate(floors) for unit in row}
    problems = []
    for module, targets in sorted(graph.items()):
        unit = _unit_of(module, units)
        if unit is None:
            problems.append(f"{module} is in no unit: add it to UNITS and FLOORS")
            continue
        for target, line in sorted(targets.items()):
            other = _unit_of(target, units)
            if other is None or other == unit:
                continue
            if floor[other] < floor[unit]:
                problems.append(f"{module}:{line} imports {target}: {unit} imports {other}, a floor above it")
            elif floor[other] == floor[unit]:
                problems.append(f"{module}:{line} imports {target}: {unit} imports {other}, its sibling")
    return problems


def test_every_import_names_a_module_that_exists() -> None:
    # Also proves the parser: relative imports and `from package import submodule` resolve to real files.
    missing = [
        f"{module}:{line} imports {target}"
        for module, targets in GRAPH.items()
        for target, line in targets.items()
        if target not in MODULES
    ]
    assert missing == []


def test_no_import_cycles() -> None:
    cycles = [" -> ".join(cycle) for cycle in _cycles(GRAPH)]
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_every_module_imports_only_its_floor_or_below() -> None:
    problems = _layer_violations(GRAPH, FLOORS, UNITS)
    assert problems == [], "layer violations:\n" + "\n".join(problems)


def test_the_floors_name_every_unit_once() -> None:
    placed = [unit for row in FLOORS for unit in row]
    assert sorted(placed) == sorted(UNITS)


def test_the_checks_report_a_cycle_an_upward_and_a_sideways_import() -> None:
    graph = {
        "squeeze_cli.low.a": {"squeeze_cli.low.b": 3},
        "squeeze_cli.low.b": {"squeeze_cli.low.a": 5, "squeeze_cli.top": 7},  # a cycle, and up a floor
        "squeeze_cli.top": {"squeeze_cli.low": 1, "squeeze_cli.side": 2},  # down (fine), and sideways
        "squeeze_cli.side": {},
        "squeeze_cli.stray": {},
    }
    floors = (("top", "side"), ("low",))
    units = {"top": ("top",), "side": ("side",), "low": ("low",)}
    assert _cycles(graph) == [["squeeze_cli.low.a", "squeeze_cli.low.b", "squeeze_cli.low.a"]]
    assert _layer_violations(graph, floors, units) == [
        "squeeze_cli.low.b:7 imports squeeze_cli.top: low imports top, a floor above it",
        "squeeze_cli.stray is in no unit: add it to UNITS and FLOORS",
        "squeeze_cli.top:2 imports squeeze_cli.side: top imports side, its sibling",
    ]
    assert _unit_of("squeeze_cli.model_checks", UNITS) == "manifest"
    assert _unit_of("squeeze_cli", UNITS) == "vocabulary"


def test_the_parser_sees_deferred_relative_submodule_and_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "from . import lock, __version__\n"  # a sibling submodule, and a name of the package
        "from ..plan import Job\n"
        "if TYPE_CHECKING:\n"
        "    import squeeze_cli.outputs.files\n"
        "def later():\n"
        "    from squeeze_cli.metrics import protocol\n"
    )
    modules = {"squeeze_cli.gen", "squeeze_cli.gen.lock", "squeeze_cli.plan", "squeeze_cli.metrics.protocol"}
    assert _imports("squeeze_cli.gen.runner", source, modules) == {
        "squeeze_cli.gen.lock": 3,
        "squeeze_cli.gen": 3,
        "squeeze_cli.plan": 4,
        "squeeze_cli.outputs.files": 6,
        "squeeze_cli.metrics.protocol": 8,
    }
    # In a package's `__init__`, `.` is the package itself.
    assert _imports("squeeze_cli.gen", "from .lock import DirectoryLock\n", modules, is_package=True) == {
        "squeeze_cli.gen.lock": 1
    }


def test_pyproject_ships_every_package() -> None:
    # A hand list, since `packages.find` cannot see `squeeze_cli.recipes` (the top-level recipes/ folder,
    # mapped by `package-dir`): a package missing here works in an editable install and not in a wheel.
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {_module_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert sorted(setuptools["packages"]) == sorted(on_disk | {"squeeze_cli.recipes"})
    assert setuptools["package-dir"] == {"squeeze_cli.recipes": "recipes"}
    assert (PACKAGE.parent / "recipes" / "__init__.py").is_file()


def test_the_torch_free_layers_import_no_torch() -> None:
    code = (
        "import sys\n"
        "import squeeze_cli.cli, squeeze_cli.manifest, squeeze_cli.plan, squeeze_cli.outputs\n"
        "import squeeze_cli.gen.runner, squeeze_cli.params, squeeze_cli.processes\n"
        "import squeeze_cli.metrics.protocol\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


EXAMPLES = PACKAGE.parent / "examples"
MODEL_LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "peft")


class Finished(NamedTuple):
    """How a fresh `squeeze ARGV` process ended: its exit code, the modules it had imported, its stderr."""

    exit_code: int
    modules: set[str]
    stderr: str


def _modules_after(*argv: str) -> Finished:
    """Run `squeeze ARGV` in a fresh process; its exit code and the modules it has imported when it exits."""
    code = (
        "import sys\n"
        "from squeeze_cli.cli import main\n"
        "try:\n"
        "    main(sys.argv[2:])\n"
        "    code = 0\n"
        "except SystemExit as stop:\n"
        "    code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1\n"
        "open(sys.argv[1], 'w').write('\\n'.join([str(code), *sys.modules]))\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "modules.txt"
        result = subprocess.run(
            [sys.executable, "-c", code, str(listing), *argv], capture_output=True, text=True, check=True
        )
        exit_code, *modules = listing.read_text().split("\n")
        return Finished(int(exit_code), set(modules), result.stderr)


@pytest.fixture(scope="module")
def pending_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder `squeeze status` reads: the demo's resolved manifest, nothing generated yet."""
    out = tmp_path_factory.mktemp("run")
    text = (EXAMPLES / "demo.yaml").read_text().replace("images/", f"{EXAMPLES}/images/")
    (out / "manifest.resolved.yaml").write_text(text)
    return out


@pytest.mark.parametrize(
    "argv, exit_code",
    [
        (["--help"], 0),
        (["gen", "--help"], 0),
        (["eval", "--help"], 0),
        (["train", "--help"], 0),
        (["dreambench", "--help"], 0),
        (["validate", str(EXAMPLES / "demo.yaml")], 0),
        (["validate", str(EXAMPLES / "no-such.yaml")], 2),  # an error stays light too
        (["status", "RUN"], 1),  # 1: the run is incomplete (nothing generated yet)
        (["recipes"], 0),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else f"exit {value}",
)
def test_the_light_commands_import_no_model_library(
    argv: list[str], exit_code: int, pending_run: Path
) -> None:
    finished = _modules_after(*(str(pending_run) if arg == "RUN" else arg for arg in argv))
    assert finished.exit_code == exit_code, finished.stderr
    assert "squeeze_cli.cli" in finished.modules
    assert sorted(name for name in MODEL_LIBRARIES if name in finished.modules) == []


def test_validate_imports_no_numpy() -> None:
    # Its cost estimate reads the stage plan, which is pure Python: numpy would add ~0.1 s to every start.
    finished = _modules_after("validate", str(EXAMPLES / "demo.yaml"))
    assert finished.exit_code == 0, finished.stderr
    assert "squeeze_cli.pipelines.stages" in finished.modules and "numpy" not in finished.modules


def test_status_without_merge_imports_no_filelock(pending_run: Path) -> None:
    # Only `--merge` takes the run's lock; filelock costs every other `squeeze status` ~10 ms.
    finished = _modules_after("status", str(pending_run))
    assert finished.exit_code == 1, finished.stderr  # incomplete
    assert "squeeze_cli.outputs" in finished.modules
    assert "filelock" not in finished.modules


def test_validating_webp_and_tiff_references_loads_only_their_pil_plugins(make_image, write_file) -> None:
    make_image("dog-0.webp")
    make_image("dog-1.tiff")
    manifest = write_file(
        "version: 1\nrecipe: tiny\nsubjects:\n  - name: dog\n    references: [dog-0.webp, dog-1.tiff]\n"
        "    prompts:\n      - a photo of a dog\n"
    )
    finished = _modules_after("validate", str(manifest))
    assert finished.exit_code == 0, finished.stderr
    plugins = {name for name in finished.modules if name.startswith("PIL.") and name.endswith("ImagePlugin")}
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
    finished = _modules_after("gen", demo, "--out", str(out), "--quiet")
    assert finished.exit_code == 0, finished.stderr
    assert "squeeze_cli.gen.runner" in finished.modules
    assert sorted(name for name in MODEL_LIBRARIES if name in finished.modules) == []
