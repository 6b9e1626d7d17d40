"""Pixel fingerprints of every tiny recipe's images: run it on two revisions and diff the output to show a
refactor changed no pixel.

    python benchmarks/tiny_pixels.py > before.txt   # on the old revision (its own venv)
    python benchmarks/tiny_pixels.py > after.txt    # on the new one
    diff before.txt after.txt

Run both with the same threads (the same `OMP_NUM_THREADS`): another thread count sums in another order,
and the pixels differ by that alone. With neither set, `squeeze gen` picks its threads by the load
(`--threads`), which may differ between the two runs.

For each registered pipeline's tiny recipe (and the squeeze pipeline with both MLLM families), `squeeze gen`
makes 9 images of two subjects (one with two references), three seeds, prompts of two lengths, true CFG
with a negative prompt, batch size 2, and prints the sha256 of each image's decoded RGB pixels (the PNG
files themselves hold the run's time).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "images"
# (recipe, --set overrides, true_cfg_scale)
RUNS = [
    ("tiny", [], 2.0),
    ("tiny", ["model.family=qwen2_5_vl"], 2.0),
    ("tiny-kontext", [], 2.0),
    ("tiny-qwen-image-edit", [], 4.0),
]
MANIFEST = """
version: 1
recipe: {recipe}
output: {{dir: out, grids: false, contact_sheet: false}}
defaults: {{seeds: [0, 1, 2], true_cfg_scale: {cfg}, negative_prompt: "blurry"}}
subjects:
  - name: dog
    class: dog
    references: ["{images}/dog/*.jpg"]
    prompts: ["a {{class}} in the snow", "a {{class}} wearing a very long santa hat on the beach at night"]
  - name: backpack
    class: backpack
    references: ["{images}/backpack/00.jpg"]
    prompts: ["a {{class}} on the beach"]
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for number, (recipe, overrides, cfg) in enumerate(RUNS):
            folder = Path(tmp) / str(number)
            folder.mkdir()
            manifest = folder / "manifest.yaml"
            manifest.write_text(MANIFEST.format(recipe=recipe, cfg=cfg, images=IMAGES))
            command = [sys.executable, "-m", "squeeze_cli", "gen", str(manifest), "--batch-size", "2", "-q"]
            for override in overrides:
                command += ["--set", override]
            subprocess.run(command, check=True)
            label = " ".join([recipe, *overrides])
            for path in sorted((folder / "out").glob("*/*.png")):
                pixels = np.asarray(Image.open(path).convert("RGB"))
                digest = hashlib.sha256(pixels.tobytes()).hexdigest()[:20]
                print(f"{label}  {path.parent.name}/{path.name}  {digest}", flush=True)


if __name__ == "__main__":
    main()
