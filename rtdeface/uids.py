"""Keyed, value-based UID mapping applied at every nesting depth.

A :class:`UidMapper` turns an original UID into a new one with HMAC-SHA256 under a key, so
the same original always gives the same new UID for a given key (across runs and machines)
and every reference to it, wherever it sits, can be rewritten by value. Registered DICOM UIDs
(``1.2.840.10008.*``: SOP classes, transfer syntaxes, coding schemes) are never mapped.

The core defacing step maps the UIDs of the objects it changes; de-identification extends the
same mechanism to every other UID of the case.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

REGISTERED_UID_ROOT = "1.2.840.10008."
"""Root of UIDs defined by the DICOM standard; these are never remapped."""

DEFAULT_UID_ROOT = "2.25."
"""Root for generated UIDs: 2.25 followed by a 128-bit decimal integer (ISO/IEC 9834-8)."""

MAX_UID_LENGTH = 64
"""Longest UID the DICOM standard allows (PS3.5 9.1)."""


@dataclass(frozen=True)
class UidMapper:
    """Deterministic keyed mapping of UID values.

    Attributes
    ----------
    key : bytes
        HMAC key; the same key maps the same UID to the same output everywhere.
    root : str
        Prefix of generated UIDs, ending with a dot. With the default ``2.25.`` the remainder is
        a 128-bit integer; with another root the integer is truncated to fit 64 characters.
    """

    key: bytes
    root: str = DEFAULT_UID_ROOT

    def __post_init__(self) -> None:
        if not self.root.endswith(".") or len(self.root) > MAX_UID_LENGTH - 10:
            raise ValueError(f"UID root {self.root!r} must end with '.' and leave room for digits")
        if not all(part.isdigit() for part in self.root[:-1].split(".")):
            raise ValueError(f"UID root {self.root!r} must be dotted decimal numbers")

    def map(self, uid: str) -> str:
        """Return the new UID for ``uid`` (registered DICOM UIDs are returned unchanged)."""
        uid = str(uid).strip().rstrip("\x00")
        if uid.startswith(REGISTERED_UID_ROOT) or not uid:
            return uid
        digest = hmac.new(self.key, uid.encode("ascii", "replace"), hashlib.sha256).digest()
        number = str(int.from_bytes(digest[:16], "big"))
        room = MAX_UID_LENGTH - len(self.root)
        return self.root + number[:room]


def element_vr(ds: Dataset, tag: int) -> str:
    """VR of an element without converting its value (raw elements stay raw).

    Implicit-VR raw elements carry no VR; the data dictionary supplies it (``UN`` when the tag
    is unknown, e.g. private).
    """
    vr = ds.get_item(tag).VR
    if vr:
        return str(vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


def iter_uid_elements(ds: Dataset) -> Iterable[tuple[Dataset, int]]:
    """Yield ``(dataset, tag)`` of every UI element at every nesting depth (file meta included).

    The file meta group is visited first when present. Elements of other VRs are not converted
    (walking a large structure set stays cheap).
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for tag in list(meta.keys()):
            if element_vr(meta, tag) == "UI":
                yield meta, int(tag)
    stack: list[Dataset] = [ds]
    while stack:
        current = stack.pop()
        for tag in list(current.keys()):
            vr = element_vr(current, tag)
            if vr == "UI":
                yield current, int(tag)
            elif vr == "SQ":
                value = current[tag].value
                if value is not None:
                    stack.extend(value)


def remap_uids(ds: Dataset, mapper: UidMapper, select: Callable[[str], bool]) -> int:
    """Rewrite, in place, every UID value of ``ds`` for which ``select(uid)`` is true.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Dataset to rewrite (its file meta and every nested sequence item included).
    mapper : UidMapper
        The keyed mapping.
    select : callable
        Decides which original UID values are mapped (e.g. membership in a set).

    Returns
    -------
    int
        Number of values rewritten.
    """
    changed = 0
    for owner, tag in list(iter_uid_elements(ds)):
        elem = owner[tag]
        value = elem.value
        if value is None or value == "":
            continue
        if isinstance(value, str):
            if select(value):
                new = mapper.map(value)
                if new != value:
                    elem.value = new
                    changed += 1
        else:  # multi-valued UI
            values = [str(v) for v in value]
            new_values = [mapper.map(v) if select(v) else v for v in values]
            if new_values != values:
                elem.value = new_values
                changed += sum(a != b for a, b in zip(values, new_values))
    return changed


__all__ = [
    "DEFAULT_UID_ROOT",
    "MAX_UID_LENGTH",
    "REGISTERED_UID_ROOT",
    "UidMapper",
    "iter_uid_elements",
    "remap_uids",
]
