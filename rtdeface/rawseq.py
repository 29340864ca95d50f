"""Raw (unparsed) DICOM sequence bytes: walk, scan and rebuild without pydicom Datasets.

A structure set's ROIContourSequence holds most of its bytes (on the real HNC case: 2,561
contours, 5.6 MB). Parsing it into pydicom Datasets, walking it for de-identification and
encoding it again costs seconds; this module reads the contour geometry straight from the raw
value, lets :mod:`rtdeface.structures` rebuild only the items it changes, and lets
:mod:`rtdeface.deid` check in one pass that a sequence holds nothing it would touch.

Supported encodings: explicit or implicit VR, little or big endian (the value's own encoding,
as pydicom read it), defined or undefined lengths of sequences and items. Items written here
always have defined lengths; items kept are copied byte for byte.

Offsets are into one ``bytes`` buffer (the sequence's value); an element or item is described
by its byte span, so nothing is copied until an item is rebuilt.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from rtdeface.uids import dictionary_vr

ITEM_TAG = 0xFFFEE000
"""(FFFE,E000) Item."""
ITEM_DELIMITER_TAG = 0xFFFEE00D
"""(FFFE,E00D) Item Delimitation Item."""
SEQUENCE_DELIMITER_TAG = 0xFFFEE0DD
"""(FFFE,E0DD) Sequence Delimitation Item."""
UNDEFINED_LENGTH = 0xFFFFFFFF
"""Value length meaning "until the delimiter"."""

LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
"""Explicit-VR VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)."""


class RawSequenceError(ValueError):
    """The raw bytes are not a well-formed sequence value (truncated or inconsistent lengths)."""


@dataclass(frozen=True)
class Codec:
    """The encoding of a raw value: implicit or explicit VR, little or big endian."""

    implicit: bool
    little: bool

    @property
    def prefix(self) -> str:
        """``struct`` byte-order prefix."""
        return "<" if self.little else ">"


@dataclass(frozen=True, slots=True)
class RawElement:
    """One element inside a raw buffer.

    Attributes
    ----------
    tag : int
    vr : str
        Explicit VR, or the dictionary VR for implicit encodings (``UN`` when unknown; ``SQ``
        for an implicit element of undefined length).
    start, end : int
        Span of the whole element (header, value and any sequence delimiter).
    value_start, value_end : int
        Span of the value (for an undefined-length sequence: the items, without delimiter).
    """

    tag: int
    vr: str
    start: int
    end: int
    value_start: int
    value_end: int


@dataclass(frozen=True, slots=True)
class RawItem:
    """One sequence item: its whole span and the span of its content (the elements)."""

    start: int
    end: int
    content_start: int
    content_end: int


def _undefined_end(buf: bytes, pos: int, end: int, codec: Codec) -> tuple[int, int]:
    """End of an undefined-length sequence value starting at ``pos``: (items end, after delim)."""
    while pos < end:
        item = _read_item(buf, pos, end, codec)
        if item is None:  # sequence delimiter
            return pos, pos + 8
        pos = item.end
    raise RawSequenceError("undefined-length sequence without a sequence delimiter")


def _read_item(buf: bytes, pos: int, end: int, codec: Codec) -> RawItem | None:
    """The item at ``pos`` (None at a sequence delimiter)."""
    if pos + 8 > end:
        raise RawSequenceError(f"truncated item header at byte {pos}")
    group, elem, length = struct.unpack_from(codec.prefix + "HHI", buf, pos)
    tag = (group << 16) | elem
    if tag == SEQUENCE_DELIMITER_TAG:
        return None
    if tag != ITEM_TAG:
        raise RawSequenceError(f"expected an item tag at byte {pos}, found {tag:08X}")
    start = pos + 8
    if length != UNDEFINED_LENGTH:
        if start + length > end:
            raise RawSequenceError(f"item at byte {pos} overruns its sequence")
        return RawItem(pos, start + length, start, start + length)
    p = start
    while p < end:
        g, e = struct.unpack_from(codec.prefix + "HH", buf, p)
        if ((g << 16) | e) == ITEM_DELIMITER_TAG:
            return RawItem(pos, p + 8, start, p)
        p = _read_element(buf, p, end, codec).end
    raise RawSequenceError(f"item at byte {pos} has no item delimiter")


def _read_element(buf: bytes, pos: int, end: int, codec: Codec) -> RawElement:
    px = codec.prefix
    if pos + 8 > end:
        raise RawSequenceError(f"truncated element header at byte {pos}")
    if codec.implicit:
        group, elem, length = struct.unpack_from(px + "HHI", buf, pos)
        tag = (group << 16) | elem
        vstart = pos + 8
        vr = "SQ" if length == UNDEFINED_LENGTH else dictionary_vr(tag)
    else:
        group, elem = struct.unpack_from(px + "HH", buf, pos)
        tag = (group << 16) | elem
        vr = buf[pos + 4 : pos + 6].decode("ascii", "replace")
        if vr in LONG_LENGTH_VRS:
            if pos + 12 > end:
                raise RawSequenceError(f"truncated element header at byte {pos}")
            (length,) = struct.unpack_from(px + "I", buf, pos + 8)
            vstart = pos + 12
        else:
            (length,) = struct.unpack_from(px + "H", buf, pos + 6)
            vstart = pos + 8
    if length == UNDEFINED_LENGTH:
        if vr not in ("SQ", "UN"):
            raise RawSequenceError(f"undefined length for {vr} element {tag:08X}")
        vend, after = _undefined_end(buf, vstart, end, codec)
        return RawElement(tag, "SQ", pos, after, vstart, vend)
    if vstart + length > end:
        raise RawSequenceError(f"element {tag:08X} at byte {pos} overruns its container")
    return RawElement(tag, vr, pos, vstart + length, vstart, vstart + length)


def items(buf: bytes, codec: Codec, start: int = 0, end: int | None = None) -> list[RawItem]:
    """The items of a sequence value ``buf[start:end]``.

    Raises
    ------
    RawSequenceError
        The bytes are not a well-formed sequence value.
    """
    end = len(buf) if end is None else end
    out: list[RawItem] = []
    pos = start
    while pos < end:
        item = _read_item(buf, pos, end, codec)
        if item is None:
            break
        out.append(item)
        pos = item.end
    return out


def elements(buf: bytes, codec: Codec, start: int, end: int) -> list[RawElement]:
    """The elements of an item's content ``buf[start:end]``, in stored order."""
    out: list[RawElement] = []
    pos = start
    while pos < end:
        e = _read_element(buf, pos, end, codec)
        out.append(e)
        pos = e.end
    return out


