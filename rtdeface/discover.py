"""Index DICOM files by content (never by file name) and assemble cases.

A *case* is one CT series with the RTSTRUCT that references it and the RTPLANs and RTDOSEs
that belong to it (by reference, else by frame of reference). Anything ambiguous is an error
that says what was found; nothing is guessed silently.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.context
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator

from rtdeface.errors import InputError
from rtdeface.uids import dictionary_vr

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RTDOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RTPLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
ION_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.8"

ROLE_BY_SOP_CLASS = {
    CT_IMAGE_STORAGE: "CT",
    RTSTRUCT_STORAGE: "RTSTRUCT",
    RTDOSE_STORAGE: "RTDOSE",
    RTPLAN_STORAGE: "RTPLAN",
    ION_PLAN_STORAGE: "RTPLAN",
}
"""Roles rtdeface handles, by SOPClassUID."""


@dataclass(frozen=True)
class FileRecord:
    """What one DICOM file is, from its header.

    Attributes
    ----------
    path : Path
        The file.
    role : str
        ``CT``, ``RTSTRUCT``, ``RTDOSE``, ``RTPLAN`` or ``OTHER``.
    sop_class_uid, sop_instance_uid, modality, study_instance_uid, series_instance_uid : str
        Header values ("" when absent).
    frame_of_reference_uid : str
        The object's frame of reference (for an RTSTRUCT, the one its ROIs are defined in).
    referenced_series_uids : tuple of str
        Series an RTSTRUCT references (RTReferencedSeriesSequence).
    referenced_sop_uids : tuple of str
        Structure sets / plans this object references (ReferencedStructureSetSequence,
        ReferencedRTPlanSequence).
    patient_id, patient_name : str
        PatientID and PatientName (identifiers: used for pseudonyms and to scrub messages,
        never written to shareable outputs).
    """

    path: Path
    role: str
    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    referenced_series_uids: tuple[str, ...] = ()
    referenced_sop_uids: tuple[str, ...] = ()
    patient_id: str = ""
    patient_name: str = ""


def peek(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """``ds.get(keyword, default)`` without converting the stored element.

    pydicom replaces a raw element by its parsed form on first access; parsed elements are
    slower to de-identify and to write. Reading headers through this keeps the dataset raw.
    """
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return default
    return peek_element(ds, tag).value


def peek_element(ds: Dataset, tag: int) -> DataElement:
    """``ds[tag]`` (present) without storing the parsed element in place of a raw one."""
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return convert_raw_data_element(elem, encoding=ds._character_set, ds=ds)
    return elem


ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
"""VRs whose values are plain ASCII (no character set applies): read from their bytes."""


_PRINTABLE = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")
"""Printable ASCII without backslash: a single value whose text needs no conversion."""


def _raw_ascii(ds: Dataset, tag: int) -> tuple[bytes, str] | None:
    """(value bytes, VR) of a raw element of an ASCII VR; None when it must be converted."""
    elem = ds.get_item(tag)
    if not isinstance(elem, RawDataElement) or not isinstance(elem.value, bytes):
        return None
    vr = elem.VR or dictionary_vr(tag)
    return (elem.value, vr) if vr in ASCII_VRS else None


def peek_str(ds: Dataset, keyword: str) -> str:
    """``str(peek(ds, keyword)).strip()`` ("" when absent or empty); a single value of an
    ASCII VR in printable ASCII is read straight from its bytes (the same text, without
    building pydicom values), anything else is converted by pydicom."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return ""
    raw = _raw_ascii(ds, tag)
    if raw is not None:
        value, vr = raw
        if vr == "UI":
            value = value.rstrip(b"\x00 ")  # as pydicom's UI conversion
        if _PRINTABLE.fullmatch(value):
            return value.decode("ascii").strip()
    converted = peek(ds, keyword, "")
    return "" if converted is None else str(converted).strip()


def peek_floats(ds: Dataset, keyword: str) -> list[float] | None:
    """A multi-valued DS/IS element as floats straight from its bytes (None when it is
    absent, empty, not raw or not numeric: convert it with :func:`peek` instead)."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    raw = _raw_ascii(ds, tag)
    value = raw[0].strip(b" \x00") if raw is not None else b""
    if not value:
        return None
    try:
        return [float(v) for v in value.split(b"\\")]
    except ValueError:
        return None


def peek_uint(ds: Dataset, keyword: str) -> int | None:
    """A single US or UL value straight from its little-endian bytes (None when absent or
    empty); anything else (other VRs, several values, big endian, parsed) is converted by
    pydicom."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes) and elem.is_little_endian:
        vr = elem.VR or dictionary_vr(tag)
        if (vr, len(elem.value)) in (("US", 2), ("UL", 4)):
            return int.from_bytes(elem.value, "little")
    value = peek(ds, keyword)
    return None if value is None else int(value)


