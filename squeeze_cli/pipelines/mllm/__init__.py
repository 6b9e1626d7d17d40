"""The frozen multimodal LLM: one encoder over a registry of family adapters (InternVL3, Qwen2.5-VL)."""

from .encoder import MLLMEncoder, MLLMEncoding, PrefixCache  # noqa: F401
