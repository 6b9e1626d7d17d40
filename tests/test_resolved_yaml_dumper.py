"""`manifest.resolved.yaml` is dumped with libyaml when PyYAML has it, with the same text as pure Python."""

from pathlib import Path

import pytest
import yaml

from squeeze_cli.manifest.resolve import load_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not hasattr(yaml, "CSafeDumper"), reason="PyYAML built without libyaml")
def test_libyaml_and_pure_python_write_the_same_resolved_manifest(write_file, make_image, monkeypatch):
    make_image("refs/a.png")
    path = write_file(
        """
        version: 1
        recipe: tiny
        defaults: {seeds: {count: 3, base: 5}, stage_thresholds: [0.9, 0.8]}
        subjects:
          - name: mug
            class: mug
            references: [refs/a.png]
            prompts:
              - "a {class} on a café table, « quoted » — with a very long tail: {class} {class} {class}"
              - "a {class} in a second prompt with the same parameters"
              - text: "a {class}: in snow"
                seeds: [1, 2]
                negative_prompt: "blurry"
                true_cfg_scale: 2.0
        """
    )
    manifest = load_manifest(path)
    fast = manifest.resolved_yaml()
    monkeypatch.delattr(yaml, "CSafeDumper")
    pure = manifest.resolved_yaml()
    assert fast == pure
    assert yaml.safe_load(fast) == yaml.safe_load(pure)
    assert "café" in fast
    assert "&id" not in fast and "*id" not in fast  # shared parameters are written out, not aliased
