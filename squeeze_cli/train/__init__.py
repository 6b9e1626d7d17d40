"""`squeeze train`: the paper's two-stage training of the Dual Layer Aggregator and a FLUX LoRA.

- `config`: the training config's schema and loading (torch-free, located all-at-once errors);
- `data`: JSONL / JSON-folder / Hugging Face (incl. Subjects200K) samples, validated before models load,
  and the deterministic batch order;
- `models`: the recipe's frozen components, the new aggregator and the LoRA;
- `objective`: the rectified-flow loss on the pipeline's own packing, ids and null condition;
- `exported`: a `squeeze export` folder as training data (subject pairs);
- `loop`: the accelerate training loop, exact resume, validation grids (drawn by `outputs.grids`);
- `checkpoints`: `checkpoints/step-N`, written whole, pruned, and the one `--resume` continues;
- `export`: the aggregator, the LoRA and the recipe `squeeze gen` loads;
- `estimate`: `--dry-run` (meta-device models, parameter counts, memory estimate);
- `presets/`: the packaged configs (`tiny`, `paper`); `model_configs/`: full-size configs for `--dry-run`.
"""
