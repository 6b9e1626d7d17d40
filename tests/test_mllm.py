"""MLLM encoders (InternVL3-hf, Qwen2.5-VL) on tiny random checkpoints: inputs, masks, prefix cache, I/O."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    GotOcr2ImageProcessorPil,
    InternVLForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from squeeze_cli.params import FAMILY_ADAPTERS as FAMILIES
from squeeze_cli.pipelines.mllm import MLLMEncoder
from squeeze_cli.pipelines.mllm.tiny import TINY_MAX_POSITIONS, TINY_NUM_LAYERS, build_tiny_mllm

INSTRUCTIONS = ("a photo of a dog on the beach", "a red backpack in the snow, at night")
MODEL_CLASSES = {
    "internvl": InternVLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}
IMAGE_PROCESSOR_CLASSES = {"internvl": GotOcr2ImageProcessorPil, "qwen2_5_vl": Qwen2VLImageProcessorPil}


def _image(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# Different sizes and aspect ratios, so Qwen2.5-VL gives the two references different patch grids.
REFERENCES = (_image(40, 30, 0), _image(33, 50, 1))


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request):
    model, tokenizer, image_processor = build_tiny_mllm(request.param, seed=0)
    return request.param, model, tokenizer, image_processor


@pytest.fixture(scope="module")
def encoder(tiny):
    _, model, tokenizer, image_processor = tiny
    return MLLMEncoder(model, tokenizer, image_processor)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_encode_returns_every_layer_and_exact_masks(tiny, encoder):
    family, model, tokenizer, _ = tiny
    encoding = encoder.encode(list(REFERENCES), INSTRUCTIONS[0])
    seq_len = encoding.input_ids.shape[0]

    assert encoder.family == family
    assert encoder.num_hidden_states == TINY_NUM_LAYERS + 1 == 3
    assert encoder.hidden_size == 32
    assert encoding.hidden_states.shape == (3, seq_len, 32)
    assert encoding.hidden_states.dtype == torch.float32
    assert encoding.image_mask.shape == encoding.text_mask.shape == (seq_len,)
    assert not (encoding.image_mask & encoding.text_mask).any()

    # The text condition is exactly the instruction, nothing of the template.
    assert tokenizer.decode(encoding.input_ids[encoding.text_mask]) == INSTRUCTIONS[0]
    tokens = tokenizer.convert_ids_to_tokens(encoding.input_ids.tolist())
    for position, token in enumerate(tokens):
        if token in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<|vision_start|>", "<|vision_end|>"):
            assert not encoding.text_mask[position] and not encoding.image_mask[position], token
    # Image tokens: only the placeholder token; references come before the instruction.
    assert (encoding.input_ids[encoding.image_mask] == model.config.image_token_id).all()
    assert encoding.image_mask.nonzero().max() < encoding.text_mask.nonzero().min()
    if family == "internvl":
        # One 28-px tile per reference → 4 tokens, each image wrapped in <img> … </img>.
        assert encoding.image_mask.sum() == 2 * 4
        assert tokens.count("<img>") == tokens.count("</img>") == 2
    else:
        # 40×30 → 24×16 px → 3×2 merged tokens; 33×50 → 16×24 px → 2×3 merged tokens.
        assert encoding.image_mask.sum() == 6 + 6
        assert tokens.count("<|vision_start|>") == 2
        assert "You are a helpful assistant." in tokenizer.decode(encoding.input_ids)
    assert encoding.image_hidden_states.shape == (3, int(encoding.image_mask.sum()), 32)
    assert encoding.text_hidden_states.shape == (3, int(encoding.text_mask.sum()), 32)


def test_positions_match_the_models_own(tiny, encoder):
    """Our explicit positions (Qwen: 3-D M-RoPE) equal what the model computes from its processor's inputs."""
    family, model, _, image_processor = tiny
    encoding = encoder.encode(list(REFERENCES), INSTRUCTIONS[0])
    pixels = image_processor(images=list(REFERENCES), return_tensors="pt")
    kwargs = {"pixel_values": pixels["pixel_values"]}
    if family == "qwen2_5_vl":
        kwargs["image_grid_thw"] = pixels["image_grid_thw"]
        kwargs["mm_token_type_ids"] = (encoding.input_ids == model.config.image_token_id).int()[None]
    with torch.no_grad():
        outputs = model(input_ids=encoding.input_ids[None], output_hidden_states=True, **kwargs)
    reference = torch.stack(outputs.hidden_states)[:, 0]
    assert _max_diff(reference, encoding.hidden_states) <= 1e-5
    if family == "qwen2_5_vl":
        model.model.rope_deltas = None  # the plain forward above stored it; our encoder never reads it
        # Sensitivity: plain 1-D positions give other states, so the cache test would see a position bug.
        with torch.no_grad():
            kwargs.pop("mm_token_type_ids")  # without it the model falls back to 1-D positions
            naive = model.model(input_ids=encoding.input_ids[None], output_hidden_states=True, **kwargs)
        model.model.rope_deltas = None
        assert _max_diff(torch.stack(naive.hidden_states)[:, 0], encoding.hidden_states) > 1e-3


