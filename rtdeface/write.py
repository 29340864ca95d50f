"""Build the output datasets of a defaced case and write them atomically.

Output layout (no identifiers in any path)::

    OUT/CT/CT_0001.dcm ...     slices in index order (inferior to superior for HFS)
    OUT/RTSTRUCT.dcm
    OUT/RTDOSE_1.dcm ...
    OUT/RTPLAN_1.dcm ...
    OUT/rtdeface_report.json

Every changed object gets a new SOPInstanceUID (the CT a new SeriesInstanceUID) through a
keyed value-based :class:`~rtdeface.uids.UidMapper`, applied at every nesting depth and to the
file meta, so every reference still resolves. The case is written into a temporary sibling
directory and renamed into place: on any failure nothing is left behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import RLELossless

from rtdeface import forking, rawseq
from rtdeface.deid import (
    DeidOptions,
    DeidRecord,
    DeidSession,
    SequenceScans,
    SessionJob,
    encode_raw,
    raw_form,
)
from rtdeface.discover import (
    FileStamp,
    check_unchanged,
    deferred_pixel_data,
    deferred_source,
    peek,
    peek_str,
    peek_uint,
    read_deferred,
)
from rtdeface.errors import InputError, OutputError
from rtdeface.forking import NO_ANSWER, Child
from rtdeface.load import copy_dataset
from rtdeface.pipeline import DefacedCase, StructuresJob
from rtdeface.uids import SameLengthTable, UidMapper, remap_uids_raw

log = logging.getLogger(__name__)

DERIVATION_DESCRIPTION = (
    "Defaced by rtdeface: voxels superior to the inferior eye plane and anterior to the eyes' "
    "A-P midpoint set to air, PTVs preserved"
)


@dataclass(frozen=True, eq=False)
class OutputObject:
    """One dataset to write and where (relative to the case output folder)."""

    relpath: str
    role: str
    dataset: Dataset


def uid_key(defaced: DefacedCase) -> bytes:
    """Key of the defacing UID mapping: a digest of the cut, so reruns give the same UIDs."""
    r = defaced.region
    payload = json.dumps(
        {
            "z": round(r.z_inferior_mm, 6),
            "y": round(r.y_mid_mm, 6),
            "kept": sorted(r.preserved_numbers),
            "opts": repr(defaced.options),
        },
        sort_keys=True,
    )
    return hashlib.sha256(b"rtdeface-deface-v1:" + payload.encode()).digest()


def changed_uids(defaced: DefacedCase) -> set[str]:
    """Original UIDs that must change: every written object's SOP instance and series."""
    case = defaced.case
    out: set[str] = {case.ct.series_instance_uid}
    objs: list[Dataset] = list(case.ct.datasets)
    if case.structure_set is not None:
        objs.append(case.structure_set.dataset)
    objs.extend(d.dataset for d in case.doses)
    objs.extend(ds for _, ds in case.plans)
    for ds in objs:
        out.add(str(ds.SOPInstanceUID))
        if "SeriesInstanceUID" in ds:
            out.add(str(ds.SeriesInstanceUID))
    return out


def _set_pixels(ds: Dataset, arr: npt.NDArray[np.integer]) -> None:
    """Store ``arr`` as the pixel data of ``ds`` losslessly, keeping the declared dtype."""
    bits_alloc = peek_uint(ds, "BitsAllocated") or int(ds.BitsAllocated)
    signed = peek_uint(ds, "PixelRepresentation") == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_alloc // 8}")
    data = np.ascontiguousarray(arr.astype(dtype, copy=False))
    ts = ds.file_meta.TransferSyntaxUID
    if not ts.is_compressed:
        value = data.tobytes()
        if len(value) % 2:  # an odd number of 8-bit pixels: padded to even length (PS3.5 8.1.1)
            value += b"\x00"
        old = ds.get_item(0x7FE00010, keep_deferred=True)
        if isinstance(old, RawDataElement) and (
            isinstance(old.value, bytes) or deferred_pixel_data(ds) is not None
        ):
            # still raw, as read: the writer then passes the new bytes to the file as they are
            ds[0x7FE00010] = old._replace(value=value, length=len(value))
        else:
            ds.PixelData = value
        return
    if ts == RLELossless:
        ds.compress(RLELossless, data, generate_instance_uid=False)
        return
    try:
        ds.compress(ts, data, generate_instance_uid=False)
    except Exception as exc:  # no encoder for this syntax installed
        log.warning(
            "no lossless encoder for %s (%s); writing that slice uncompressed", ts.name, exc
        )
        ds.set_pixel_data(
            data, str(ds.PhotometricInterpretation), int(ds.BitsStored), generate_instance_uid=False
        )


