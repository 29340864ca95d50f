"""Deface every non-preserved ROI with shapely on its own planes; keep the RTSTRUCT valid.

For each ROI not in P and each of its contour planes that meets the cut C(z), the plane's
closed contours (even-odd) become ``section - C(z)``, written back as one contour per exterior
ring and one per hole (even-odd again). Planes that do not meet the cut keep their items
untouched. OPEN_PLANAR contours are clipped as lines, POINT contours inside the cut dropped,
OPEN_NONPLANAR contours split around vertices in the cut. ROIs left without any contour are
removed from StructureSetROISequence, ROIContourSequence and RTROIObservationsSequence.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from shapely.geometry import LineString, Point, Polygon
from shapely.geometry.base import BaseGeometry

from rtdeface import rawseq
from rtdeface.landmarks import closed_planes
from rtdeface.load import (
    CONTOUR_DATA_TAG,
    CONTOUR_GEOMETRIC_TYPE_TAG,
    CONTOUR_SEQUENCE_TAG,
    ROI_CONTOUR_SEQUENCE_TAG,
    Contour,
    RawContours,
    Roi,
    StructureSet,
    copy_dataset,
)
from rtdeface.region import DefacingRegion, even_odd, polygon_from_points

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

COORD_DECIMALS = 6
"""Decimals (mm) written for new contour coordinates (DS values are at most 16 characters)."""

CONTOUR_IMAGE_SEQUENCE_TAG = 0x30060016
"""(3006,0016) ContourImageSequence."""
NUMBER_OF_CONTOUR_POINTS_TAG = 0x30060046
"""(3006,0046) NumberOfContourPoints."""
CONTOUR_NUMBER_TAG = 0x30060048
"""(3006,0048) ContourNumber."""
ATTACHED_CONTOURS_TAG = 0x30060049
"""(3006,0049) AttachedContours."""

MIN_RING_AREA_MM2 = 1e-6
"""Rings smaller than this (numerical slivers of the clipping) are not written."""


@dataclass(frozen=True)
class RoiChange:
    """What happened to one ROI.

    Attributes
    ----------
    number, name, interpreted_type : as in the structure set
    preserved : bool
        In P (never modified).
    volume_before_ml, volume_after_ml : float
        Closed-contour volume (even-odd area x plane spacing).
    planes_changed : int
        Contour planes rewritten.
    contours_before, contours_after : int
        Contour items.
    removed : bool
        The ROI had contours and has none left; it is removed from the structure set.
    """

    number: int
    name: str
    interpreted_type: str
    preserved: bool
    volume_before_ml: float
    volume_after_ml: float
    planes_changed: int
    contours_before: int
    contours_after: int
    removed: bool


@dataclass(frozen=True)
class StructuresResult:
    """The defaced structure set and what changed.

    Attributes
    ----------
    dataset : pydicom Dataset
        A new RTSTRUCT dataset (the input dataset is not modified); UIDs still original.
    changes : tuple of RoiChange
        One per input ROI, in StructureSetROISequence order.
    """

    dataset: Dataset
    changes: tuple[RoiChange, ...]

    @property
    def removed_rois(self) -> tuple[str, ...]:
        """Names of ROIs removed because no contour was left."""
        return tuple(c.name for c in self.changes if c.removed)


def _ring_points(coords: FloatArray, z_mm: float, y_mid_mm: float) -> list[str]:
    """Contour data strings for a ring (closing vertex dropped), y snapped off the cut line."""
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    if len(xy) > 1 and np.allclose(xy[0], xy[-1]):
        xy = xy[:-1]
    return _plane_points(xy, z_mm, y_mid_mm)


def _plane_points(xy: FloatArray, z_mm: float, y_mid_mm: float) -> list[str]:
    """Contour data strings for points ``xy`` (n, 2) on the plane z, y snapped off the line.

    ``y_mid_mm`` is the plane's cut line (y_mid, or the face profile's limit in full-face
    mode). A vertex within rounding of the cut line is written rounded *up* (posterior), so
    no written point falls into the region through rounding.
    """
    pts = np.empty((len(xy), 3), dtype=np.float64)
    pts[:, 0] = xy[:, 0]
    pts[:, 1] = snap_y(xy[:, 1], y_mid_mm)
    pts[:, 2] = z_mm
    return format_ds(pts.ravel())


def format_ds(values: FloatArray) -> list[str]:
    """DS strings of ``values``: :data:`COORD_DECIMALS` decimals, trailing zeros (and a bare
    point) dropped, ``-0`` written ``0`` (at most 16 characters for |v| < 1e8)."""
    if values.size == 0:
        return []
    text = "\\".join([f"%.{COORD_DECIMALS}f"] * values.size) % tuple(values.tolist())
    # every string has a decimal point, so stripping zeros never reaches the integer part
    out = [v.rstrip("0").rstrip(".") for v in text.split("\\")]
    return [v if v != "-0" else "0" for v in out]


def snap_y(y: FloatArray, y_mid_mm: float) -> FloatArray:
    """y values within rounding of the cut line, moved to the line rounded up (posterior)."""
    scale = 10.0**COORD_DECIMALS
    near = np.abs(y - y_mid_mm) < 2.0 / scale
    return np.where(near, math.ceil(y_mid_mm * scale) / scale, y)


def _outline(points_lps_mm: FloatArray) -> BaseGeometry:
    """The drawn outline of a closed contour (a point for a one-point contour)."""
    xy = points_lps_mm[:, :2]
    if len(xy) == 1:
        return Point(xy[0])
    return LineString(np.vstack([xy, xy[:1]]))


def _polygon_rings(geom: BaseGeometry) -> list[FloatArray]:
    rings: list[FloatArray] = []
    for part in shapely.get_parts(geom):
        if not isinstance(part, Polygon) or part.is_empty or part.area < MIN_RING_AREA_MM2:
            continue
        rings.append(np.asarray(part.exterior.coords))
        for hole in part.interiors:
            if Polygon(hole).area >= MIN_RING_AREA_MM2:
                rings.append(np.asarray(hole.coords))
    return rings


@dataclass(frozen=True)
class NewContour:
    """A contour written by the cut: type and ContourData strings (x, y, z per point)."""

    geometric_type: str
    data: tuple[str, ...]

    def points_lps_mm(self) -> FloatArray:
        """The points as written, shape (n, 3), mm."""
        return np.asarray(self.data, dtype=np.float64).reshape(-1, 3)


def _clip_closed_plane(
    contours: Sequence[Contour], cut: BaseGeometry, z: float, y_mid: float
) -> list[NewContour] | None:
    """New contours for one plane, or None when no contour of the plane meets the cut.

    A plane meets the cut when any contour outline (or its even-odd area) does, so duplicate
    or cancelling contours and degenerate (point/line) contours in the cut cannot survive;
    the plane is then rewritten as ``section - cut`` and zero-area contours are dropped.
    """
    section = even_odd([polygon_from_points(c.points_lps_mm) for c in contours])
    meets = any(_outline(c.points_lps_mm).intersects(cut) for c in contours) or (
        not section.is_empty and section.intersection(cut).area > MIN_RING_AREA_MM2
    )
    if not meets:
        return None
    remaining = section.difference(cut) if not section.is_empty else Polygon()
    return [
        NewContour("CLOSED_PLANAR", tuple(_ring_points(ring, z, y_mid)))
        for ring in _polygon_rings(remaining)
    ]


def _clip_open(contour: Contour, region: DefacingRegion) -> list[NewContour] | None:
    pts = contour.points_lps_mm
    inside = region.contains_points(pts)
    if not inside.any():
        return None
    if contour.geometric_type == "POINT" or len(pts) < 2:
        return []
    if contour.geometric_type == "OPEN_PLANAR":
        cut = region.cut_at(contour.z_mm)
        if cut is None:
            return None
        parts = LineString(pts[:, :2]).difference(cut)
        out = []
        y_line = float(region.y_limit(contour.z_mm)[0])
        for part in shapely.get_parts(parts):
            if isinstance(part, LineString) and not part.is_empty and len(part.coords) >= 2:
                data = _plane_points(np.asarray(part.coords)[:, :2], contour.z_mm, y_line)
                out.append(NewContour("OPEN_PLANAR", tuple(data)))
        return out
    # OPEN_NONPLANAR: keep runs of >= 2 consecutive vertices outside the cut
    out = []
    run: list[FloatArray] = []
    for p, bad in zip(pts, inside):
        if not bad:
            run.append(p)
            continue
        if len(run) >= 2:
            out.append(NewContour("OPEN_NONPLANAR", tuple(format_ds(np.ravel(run)))))
        run = []
    if len(run) >= 2:
        out.append(NewContour("OPEN_NONPLANAR", tuple(format_ds(np.ravel(run)))))
    return out


def _unchanged(roi: Roi, preserved: bool, volume_ml: float) -> RoiChange:
    """The change record of an ROI whose contours are kept as they are."""
    n = len(roi.contours)
    return RoiChange(
        roi.number, roi.name, roi.interpreted_type, preserved, volume_ml, volume_ml, 0, n, n, False
    )


def _encode_contour(
    raw: RawContours, template: rawseq.RawItem, new: NewContour, number: int | None
) -> bytes:
    """A new ContourSequence item: the template's ContourImageSequence, type, count, data."""
    codec, value = raw.codec, raw.value
    parts: list[bytes] = []
    for e in rawseq.item_elements(value, codec, template):
        if e.tag == CONTOUR_IMAGE_SEQUENCE_TAG:
            parts.append(value[e.start : e.end])
    gtype = new.geometric_type.encode("ascii")
    parts.append(
        rawseq.encode_element(CONTOUR_GEOMETRIC_TYPE_TAG, "CS", rawseq.pad(gtype, "CS"), codec)
    )
    count = str(len(new.data) // 3).encode("ascii")
    parts.append(
        rawseq.encode_element(NUMBER_OF_CONTOUR_POINTS_TAG, "IS", rawseq.pad(count, "IS"), codec)
    )
    if number is not None:
        parts.append(_contour_number(number, codec))
    data = "\\".join(new.data).encode("ascii")
    parts.append(rawseq.encode_element(CONTOUR_DATA_TAG, "DS", rawseq.pad(data, "DS"), codec))
    return rawseq.encode_item(b"".join(parts), codec)


def _contour_number(number: int, codec: rawseq.Codec) -> bytes:
    text = rawseq.pad(str(number).encode("ascii"), "IS")
    return rawseq.encode_element(CONTOUR_NUMBER_TAG, "IS", text, codec)


def _rebuild_roi_item(
    raw: RawContours,
    index: int,
    kept: dict[int, list[NewContour] | None],
    empty: set[int],
) -> tuple[bytes, int]:
    """The ROIContourSequence item of a changed ROI, and its number of contour items.

    ``kept`` maps each ContourSequence item index to its replacement (None: keep as it is);
    indices in neither ``kept`` nor the item list's range are dropped; ``empty`` items (no
    points) are dropped. Unchanged contour items are copied byte for byte unless the ROI
    numbers its contours (ContourNumber is renumbered and AttachedContours dropped, as in
    every rewritten item).
    """
    value, codec = raw.value, raw.codec
    citems = raw.contour_items[index]
    layouts = [rawseq.item_elements(value, codec, it) for it in citems]
    numbered = any(e.tag == CONTOUR_NUMBER_TAG for els in layouts for e in els)
    out: list[bytes] = []
    n = 0
    for i, item in enumerate(citems):
        if i in empty or i not in kept:
            continue
        replacement = kept[i]
        if replacement is None:
            n += 1
            attached = any(e.tag == ATTACHED_CONTOURS_TAG for e in layouts[i])
            if numbered or attached:
                edits: dict[int, bytes | None] = {ATTACHED_CONTOURS_TAG: None}
                if numbered:
                    edits[CONTOUR_NUMBER_TAG] = _contour_number(n, codec)
                out.append(rawseq.rebuild_item(value, codec, item, edits))
            else:
                out.append(value[item.start : item.end])
            continue
        for new in replacement:
            n += 1
            out.append(_encode_contour(raw, item, new, n if numbered else None))
    seq = rawseq.encode_element(CONTOUR_SEQUENCE_TAG, "SQ", b"".join(out), codec)
    item = raw.roi_items[index]
    return rawseq.rebuild_item(value, codec, item, {CONTOUR_SEQUENCE_TAG: seq}), n


@dataclass(frozen=True)
class StructuresClip:
    """The work of :func:`clip_structures`: small and picklable (it may come from a child
    process), applied to the structure set by :func:`apply_clip`.

    Attributes
    ----------
    changes : tuple of RoiChange
        One per input ROI, in StructureSetROISequence order.
    rebuilt : dict of int to bytes
        New bytes of the ROIContourSequence items the cut changed, by item index (only
        these, not the whole value, so the answer of a child process stays small).
    removed_numbers : frozenset of int
        ROIs left without any contour.
    seconds : float
        Time the clipping took.
    """

    changes: tuple[RoiChange, ...]
    rebuilt: dict[int, bytes]
    removed_numbers: frozenset[int]
    seconds: float = 0.0

    def roi_contours(self, raw: RawContours | None) -> bytes | None:
        """The new value of the ROIContourSequence of ``raw`` (None: unchanged): rebuilt
        items in place of the old ones, items of removed ROIs left out, the rest as read."""
        if raw is None or not (self.rebuilt or self.removed_numbers):
            return None
        parts = []
        for index, (item, number) in enumerate(zip(raw.roi_items, raw.numbers, strict=True)):
            if number in self.removed_numbers:
                continue
            parts.append(self.rebuilt.get(index, raw.value[item.start : item.end]))
        return b"".join(parts)


def deface_structures(
    structure_set: StructureSet, region: DefacingRegion, default_thickness_mm: float
) -> StructuresResult:
    """Clip every non-preserved ROI of ``structure_set`` against the cut of ``region``.

    The ROIContourSequence is rebuilt from its raw bytes: items of unchanged ROIs and
    unchanged contours are copied byte for byte, so a large structure set is never parsed
    into datasets or encoded again.

    Parameters
    ----------
    structure_set : StructureSet
        The loaded structure set (its dataset is copied, never modified).
    region : DefacingRegion
        R and P; ROIs whose number is in ``region.preserved_numbers`` are not touched.
    default_thickness_mm : float
        Slab thickness for volumes of single-plane ROIs (the CT slice spacing).
    """
    return apply_clip(structure_set, clip_structures(structure_set, region, default_thickness_mm))


def apply_clip(
    structure_set: StructureSet, clip: StructuresClip, roi_contours: bytes | None = None
) -> StructuresResult:
    """The defaced structure set: a copy of ``structure_set.dataset`` with ``clip`` applied
    (``roi_contours``: ``clip.roi_contours(...)`` when the caller has it already)."""
    ds = copy_dataset(structure_set.dataset)
    raw = structure_set.raw_contours
    if roi_contours is None:
        roi_contours = clip.roi_contours(raw)
    if raw is not None and roi_contours is not None:
        ds[ROI_CONTOUR_SEQUENCE_TAG] = rawseq.raw_sequence_element(
            ROI_CONTOUR_SEQUENCE_TAG, roi_contours, raw.codec
        )
    if clip.removed_numbers:
        _remove_rois(ds, set(clip.removed_numbers))
        for number in sorted(clip.removed_numbers):
            log.warning("ROI %d has no contour left after defacing; removed", number)
    return StructuresResult(ds, clip.changes)


def clip_structures(
    structure_set: StructureSet, region: DefacingRegion, default_thickness_mm: float
) -> StructuresClip:
    """The clipping of :func:`deface_structures`, without touching any dataset."""
    t0 = time.perf_counter()
    raw = structure_set.raw_contours
    preserved = set(region.preserved_numbers)
    changes: list[RoiChange] = []
    removed_numbers: set[int] = set()
    rebuilt: dict[int, bytes] = {}  # ROIContourSequence item index -> new item bytes
    for roi in structure_set.rois:
        index = raw.index_of(roi.number) if raw is not None else -1
        n_before = len(roi.contours)
        planes = closed_planes(roi.contours, default_thickness_mm)
        vol_before = planes.volume_ml()
        is_kept = roi.number in preserved
        if is_kept or raw is None or index < 0 or not roi.contours:
            changes.append(_unchanged(roi, is_kept, vol_before))
            continue
        replacement: dict[int, list[NewContour]] = {}  # first item index of a group -> new
        dropped: set[int] = set()
        planes_changed = 0
        for plane, group in enumerate(planes.groups):
            z = float(planes.z_mm[plane])
            cut = region.cut_at(z)
            if cut is None:
                continue
            group_contours = [planes.contours[g] for g in group]
            new = _clip_closed_plane(group_contours, cut, z, float(region.y_limit(z)[0]))
            if new is None:
                continue
            planes_changed += 1
            idxs = sorted(c.item_index for c in group_contours)
            replacement[idxs[0]] = new
            dropped.update(idxs[1:])
        for c in roi.contours:
            if c.geometric_type == "CLOSED_PLANAR":
                continue
            new = _clip_open(c, region)
            if new is not None:
                planes_changed += 1
                replacement[c.item_index] = new
        if not replacement:
            changes.append(_unchanged(roi, False, vol_before))
            continue
        with_points = {c.item_index for c in roi.contours}
        n_items = len(raw.contour_items[index])
        empty = set(range(n_items)) - with_points
        kept: dict[int, list[NewContour] | None] = {
            i: replacement.get(i) for i in range(n_items) if i not in dropped
        }
        rebuilt[index], n_after = _rebuild_roi_item(raw, index, kept, empty)
        by_index = {c.item_index: c for c in roi.contours}
        after = []
        for i in sorted(kept):
            if i in empty:
                continue
            if kept[i] is None:
                after.append(by_index[i])
            else:
                after.extend(
                    Contour(nc.geometric_type, nc.points_lps_mm(), -1) for nc in kept[i] or []
                )
        # the contours as written, measured afresh; planes the cut left alone keep their area
        vol_after = closed_planes(after, default_thickness_mm, known=planes).volume_ml()
        removed = n_after == 0
        if removed:
            removed_numbers.add(roi.number)
        changes.append(
            RoiChange(
                roi.number,
                roi.name,
                roi.interpreted_type,
                False,
                vol_before,
                vol_after,
                planes_changed,
                n_before,
                n_after,
                removed,
            )
        )
    return StructuresClip(
        tuple(changes), rebuilt, frozenset(removed_numbers), time.perf_counter() - t0
    )


def _remove_rois(ds: Dataset, numbers: set[int]) -> None:
    """Remove ROIs from the two small ROI sequences (matched through ROINumber, not position).

    ROIContourSequence items are dropped when its value is rebuilt
    (:meth:`StructuresClip.roi_contours`).
    """
    ds.StructureSetROISequence = DicomSequence(
        [s for s in ds.StructureSetROISequence if int(s.ROINumber) not in numbers]
    )
    if "RTROIObservationsSequence" in ds:
        ds.RTROIObservationsSequence = DicomSequence(
            [s for s in ds.RTROIObservationsSequence if int(s.ReferencedROINumber) not in numbers]
        )


def roi_by_number(rois: Sequence[Roi]) -> dict[int, Roi]:
    """Map ROINumber -> Roi."""
    return {r.number: r for r in rois}
