"""Download the wheels `benchmarks/gpu.py` needs on a lent GPU machine into `.whl/` (git-ignored).

    python benchmarks/gpu/fetch_wheels.py          # then carry `.whl` with `benchmarks/gpu/run.sh`

That machine has no network, PyTorch and much of the scientific stack (the list in the device notes'
KINDS.md), but no diffusers and older transformers / huggingface_hub. Every package below is pinned to the
version installed here, so the GPU runs the code the tests ran, as manylinux x86_64 CPython 3.12 wheels
(the machine's Python), without their dependencies (`pip install --no-deps` there): the list is what the
benchmark imports (checked with `sys.modules` after a `--small` run of every recipe) less what that image
holds at a version that works (torch, numpy, pillow, pyyaml, requests, packaging, fsspec, tqdm, psutil,
jinja2, sympy). The wheels must fit in one call's carry: at most 60 MiB together.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
LIMIT_MIB = 60
PACKAGES = (
    "diffusers",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "peft",
    "huggingface_hub",
    "httpx2",  # huggingface_hub 2's HTTP client, and what it needs
    "httpcore2",
    "truststore",
    "anyio",
    "idna",
    "h11",
    "pydantic",  # squeeze's recipe files are read through its schema
    "pydantic_core",
    "annotated-types",
    "typing-inspection",
    "typing_extensions",
    "regex",
    "filelock",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def main() -> int:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]
    WHEELS.mkdir(exist_ok=True)
    for stale in WHEELS.glob("*.whl"):  # one version of each: two stop the install there
        stale.unlink()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "-d", str(WHEELS)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    missing = []
    for pin in pins:  # one at a time, so that one missing wheel names itself and the rest still come
        if subprocess.run([*command, pin], capture_output=True, text=True).returncode:
            missing.append(pin)
    sizes = sorted(((w.stat().st_size, w.name) for w in WHEELS.glob("*.whl")), reverse=True)
    total = sum(size for size, _ in sizes) / 2**20
    for size, name in sizes:
        print(f"{size / 2**20:7.2f} MiB  {name}")
    print(f"{total:7.2f} MiB  in {len(sizes)} wheels, {WHEELS}")
    if missing:
        print(f"no manylinux cp312 wheel found for: {', '.join(missing)}", file=sys.stderr)
    if total > LIMIT_MIB:
        print(
            f"over {LIMIT_MIB} MiB: drop the largest wheel the machine's own version can replace "
            f"(see KINDS.md), largest first above",
            file=sys.stderr,
        )
    return 1 if missing or total > LIMIT_MIB else 0


if __name__ == "__main__":
    sys.exit(main())