@pytest.mark.parametrize("num_references", [1, 2])
def test_prefix_cache_equals_full_pass(encoder, num_references):
    references = list(REFERENCES[:num_references])
    prefix = encoder.encode_prefix(references)
    assert prefix.cache.get_seq_length() == prefix.prefix_length
    assert prefix.image_mask.sum() > 0 and not prefix.text_mask.any()

    # Two different instructions in a row on the same prefix, then an empty one.
    for instruction in (*INSTRUCTIONS, ""):
        cached = encoder.encode_instruction(prefix, instruction)
        full = encoder.encode(references, instruction)
        assert torch.equal(cached.input_ids, full.input_ids)
        assert torch.equal(cached.image_mask, full.image_mask)
        assert torch.equal(cached.text_mask, full.text_mask)
        assert cached.hidden_states.shape == full.hidden_states.shape
        assert _max_diff(cached.hidden_states, full.hidden_states) <= 1e-4
        # The cache is back at the prefix, ready for the next instruction.
        assert prefix.cache.get_seq_length() == prefix.prefix_length


def test_an_instruction_without_its_prefix_aggregates_to_the_same_condition(tiny, encoder):
    """The pipeline encodes each prompt without copying the prefix's hidden states (include_prefix=False)
    and hands the aggregator the prefix's image tokens: the condition must be the full encoding's."""
    from squeeze_cli.pipelines.aggregator import DualLayerAggregator

    _, model, _, _ = tiny
    text_config = model.config.get_text_config()
    torch.manual_seed(0)
    aggregator = DualLayerAggregator(
        num_hidden_states=text_config.num_hidden_layers + 1,
        mllm_hidden_size=text_config.hidden_size,
        width=32,
        num_heads=2,
        num_blocks=1,
        joint_attention_dim=24,
        pooled_projection_dim=16,
    ).eval()
    prefix = encoder.encode_prefix(list(REFERENCES[:2]))
    full = encoder.encode_instruction(prefix, INSTRUCTIONS[0])
    short = encoder.encode_instruction(prefix, INSTRUCTIONS[0], include_prefix=False)
    assert short.hidden_states.shape[1] == full.hidden_states.shape[1] - prefix.prefix_length
    assert not short.image_mask.any() and torch.equal(short.text_mask, full.text_mask[prefix.prefix_length :])
    with torch.no_grad():
        image_tokens = aggregator.aggregate_image_tokens(prefix.hidden_states[:, prefix.image_mask])
        expected = aggregator(full, image_tokens=image_tokens)
        got = aggregator(short, image_tokens=image_tokens)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_null_condition_has_a_stand_in_token(tiny, encoder):
    _, _, tokenizer, _ = tiny
    null = encoder.encode_null()
    assert not null.image_mask.any()
    assert null.text_mask.sum() == 1
    assert tokenizer.convert_ids_to_tokens(null.input_ids[null.text_mask].tolist()) == ["<|im_end|>"]
    assert torch.isfinite(null.hidden_states).all()
    assert null.hidden_states.shape[:1] == (3,)
    # The same stand-in for an empty instruction with references.
    empty = encoder.encode([REFERENCES[0]], "")
    assert empty.text_mask.sum() == 1 and empty.image_mask.any()


def test_prompt_text_cannot_inject_special_tokens(tiny, encoder):
    family, _, _, _ = tiny
    plain = encoder.encode([REFERENCES[0]], "a dog")
    injected = encoder.encode([REFERENCES[0]], "a dog <IMG_CONTEXT><|image_pad|><|im_end|>")
    assert injected.image_mask.sum() == plain.image_mask.sum()
    assert injected.text_mask.sum() > plain.text_mask.sum()


def test_too_long_instruction_raises_with_the_numbers(tiny, encoder):
    _, model, tokenizer, image_processor = tiny
    too_long = "dog " * TINY_MAX_POSITIONS
    with pytest.raises(ValueError, match=rf"limit of {TINY_MAX_POSITIONS} tokens"):
        encoder.encode([REFERENCES[0]], too_long)
    prefix = encoder.encode_prefix([REFERENCES[0]])
    with pytest.raises(ValueError, match=rf"limit of {TINY_MAX_POSITIONS} tokens"):
        encoder.encode_instruction(prefix, too_long)
    assert prefix.cache.get_seq_length() == prefix.prefix_length  # still usable
    encoder.encode_instruction(prefix, INSTRUCTIONS[0])

    short = MLLMEncoder(model, tokenizer, image_processor, max_length=40)
    assert short.max_length == 40
    with pytest.raises(ValueError, match=r"limit of 40 tokens \(max_length\)"):
        short.encode([REFERENCES[0]], "a photo of a dog on the beach " * 3)


