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


# ---------------------------------------------------------------------------------------------------
# Protocol parity with DINO's release: torchvision's transform, the release's LayerNorm epsilon
# ---------------------------------------------------------------------------------------------------


def _torchvision_resize_center_crop(image: Image.Image, resize: int, crop: int) -> torch.Tensor:
    """`Resize(resize, BICUBIC)`, `CenterCrop(crop)`, `ToTensor()`, `Normalize` written out from
    torchvision's `_compute_resized_output_size` and `center_crop` (torchvision is not a dependency)."""
    import numpy as np

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    tensor = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float().div(255)
    mean, std = torch.as_tensor(IMAGENET_MEAN), torch.as_tensor(IMAGENET_STD)
    return tensor.sub(mean.view(3, 1, 1)).div(std.view(3, 1, 1))


def _noise(width: int, height: int) -> Image.Image:
    generator = torch.Generator().manual_seed(width * 10007 + height)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.mark.parametrize(
    "size",
    [(1000, 600), (600, 1000), (700, 467), (467, 700), (400, 300), (300, 400), (256, 256), (257, 256)]
    + [(1024, 683), (333, 1000), (2000, 257), (225, 900)],
)
def test_dino_preprocessing_is_torchvisions_pixel_for_pixel(size):
    image = _noise(*size)
    assert torch.equal(resize_center_crop(image, 256, 224), _torchvision_resize_center_crop(image, 256, 224))


def test_dino_preprocessing_is_torchvisions_for_every_aspect_ratio_of_small_images():
    # Every shape from 1:3 to 3:1 at the tiny protocol's sizes (resize 36, crop 32): odd and even sides.
    for width in range(33, 110, 3):
        for height in range(max(33, width // 3), min(110, 3 * width), 4):
            image = _noise(width, height)
            expected = _torchvision_resize_center_crop(image, 36, 32)
            assert torch.equal(resize_center_crop(image, 36, 32), expected), (width, height)


def test_dino_preprocessing_matches_torchvision_itself_when_installed():
    transforms = pytest.importorskip("torchvision.transforms")
    pipeline = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    for size in [(1000, 600), (600, 1000), (700, 467), (400, 300), (256, 256)]:
        image = _noise(*size)
        assert torch.equal(resize_center_crop(image, 256, 224), pipeline(image)), size


@pytest.mark.parametrize("metrics", ["tiny", "dreambench"])
def test_dino_uses_the_layer_norm_epsilon_of_the_original_release(metrics):
    # facebookresearch/dino `vision_transformer.py`: `partial(nn.LayerNorm, eps=1e-6)`; the hub's 1e-12.
    spec = make_protocol(metrics).encoder("dino")
    assert spec.layer_norm_eps == 1e-6
    assert spec.to_dict()["layer_norm_eps"] == 1e-6


def test_the_dino_model_is_built_with_the_release_epsilon():
    import json

    spec = make_protocol("tiny").encoder("dino")
    saved = json.loads((ensure_tiny_metric_checkpoint("dino") / "config.json").read_text())
    assert saved["layer_norm_eps"] == 1e-12  # as the hub's facebook/dino-vits16 config.json
    model = Encoder(spec).model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(norm.eps == 1e-6 for norm in norms)