def _set_derived(ds: Dataset, cache: dict[tuple[object, ...], RawDataElement]) -> None:
    """ImageType DERIVED, DerivationDescription, RecognizableVisualFeatures NO on a CT slice.

    For a dataset read from a file the three elements are encoded once per value and encoding
    and shared (raw elements are immutable), so they are written without re-encoding.
    """
    form = raw_form(ds)
    old = ds.get_item(0x00080008)
    raw_type = (  # the slices of a series share these bytes: the key, without converting them
        old.value
        if form is not None and isinstance(old, RawDataElement) and isinstance(old.value, bytes)
        else None
    )
    image_type = None if raw_type is not None else derived_image_type(peek(ds, "ImageType"))
    for tag, vr in ((0x00080008, "CS"), (0x00082111, "ST"), (0x00280302, "CS")):
        source: object = None
        if tag == 0x00080008:
            source = raw_type if raw_type is not None else tuple(image_type or ())
        key = (tag, source, form)
        raw = cache.get(key) if form is not None else None
        if raw is None:
            if tag == 0x00080008:
                if image_type is None:
                    image_type = derived_image_type(peek(ds, "ImageType"))
                value: object = image_type
            else:
                value = DERIVATION_DESCRIPTION if tag == 0x00082111 else "NO"
            elem = DataElement(tag, vr, value)
            if form is None:
                ds[tag] = elem
                continue
            raw = cache[key] = encode_raw(elem, form)
        ds[tag] = raw


def derived_image_type(value: object) -> list[str]:
    """ImageType with value 1 set to DERIVED (value 2 defaults to PRIMARY when absent)."""
    if value is None or value == "":
        values: list[str] = []
    elif isinstance(value, str):
        values = value.split("\\")
    else:
        values = [str(v) for v in value]  # type: ignore[attr-defined]
    if not values:
        return ["DERIVED", "PRIMARY"]
    return ["DERIVED", *values[1:]] if len(values) > 1 else ["DERIVED", "PRIMARY"]