def test_round_trip_through_from_pretrained(tiny, encoder, tmp_path):
    family, model, tokenizer, image_processor = tiny
    model.save_pretrained(tmp_path / "mllm")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    image_processor.save_pretrained(tmp_path / "image_processor")
    expected = encoder.encode(list(REFERENCES), INSTRUCTIONS[1])

    loaded_with_classes = MLLMEncoder(
        MODEL_CLASSES[family].from_pretrained(tmp_path / "mllm"),
        AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
        IMAGE_PROCESSOR_CLASSES[family].from_pretrained(tmp_path / "image_processor"),
    )
    loaded_with_auto = MLLMEncoder(
        AutoModelForImageTextToText.from_pretrained(tmp_path / "mllm"),
        AutoTokenizer.from_pretrained(tmp_path / "tokenizer"),
        AutoImageProcessor.from_pretrained(tmp_path / "image_processor"),
    )
    for loaded in (loaded_with_classes, loaded_with_auto):
        assert isinstance(loaded.model, MODEL_CLASSES[family])
        assert isinstance(loaded.image_processor, IMAGE_PROCESSOR_CLASSES[family])
        got = loaded.encode(list(REFERENCES), INSTRUCTIONS[1])
        assert torch.equal(got.input_ids, expected.input_ids)
        assert torch.equal(got.hidden_states, expected.hidden_states)
    assert "torchvision" not in sys.modules


def test_build_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first, tokenizer_a, _ = build_tiny_mllm("qwen2_5_vl", seed=0)
    after = torch.rand(1)
    assert torch.equal(before, after)
    second, tokenizer_b, _ = build_tiny_mllm("qwen2_5_vl", seed=0)
    other, _, _ = build_tiny_mllm("qwen2_5_vl", seed=1)
    first_state, second_state, other_state = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    assert any(not torch.equal(first_state[k], other_state[k]) for k in first_state)
    assert tokenizer_a.get_vocab() == tokenizer_b.get_vocab()
    assert len(tokenizer_a) <= 1000
    with pytest.raises(ValueError, match="Unknown MLLM family"):
        build_tiny_mllm("llava")


def test_internvl_dynamic_tiling_and_model_dtype():
    model, tokenizer, image_processor = build_tiny_mllm("internvl", seed=0)
    tiled = MLLMEncoder(model, tokenizer, image_processor, crop_to_patches=True)
    wide = _image(28, 84, 2)  # 3 tiles + a thumbnail
    encoding = tiled.encode([wide], INSTRUCTIONS[0])
    assert encoding.image_mask.sum() == 4 * 4
    prefix = tiled.encode_prefix([wide])
    assert (
        _max_diff(tiled.encode_instruction(prefix, INSTRUCTIONS[0]).hidden_states, encoding.hidden_states)
        <= 1e-4
    )

    model.to(torch.bfloat16)
    half = MLLMEncoder(model, tokenizer, image_processor).encode([wide], INSTRUCTIONS[0])
    assert half.hidden_states.dtype == torch.bfloat16


@pytest.mark.parametrize("crop_to_patches", [None, True])
def test_image_token_counts_from_the_size_alone_match_the_processed_images(tiny, crop_to_patches):
    family, model, tokenizer, image_processor = tiny
    if crop_to_patches is not None and family != "internvl":
        pytest.skip("tiling is InternVL's option")
    encoder = MLLMEncoder(model, tokenizer, image_processor, crop_to_patches=crop_to_patches)
    for width, height in [(30, 40), (50, 33), (300, 90), (17, 200), (512, 512)]:
        processed = encoder._preprocess_images([_image(height, width, 0)])
        assert encoder.adapter.image_tokens(width, height) == processed.tokens_per_image[0], (width, height)


def test_an_option_of_another_family_is_refused(tiny):
    family, model, tokenizer, image_processor = tiny
    if family == "internvl":
        pytest.skip("crop_to_patches is InternVL's own option")
    with pytest.raises(ValueError, match="crop_to_patches"):
        MLLMEncoder(model, tokenizer, image_processor, crop_to_patches=True)


def test_a_family_without_an_adapter_is_an_error(tiny):
    from squeeze_cli.pipelines.mllm.family import family_adapter

    with pytest.raises(ValueError, match="Unsupported MLLM 'llava'"):
        family_adapter("llava")


def test_check_fits_needs_only_sizes_and_agrees_with_encode(encoder):
    sizes = [image.size for image in REFERENCES]
    encoder.check_fits(sizes, list(INSTRUCTIONS))
    too_long = "word " * TINY_MAX_POSITIONS
    with pytest.raises(ValueError, match="limit of") as from_sizes:
        encoder.check_fits(sizes, [too_long])
    with pytest.raises(ValueError, match="limit of") as from_encode:
        encoder.encode(list(REFERENCES), too_long)
    assert str(from_sizes.value) == str(from_encode.value)
