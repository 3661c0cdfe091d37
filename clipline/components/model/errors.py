"""The model package's errors. Both are ``ValueError``s whose message names the model or file at
fault and says what to do; a caller that handles bad models catches :class:`ModelError`."""

from __future__ import annotations


class ModelError(ValueError):
    """A model name or checkpoint that cannot be used."""


class CheckpointError(ModelError):
    """A checkpoint that is missing, incomplete, malformed or does not fit its model (see
    :mod:`clipline.components.model.checkpoint`)."""
