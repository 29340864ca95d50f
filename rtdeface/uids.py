"""Keyed, value-based UID mapping applied at every nesting depth.

A :class:`UidMapper` turns an original UID into a new one with HMAC-SHA256 under a key, so
the same original always gives the same new UID for a given key (across runs and machines)
and every reference to it, wherever it sits, can be rewritten by value. Registered DICOM UIDs
(``1.2.840.10008.*``: SOP classes, transfer syntaxes, coding schemes) are never mapped.

The core defacing step maps the UIDs of the objects it changes; de-identification extends the
same mechanism to every other UID of the case.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

REGISTERED_UID_ROOT = "1.2.840.10008."
"""Root of UIDs defined by the DICOM standard; these are never remapped."""

DEFAULT_UID_ROOT = "2.25."
"""Root for generated UIDs: 2.25 followed by a 128-bit decimal integer (ISO/IEC 9834-8)."""

MAX_UID_LENGTH = 64
"""Longest UID the DICOM standard allows (PS3.5 9.1)."""

MIN_SAME_LENGTH_DIGITS = 20
"""Fewest keyed digits a same-length UID may have (shorter originals are mapped with
:meth:`UidMapper.map`, whose length differs): 10**20 values make collisions negligible."""


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

    def map_same_length(self, uid: str) -> str:
        """Like :meth:`map` but the result has exactly the length of ``uid`` when possible.

        Used when rewriting UIDs inside raw (unparsed) element bytes, where a value may only be
        replaced by one of the same length. The result is the root, the keyed 128-bit integer
        (truncated when the UID is short) and, for long UIDs, one more arc of keyed digits
        (an arc under the UUID-derived OID, so ``2.25`` stays valid). UIDs leaving fewer than
        :data:`MIN_SAME_LENGTH_DIGITS` digits fall back to :meth:`map` (different length).
        """
        uid = str(uid).strip().rstrip("\x00")
        if uid.startswith(REGISTERED_UID_ROOT) or not uid:
            return uid
        room = len(uid) - len(self.root)
        if room < MIN_SAME_LENGTH_DIGITS or len(uid) > MAX_UID_LENGTH:
            return self.map(uid)
        digest = hmac.new(self.key, uid.encode("ascii", "replace"), hashlib.sha256).digest()
        number = str(int.from_bytes(digest[:16], "big"))  # < 2**128, no leading zero
        if len(number) >= room:
            return self.root + number[:room]
        extra_room = room - len(number) - 1  # one dot before the extra arc
        if extra_room == 0:  # no room for '.d': give one digit of the number to the extra arc
            number, extra_room = number[:-1], 1
        extra = str(int.from_bytes(digest[16:], "big"))  # no leading zero
        return f"{self.root}{number}.{extra[:extra_room]}"


def element_vr(ds: Dataset, tag: int) -> str:
    """VR of an element without converting its value (raw elements stay raw).

    Implicit-VR raw elements carry no VR; the data dictionary supplies it (``UN`` when the tag
    is unknown, e.g. private).
    """
    vr = ds.get_item(tag, keep_deferred=True).VR  # a deferred value is not read
    return str(vr) if vr else dictionary_vr(int(tag))


@functools.lru_cache(maxsize=8192)
def dictionary_vr(tag: int) -> str:
    """The data dictionary's VR of ``tag`` (``UN`` when unknown), cached."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return "UN"


@functools.lru_cache(maxsize=8192)
def tag_keyword(tag: int) -> str:
    """The data dictionary's keyword of ``tag`` (``""`` when unknown), cached (pass an int:
    pydicom's tag type compares in Python)."""
    return keyword_for_tag(tag)


RAW_UID_PATTERN = re.compile(rb"(?<![0-9.])[0-9]+(?:\.[0-9]+){2,}(?![0-9.])")
"""A whole UID-like value in raw bytes: digit groups with at least two dots, not preceded or
followed by a digit or a dot (so decimal numbers such as contour coordinates never match, and
a UID that is a prefix of another never matches inside it)."""


