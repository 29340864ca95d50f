"""One exception tree for everything rtdeface refuses to do.

Every message names the object (file, series, ROI), the offending value and the remedy,
on one line, so the CLI can print it as it is.
"""

from __future__ import annotations


class RtDefaceError(Exception):
    """Root of every error rtdeface raises on purpose."""


class InputError(RtDefaceError):
    """A file or directory cannot be used: unreadable, missing, ambiguous or inconsistent."""


class GeometryError(RtDefaceError):
    """Image geometry rtdeface does not support or that is internally inconsistent."""


class LandmarkError(RtDefaceError):
    """The eyes (the landmarks of the removal region) cannot be found or are implausible."""


class DicomReferenceError(RtDefaceError):
    """A DICOM cross-reference does not resolve (frame of reference, series, SOP instance)."""


class OutputError(RtDefaceError):
    """The output location cannot be written safely."""


class UsageError(RtDefaceError):
    """Options that contradict each other or name nothing (exit code 2 on the CLI)."""


__all__ = [
    "DicomReferenceError",
    "GeometryError",
    "InputError",
    "LandmarkError",
    "OutputError",
    "RtDefaceError",
    "UsageError",
]
