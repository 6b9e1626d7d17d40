"""The pixels: `SqueezePipeline` (diffusers conventions), the Dual Layer Aggregator, the stage schedule and
the per-family MLLM adapters. Knows nothing about files, YAML or ranks."""
