"""The evaluation protocol: which models, which preprocessing, which references, which weights.

Published DreamBench numbers differ by protocol, so everything that decides a number is in a `Protocol`,
written into `metrics.json` beside the numbers. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from squeeze_cli.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINO_ID = "facebook/dino-vits16"
# The DINO release builds its ViTs with `nn.LayerNorm(eps=1e-6)`; the hub's config.json says 1e-12.
DINO_LAYER_NORM_EPS = 1e-6
DINOV2_ID = "facebook/dinov2-small"
CLIP_IDS = {"b32": "openai/clip-vit-base-patch32", "l14": "openai/clip-vit-large-patch14"}

# Columns, in the order tables show them; `copy` is the copy-paste measure (docs/evaluation.md).
METRIC_LABELS = {
    "dino": "DINO",
    "clip_i": "CLIP-I",
    "clip_t": "CLIP-T",
    "dinov2": "DINOv2",
    "copy": "copy",
}


@dataclass(frozen=True)
class EncoderSpec:
    """One metric model and how images are prepared for it.

    Args:
        role (`str`): `dino` (DINO ViT: identity and copy), `clip` (CLIP-I and CLIP-T) or `dinov2`.
        model_id (`str`): a hub id or a local folder, loaded with `from_pretrained`.
        resize (`int`, *optional*): shortest side after a bicubic resize; None: the checkpoint's own
            image processor decides (CLIP).
        crop (`int`, *optional*): the centre crop's side, with `resize`.
        revision (`str`, *optional*): the hub revision.
        layer_norm_eps (`float`, *optional*): replaces the checkpoint config's LayerNorm epsilon.
    """

    role: str
    model_id: str
    resize: int | None = None
    crop: int | None = None
    revision: str | None = None
    layer_norm_eps: float | None = None

    def preprocessing(self) -> dict[str, Any]:
        if self.resize is None:
            return {"processor": "the checkpoint's own image processor"}
        return {
            "resize": self.resize,
            "interpolation": "bicubic",
            "center_crop": self.crop,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        }

    def fingerprint(self) -> str:
        """16 hex characters naming the model and its preprocessing: the cache key's model half."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "model": self.model_id,
            "revision": self.revision,
            **({"layer_norm_eps": self.layer_norm_eps} if self.layer_norm_eps is not None else {}),
            "preprocessing": self.preprocessing(),
        }


@dataclass(frozen=True)
class Protocol:
    """Everything that decides the numbers of one evaluation.

    Args:
        metric_set (`str`): `dreambench` (real models) or `tiny` (random tiny models: plumbing only,
            the numbers mean nothing).
        encoders (`tuple[EncoderSpec, ...]`): the models, one per role.
        clip_t_weight (`float`): CLIP-T = weight x max(cosine, 0). 1 is DreamBench's plain cosine
            (what the papers compared in docs/evaluation.md report); 2.5 is CLIPScore (Hessel et al.).
        references (`str`): `conditioning` (the images that conditioned each generation, from its sidecar)
            or a folder holding one sub-folder of reference images per subject (`all` of DreamBench).
    """

    metric_set: str
    encoders: tuple[EncoderSpec, ...]
    clip_t_weight: float = 1.0
    references: str = "conditioning"
    notes: dict[str, str] = field(default_factory=dict)

    def encoder(self, role: str) -> EncoderSpec | None:
        return next((spec for spec in self.encoders if spec.role == role), None)

    def metrics(self) -> list[str]:
        """The metric columns this protocol produces, in table order."""
        roles = {spec.role for spec in self.encoders}
        names = []
        if "dino" in roles:
            names.append("dino")
        if "clip" in roles:
            names += ["clip_i", "clip_t"]
        if "dinov2" in roles:
            names.append("dinov2")
        if "dino" in roles:
            names.append("copy")
        return names

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric_set": self.metric_set,
            "encoders": [spec.to_dict() for spec in self.encoders],
            "clip_t": {
                "weight": self.clip_t_weight,
                "formula": "weight * max(cosine(text, image), 0)",
                "text": "the prompt with the subject's name replaced by its class noun",
            },
            "identity": "cosine of the embeddings (DINO/DINOv2: CLS token; CLIP: projected image embedding) "
            "between the image and each reference, averaged over the references",
            "references": self.references,
            "copy": "max over references of the mean cosine of spatially aligned DINO patch tokens",
            **({"notes": dict(self.notes)} if self.notes else {}),
        }


def make_protocol(
    metrics: str = "dreambench",
    *,
    clip: str | None = None,
    dinov2: bool = False,
    clip_t_weight: float = 1.0,
    references: str = "conditioning",
) -> Protocol:
    """The protocol for the command line's choices.

    Args:
        metrics (`str`): `dreambench` or `tiny`.
        clip (`str`, *optional*): `b32` (None: the default), `l14`, or a hub id / folder of a CLIP checkpoint;
            none with `tiny`, whose CLIP is its own.
        dinov2 (`bool`): add the DINOv2 identity column (as DreamBench++ does).
    """
    if clip_t_weight <= 0:
        raise UsageError(
            f"--clip-t-weight must be positive, got {clip_t_weight}", "use 1 (DreamBench) or 2.5"
        )
    if metrics == "tiny" and clip is not None:  # its CLIP is a tiny random one: the same numbers, silently
        raise UsageError(
            f"--clip {clip} has no effect with --metrics tiny", "drop --clip, or use --metrics dreambench"
        )
    if metrics == "tiny":
        from squeeze_cli.metrics.tiny import ensure_tiny_metric_checkpoint

        encoders = [
            EncoderSpec(
                "dino",
                str(ensure_tiny_metric_checkpoint("dino")),
                resize=36,
                crop=32,
                layer_norm_eps=DINO_LAYER_NORM_EPS,
            ),
            EncoderSpec("clip", str(ensure_tiny_metric_checkpoint("clip"))),
        ]
        if dinov2:
            encoders.append(
                EncoderSpec("dinov2", str(ensure_tiny_metric_checkpoint("dinov2")), resize=36, crop=28)
            )
        notes = {"warning": "tiny RANDOM-weight metric models: checks the plumbing, the numbers mean nothing"}
        return Protocol("tiny", tuple(encoders), clip_t_weight, references, notes)
    if metrics != "dreambench":
        raise UsageError(
            f"unknown --metrics {metrics!r}", "use dreambench (real models) or tiny (no download)"
        )
    clip = clip or "b32"
    encoders = [
        EncoderSpec("dino", DINO_ID, resize=256, crop=224, layer_norm_eps=DINO_LAYER_NORM_EPS),
        EncoderSpec("clip", CLIP_IDS.get(clip, clip)),
    ]
    if dinov2:
        encoders.append(EncoderSpec("dinov2", DINOV2_ID, resize=256, crop=224))
    return Protocol("dreambench", tuple(encoders), clip_t_weight, references)
