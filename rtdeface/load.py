"""Load one case into plain, validated data: CT grid, structure set, dose grids, plans.

Geometry goes only through :func:`rtdeface.geometry.affine_from_attributes`. The loaded
pydicom datasets are kept (read once) so the writer can derive the output from them; the
files on disk are never modified.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag

from rtdeface import rawseq
from rtdeface.discover import (
    PIXEL_DATA_TAG,
    SOURCE_STAMP,
    CaseFiles,
    FileRecord,
    assemble_single_case,
    classify,
    deferred_pixel_data,
    iter_files,
    native_pixel_format,
    peek,
    peek_floats,
    peek_str,
    peek_uint,
    read_deferred,
    read_dicom,
)
from rtdeface.errors import DicomReferenceError, GeometryError, InputError
from rtdeface.geometry import (
    IN_PLANE_OFFSET_ATOL_MM,
    ORIENTATION_ATOL,
    PLANE_MATCH_ATOL_MM,
    Grid,
    affine_from_attributes,
    check_regular_positions,
    slice_normal,
)

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


def copy_dataset(ds: Dataset) -> Dataset:
    """A copy of ``ds`` whose elements can be replaced or removed without touching ``ds``.

    Sequences are copied item by item (recursively); raw elements (bytes not yet parsed) are
    shared, and so are the values of parsed elements (each element object is new, so setting
    ``elem.value`` on the copy leaves ``ds`` as it is; rtdeface never mutates a value in
    place). Much faster than :func:`copy.deepcopy` on CT headers and structure sets. File
    meta, preamble, original encoding and undefined lengths of sequences and items are kept
    (so a sequence is written alike whether or not it was parsed before the copy).
    """
    new = Dataset(_copy_elements(ds))
    new.is_undefined_length_sequence_item = ds.is_undefined_length_sequence_item
    for name in _SOURCE_ATTRIBUTES:  # deferred values (pixel data) still resolve on the copy
        if name in ds.__dict__:
            object.__setattr__(new, name, ds.__dict__[name])
    if "file_meta" in ds.__dict__ and ds.file_meta is not None:
        meta = FileMetaDataset()
        meta.update(_copy_elements(ds.file_meta))
        new.file_meta = meta
    if getattr(ds, "preamble", None) is not None:
        new.preamble = ds.preamble
    copy_encoding(ds, new)
    return new


_SOURCE_ATTRIBUTES = ("filename", "timestamp", "fileobj_type", "buffer", SOURCE_STAMP)
"""Attributes of a dataset read from a file that pydicom (and
:func:`rtdeface.discover.read_deferred`) read deferred values with."""


def _copy_elements(ds: Dataset) -> dict[BaseTag, DataElement | RawDataElement]:
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    for tag, elem in list(ds.items()):  # raw elements as stored (deferred ones stay deferred)
        if isinstance(elem, RawDataElement):
            elements[tag] = elem
        elif elem.VR == "SQ":
            elements[tag] = DataElement(  # the same lengths (defined or not) as the original
                elem.tag,
                "SQ",
                DicomSequence([copy_dataset(item) for item in elem.value or []]),
                is_undefined_length=elem.is_undefined_length,
            )
        else:
            elements[tag] = _shallow_copy(elem)
    return elements


def _shallow_copy(elem: DataElement) -> DataElement:
    """A new element object sharing ``elem``'s value (what :func:`copy.copy` does, faster)."""
    new = object.__new__(type(elem))
    new.__dict__.update(elem.__dict__)
    return new


def copy_encoding(src: Dataset, dst: Dataset) -> None:
    """Give ``dst`` the original encoding and character set context of ``src``.

    pydicom re-parses every raw element of a dataset whose original encoding or character
    set differs from the one it is written with; nested items built bottom-up would otherwise
    see the default character set instead of their parent's and be re-parsed on write.
    """
    dst._parent_encoding = src._parent_encoding
    implicit, little = src.original_encoding
    if implicit is not None or little is not None:
        dst.set_original_encoding(implicit, little, src._character_set)


