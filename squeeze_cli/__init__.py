"""squeeze: many images of one specific subject, from a YAML manifest."""

__version__ = "0.1.0"