def build_outputs(
    defaced: DefacedCase,
    deid: DeidOptions | None = None,
    *,
    context: SessionJob | None = None,
    ct_ready: Callable[[Sequence[OutputObject]], None] | None = None,
) -> tuple[list[OutputObject], DeidRecord | None]:
    """Output datasets (copies; the loaded case is untouched) with UIDs remapped.

    Parameters
    ----------
    defaced : DefacedCase
    deid : DeidOptions, optional
        De-identify all output datasets of the case together (PS3.15 Annex E; every UID is
        then remapped with the de-identification key). The context (identity tokens, the
        UID table) comes from the case's input objects, so the CT objects are de-identified
        while the structure set may still be clipped (:class:`rtdeface.pipeline.StructuresJob`).
        Without it only the UIDs of the changed objects are remapped, with a key derived from
        the cut.
    context : SessionJob, optional
        The de-identification context of ``deid``, started from the case's input objects
        (e.g. in a child process while the case was loaded and defaced); used when it was
        started from exactly those objects, else the context is built here.
    ct_ready : callable, optional
        Called with the CT objects as soon as they are final, before the structure set is
        waited for (e.g. :meth:`CaseWriter.write` in the background).

    Returns
    -------
    outputs : list of OutputObject
        CT slices in index order, then RTSTRUCT, RTDOSE(s), RTPLAN(s).
    record : DeidRecord or None
        The de-identification audit record (holds the original PatientID: keep it private).
    """
    case = defaced.case
    session = None
    if deid is not None:  # the context comes from the inputs: the CT goes first (see below)
        originals = [*case.ct.datasets]
        if case.structure_set is not None:
            originals.append(case.structure_set.dataset)
        originals += [d.dataset for d in case.doses] + [plan for _, plan in case.plans]
        session = (
            context.session(originals)
            if context is not None
            else DeidSession(originals, deid, ct_defaced=True)
        )
        mapper = table = splice = scans = None
    else:
        mapper = UidMapper(uid_key(defaced))
        table = SameLengthTable.build(mapper, changed_uids(defaced))
        scans = SequenceScans()
        splice = scans.splicer(table)

    def finish(objects: Sequence[OutputObject]) -> None:
        if session is not None:
            session.process([o.dataset for o in objects])
            return
        assert mapper is not None and table is not None
        for o in objects:
            remap_uids_raw(o.dataset, mapper, table, splice=splice)

    outputs: list[OutputObject] = []
    derived: dict[tuple[object, ...], RawDataElement] = {}  # encoded once per value and form
    for k, src in enumerate(case.ct.datasets):
        ds = copy_dataset(src)
        if k in defaced.ct.slices:
            _set_pixels(ds, defaced.ct.slices[k])
        _set_derived(ds, derived)
        outputs.append(OutputObject(f"CT/CT_{k + 1:04d}.dcm", "CT", ds))
    # the CT first, while the structure set may still be clipped in a child process
    # (deface_case(..., defer=True)): reading defaced.structures waits for it
    finish(outputs)
    if ct_ready is not None:
        ct_ready(outputs)
    # then the doses and plans, which need nothing from the structure set either
    others: list[OutputObject] = []
    for n, (dose, result) in enumerate(zip(case.doses, defaced.doses), start=1):
        ds = copy_dataset(dose.dataset)
        if result.stored is not None:
            _set_pixels(ds, result.stored)
        if "DVHSequence" in ds:
            del ds.DVHSequence
            log.info("RTDOSE %d: stale DVHSequence dropped", n)
        others.append(OutputObject(f"RTDOSE_{n}.dcm", "RTDOSE", ds))
    for n, (_, plan) in enumerate(case.plans, start=1):
        others.append(OutputObject(f"RTPLAN_{n}.dcm", "RTPLAN", copy_dataset(plan)))
    finish(others)
    rtstruct: list[OutputObject] = []
    if defaced.structures is not None:  # a copy: building outputs twice gives the same result
        job = defaced.structures_work
        if isinstance(job, StructuresJob) and job.scanned is not None:  # scanned by the job
            if session is not None:
                session.add_scan(*job.scanned)
            elif scans is not None:
                scans.add(*job.scanned)
        structures = copy_dataset(defaced.structures.dataset)
        rtstruct.append(OutputObject("RTSTRUCT.dcm", "RTSTRUCT", structures))
        finish(rtstruct)
    return outputs + rtstruct + others, session.record() if session is not None else None


