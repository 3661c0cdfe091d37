"""clipline: web image-text pairs to CLIP models, orchestrated, incremental and tracked."""

__version__ = "0.1.0"
