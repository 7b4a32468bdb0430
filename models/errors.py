"""Exceptions raised by the detector package.

Everything the detector refuses to analyse raises a subclass of `DetectorError`, so callers (the worker, the
CLI) can catch one type and store its message as the readable failure reason.
"""

from __future__ import annotations


class DetectorError(Exception):
    """Base class of every error the detector raises on purpose."""


class ImageTooSmallError(DetectorError):
    """The image is smaller than the smallest crop the detector can analyse without resizing."""

    def __init__(self, width: int, height: int, min_side: int) -> None:
        self.width = width
        self.height = height
        self.min_side = min_side
        super().__init__(
            f"image is {width}x{height} px; the detector needs at least {min_side} px on each side "
            "(images are never resized, because resizing erases the traces it looks for)"
        )


class FlatImageError(DetectorError):
    """Every region the detector reads is a single colour: there is no texture to analyse."""

    def __init__(self) -> None:
        super().__init__(
            "the image is flat: every region read is one colour (within one grey level), so it holds no "
            "texture to analyse"
        )


class UnsupportedImageError(DetectorError):
    """The image's mode or contents cannot be turned into RGB pixels."""