def _floats(ds: Dataset, keyword: str, n: int, what: str) -> FloatArray:
    fast = peek_floats(ds, keyword)
    if fast is not None and len(fast) == n:
        return np.asarray(fast, dtype=np.float64)
    value = peek(ds, keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: {keyword} missing or not numeric ({value!r})") from exc
    if arr.shape != (n,):
        raise InputError(f"{what}: {keyword} must have {n} values, got {arr.tolist()}")
    return arr


def rescale_of(ds: Dataset) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of an image (defaults 1, 0; a zero slope reads as 1),
    read without converting the stored elements."""
    slope, intercept = peek_floats(ds, "RescaleSlope"), peek_floats(ds, "RescaleIntercept")
    if slope is not None and intercept is not None and len(slope) == len(intercept) == 1:
        return slope[0] or 1.0, intercept[0]
    return float(peek(ds, "RescaleSlope", 1) or 1), float(peek(ds, "RescaleIntercept", 0) or 0)


@dataclass(frozen=True, eq=False)
class CtSeries:
    """One axial CT series in index order.

    Attributes
    ----------
    grid : Grid
        Index-to-patient geometry; slice k of the grid is ``datasets[k]``.
    datasets : tuple of pydicom Dataset
        Slices sorted by position along the slice normal (full reads, pixel data included).
    paths : tuple of Path
        Source file of each slice, same order.
    series_instance_uid, frame_of_reference_uid : str
        Header values shared by every slice.
    """

    grid: Grid
    datasets: tuple[Dataset, ...]
    paths: tuple[Path, ...]
    series_instance_uid: str
    frame_of_reference_uid: str

    def stored_slice(self, k: int, *, writable: bool = False) -> npt.NDArray[np.integer]:
        """Stored pixel values of slice k, shape (ni, nj), dtype from PixelRepresentation.

        Uncompressed little-endian data whose values need no sign extension are viewed
        straight from the PixelData bytes (read-only) or read from the file (deferred pixel
        data, see :func:`rtdeface.discover.read_dicom`: read for each call, never kept);
        everything else goes through pydicom. With ``writable``, the array is the caller's
        own (read into a new buffer, or copied).

        Raises
        ------
        InputError
            The pixel data cannot be decoded, or their file changed since it was read.
        """
        ds = self.datasets[k]  # header values read without converting the stored elements
        arr = native_pixels(ds, self.paths[k], writable=writable)
        if arr is None:
            arr = decode_pixels(ds, self.paths[k])
            return arr.copy() if writable else arr
        first: npt.NDArray[np.integer] = arr[0]  # the first frame (a CT slice has one)
        return first

    def rescale(self, k: int) -> tuple[float, float]:
        """(RescaleSlope, RescaleIntercept) of slice k (defaults 1, 0)."""
        return rescale_of(self.datasets[k])

    def hu_slice(self, k: int) -> npt.NDArray[np.float32]:
        """Slice k in Hounsfield units, float32, shape (ni, nj)."""
        slope, intercept = self.rescale(k)
        return (self.stored_slice(k).astype(np.float32) * np.float32(slope)) + np.float32(intercept)

    def hu_volume(self) -> npt.NDArray[np.float32]:
        """The whole series in Hounsfield units, float32, shape (nk, ni, nj)."""
        return self.hu_slab(0, self.grid.shape[0])

    def hu_slab(self, k0: int, k1: int) -> npt.NDArray[np.float32]:
        """Slices ``k0 .. k1 - 1`` in Hounsfield units, float32, shape (k1 - k0, ni, nj):
        the values of :meth:`hu_slice`, computed in place."""
        out = np.empty((k1 - k0, *self.grid.shape[1:]), dtype=np.float32)
        for n, k in enumerate(range(k0, k1)):
            slope, intercept = self.rescale(k)
            np.multiply(self.stored_slice(k), np.float32(slope), out=out[n], casting="unsafe")
            out[n] += np.float32(intercept)
        return out


@dataclass(frozen=True, eq=False)
class Contour:
    """One contour of an ROI.

    Attributes
    ----------
    geometric_type : str
        ``CLOSED_PLANAR``, ``OPEN_PLANAR``, ``OPEN_NONPLANAR`` or ``POINT``.
    points_lps_mm : numpy.ndarray, shape (n, 3)
        Contour points (x, y, z), mm, LPS.
    item_index : int
        Position of the item in the ROI's ContourSequence (to edit the dataset).
    """

    geometric_type: str
    points_lps_mm: FloatArray
    item_index: int

    @property
    def z_mm(self) -> float:
        """Plane z (mm) of a planar contour (mean of its points' z)."""
        return float(np.mean(self.points_lps_mm[:, 2]))


@dataclass(frozen=True, eq=False)
class Roi:
    """One ROI, matched through ROINumber across the three structure-set sequences.

    Attributes
    ----------
    number : int
        ROINumber.
    name : str
        ROIName.
    interpreted_type : str
        RTROIInterpretedType ("" when not given).
    contours : tuple of Contour
        All contours (empty if the ROI has no ContourSequence).
    """

    number: int
    name: str
    interpreted_type: str
    contours: tuple[Contour, ...]


@dataclass(frozen=True, eq=False)
class StructureSet:
    """An RTSTRUCT and its ROIs in patient coordinates.

    Attributes
    ----------
    dataset : pydicom Dataset
        The structure set as read.
    path : Path
        Source file.
    rois : tuple of Roi
        In StructureSetROISequence order.
    raw_contours : RawContours or None
        The ROIContourSequence bytes and layout (None when the structure set has none).
    """

    dataset: Dataset
    path: Path
    rois: tuple[Roi, ...]
    raw_contours: RawContours | None = None

    def roi(self, number: int) -> Roi:
        """The ROI with this ROINumber."""
        for r in self.rois:
            if r.number == number:
                return r
        raise KeyError(number)


@dataclass(frozen=True, eq=False)
class DoseGrid:
    """One RTDOSE grid.

    Attributes
    ----------
    grid : Grid
        Geometry; frame k of the grid is frame k of the file (any frame order).
    dataset : pydicom Dataset
        As read (pixel data included).
    path : Path
        Source file.
    """

    grid: Grid
    dataset: Dataset
    path: Path

    def stored(self) -> npt.NDArray[np.integer]:
        """Stored dose values, shape (nk, ni, nj), dtype as the header declares (uncompressed
        little-endian data that use every allocated bit are viewed read-only from the
        PixelData bytes; pydicom decodes the rest, masking unused high bits)."""
        ds = self.dataset
        arr = None
        if peek_uint(ds, "BitsStored") in (None, peek_uint(ds, "BitsAllocated")):
            arr = native_pixels(ds, self.path)
        if arr is None:
            arr = decode_pixels(ds, self.path)
        return arr.reshape(self.grid.shape)

    @property
    def scaling(self) -> float:
        """DoseGridScaling (Gy per stored unit)."""
        return float(self.dataset.get("DoseGridScaling", 1.0))


@dataclass(frozen=True, eq=False)
class Case:
    """A loaded case. Valid once constructed: every object shares the CT's frame of reference.

    Attributes
    ----------
    source : Path
        The input folder.
    ct : CtSeries
    structure_set : StructureSet or None
    doses : tuple of DoseGrid
    plans : tuple of (Path, Dataset)
    ignored : tuple of Path
        DICOM files found beside the case that rtdeface does not handle (not written).
    """

    source: Path
    ct: CtSeries
    structure_set: StructureSet | None
    doses: tuple[DoseGrid, ...]
    plans: tuple[tuple[Path, Dataset], ...]
    ignored: tuple[Path, ...] = ()


def native_pixels(
    ds: Dataset, path: Path, *, writable: bool = False
) -> npt.NDArray[np.integer] | None:
    """The stored values of uncompressed little-endian pixel data that need no conversion
    (8, 16 or 32 bits allocated, one sample, no sign extension), shape (frames, rows,
    columns); None for anything else (decode it with :func:`decode_pixels`).

    The array is a read-only view of the PixelData bytes; deferred pixel data (see
    :func:`rtdeface.discover.read_dicom`) are read from ``path`` into a new buffer. With
    ``writable`` the array is the caller's own (read into a new buffer, or copied).

    Raises
    ------
    InputError
        The file of deferred pixel data changed since it was read.
    """
    layout = native_pixel_format(ds)
    if layout is None or PIXEL_DATA_TAG not in ds:
        return None
    bits, signed = layout
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    rows, cols = peek_uint(ds, "Rows") or 0, peek_uint(ds, "Columns") or 0
    frames_text = peek_str(ds, "NumberOfFrames") or "1"
    try:
        frames = int(frames_text)
    except ValueError:
        return None
    count = rows * cols * max(frames, 1)
    if count == 0:
        return None
    deferred = deferred_pixel_data(ds)
    if deferred is not None:  # read now, not kept: the input dataset stays as it is
        if deferred.length < count * dtype.itemsize:
            return None
        buf = read_deferred(path, deferred, ds.__dict__.get(SOURCE_STAMP), writable=writable)
        arr = np.frombuffer(buf, dtype=dtype, count=count)
    else:
        elem = ds.get_item(PIXEL_DATA_TAG)
        value = elem.value if isinstance(elem, RawDataElement) else ds.PixelData
        if not isinstance(value, bytes) or len(value) < count * dtype.itemsize:
            return None
        arr = np.frombuffer(value, dtype=dtype, count=count)
        if writable:
            arr = arr.copy()
    return arr.reshape(max(frames, 1), rows, cols)


def decode_pixels(ds: Dataset, path: Path) -> npt.NDArray[np.integer]:
    """``ds.pixel_array`` with decoding failures turned into an :class:`InputError`.

    Raises
    ------
    InputError
        No decoder for the transfer syntax is installed, or the pixel data are corrupt.
    """
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises several types for missing plugins / bad data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", str(ts))
        detail = " ".join(str(exc).split())[:200]
        raise InputError(
            f"{path}: cannot decode pixel data ({name}: {detail}); for JPEG/JPEG-LS/JPEG 2000 "
            'install the decoders (pip install "rtdeface[jpeg]"), else re-export uncompressed'
        ) from exc


def check_pixel_module(ds: Dataset, path: Path, frames: int = 1) -> tuple[int, int]:
    """Check the attributes rtdeface reads and writes pixels with; return (rows, columns).

    Raises
    ------
    InputError
        Missing Rows/Columns/BitsAllocated/PixelData, a big-endian transfer syntax (retired),
        or uncompressed pixel data shorter than Rows x Columns x frames x BitsAllocated.
    """
    try:
        rows, cols, bits = (peek_uint(ds, k) for k in ("Rows", "Columns", "BitsAllocated"))
    except (AttributeError, TypeError, ValueError):
        rows = cols = bits = None
    if rows is None or cols is None or bits is None:
        raise InputError(
            f"{path}: Rows, Columns or BitsAllocated missing or invalid; the file is not a "
            "complete image, re-export it"
        )
    if "PixelData" not in ds:
        raise InputError(f"{path}: no PixelData; the file is not a complete image, re-export it")
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None and not ts.is_little_endian:
        raise InputError(
            f"{path}: big-endian transfer syntax {ts} (retired) is not supported; convert the "
            "file to Explicit VR Little Endian first (e.g. dcmconv +te)"
        )
    if ts is not None and not ts.is_compressed:
        needed = rows * cols * frames * bits // 8
        deferred = deferred_pixel_data(ds)  # its length was checked against the file
        have = (
            deferred.length if deferred is not None else len(ds.get_item("PixelData").value or b"")
        )
        if have < needed:
            raise InputError(
                f"{path}: PixelData holds {have} bytes but Rows x Columns x frames x "
                f"BitsAllocated needs {needed}; the file is truncated or NumberOfFrames is wrong"
            )
    return rows, cols


def load_ct(datasets: Sequence[Dataset], paths: Sequence[Path]) -> CtSeries:
    """Sort CT slices along their normal and build the grid, checking the series is regular.

    Raises
    ------
    GeometryError
        Mixed orientations or matrix sizes, gantry tilt, oblique slices, duplicate or missing
        slices, irregular spacing.
    """
    what = f"CT series {peek(datasets[0], 'SeriesInstanceUID', '?')} ({paths[0].parent})"
    iop0 = _floats(datasets[0], "ImageOrientationPatient", 6, f"{paths[0]}")
    ps0 = _floats(datasets[0], "PixelSpacing", 2, f"{paths[0]}")
    rows, cols = check_pixel_module(datasets[0], paths[0])
    for ds, path in zip(datasets, paths):
        iop = _floats(ds, "ImageOrientationPatient", 6, f"{path}")
        if not np.allclose(iop, iop0, atol=ORIENTATION_ATOL):
            raise GeometryError(
                f"{path}: ImageOrientationPatient {iop.tolist()} differs from {iop0.tolist()} in "
                f"the same {what}; the series mixes orientations, split it"
            )
        if check_pixel_module(ds, path) != (rows, cols):
            raise GeometryError(f"{path}: matrix {ds.Rows}x{ds.Columns} differs in {what}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, f"{path}"), ps0, atol=1e-4):
            raise GeometryError(f"{path}: PixelSpacing differs within {what}")
        fast_tilt = peek_floats(ds, "GantryDetectorTilt")
        tilt = (
            fast_tilt[0]
            if fast_tilt is not None and len(fast_tilt) == 1
            else float(peek(ds, "GantryDetectorTilt", 0) or 0)
        )
        if abs(tilt) > 1e-3:
            raise GeometryError(
                f"{path}: GantryDetectorTilt {tilt} deg; tilted-gantry CT is not supported, "
                "resample it to an untilted axial series first"
            )
    normal = slice_normal(iop0)
    ipp = np.stack(
        [_floats(ds, "ImagePositionPatient", 3, f"{p}") for ds, p in zip(datasets, paths)]
    )
    along = ipp @ normal
    order = np.argsort(along, kind="stable")
    along_sorted = along[order]
    ipp_sorted = ipp[order]
    step = check_regular_positions(along_sorted, what, "re-export the complete series")
    in_plane = ipp_sorted - np.outer(along_sorted - along_sorted[0], normal) - ipp_sorted[0]
    worst = float(np.max(np.linalg.norm(in_plane, axis=1)))
    if worst > IN_PLANE_OFFSET_ATOL_MM:
        raise GeometryError(
            f"{what}: slice origins shift {worst:.2f} mm in-plane along the series (gantry tilt "
            "or sheared stack); unsupported, resample to an untilted axial series first"
        )
    try:  # the affine builder and Grid check orientation; their messages lack the series
        affine = affine_from_attributes(ipp_sorted[0], iop0, ps0, step)
        grid = Grid(affine, (len(datasets), rows, cols))
    except GeometryError as exc:
        raise GeometryError(f"{what}: {exc}") from exc
    for_uids = {peek_str(ds, "FrameOfReferenceUID") for ds in datasets}
    if len(for_uids) != 1 or "" in for_uids:
        raise DicomReferenceError(
            f"{what}: slices carry FrameOfReferenceUID {sorted(for_uids)}; one non-empty frame "
            "of reference is required"
        )
    return CtSeries(
        grid=grid,
        datasets=tuple(datasets[int(i)] for i in order),
        paths=tuple(paths[int(i)] for i in order),
        series_instance_uid=str(datasets[0].SeriesInstanceUID),
        frame_of_reference_uid=for_uids.pop(),
    )


CONTOUR_DATA_TAG = 0x30060050
"""(3006,0050) ContourData."""
ROI_CONTOUR_SEQUENCE_TAG = 0x30060039
"""(3006,0039) ROIContourSequence."""
CONTOUR_SEQUENCE_TAG = 0x30060040
"""(3006,0040) ContourSequence."""
CONTOUR_GEOMETRIC_TYPE_TAG = 0x30060042
"""(3006,0042) ContourGeometricType."""
REFERENCED_ROI_NUMBER_TAG = 0x30060084
"""(3006,0084) ReferencedROINumber."""


def contour_data_array(item: Dataset) -> FloatArray:
    """ContourData of a contour item as a flat float64 array (mm), without DS objects.

    Parses the raw bytes when pydicom has not converted the element yet (much faster than
    building one DSfloat per coordinate); unconverted elements are written back unchanged.
    """
    if CONTOUR_DATA_TAG not in item:
        return np.zeros(0, dtype=np.float64)
    raw = item.get_item(CONTOUR_DATA_TAG)
    value = raw.value
    if isinstance(value, bytes):
        return ds_array(value)
    if value is None:
        return np.zeros(0, dtype=np.float64)
    if isinstance(value, (str, float, int)):
        return np.asarray([float(value)], dtype=np.float64)
    return np.asarray([float(v) for v in value], dtype=np.float64)


def ds_array(value: bytes) -> FloatArray:
    """A raw multi-valued DS value (``b"1.5\\-2\\3 "``) as a flat float64 array."""
    text = value.strip(b" \x00")
    if not text:
        return np.zeros(0, dtype=np.float64)
    return np.asarray(text.split(b"\\"), dtype=np.float64)


CONTOUR_TYPES = ("CLOSED_PLANAR", "OPEN_PLANAR", "OPEN_NONPLANAR", "POINT")
"""ContourGeometricType values handled (CLOSEDPLANAR_XOR is read as CLOSED_PLANAR: both are
composed even-odd here)."""


def _roi_number(item: Dataset, keyword: str, path: Path, where: str) -> int:
    """An ROI number attribute as int, or an InputError naming the item."""
    return _as_roi_number(item.get(keyword), keyword, path, where)


def _as_roi_number(value: object, keyword: str, path: Path, where: str) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        raise InputError(
            f"{path}: {where} has no valid {keyword} ({value!r}); the structure set is corrupt, "
            "re-export it"
        ) from None


@dataclass(frozen=True, eq=False)
class RawContours:
    """The ROIContourSequence of a structure set as raw bytes, with its item layout.

    Kept so that :mod:`rtdeface.structures` copies the items of unchanged ROIs and contours
    byte for byte and rebuilds only what the cut changes (see :mod:`rtdeface.rawseq`).

    Attributes
    ----------
    value : bytes
        The sequence value (its items).
    codec : rawseq.Codec
        Encoding of ``value``.
    roi_items : tuple of rawseq.RawItem
        ROIContourSequence items, stored order.
    numbers : tuple of int
        ReferencedROINumber of each item.
    contour_items : tuple of tuple of rawseq.RawItem
        ContourSequence items of each ROI item (empty when it has none).
    """

    value: bytes
    codec: rawseq.Codec
    roi_items: tuple[rawseq.RawItem, ...]
    numbers: tuple[int, ...]
    contour_items: tuple[tuple[rawseq.RawItem, ...], ...]

    def index_of(self, number: int) -> int:
        """Position of the ROI's item, or -1."""
        try:
            return self.numbers.index(number)
        except ValueError:
            return -1


def _dataset_codec(ds: Dataset) -> rawseq.Codec:
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None:
            implicit, little = bool(ts.is_implicit_VR), bool(ts.is_little_endian)
        else:
            implicit, little = False, True
    return rawseq.Codec(bool(implicit), bool(little))


def raw_sequence_value(ds: Dataset, tag: int) -> tuple[bytes, rawseq.Codec]:
    """The value bytes of a sequence element of ``ds`` and their encoding.

    A raw (unparsed) element gives its bytes as read; a parsed one is encoded here (in the
    dataset's original encoding), so callers have one representation either way.
    """
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        if elem.value is None:
            return b"", rawseq.Codec(bool(elem.is_implicit_VR), bool(elem.is_little_endian))
        if elem.VR not in (None, "SQ", "UN"):
            raise InputError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) is {elem.VR}, not SQ")
        return bytes(elem.value), rawseq.Codec(
            bool(elem.is_implicit_VR), bool(elem.is_little_endian)
        )
    codec = _dataset_codec(ds)
    fp = DicomBytesIO()
    fp.is_little_endian = codec.little
    fp.is_implicit_VR = codec.implicit
    write_sequence(fp, elem, ds.get("SpecificCharacterSet", default_encoding))
    return fp.getvalue(), codec


def parse_structure_set(ds: Dataset, path: Path) -> StructureSet:
    """Read ROIs and contours (patient mm) of an RTSTRUCT, matching sequences by ROINumber.

    The ROIContourSequence is read from its raw bytes (:func:`raw_sequence_value`); the returned
    dataset is ``ds`` itself, unparsed.

    Raises
    ------
    InputError
        Malformed ContourData (not a multiple of 3, non-numeric), duplicate ROINumbers or
        corrupt sequence bytes.
    GeometryError
        A planar contour whose points do not share one z (non-axial contour planes).
    """
    small = Dataset()  # the small sequences, parsed on a shallow copy (ds stays unparsed)
    for keyword in ("RTROIObservationsSequence", "StructureSetROISequence"):
        if keyword in ds:
            small[keyword] = copy_dataset_element(ds, keyword)
    types: dict[int, str] = {}
    for n, obs in enumerate(small.get("RTROIObservationsSequence", []) or []):
        if obs.get("ReferencedROINumber") not in (None, ""):
            number = _roi_number(obs, "ReferencedROINumber", path, f"RTROIObservations item {n}")
            types[number] = str(obs.get("RTROIInterpretedType", "") or "")
    ssrois = list(small.get("StructureSetROISequence", []) or [])
    ssroi_numbers = [
        _roi_number(ssr, "ROINumber", path, f"StructureSetROISequence item {n}")
        for n, ssr in enumerate(ssrois)
    ]
    raw, contours_by_roi = _read_roi_contours(ds, path, set(ssroi_numbers))
    rois: list[Roi] = []
    seen: set[int] = set()
    for ssr, number in zip(ssrois, ssroi_numbers):
        if number in seen:
            raise InputError(
                f"{path}: ROINumber {number} appears twice; the structure set is corrupt"
            )
        seen.add(number)
        rois.append(
            Roi(
                number=number,
                name=str(ssr.get("ROIName", "") or ""),
                interpreted_type=types.get(number, ""),
                contours=tuple(contours_by_roi.get(number, [])),
            )
        )
    return StructureSet(dataset=ds, path=path, rois=tuple(rois), raw_contours=raw)


def copy_dataset_element(ds: Dataset, keyword: str) -> DataElement | RawDataElement:
    """The element of ``ds`` for ``keyword``, copied so that parsing it leaves ``ds`` raw."""
    elem = ds.get_item(keyword)
    if isinstance(elem, RawDataElement):
        return elem
    return copy.deepcopy(elem)


def _read_roi_contours(
    ds: Dataset, path: Path, ssroi_numbers: set[int]
) -> tuple[RawContours | None, dict[int, list[Contour]]]:
    """Parse the ROIContourSequence from its raw bytes: contours by ROI number."""
    contours_by_roi: dict[int, list[Contour]] = {}
    if ROI_CONTOUR_SEQUENCE_TAG not in ds:
        return None, contours_by_roi
    value, codec = raw_sequence_value(ds, ROI_CONTOUR_SEQUENCE_TAG)
    roi_items: list[rawseq.RawItem] = []
    numbers: list[int] = []
    all_contour_items: list[tuple[rawseq.RawItem, ...]] = []
    try:
        for n, rc in enumerate(rawseq.items(value, codec)):
            number_text: object = None
            contour_seq: rawseq.RawElement | None = None
            for e in rawseq.item_elements(value, codec, rc):
                if e.tag == REFERENCED_ROI_NUMBER_TAG:
                    number_text = rawseq.text(value, e) or None
                elif e.tag == CONTOUR_SEQUENCE_TAG:
                    contour_seq = e
            where = f"ROIContourSequence item {n}"
            number = _as_roi_number(number_text, "ReferencedROINumber", path, where)
            if number in contours_by_roi:
                raise InputError(
                    f"{path}: ROI {number} has two ROIContourSequence items; the structure set "
                    "is corrupt, re-export it"
                )
            if number not in ssroi_numbers:
                raise InputError(
                    f"{path}: ROIContourSequence item {n} references ROI {number}, which is not "
                    "in StructureSetROISequence; the structure set is corrupt, re-export it"
                )
            citems: tuple[rawseq.RawItem, ...] = ()
            if contour_seq is not None:
                citems = tuple(
                    rawseq.items(value, codec, contour_seq.value_start, contour_seq.value_end)
                )
            contours_by_roi[number] = [
                c
                for idx, item in enumerate(citems)
                if (c := _read_contour(value, codec, item, idx, number, path)) is not None
            ]
            roi_items.append(rc)
            numbers.append(number)
            all_contour_items.append(citems)
    except rawseq.RawSequenceError as exc:
        raise InputError(
            f"{path}: ROIContourSequence is corrupt ({exc}); re-export the structure set"
        ) from exc
    raw = RawContours(value, codec, tuple(roi_items), tuple(numbers), tuple(all_contour_items))
    return raw, contours_by_roi


def _read_contour(
    value: bytes, codec: rawseq.Codec, item: rawseq.RawItem, idx: int, number: int, path: Path
) -> Contour | None:
    """One contour item (None when it has no points)."""
    gtype = "CLOSED_PLANAR"
    data: tuple[int, int] | None = None
    for tag, _vr, start, end in rawseq.item_tags(value, codec, item):
        if tag == CONTOUR_GEOMETRIC_TYPE_TAG:
            gtype = value[start:end].decode("ascii", "replace").strip(" \x00") or "CLOSED_PLANAR"
        elif tag == CONTOUR_DATA_TAG:
            data = (start, end)
    if gtype == "CLOSEDPLANAR_XOR":  # already an even-odd composition
        gtype = "CLOSED_PLANAR"
    if gtype not in CONTOUR_TYPES:
        raise InputError(
            f"{path}: ROI {number} contour {idx}: unknown ContourGeometricType "
            f"{gtype!r}; expected one of {', '.join(CONTOUR_TYPES)}"
        )
    if data is None:
        return None
    try:
        pts = ds_array(value[data[0] : data[1]])
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{path}: ROI {number} contour {idx}: ContourData is not numeric; the "
            "structure set is corrupt, re-export it"
        ) from exc
    if pts.size == 0:
        return None
    if pts.size % 3:
        raise InputError(
            f"{path}: ROI {number} contour {idx}: ContourData has {pts.size} values, "
            "not a multiple of 3; the structure set is corrupt, re-export it"
        )
    pts = pts.reshape(-1, 3)
    if gtype in ("CLOSED_PLANAR", "OPEN_PLANAR") and np.ptp(pts[:, 2]) > PLANE_MATCH_ATOL_MM:
        raise GeometryError(
            f"{path}: ROI {number} contour {idx} is not on an axial plane (z spans "
            f"{np.ptp(pts[:, 2]):.2f} mm); only axial contours are supported"
        )
    return Contour(gtype, pts, idx)


def load_dose(ds: Dataset, path: Path) -> DoseGrid:
    """Build the grid of an RTDOSE from IPP/IOP/PixelSpacing and GridFrameOffsetVector.

    Offsets are relative to IPP along the slice normal when the first is 0, otherwise absolute
    z positions (allowed only for IOP [1,0,0,0,1,0]); either order is accepted.

    Raises
    ------
    GeometryError
        Irregular frame spacing, absolute offsets with another orientation, or offsets that
        contradict ImagePositionPatient.
    """
    what = str(path)
    ipp = _floats(ds, "ImagePositionPatient", 3, what)
    iop = _floats(ds, "ImageOrientationPatient", 6, what)
    ps = _floats(ds, "PixelSpacing", 2, what)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        float(ds.get("DoseGridScaling", 1.0))
    except (TypeError, ValueError):
        raise InputError(
            f"{path}: NumberOfFrames or DoseGridScaling is not a number; re-export the dose"
        ) from None
    check_pixel_module(ds, path, frames)
    gfov = ds.get("GridFrameOffsetVector")
    if frames > 1 and gfov is None:
        raise InputError(f"{path}: multi-frame RTDOSE without GridFrameOffsetVector; re-export it")
    offsets = np.asarray([float(v) for v in (gfov or [0.0])], dtype=np.float64)[:frames]
    if offsets.size != frames:
        raise InputError(
            f"{path}: GridFrameOffsetVector has {offsets.size} values for {frames} frames"
        )
    normal = slice_normal(iop)
    if not np.isclose(offsets[0], 0.0, atol=PLANE_MATCH_ATOL_MM):
        # absolute: the offsets are the z coordinates of the frames
        if not np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=ORIENTATION_ATOL):
            raise GeometryError(
                f"{path}: absolute GridFrameOffsetVector (first value {offsets[0]}) is only "
                f"defined for ImageOrientationPatient [1,0,0,0,1,0], got {iop.tolist()}"
            )
        if not np.isclose(offsets[0], ipp[2], atol=PLANE_MATCH_ATOL_MM):
            raise GeometryError(
                f"{path}: GridFrameOffsetVector starts at {offsets[0]} but "
                f"ImagePositionPatient z is {ipp[2]}; the dose geometry is inconsistent, "
                "re-export it"
            )
        offsets = offsets - offsets[0]
    step = check_regular_positions(
        offsets, f"RTDOSE {path}", "re-export the dose on a regular grid"
    )
    try:  # name the file in the geometry checks' messages
        affine = affine_from_attributes(ipp, iop, ps, step)
        grid = Grid(affine, (frames, int(ds.Rows), int(ds.Columns)))
    except GeometryError as exc:
        raise GeometryError(f"{path}: {exc}") from exc
    _ = normal
    return DoseGrid(grid=grid, dataset=ds, path=path)