def check_output_free(out_dir: Path) -> Path:
    """Refuse an output that exists and is not an empty folder (checked before any work).

    Raises
    ------
    OutputError
        ``out_dir`` exists and is not an empty directory.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputError(
            f"{out_dir}: output exists and is not empty; choose a new output folder "
            "(rtdeface never overwrites)"
        )
    return out_dir


PARALLEL_WRITE_MIN_OBJECTS = 64
"""``write_atomic(..., parallel=True)`` writes cases with at least this many objects with two
processes (where possible); :meth:`CaseWriter.write` with ``background`` always does."""


def write_atomic(
    outputs: Sequence[OutputObject],
    out_dir: Path,
    extra_files: Mapping[str, bytes] = {},
    *,
    parallel: bool = False,
) -> Path:
    """Write a case into ``out_dir`` atomically (temporary sibling, then rename).

    With ``parallel`` (and Linux, two or more CPUs, at least
    :data:`PARALLEL_WRITE_MIN_OBJECTS` objects), a forked child process encodes and writes
    the CT slices from the first while this process writes the other objects and then the
    CT slices from the last, until they meet (pydicom's encoder holds the GIL, so threads
    would not help). The result is byte-identical; any failure of either process leaves
    nothing behind. :class:`CaseWriter` does the same in steps.

    Raises
    ------
    OutputError
        ``out_dir`` exists and is not an empty directory, or it lies inside an input, or the
        writing child process failed.
    """
    with CaseWriter(out_dir) as writer:
        ct = [o for o in outputs if o.role == "CT"]
        if not parallel or len(outputs) < PARALLEL_WRITE_MIN_OBJECTS:
            ct = []
        writer.write(ct, background=True)
        taken = {id(o) for o in ct}
        writer.write([o for o in outputs if id(o) not in taken])
        return writer.commit(extra_files)


class CaseWriter:
    """One case written atomically, in steps: objects go into a temporary sibling of
    ``out_dir`` as they become ready (some by forked writer processes), :meth:`commit` renames
    it into place. :meth:`abort`, or leaving a ``with`` block by an exception, removes it.

    Raises
    ------
    OutputError
        ``out_dir`` exists and is not an empty directory (checked here, before any writing).
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = check_output_free(out_dir)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp: Path | None = Path(
            tempfile.mkdtemp(prefix=".rtdeface-partial-", dir=self.out_dir.parent)
        )
        self._batches: list[tuple[Child, list[OutputObject], Any]] = []

    def __enter__(self) -> CaseWriter:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is not None:
            self.abort()

    def _folder(self) -> Path:
        if self._tmp is None:
            raise OutputError(f"{self.out_dir}: the case was already committed or aborted")
        return self._tmp

    def write(self, objects: Sequence[OutputObject], *, background: bool = False) -> None:
        """Write ``objects`` now, or with ``background`` in a forked child process where
        possible: it writes them from the first, and :meth:`commit` writes those it has not
        reached yet from the last, so the two processes share the work however fast each
        is (the child's failure is raised by :meth:`commit`)."""
        tmp = self._folder()
        if not objects:
            return
        try:
            for folder in sorted({(tmp / o.relpath).parent for o in objects}):
                folder.mkdir(parents=True, exist_ok=True)
            child = claims = None
            if background and forking.can_fork():
                claims = multiprocessing.get_context("fork").Array("q", [0, len(objects)])
                child = Child.start(_writer_child, list(objects), tmp, claims)
            if child is None:
                _write_objects(objects, tmp)
            else:
                self._batches.append((child, list(objects), claims))
        except BaseException:
            self.abort()
            raise

    def commit(self, extra_files: Mapping[str, bytes] = {}) -> Path:
        """Wait for the writer processes, add ``extra_files`` and rename the case into place."""
        tmp = self._folder()
        try:
            while self._batches:
                child, objects, claims = self._batches[0]
                _write_claimed(objects, tmp, claims, first=False)
                self._batches.pop(0)
                _join_writer(child)
            for name, data in extra_files.items():
                (tmp / name).write_bytes(data)
            if self.out_dir.exists():
                self.out_dir.rmdir()
            os.replace(tmp, self.out_dir)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        return self.out_dir

    def abort(self) -> None:
        """Stop the writer processes and remove everything written (idempotent)."""
        while self._batches:
            self._batches.pop()[0].stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _write_objects(outputs: Sequence[OutputObject], folder: Path) -> None:
    for obj in outputs:
        write_dicom(folder / obj.relpath, obj.dataset)


_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
"""(FFFE,E0DD) with length 0, little endian."""


