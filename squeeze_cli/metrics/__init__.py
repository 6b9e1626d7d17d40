"""The metric models, shared by `squeeze eval` and `gen`'s identity gate (`gen/gate.py`).

Modules: `protocol` (metric sets, model ids, preprocessing, the metric columns; torch-free), `encoders`
(the models through `from_pretrained`, and their embeddings), `tiny` (random tiny metric checkpoints).
"""
