"""The metric models: DINO's preprocessing, the tiny checkpoints in the hub layout, embeddings."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from squeeze_cli.metrics.encoders import Encoder, resize_center_crop
from squeeze_cli.metrics.protocol import IMAGENET_MEAN, IMAGENET_STD, make_protocol
from squeeze_cli.metrics.tiny import ensure_tiny_metric_checkpoint


def test_dino_preprocessing_resizes_the_short_side_then_crops_the_centre():
    image = Image.new("RGB", (400, 200), (255, 0, 0))
    image.paste((0, 0, 255), (200, 0, 400, 200))  # left half red, right half blue
    pixels = resize_center_crop(image, 256, 224)
    assert pixels.shape == (3, 224, 224)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    blue = (torch.tensor([0.0, 0.0, 1.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    # 400x200 -> 512x256, centre crop 224: the colour boundary (x = 256) lands in the middle (x = 112).
    assert torch.allclose(pixels[:, 100, 50], red, atol=1e-5)
    assert torch.allclose(pixels[:, 100, 180], blue, atol=1e-5)
    assert torch.allclose(pixels[:, :, 108], red.view(3, 1).expand(3, 224), atol=0.05)


@pytest.mark.parametrize("name", ["dino", "dinov2"])
def test_the_tiny_processors_normalise_with_the_protocols_imagenet_statistics(name):
    # `tiny` takes them from transformers, since `protocol` imports `tiny` and not the other way round.
    import json

    saved = json.loads((ensure_tiny_metric_checkpoint(name) / "preprocessor_config.json").read_text())
    assert (tuple(saved["image_mean"]), tuple(saved["image_std"])) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize(
    "name, files",
    [
        ("dino", {"config.json", "model.safetensors", "preprocessor_config.json"}),
        ("dinov2", {"config.json", "model.safetensors", "preprocessor_config.json"}),
        ("clip", {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"}),
    ],
)
def test_tiny_checkpoints_are_in_the_hub_layout_and_load_with_the_auto_classes(name, files):
    from transformers import AutoConfig, AutoModel

    path = ensure_tiny_metric_checkpoint(name)
    assert files <= {p.name for p in path.iterdir()}
    assert ensure_tiny_metric_checkpoint(name) == path  # built once
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == {"dino": "vit", "dinov2": "dinov2", "clip": "clip"}[name]
    assert AutoModel.from_pretrained(path) is not None


def test_embeddings_are_normalised_batch_independent_and_an_image_matches_itself():
    protocol = make_protocol("tiny", dinov2=True)
    images = [Image.new("RGB", (40, 30), (30 * i, 200 - 40 * i, 90)) for i in range(3)]
    for spec in protocol.encoders:
        encoder = Encoder(spec)
        batch = encoder.embed_images(images)
        single = encoder.embed_images(images[1:2])
        assert torch.allclose(batch.global_.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(batch.global_[1], single.global_[0], atol=1e-5)
        assert float(batch.global_[0] @ single.global_[0]) < 1 - 1e-4  # another image is not itself
        if spec.role == "dino":
            assert batch.patches.shape[:2] == (3, (32 // 8) ** 2)
        if spec.role == "clip":
            texts = encoder.embed_texts(["a dog in the snow", "a red backpack on the beach"])
            assert texts.shape[0] == 2 and float(texts[0] @ texts[1]) < 1 - 1e-4


def test_a_tiny_metric_model_without_its_weights_never_enters_the_cache(tmp_path, monkeypatch) -> None:
    from transformers import PreTrainedModel

    from squeeze_cli.errors import ModelLoadError
    from squeeze_cli.metrics.tiny import ensure_tiny_metric_checkpoint

    # As on rank 1 of a distributed run: transformers' save_pretrained then writes no weights.
    monkeypatch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: False)
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))
    lacking = r"tiny-metric-dino-v1 built in this process lacks weights \(model\)"
    with pytest.raises(ModelLoadError, match=lacking):
        ensure_tiny_metric_checkpoint("dino")
    assert list((tmp_path / "cache").iterdir()) == []