def write_dicom(path: Path, ds: Dataset) -> None:
    """Write ``ds`` as a DICOM file: the bytes of ``pydicom.dcmwrite(path, ds,
    enforce_file_format=True)``, faster for datasets whose elements are mostly raw.

    pydicom's writer re-buffers every element; here raw (unparsed) elements in the dataset's
    own encoding are written as header plus original value bytes, and only parsed elements go
    through pydicom's element writer. Every rule of ``dcmwrite`` that applies is kept: file
    meta completed and validated (MediaStorage UIDs from the dataset, group length first),
    128-byte preamble, undefined-length encapsulated pixel data, delimiters of
    undefined-length sequences, retired group lengths dropped. Datasets this does not cover
    (deflated, big-endian or private syntaxes, a changed character set or encoding, built in
    memory) are written by ``pydicom.dcmwrite`` itself. Tests compare the bytes.
    """
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    original_implicit, little = ds.original_encoding
    if (
        meta is None
        or ts is None
        or not ts.is_transfer_syntax
        or ts.is_private
        or ts == pydicom.uid.DeflatedExplicitVRLittleEndian
        or not ts.is_little_endian
        or (original_implicit, little) != (ts.is_implicit_VR, True)
        or ds.original_character_set != ds._character_set
        or any(t >> 16 in (0, 2) for t in ds.keys())
        or (getattr(ds, "preamble", None) not in (None, b"") and len(ds.preamble) != 128)
    ):
        deferred = deferred_pixel_data(ds)
        if deferred is not None:  # read here, checked against the file, into a copy
            source, stamp = deferred_source(ds)
            ds = copy_dataset(ds)
            ds[0x7FE00010] = deferred._replace(value=bytes(read_deferred(source, deferred, stamp)))
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        return
    file_meta = FileMetaDataset(copy_dataset(meta))
    ds_class = peek_str(ds, "SOPClassUID")
    if file_meta.get("MediaStorageSOPClassUID") is None or (
        ds_class and ds_class != file_meta.get("MediaStorageSOPClassUID")
    ):
        file_meta.MediaStorageSOPClassUID = pydicom.uid.UID(ds_class)
    ds_instance = peek_str(ds, "SOPInstanceUID")
    if file_meta.get("MediaStorageSOPInstanceUID") is None or (
        ds_instance and ds_instance != file_meta.get("MediaStorageSOPInstanceUID")
    ):
        file_meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(ds_instance)
    validate_file_meta(file_meta, enforce_standard=True)
    meta_buf = DicomBytesIO()
    meta_buf.is_implicit_VR, meta_buf.is_little_endian = False, True
    _encode_elements(meta_buf, file_meta, False, False, default_encoding, skip={0x00020000})
    group = meta_buf.getvalue()
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = bool(original_implicit), True
    buf.write(getattr(ds, "preamble", None) or b"\x00" * 128)
    buf.write(b"DICM")
    buf.write(_PACK_SHORT_HEADER(0x0002, 0x0000, b"UL", 4))  # FileMetaInformationGroupLength
    buf.write(struct.pack("<I", len(group)))
    buf.write(group)
    encodings = peek(ds, "SpecificCharacterSet", default_encoding)
    parts: list[bytes | _FileSpan] = []
    _encode_elements(
        buf, ds, bool(original_implicit), bool(ts.is_compressed), encodings, parts=parts
    )
    parts.append(buf.getvalue())
    with open(path, "wb") as fh:
        for part in parts:  # large values go to the file as they are, without a copy
            if isinstance(part, _FileSpan):
                _copy_span(part, fh)
            else:
                fh.write(part)


@dataclass(frozen=True)
class _FileSpan:
    """A deferred value (``elem``, see :func:`rtdeface.discover.read_dicom`) that is copied
    from its input file straight into the output file."""

    path: Path
    elem: RawDataElement
    stamp: FileStamp | None


COPY_CHUNK_BYTES = 1 << 20
"""Bytes copied per call where the kernel cannot copy between the files itself."""