def item_elements(buf: bytes, codec: Codec, item: RawItem) -> list[RawElement]:
    """The elements of one item."""
    return elements(buf, codec, item.content_start, item.content_end)


def item_tags(buf: bytes, codec: Codec, item: RawItem) -> list[tuple[int, str, int, int]]:
    """The elements of one item as ``(tag, vr, value_start, value_end)``; fast for explicit
    VR little endian with defined lengths, :func:`item_elements` otherwise."""
    if codec.implicit or not codec.little:
        return [(e.tag, e.vr, e.value_start, e.value_end) for e in item_elements(buf, codec, item)]
    header = _EXPLICIT_LE_HEADER.unpack_from
    u32 = _LE_UINT32.unpack_from
    out: list[tuple[int, str, int, int]] = []
    p, end = item.content_start, item.content_end
    while p < end:
        if p + 8 > end:
            raise RawSequenceError(f"truncated element header at byte {p}")
        group, elem, vr_bytes, short_length = header(buf, p)
        if vr_bytes in _LONG_LENGTH_VR_BYTES:
            if p + 12 > end:
                raise RawSequenceError(f"truncated element header at byte {p}")
            vlen = u32(buf, p + 8)[0]
            vstart = p + 12
        else:
            vlen, vstart = short_length, p + 8
        if vlen == UNDEFINED_LENGTH:
            e = _read_element(buf, p, end, codec)
            out.append((e.tag, e.vr, e.value_start, e.value_end))
            p = e.end
            continue
        vend = vstart + vlen
        if vend > end:
            raise RawSequenceError(f"element at byte {p} overruns its item")
        out.append(((group << 16) | elem, vr_bytes.decode("ascii", "replace"), vstart, vend))
        p = vend
    return out


