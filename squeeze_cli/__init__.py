"""squeeze: many images of one specific subject, from a YAML manifest."""

import logging

__version__ = "0.1.0"


def _without_torchvision_fallback_note(record: logging.LogRecord) -> bool:
    """Drop transformers' note that CLIP's and SigLIP's image processors fall back to their PIL versions
    without torchvision: diffusers' FLUX pipelines import both names, squeeze's preprocessing is PIL's on
    purpose, and the two lines otherwise open every `gen` and `train` on a machine without torchvision."""
    return "requires torchvision (not installed); falling back" not in record.getMessage()


# Here, not where a pipeline is imported: `gen`, `train` and `eval` reach diffusers by different paths.
logging.getLogger("transformers.utils.import_utils").addFilter(_without_torchvision_fallback_note)