def _copy_span(span: _FileSpan, out: Any) -> None:
    """Append the value of ``span`` to the binary file ``out`` (flushed first): copied by
    the kernel (``os.copy_file_range``) where it can, else read and written in chunks.

    Raises
    ------
    InputError
        The input file changed since it was read, or can no longer be read.
    """
    out.flush()
    try:
        src = open(span.path, "rb")
    except OSError as exc:
        raise InputError(
            f"{span.path}: cannot read it again to copy its pixel data ({exc.strerror}); "
            "rerun when no other program changes the input"
        ) from exc
    with src:
        check_unchanged(span.path, os.fstat(src.fileno()), span.elem, span.stamp)
        offset, left = span.elem.value_tell, span.elem.length
        kernel = sys.platform.startswith("linux") and hasattr(os, "copy_file_range")
        while left > 0 and kernel:
            try:
                n = os.copy_file_range(src.fileno(), out.fileno(), left, offset)
            except OSError:  # e.g. across file systems on older kernels: copy by hand
                n = 0
            if n <= 0:  # some file systems copy nothing: the rest by hand
                break
            offset += n
            left -= n
        src.seek(offset)
        while left > 0:
            chunk = src.read(min(left, COPY_CHUNK_BYTES))
            if not chunk:
                check_unchanged(span.path, os.fstat(src.fileno()), span.elem, span.stamp)
                raise InputError(f"{span.path}: the file ended early; rerun")
            out.write(chunk)  # a buffered file: raises on a short write (e.g. disk full)
            left -= len(chunk)
        out.flush()


LARGE_VALUE_BYTES = 65536
"""Raw values at least this long (pixel data, big contour sequences) are written to the file
from their own bytes rather than copied into the element buffer first."""


_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI"}
    | {"UR", "UT"}
)
"""VRs whose empty value pydicom writes as a bare header of length 0."""

_PACK_SHORT_HEADER = struct.Struct("<HH2sH").pack
_PACK_LONG_HEADER = struct.Struct("<HH2sHI").pack
_PACK_IMPLICIT_HEADER = struct.Struct("<HHI").pack


def _encode_elements(
    buf: DicomBytesIO,
    ds: Dataset,
    implicit: bool,
    compressed: bool,
    encodings: Any,
    skip: frozenset[int] | set[int] = frozenset(),
    parts: list[bytes | _FileSpan] | None = None,
) -> None:
    """Write the elements of ``ds`` in tag order (raw ones verbatim, as pydicom would).

    With ``parts``, a raw value of :data:`LARGE_VALUE_BYTES` or more is not copied into
    ``buf``: what ``buf`` holds so far, then the value itself, are appended to ``parts`` and
    ``buf`` is emptied (the output is ``parts`` followed by ``buf``'s content). Deferred pixel
    data (:func:`rtdeface.discover.read_dicom`) are appended as a :class:`_FileSpan` to copy
    from the input file; without ``parts``, deferred values are read through pydicom."""
    for tag in sorted(ds.keys()):
        if (tag.element == 0 and tag.group > 6) or tag in skip:
            continue  # retired group length (PS3.5 7.2), or written by the caller
        elem = ds.get_item(tag, keep_deferred=True)
        if (
            parts is not None
            and tag == 0x7FE00010
            and not compressed
            and isinstance(elem, RawDataElement)
            and deferred_pixel_data(ds) is not None
            and bool(elem.is_implicit_VR) == implicit
            and elem.is_little_endian
            and (implicit or elem.VR)
        ):  # deferred pixel data: the header here, the value copied from the input file
            buf.write(_element_header(tag, str(elem.VR), elem.length, implicit, False))
            source, stamp = deferred_source(ds)
            _append_part(parts, buf, _FileSpan(source, elem, stamp))
            continue
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
            elem = ds.get_item(tag)  # another deferred value: read through pydicom
        if isinstance(elem, DataElement) and elem.VR in _TEXT_VRS and elem.value in ("", None):
            value, undefined = b"", False  # empty text (parsed while reading): a bare header
        elif (
            not isinstance(elem, RawDataElement)
            or elem.value is None
            or bool(elem.is_implicit_VR) != implicit
            or not elem.is_little_endian
            or (not implicit and not elem.VR)
        ):
            write_data_element(buf, ds[tag], encodings)
            continue
        else:
            value, undefined = elem.value, elem.length == rawseq.UNDEFINED_LENGTH
        if tag == 0x7FE00010:
            undefined = compressed  # PS3.5 A.4: encapsulated pixel data has undefined length
            if (
                (undefined and not value.startswith(b"\xfe\xff\x00\xe0"))
                or (not undefined and len(value) % 2)
                or (not implicit and elem.VR == "UN")
            ):  # pydicom pads odd pixel data and gives UN-labelled ones their VR: its writer
                write_data_element(buf, ds[tag], encodings)
                continue
        buf.write(_element_header(tag, str(elem.VR), len(value), implicit, undefined))
        if parts is not None and len(value) >= LARGE_VALUE_BYTES:
            _append_part(parts, buf, value)
        else:
            buf.write(value)
        if undefined:
            buf.write(_SEQUENCE_DELIMITER)


