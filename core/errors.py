"""Project errors: every user-facing failure is one of these, with a one-line message."""
from __future__ import annotations


class MinorityError(ValueError):
    """Base class: a problem with the user's input that the CLI reports as one line."""


class InvalidImageError(MinorityError):
    """An image file cannot be decoded, is too large, or has an unusable mode."""


class DataError(MinorityError):
    """A data folder or score table is empty, inconsistent or unreadable."""


class CheckpointError(MinorityError):
    """A checkpoint, config or bundle is missing, malformed or does not match the model."""


class OfflineError(MinorityError):
    """Something needs a download (hub id, pretrained weights) and cannot get it."""