def classify(ds: Dataset, path: Path) -> FileRecord:
    """Describe a dataset (a header read is enough) as a :class:`FileRecord`."""
    sop_class = peek_str(ds, "SOPClassUID")
    if not sop_class and "file_meta" in ds.__dict__ and ds.file_meta is not None:
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    role = ROLE_BY_SOP_CLASS.get(sop_class, "OTHER")
    for_uid = peek_str(ds, "FrameOfReferenceUID")
    ref_series: list[str] = []
    if role == "RTSTRUCT":
        for fr in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
            for_uid = for_uid or peek_str(fr, "FrameOfReferenceUID")
            for st in fr.get("RTReferencedStudySequence", []) or []:
                for se in st.get("RTReferencedSeriesSequence", []) or []:
                    ref_series.append(peek_str(se, "SeriesInstanceUID"))
    ref_sops: list[str] = []
    for keyword in ("ReferencedStructureSetSequence", "ReferencedRTPlanSequence"):
        for item in ds.get(keyword, []) or []:
            ref_sops.append(peek_str(item, "ReferencedSOPInstanceUID"))
    return FileRecord(
        path=path,
        role=role,
        sop_class_uid=sop_class,
        sop_instance_uid=peek_str(ds, "SOPInstanceUID"),
        modality=peek_str(ds, "Modality"),
        study_instance_uid=peek_str(ds, "StudyInstanceUID"),
        series_instance_uid=peek_str(ds, "SeriesInstanceUID"),
        frame_of_reference_uid=for_uid,
        referenced_series_uids=tuple(u for u in ref_series if u),
        referenced_sop_uids=tuple(u for u in ref_sops if u),
        patient_id=peek_str(ds, "PatientID"),
        patient_name=peek_str(ds, "PatientName"),
    )