def text(buf: bytes, e: RawElement) -> str:
    """The value of a string element, stripped of padding."""
    return buf[e.value_start : e.value_end].decode("ascii", "replace").strip(" \x00")


_EXPLICIT_LE_HEADER = struct.Struct("<HH2sH")
_LE_UINT32 = struct.Struct("<I")
_LONG_LENGTH_VR_BYTES = frozenset(v.encode("ascii") for v in LONG_LENGTH_VRS)


# --------------------------------------------------------------------------------- encoding


def pad(value: bytes, vr: str) -> bytes:
    """Pad a value to even length (NUL for UI, space for text VRs)."""
    if len(value) % 2:
        return value + (b"\x00" if vr in ("UI", "OB", "UN") else b" ")
    return value


def encode_element(tag: int, vr: str, value: bytes, codec: Codec) -> bytes:
    """One element with a defined length (``value`` already padded to even length).

    In explicit VR, a value too long for its VR's 2-byte length field (e.g. the ContourData of
    a contour with more than about 4,000 points) is written as UN with a 4-byte length, as
    pydicom does (PS3.5 6.2.2); readers take its VR from the data dictionary.
    """
    px = codec.prefix
    if codec.implicit:
        return struct.pack(px + "HHI", tag >> 16, tag & 0xFFFF, len(value)) + value
    if vr not in LONG_LENGTH_VRS and len(value) > 0xFFFF:
        vr = "UN"  # too long for a 2-byte length, as pydicom (PS3.5 6.2.2)
    header = struct.pack(px + "HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in LONG_LENGTH_VRS:
        return header + struct.pack(px + "HI", 0, len(value)) + value
    return header + struct.pack(px + "H", len(value)) + value


def encode_item(content: bytes, codec: Codec) -> bytes:
    """An item of defined length around ``content`` (encoded elements, in tag order)."""
    return struct.pack(codec.prefix + "HHI", 0xFFFE, 0xE000, len(content)) + content


def rebuild_item(
    buf: bytes,
    codec: Codec,
    item: RawItem,
    replace: dict[int, bytes | None],
) -> bytes:
    """An item with some elements replaced (encoded bytes) or removed (None), others verbatim.

    Elements of ``replace`` that the item lacks are added; the result is in tag order.
    """
    parts: dict[int, bytes] = {}
    for e in item_elements(buf, codec, item):
        parts[e.tag] = buf[e.start : e.end]
    for tag, value in replace.items():
        if value is None:
            parts.pop(tag, None)
        else:
            parts[tag] = value
    return encode_item(b"".join(parts[t] for t in sorted(parts)), codec)


def raw_sequence_element(tag: int, value: bytes, codec: Codec) -> RawDataElement:
    """A pydicom raw element holding a sequence value of defined length."""
    return RawDataElement(
        Tag(tag), "SQ", len(value), value, 0, codec.implicit, codec.little, True, False
    )


__all__ = [
    "ITEM_TAG",
    "LONG_LENGTH_VRS",
    "Codec",
    "RawElement",
    "RawItem",
    "RawSequenceError",
    "elements",
    "encode_element",
    "encode_item",
    "item_elements",
    "item_tags",
    "items",
    "pad",
    "raw_sequence_element",
    "rebuild_item",
    "text",
]