@dataclass(frozen=True)
class SameLengthTable:
    """Original UID -> same-length new UID, as bytes, with a matcher for raw element bytes.

    Build it once per case with :meth:`build`; it is applied to every object of the case.

    Attributes
    ----------
    table : dict of bytes to bytes
        Only UIDs whose same-length mapping exists.
    fallback : frozenset of str
        UIDs that cannot be mapped with the same length (rewritten parsed, with
        :meth:`UidMapper.map`).
    pattern : re.Pattern
        Maximal runs of UID characters with a length of some key.
    """

    table: dict[bytes, bytes]
    fallback: frozenset[str]
    pattern: re.Pattern[bytes]
    by_str: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, mapper: UidMapper, uids: Collection[str]) -> SameLengthTable:
        """Map every UID of ``uids`` once."""
        table: dict[bytes, bytes] = {}
        fallback: set[str] = set()
        for u in uids:
            new = mapper.map_same_length(u)
            if u and len(new) == len(u):
                table[u.encode("ascii")] = new.encode("ascii")
            elif u:
                fallback.add(u)
        seen: dict[bytes, bytes] = {}
        for old_uid, new_uid in list(table.items()):  # never map two UIDs to one
            if new_uid in seen:
                fallback.update((old_uid.decode(), seen[new_uid].decode()))
            seen[new_uid] = old_uid
        for u in fallback:
            table.pop(u.encode("ascii"), None)
        by_str = {k.decode(): v.decode() for k, v in table.items()}
        return cls(table, frozenset(fallback), RAW_UID_PATTERN, by_str)

    def map(self, mapper: UidMapper, uid: str) -> str:
        """The new value of ``uid`` under this table (unchanged when it is not mapped)."""
        u = str(uid).strip().rstrip("\x00")
        new = self.by_str.get(u)
        if new is not None:
            return new
        return mapper.map(u) if u in self.fallback else str(uid)

    def sub(self, value: bytes) -> bytes:
        """Replace whole UID values found in raw bytes by their same-length mapping.

        Only maximal runs of ``[0-9.]`` equal to a key are replaced, so a UID that is a prefix
        of another is never touched; lengths are unchanged, so the encoding stays valid.
        """
        table = self.table
        return self.pattern.sub(lambda m: table.get(m.group(), m.group()), value)


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


def remap_uids_raw(
    ds: Dataset,
    mapper: UidMapper,
    table: SameLengthTable,
    splice: Callable[[RawDataElement], bytes | None] | None = None,
) -> int:
    """Rewrite, in place, the UIDs of ``table`` wherever they occur in ``ds``, parsing little.

    Raw (still unparsed) elements and sequences are rewritten at the byte level with
    same-length UIDs, so large structure sets are never decoded and re-encoded; parsed
    elements are rewritten as values. UIDs without a same-length mapping are rewritten with
    :func:`remap_uids` (which parses what it walks).

    ``splice(elem)``, when given, may rewrite a raw sequence itself (e.g. from known positions
    of its UI values) and return the new bytes; when it returns None the bytes are searched.

    Returns
    -------
    int
        Number of elements rewritten.
    """
    changed = 0
    if table.fallback:
        changed += remap_uids(ds, mapper, table.fallback.__contains__)
    same = table.by_str
    datasets = [ds]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        datasets.append(meta)
    while datasets:
        current = datasets.pop()
        for tag in list(current.keys()):
            elem = current.get_item(tag, keep_deferred=True)  # deferred pixel data: not read
            if isinstance(elem, RawDataElement):
                # only UIDs and sequences can hold UIDs (never pixel data or other binary VRs)
                vr = element_vr(current, tag)
                if isinstance(elem.value, bytes) and elem.value and vr in ("UI", "SQ"):
                    spliced = splice(elem) if splice is not None and vr == "SQ" else None
                    new = spliced if spliced is not None else table.sub(elem.value)
                    if new != elem.value:
                        current[tag] = elem._replace(value=new)
                        changed += 1
                continue
            if elem.VR == "SQ":
                datasets.extend(elem.value or [])
            elif elem.VR == "UI" and elem.value:
                values = [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])]
                new_values = [same.get(v.strip().rstrip("\x00"), v) for v in values]
                if new_values != values:
                    elem.value = new_values if elem.VM > 1 else new_values[0]
                    changed += 1
    return changed


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
    "SameLengthTable",
    "UidMapper",
    "iter_uid_elements",
    "remap_uids",
    "remap_uids_raw",
]