def iter_files(root: Path) -> list[Path]:
    """Every regular file below ``root`` (or ``root`` itself), sorted, hidden files skipped."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"{root}: no such file or directory; give the folder of one case")
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def read_dicom(path: Path, *, header_only: bool, defer_pixels: bool = False) -> Dataset | None:
    """Read one file; None when it is not DICOM at all (a text file, a DICOMDIR).

    With ``defer_pixels`` (and not ``header_only``), uncompressed pixel data that end the
    file are not read: the PixelData element is kept as pydicom's deferred element (value
    None, see :func:`deferred_pixel_data`), read on use with :func:`read_deferred` or through
    pydicom, and written by :func:`rtdeface.write.write_dicom` straight from the file. The
    other elements are those of a full read.

    Raises
    ------
    InputError
        The file claims to be DICOM (preamble ``DICM``) but cannot be parsed.
    """
    remedy = "re-export it or remove it from the input"
    try:
        if defer_pixels and not header_only:
            ds = _read_deferring_pixels(path)
        else:
            ds = pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types on truncated/corrupt input
        detail = " ".join(str(exc).split())  # one line, whatever pydicom says
        raise InputError(
            f"{path}: unreadable DICOM file ({type(exc).__name__}: {detail}); {remedy}"
        ) from exc
    truncated = _truncated_element(ds)
    if truncated:
        raise InputError(f"{path}: unreadable DICOM file (truncated: {truncated}); {remedy}")
    if "DirectoryRecordSequence" in ds:  # DICOMDIR: an index, not an object
        return None
    if not peek_str(ds, "SOPClassUID") and not peek_str(ds, "SOPInstanceUID"):
        meta = ds.__dict__.get("file_meta")
        if meta is None or "TransferSyntaxUID" not in meta:
            # pydicom parses anything after a DICM prefix; without file meta it is garbage
            raise InputError(
                f"{path}: unreadable DICOM file (DICM prefix but no file meta information "
                f"and no SOP instance); {remedy}"
            )
        return None
    return ds


UNDEFINED_LENGTH = 0xFFFFFFFF
"""Value length of DICOM elements with undefined length (delimited sequences, encapsulated)."""

PIXEL_DATA_TAG = 0x7FE00010

DEFER_PIXELS_MIN_BYTES = 16384
"""Pixel data shorter than this are read with the header (deferring them saves nothing)."""


DEFERRED_PIXELS_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2"})
"""SOP classes whose pixel data :func:`read_dicom` may defer: CT Image Storage (the slices
that are written unchanged; every other object is read whole)."""


def _read_deferring_pixels(path: Path) -> Dataset:
    """``pydicom.dcmread(path)``, with the PixelData element of a CT slice deferred when it
    holds defined-length (uncompressed) data of at least :data:`DEFER_PIXELS_MIN_BYTES` and
    ends the file; any other file (another SOP class, encapsulated or small pixel data,
    elements after the pixel data, a deflated transfer syntax, a short file) is read whole."""
    with open(path, "rb") as fp:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
        meta = ds.__dict__.get("file_meta")
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        start, size = fp.tell(), os.fstat(fp.fileno()).st_size
        implicit, little = ds.original_encoding
        if start < size and _deferrable(ds, ts, implicit, little):
            elements = data_element_generator(
                fp, bool(implicit), bool(little), defer_size=DEFER_PIXELS_MIN_BYTES - 1
            )
            elem = next(elements, None)
            if (
                isinstance(elem, RawDataElement)
                and elem.tag == PIXEL_DATA_TAG
                and elem.value is None
                and elem.length != UNDEFINED_LENGTH
                and elem.length % 2 == 0
                and (implicit or elem.VR in ("OB", "OW"))
                and fp.tell() == size == elem.value_tell + elem.length
            ):
                ds[elem.tag] = elem
                ds.__dict__[SOURCE_STAMP] = file_stamp(os.fstat(fp.fileno()))
                return ds
        if start >= size:
            return ds  # no pixel data: the header is the whole file
        fp.seek(0)
        return pydicom.dcmread(fp)


def native_pixel_format(ds: Dataset) -> tuple[int, bool] | None:
    """(BitsAllocated, signed) of pixel data that are stored as they are read: an
    uncompressed little-endian syntax, 8, 16 or 32 bits allocated, one sample and no sign
    extension (signed values use every allocated bit); None for anything else."""
    meta = ds.__dict__.get("file_meta")
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None or ts.is_compressed or not ts.is_little_endian:
        return None
    bits = peek_uint(ds, "BitsAllocated")
    signed = peek_uint(ds, "PixelRepresentation") == 1
    if (
        bits not in (8, 16, 32)
        or peek_uint(ds, "SamplesPerPixel") not in (None, 1)
        or (signed and peek_uint(ds, "BitsStored") not in (None, bits))
    ):
        return None
    return int(bits), signed


def _deferrable(ds: Dataset, ts: Any, implicit: bool | None, little: bool | None) -> bool:
    """Whether the pixel data of ``ds`` (a header read) may be deferred: a CT slice encoded
    in its (not deflated) transfer syntax whose pixel data :func:`native_pixel_format`
    describes. These are the slices that :func:`rtdeface.load.native_pixels` reads and
    :func:`rtdeface.write.write_dicom` copies themselves; every other file is read whole."""
    return (
        peek_str(ds, "SOPClassUID") in DEFERRED_PIXELS_SOP_CLASSES
        and ts is not None
        and ts.is_transfer_syntax
        and not ts.is_deflated
        and (implicit, little) == (ts.is_implicit_VR, True)
        and native_pixel_format(ds) is not None
    )


SOURCE_STAMP = "rtdeface_source_stamp"
"""Attribute of a dataset with deferred values: :func:`file_stamp` of its file when read."""

FileStamp = tuple[int, int, int, int, int]
"""(device, inode, size, modification time ns, status change time ns) of a file."""


def file_stamp(stat: os.stat_result) -> FileStamp:
    """What :func:`check_unchanged` compares: identity, size and times of a file."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def deferred_pixel_data(ds: Dataset) -> RawDataElement | None:
    """The PixelData element of ``ds`` when its value was deferred (see :func:`read_dicom`)."""
    elem = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True) if PIXEL_DATA_TAG in ds else None
    if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
        return elem
    return None


def deferred_source(ds: Dataset) -> tuple[Path, FileStamp | None]:
    """(file, :func:`file_stamp` when read) that the deferred values of ``ds`` come from.

    Raises
    ------
    InputError
        ``ds`` was not read from a file.
    """
    filename = ds.__dict__.get("filename")
    if not filename:
        raise InputError("a deferred pixel data element has no source file; read it again")
    return Path(filename), ds.__dict__.get(SOURCE_STAMP)


def read_deferred(
    path: Path, elem: RawDataElement, stamp: FileStamp | None, *, writable: bool = False
) -> bytes | bytearray:
    """The value of a deferred element, read from ``path`` (checked unchanged since); a new
    ``bytearray`` with ``writable``.

    Raises
    ------
    InputError
        The file changed since it was read (see :func:`check_unchanged`), or cannot be read.
    """
    try:
        with open(path, "rb") as fh:
            check_unchanged(path, os.fstat(fh.fileno()), elem, stamp)
            fh.seek(elem.value_tell)
            if writable:
                value: bytes | bytearray = bytearray(elem.length)
                n = fh.readinto(value)
            else:
                value = fh.read(elem.length)
                n = len(value)
    except OSError as exc:
        raise InputError(f"{path}: cannot read its pixel data ({exc.strerror}); rerun") from exc
    if n != elem.length:
        raise InputError(f"{path}: the file changed while rtdeface was reading it; rerun")
    return value