def _rtstruct_for_uid(ds: Dataset) -> str:
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
        uid = str(fr.get("FrameOfReferenceUID", "") or "")
        if uid:
            return uid
    return ""


def load_case(source: Path) -> Case:
    """Read every file below ``source`` once and assemble one validated case.

    Raises
    ------
    InputError, GeometryError, DicomReferenceError
        With a one-line message naming the file or series and the remedy.
    """
    source = Path(source)
    datasets: dict[Path, Dataset] = {}
    records: list[FileRecord] = []
    for path in iter_files(source):
        ds = read_dicom(path, header_only=False)
        if ds is None:
            log.debug("skipping non-DICOM file %s", path)
            continue
        datasets[path] = ds
        records.append(classify(ds, path))
    return load_case_files(assemble_single_case(records, source), source, datasets)


def load_case_files(
    files: CaseFiles,
    source: Path | None = None,
    datasets: Mapping[Path, Dataset] | None = None,
) -> Case:
    """Load one case from a known file list (e.g. one case of a tree, see
    :func:`rtdeface.discover.assemble_cases`).

    Parameters
    ----------
    files : CaseFiles
        The files of the case by role.
    source : Path, optional
        The case folder, for messages and :attr:`Case.source` [default: the deepest folder
        holding every file].
    datasets : mapping of Path to Dataset, optional
        Full reads of the files already in memory; files missing from it are read here.

    Raises
    ------
    InputError, GeometryError, DicomReferenceError
        With a one-line message naming the file or series and the remedy.
    """
    if not files.ct:
        raise InputError(f"{source}: no CT image series in the case; nothing to deface")
    rs = (files.rtstruct,) if files.rtstruct is not None else ()
    wanted = [r.path for r in (*files.ct, *rs, *files.doses, *files.plans)]
    if source is None:
        source = Path(os.path.commonpath([str(p.parent) for p in wanted]))
    loaded: dict[Path, Dataset] = dict(datasets or {})
    for path in wanted:
        if path not in loaded:
            ds = read_dicom(path, header_only=False)
            if ds is None:
                raise InputError(f"{path}: no longer a DICOM object; rerun discovery")
            loaded[path] = ds
    datasets = loaded
    ct = load_ct([datasets[r.path] for r in files.ct], [r.path for r in files.ct])
    structure_set = None
    if files.rtstruct is not None:
        ss_ds = datasets[files.rtstruct.path]
        ss_for = _rtstruct_for_uid(ss_ds)
        if ss_for and ss_for != ct.frame_of_reference_uid:
            raise DicomReferenceError(
                f"{files.rtstruct.path}: structure set frame of reference {ss_for} does not match "
                f"the CT's {ct.frame_of_reference_uid}; export the RTSTRUCT drawn on this CT"
            )
        structure_set = parse_structure_set(ss_ds, files.rtstruct.path)
    doses = []
    for r in files.doses:
        if r.frame_of_reference_uid != ct.frame_of_reference_uid:
            raise DicomReferenceError(
                f"{r.path}: RTDOSE frame of reference {r.frame_of_reference_uid or '(none)'} does "
                f"not match the CT's {ct.frame_of_reference_uid}; remove it or export the dose "
                "computed on this CT"
            )
        doses.append(load_dose(datasets[r.path], r.path))
    plans = []
    for r in files.plans:
        if r.frame_of_reference_uid and r.frame_of_reference_uid != ct.frame_of_reference_uid:
            raise DicomReferenceError(
                f"{r.path}: RTPLAN frame of reference {r.frame_of_reference_uid} does not match "
                f"the CT's {ct.frame_of_reference_uid}; remove it from the case folder"
            )
        plans.append((r.path, datasets[r.path]))
    for r in files.ignored:
        log.warning(
            "%s: %s object (SOP class %s) is not handled and will not be written",
            r.path,
            r.modality or "unknown",
            r.sop_class_uid,
        )
    return Case(
        source=source,
        ct=ct,
        structure_set=structure_set,
        doses=tuple(doses),
        plans=tuple(plans),
        ignored=tuple(r.path for r in files.ignored),
    )