def _append_part(
    parts: list[bytes | _FileSpan], buf: DicomBytesIO, part: bytes | _FileSpan
) -> None:
    """Append what ``buf`` holds, then ``part``, to ``parts``, and empty ``buf``."""
    parts.append(buf.getvalue())
    parts.append(part)
    inner = cast(io.BytesIO, buf.parent)
    inner.seek(0)
    inner.truncate()


def _element_header(tag: int, vr: str, length: int, implicit: bool, undefined: bool) -> bytes:
    """The header of an element holding ``length`` bytes (or of undefined length), by the
    rules of pydicom's ``write_data_element``."""
    group, element = tag >> 16, tag & 0xFFFF
    stored = rawseq.UNDEFINED_LENGTH if undefined else length
    if implicit:
        return _PACK_IMPLICIT_HEADER(group, element, stored)
    if vr not in rawseq.LONG_LENGTH_VRS and not undefined and length > 0xFFFF:
        vr = "UN"  # pydicom relabels a value too long for a 2-byte length
    if vr in rawseq.LONG_LENGTH_VRS:
        return _PACK_LONG_HEADER(group, element, vr.encode("ascii"), 0, stored)
    if undefined:
        return (
            _PACK_IMPLICIT_HEADER(group, element, 0)[:4]
            + vr.encode("ascii")
            + struct.pack("<I", stored)
        )
    return _PACK_SHORT_HEADER(group, element, vr.encode("ascii"), stored)


def _claim(claims: Any, *, first: bool) -> int | None:
    """Take the index of the next object to write: the first or the last one not yet taken
    (``claims`` holds [next first, end] in shared memory); None when all are taken."""
    lock = claims.get_lock()
    if not lock.acquire(timeout=WRITER_TIMEOUT_S):  # its holder died inside (e.g. killed)
        raise OutputError("the CT slice writers lost their shared claims; rerun the case")
    try:
        lo, hi = claims[0], claims[1]
        if lo >= hi:
            return None
        if first:
            claims[0] = lo + 1
            return int(lo)
        claims[1] = hi - 1
        return int(hi - 1)
    finally:
        lock.release()


def _write_claimed(
    objects: Sequence[OutputObject], folder: Path, claims: Any, *, first: bool
) -> None:
    """Write the objects this process claims (from the first or the last) until none is left."""
    while (k := _claim(claims, first=first)) is not None:
        write_dicom(folder / objects[k].relpath, objects[k].dataset)


def _writer_child(outputs: Sequence[OutputObject], folder: Path, claims: Any, conn: Any) -> None:
    """Child of :meth:`CaseWriter.write`: write objects from the first until they are all
    taken; send "" or the error."""
    try:
        _write_claimed(outputs, folder, claims, first=True)
        conn.send("")
    except InputError as exc:  # an input changed: the parent raises it as it is
        conn.send(("InputError", " ".join(str(exc).split())))
    except BaseException as exc:
        conn.send(f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
    finally:
        conn.close()


def _join_writer(child: Child) -> None:
    message = child.receive(WRITER_TIMEOUT_S)
    if isinstance(message, tuple) and message[:1] == ("InputError",):
        raise InputError(str(message[1]))
    if message is NO_ANSWER or message or child.proc.exitcode != 0:
        detail = "no answer" if message is NO_ANSWER else str(message) or "exit status"
        raise OutputError(
            f"writing the CT slices failed in the writer process ({detail}); "
            "check the output folder's disk space and permissions"
        )


WRITER_TIMEOUT_S = 600.0
"""Longest wait (s) for a writing child process of :class:`CaseWriter` (its answer, or the
lock of the shared claims)."""