def check_unchanged(
    path: Path, stat: os.stat_result, elem: RawDataElement, stamp: FileStamp | None
) -> None:
    """Raise an InputError when a file no longer matches its deferred element ``elem`` (it
    ended the file) and its :func:`file_stamp` ``stamp`` (same device, inode, size,
    modification and status change times: a rewrite, a replacement or a copy over it that keeps
    the modification time all count as changes)."""
    if stat.st_size != elem.value_tell + elem.length or (
        stamp is not None and file_stamp(stat) != tuple(stamp)
    ):
        raise InputError(
            f"{path}: the file changed while rtdeface was reading it; rerun when no other "
            "program writes to the input"
        )


def _truncated_element(ds: Dataset) -> str:
    """Describe the first top-level element whose value is shorter than its declared length.

    pydicom does not complain when a file ends inside an element of defined length (it keeps
    the short value), so a truncated file would otherwise fail much later, e.g. when its pixel
    data are decoded. Returns "" when every unparsed element is complete. Only the last
    element read can be short (the file ended there), so only it is looked at.
    """
    keys = list(ds.keys())
    for tag in keys[-1:]:
        elem = ds.get_item(tag, keep_deferred=True)  # a deferred value was checked on reading
        if (
            isinstance(elem, RawDataElement)
            and elem.length != UNDEFINED_LENGTH
            and elem.value is not None
            and len(elem.value) < elem.length
        ):
            return (
                f"element {elem.tag} declares {elem.length} bytes, the file holds {len(elem.value)}"
            )
    return ""


def index_directory(root: Path) -> list[FileRecord]:
    """Header-only index of every DICOM object below ``root`` (non-DICOM files are skipped)."""
    records = []
    for path in iter_files(root):
        ds = read_dicom(path, header_only=True)
        if ds is None:
            log.debug("skipping non-DICOM file %s", path)
            continue
        records.append(classify(ds, path))
    return records


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case, by role.

    Attributes
    ----------
    ct : tuple of FileRecord
        The slices of one CT series (unsorted).
    rtstruct : FileRecord
        The structure set that references the CT series.
    doses, plans : tuple of FileRecord
        RTDOSE and RTPLAN objects of the case.
    ignored : tuple of FileRecord
        Other objects found beside the case (not written).
    """

    ct: tuple[FileRecord, ...]
    rtstruct: FileRecord | None
    doses: tuple[FileRecord, ...]
    plans: tuple[FileRecord, ...]
    ignored: tuple[FileRecord, ...] = ()


def assemble_single_case(records: Sequence[FileRecord], where: Path) -> CaseFiles:
    """Assemble exactly one case from the records of one case folder.

    Raises
    ------
    InputError
        No CT, several CT series, several structure sets referencing the CT, or no structure
        set; the message lists what was found.
    """
    ct_series: dict[str, list[FileRecord]] = {}
    for r in records:
        if r.role == "CT":
            ct_series.setdefault(r.series_instance_uid, []).append(r)
    if not ct_series:
        found = sorted({f"{r.modality or '?'}" for r in records}) or ["no DICOM files"]
        raise InputError(
            f"{where}: no CT image series found (found: {', '.join(found)}); "
            "point rtdeface at a folder holding the planning CT and its RT objects"
        )
    if len(ct_series) > 1:
        desc = "; ".join(f"{uid} ({len(v)} slices)" for uid, v in sorted(ct_series.items()))
        raise InputError(
            f"{where}: {len(ct_series)} CT series found ({desc}); "
            "put one case per folder (batch mode over a tree handles several)"
        )
    series_uid, ct = next(iter(ct_series.items()))
    for_uid = ct[0].frame_of_reference_uid
    structs = [r for r in records if r.role == "RTSTRUCT"]
    referencing = [s for s in structs if series_uid in s.referenced_series_uids]
    if not referencing:
        referencing = [
            s
            for s in structs
            if not s.referenced_series_uids and s.frame_of_reference_uid == for_uid
        ]
    if len(referencing) > 1:
        names = ", ".join(str(s.path.name) for s in referencing)
        raise InputError(
            f"{where}: {len(referencing)} structure sets reference CT series {series_uid} "
            f"({names}); keep one per case folder"
        )
    rtstruct = referencing[0] if referencing else None
    if rtstruct is None and structs:
        names = ", ".join(
            f"{s.path.name} (series {list(s.referenced_series_uids)})" for s in structs
        )
        raise InputError(
            f"{where}: no structure set references CT series {series_uid} (found {names}); "
            "export the RTSTRUCT drawn on this CT"
        )
    plans = tuple(r for r in records if r.role == "RTPLAN")
    doses = tuple(r for r in records if r.role == "RTDOSE")
    ignored = tuple(r for r in records if r.role == "OTHER")
    return CaseFiles(tuple(ct), rtstruct, doses, plans, ignored)


def describe(records: Iterable[FileRecord]) -> dict[str, int]:
    """Count records by role (for messages and ``inspect``)."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.role] = counts.get(r.role, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------
# Trees of many cases (batch mode)
# --------------------------------------------------------------------------------------------

PARALLEL_INDEX_MIN_FILES = 256
"""Below this many files the header index is read in this process (a pool would cost more)."""


def pool_context() -> multiprocessing.context.BaseContext:
    """Multiprocessing start method of rtdeface's process pools.

    ``fork`` on Linux (workers start in milliseconds and inherit the imported modules; pools
    are created before any helper thread starts), ``spawn`` elsewhere.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class TreeIndex:
    """Header-only index of every file below an input root.

    Attributes
    ----------
    root : Path
        The input root (absolute).
    records : tuple of FileRecord
        One per readable DICOM object, in path order.
    unreadable : tuple of (Path, str)
        Files that claim to be DICOM but cannot be parsed, with the reason.
    non_dicom : tuple of Path
        Files that are not DICOM objects (text files, DICOMDIR, ...); skipped.
    datasets : mapping of Path to Dataset
        Whole reads of the DICOM objects when the index was asked to keep them (else empty).
    """

    root: Path
    records: tuple[FileRecord, ...]
    unreadable: tuple[tuple[Path, str], ...]
    non_dicom: tuple[Path, ...]
    datasets: Mapping[Path, Dataset] = field(default_factory=dict, compare=False, repr=False)


def _index_one(path: Path) -> FileRecord | str | None:
    """A record, a reason (file claims to be DICOM but is unusable), or None (not DICOM)."""
    return _read_one(path, header_only=True)[0]


def _read_one(
    path: Path, *, header_only: bool, defer_pixels: bool = False
) -> tuple[FileRecord | str | None, Dataset | None]:
    """:func:`_index_one` and the dataset read (None unless the file is a DICOM object)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = read_dicom(path, header_only=header_only, defer_pixels=defer_pixels)
            if ds is not None:
                return classify(ds, path), ds
            with open(path, "rb") as fh:
                if fh.read(132)[128:] != b"DICM":
                    return None, None
            meta = pydicom.dcmread(path, stop_before_pixels=True)
        except InputError as exc:
            return str(exc), None
        except OSError as exc:
            return f"{path}: cannot read ({exc.strerror}); check permissions", None
        except Exception as exc:
            reason = f"{path}: unreadable DICOM file ({type(exc).__name__}); re-export or remove it"
            return reason, None
    if "DirectoryRecordSequence" in meta:
        return None, None  # DICOMDIR: an index of the files, not an object
    return (
        f"{path}: DICOM file without SOPClassUID and SOPInstanceUID (corrupt?); "
        "re-export it or remove it from the input"
    ), None


def _index_chunk(paths: Sequence[Path]) -> list[FileRecord | str | None]:
    return [_index_one(p) for p in paths]


def index_tree(root: Path, jobs: int | None = None, keep_datasets_bytes: int = 0) -> TreeIndex:
    """Read the header (``stop_before_pixels``) of every file below ``root``, in parallel.

    Parameters
    ----------
    root : Path
        Input folder (any layout) or a single file.
    jobs : int, optional
        Worker processes [default: the CPU count]; small trees are read in this process.
    keep_datasets_bytes : int
        When the files below ``root`` add up to at most this many bytes, read each file whole,
        once, in this process, and keep the datasets in :attr:`TreeIndex.datasets` (a single
        case is then never read twice; uncompressed pixel data are deferred, see
        :func:`read_dicom`) [default 0: headers only].

    Raises
    ------
    InputError
        ``root`` does not exist.
    """
    root = Path(root).absolute()
    paths = iter_files(root)
    full = _read_small_tree(root, paths, keep_datasets_bytes)
    if full is not None:
        return full
    jobs = max(1, jobs or os.cpu_count() or 1)
    results: list[FileRecord | str | None]
    if jobs > 1 and len(paths) >= PARALLEL_INDEX_MIN_FILES:
        size = max(16, len(paths) // (jobs * 8))
        chunks = [paths[i : i + size] for i in range(0, len(paths), size)]
        with ProcessPoolExecutor(max_workers=jobs, mp_context=pool_context()) as ex:
            results = [r for part in ex.map(_index_chunk, chunks) for r in part]
    else:
        results = [_index_one(p) for p in paths]
    return _tree_index(root, paths, results)


KEEP_DATASETS_MAX_BYTES = 1024**3
"""Largest tree (bytes of all files) that :func:`index_tree` may read whole, once, and keep."""


def _read_small_tree(root: Path, paths: Sequence[Path], limit: int) -> TreeIndex | None:
    """Full reads of a tree no larger than ``limit`` bytes, kept in the index (else None)."""
    if limit <= 0:
        return None
    total = 0
    for p in paths:
        try:
            total += p.stat().st_size
        except OSError:
            continue
        if total > limit:
            return None
    pairs = [_read_one(p, header_only=False, defer_pixels=True) for p in paths]
    datasets = {p: ds for p, (_, ds) in zip(paths, pairs) if ds is not None}
    index = _tree_index(root, paths, [res for res, _ in pairs])
    return dataclasses.replace(index, datasets=datasets)


def _tree_index(
    root: Path, paths: Sequence[Path], results: Sequence[FileRecord | str | None]
) -> TreeIndex:
    records: list[FileRecord] = []
    unreadable: list[tuple[Path, str]] = []
    non_dicom: list[Path] = []
    for path, res in zip(paths, results):
        if isinstance(res, FileRecord):
            records.append(res)
        elif isinstance(res, str):
            unreadable.append((path, res))
        else:
            non_dicom.append(path)
    log.info(
        "indexed %d files: %d DICOM objects, %d unreadable, %d not DICOM",
        len(paths),
        len(records),
        len(unreadable),
        len(non_dicom),
    )
    return TreeIndex(root, tuple(records), tuple(unreadable), tuple(non_dicom))


@dataclass(frozen=True)
class FoundCase:
    """One case assembled from a tree: a CT series and the objects that reference it.

    Attributes
    ----------
    files : CaseFiles
    folder : Path
        Deepest folder holding every file of the case.
    patient_id, patient_name : str
        From the CT header (identifiers; never written to shareable outputs).
    """

    files: CaseFiles
    folder: Path
    patient_id: str
    patient_name: str

    @property
    def identity(self) -> str:
        """CT SeriesInstanceUID and RTSTRUCT SOPInstanceUID: what makes the case this case."""
        struct = self.files.rtstruct.sop_instance_uid if self.files.rtstruct else ""
        return f"{self.files.ct[0].series_instance_uid}/{struct}"

    def paths(self) -> tuple[Path, ...]:
        """Every file written from (CT, RTSTRUCT, RTDOSE, RTPLAN), in role order."""
        f = self.files
        rs = (f.rtstruct,) if f.rtstruct else ()
        return tuple(r.path for r in (*f.ct, *rs, *f.doses, *f.plans))

    def counts(self) -> dict[str, int]:
        """Number of files per role (CT, RTSTRUCT, RTDOSE, RTPLAN, OTHER)."""
        f = self.files
        return {
            "CT": len(f.ct),
            "RTSTRUCT": 1 if f.rtstruct else 0,
            "RTDOSE": len(f.doses),
            "RTPLAN": len(f.plans),
            "OTHER": len(f.ignored),
        }


@dataclass(frozen=True)
class TreeProblem:
    """Something in the tree that is not (or not entirely) a case.

    Attributes
    ----------
    kind : str
        ``unreadable``, ``orphan``, ``ambiguous``, ``duplicate`` or ``unhandled``.
    is_error : bool
        Data that should have been defaced was not (the batch exits 1); otherwise a warning.
    summary : str
        One line without identifiers (no paths, UIDs or names): safe for shareable outputs.
    detail : str
        One line for the operator, with paths relative to the input root.
    files : tuple of Path
        The files concerned.
    patient_id : str
        PatientID of the files when known (for the pseudonym; never written as such).
    """

    kind: str
    is_error: bool
    summary: str
    detail: str
    files: tuple[Path, ...]
    patient_id: str = ""


@dataclass(frozen=True)
class TreeCases:
    """Cases and problems found below an input root.

    Attributes
    ----------
    index : TreeIndex
    cases : tuple of FoundCase
        Sorted by folder, then by CT series.
    problems : tuple of TreeProblem
    ct_series : int
        Number of CT series found (cases plus ambiguous ones).
    """

    index: TreeIndex
    cases: tuple[FoundCase, ...]
    problems: tuple[TreeProblem, ...]
    ct_series: int


def _rel(path: Path, root: Path) -> str:
    try:
        rel = path.relative_to(root)
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else path.name


def _list(paths: Sequence[Path], root: Path, limit: int = 4) -> str:
    shown = ", ".join(_rel(p, root) for p in paths[:limit])
    return shown + (f", ... ({len(paths)} files)" if len(paths) > limit else "")


def _counts_text(records: Iterable[FileRecord]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        label = r.role if r.role != "OTHER" else (r.modality or "unknown")
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def _common_folder(paths: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def assemble_cases(index: TreeIndex) -> TreeCases:
    """Assemble cases from a tree index by references, reporting what does not fit.

    A case is one CT series, the structure set that references it (by
    RTReferencedSeriesSequence; by frame of reference only when the structure set names no
    series and one CT series has that frame), the plans that reference that structure set and
    the doses that reference those plans or that structure set. Plans and doses without a
    resolvable reference join the case whose CT shares their frame of reference, when exactly
    one does. Nothing else is guessed:

    * two or more structure sets on one CT series: the case is *ambiguous* and not processed;
    * an RTSTRUCT, RTPLAN or RTDOSE that belongs to no case is an *orphan*;
    * a plan or dose that matches several cases by frame of reference is *ambiguous*;
    * a file that claims to be DICOM but cannot be parsed is *unreadable*;
    * a second file with the same SOPInstanceUID is a *duplicate* (the first copy is used);
    * objects rtdeface does not handle (MR, REG, ...) are *unhandled* (warning).
    """
    root = index.root
    problems: list[TreeProblem] = [
        TreeProblem(
            "unreadable",
            True,
            "unreadable DICOM file (1 file): cannot be parsed",
            reason.replace(str(path), _rel(path, root)),
            (path,),
        )
        for path, reason in index.unreadable
    ]
    seen: dict[str, FileRecord] = {}
    records: list[FileRecord] = []
    duplicates: list[FileRecord] = []
    for r in index.records:
        if r.sop_instance_uid and r.sop_instance_uid in seen:
            duplicates.append(r)
            continue
        if r.sop_instance_uid:
            seen[r.sop_instance_uid] = r
        records.append(r)
    if duplicates:
        problems.append(
            TreeProblem(
                "duplicate",
                False,
                f"{len(duplicates)} duplicate object(s) ({_counts_text(duplicates)}) with the "
                "SOPInstanceUID of another file; the first copy is used",
                f"{len(duplicates)} duplicate object(s) ignored: "
                f"{_list([r.path for r in duplicates], root)}",
                tuple(r.path for r in duplicates),
            )
        )
    ct_series: dict[str, list[FileRecord]] = {}
    for r in records:
        if r.role == "CT":
            ct_series.setdefault(r.series_instance_uid, []).append(r)
    by_for: dict[str, list[str]] = {}
    for uid, slices in ct_series.items():
        by_for.setdefault(slices[0].frame_of_reference_uid, []).append(uid)

    def orphan(r: FileRecord, why: str) -> None:
        problems.append(
            TreeProblem(
                "orphan",
                True,
                f"orphan {r.role} (1 file): {why}",
                f"orphan {r.role} {_rel(r.path, root)}: {why}",
                (r.path,),
                r.patient_id,
            )
        )

    # structure sets -> CT series
    structs_of: dict[str, list[FileRecord]] = {uid: [] for uid in ct_series}
    for s in (r for r in records if r.role == "RTSTRUCT"):
        refs = sorted({u for u in s.referenced_series_uids if u in ct_series})
        if len(refs) == 1:
            structs_of[refs[0]].append(s)
        elif len(refs) > 1:
            orphan(s, f"it references {len(refs)} CT series; rtdeface needs one")
        elif s.referenced_series_uids:
            orphan(s, "the CT series it references is not in the input")
        else:
            candidates = by_for.get(s.frame_of_reference_uid, [])
            if len(candidates) == 1:
                structs_of[candidates[0]].append(s)
            else:
                orphan(
                    s,
                    f"it names no CT series and {len(candidates)} CT series share its frame "
                    "of reference",
                )
    # CT series -> cases (or ambiguous groups)
    case_of_series: dict[str, int] = {}
    groups: list[dict[str, list[FileRecord]]] = []
    ambiguous: set[int] = set()
    for uid in sorted(ct_series, key=lambda u: (str(ct_series[u][0].path), u)):
        structs = structs_of[uid]
        case_of_series[uid] = len(groups)
        if len(structs) > 1:
            ambiguous.add(len(groups))
        groups.append(
            {"CT": ct_series[uid], "RTSTRUCT": structs, "RTPLAN": [], "RTDOSE": [], "OTHER": []}
        )
    case_of_struct = {
        s.sop_instance_uid: case_of_series[uid] for uid, ss in structs_of.items() for s in ss
    }

    def by_frame(r: FileRecord) -> int | None:
        candidates = by_for.get(r.frame_of_reference_uid, []) if r.frame_of_reference_uid else []
        if len(candidates) == 1:
            return case_of_series[candidates[0]]
        if len(candidates) > 1:
            problems.append(
                TreeProblem(
                    "ambiguous",
                    True,
                    f"ambiguous {r.role} (1 file): it references no structure set or plan of "
                    f"the input and {len(candidates)} CT series share its frame of reference",
                    f"ambiguous {r.role} {_rel(r.path, root)}: {len(candidates)} CT series share "
                    "its frame of reference and it references none of their objects; move it "
                    "beside the right CT in a folder of its own",
                    (r.path,),
                    r.patient_id,
                )
            )
            return -1
        return None

    case_of_plan: dict[str, int] = {}
    for p in (r for r in records if r.role == "RTPLAN"):
        target = next(
            (case_of_struct[u] for u in p.referenced_sop_uids if u in case_of_struct), None
        )
        if target is None:
            target = by_frame(p)
        if target is None:
            orphan(p, "its structure set and CT are not in the input")
        elif target >= 0:
            groups[target]["RTPLAN"].append(p)
            case_of_plan[p.sop_instance_uid] = target
    for d in (r for r in records if r.role == "RTDOSE"):
        target = next((case_of_plan[u] for u in d.referenced_sop_uids if u in case_of_plan), None)
        if target is None:
            target = next(
                (case_of_struct[u] for u in d.referenced_sop_uids if u in case_of_struct), None
            )
        if target is None:
            target = by_frame(d)
        if target is None:
            orphan(d, "its plan, structure set and CT are not in the input")
        elif target >= 0:
            groups[target]["RTDOSE"].append(d)
    unhandled: list[FileRecord] = []
    for o in (r for r in records if r.role == "OTHER"):
        candidates = by_for.get(o.frame_of_reference_uid, []) if o.frame_of_reference_uid else []
        if len(candidates) == 1:
            groups[case_of_series[candidates[0]]]["OTHER"].append(o)
        else:
            unhandled.append(o)
    if unhandled:
        problems.append(
            TreeProblem(
                "unhandled",
                False,
                f"{len(unhandled)} object(s) of types rtdeface does not handle "
                f"({_counts_text(unhandled)}); not written",
                f"{len(unhandled)} unhandled object(s) ({_counts_text(unhandled)}) not written: "
                f"{_list([r.path for r in unhandled], root)}",
                tuple(r.path for r in unhandled),
            )
        )
    cases: list[FoundCase] = []
    for n, g in enumerate(groups):
        ct = g["CT"]
        every = [*ct, *g["RTSTRUCT"], *g["RTPLAN"], *g["RTDOSE"]]
        if n in ambiguous:
            problems.append(
                TreeProblem(
                    "ambiguous",
                    True,
                    f"ambiguous case ({_counts_text(every)}): {len(g['RTSTRUCT'])} structure "
                    "sets reference one CT series; keep one structure set per CT",
                    f"ambiguous case in {_rel(_common_folder([r.path for r in every]), root)}: "
                    f"{len(g['RTSTRUCT'])} structure sets reference one CT series of "
                    f"{len(ct)} slices ({_list([s.path for s in g['RTSTRUCT']], root)}); "
                    "keep one structure set per CT (move the others out of the input)",
                    tuple(r.path for r in every),
                    ct[0].patient_id,
                )
            )
            continue
        files = CaseFiles(
            ct=tuple(ct),
            rtstruct=g["RTSTRUCT"][0] if g["RTSTRUCT"] else None,
            doses=tuple(g["RTDOSE"]),
            plans=tuple(g["RTPLAN"]),
            ignored=tuple(g["OTHER"]),
        )
        folder = _common_folder([r.path for r in every])
        cases.append(FoundCase(files, folder, ct[0].patient_id, ct[0].patient_name))
    cases.sort(key=lambda c: (str(c.folder), c.identity))
    for c in cases:
        log.debug("case in %s: %s", c.folder, c.counts())
    return TreeCases(index, tuple(cases), tuple(problems), len(ct_series))


def discover_cases(root: Path, jobs: int | None = None, keep_datasets_bytes: int = 0) -> TreeCases:
    """Index ``root`` (header-only, in parallel) and assemble its cases by references.

    ``keep_datasets_bytes``: see :func:`index_tree`.
    """
    return assemble_cases(index_tree(root, jobs, keep_datasets_bytes))
