"""Deface every non-preserved ROI with shapely on its own planes; keep the RTSTRUCT valid.

For each ROI not in P and each of its contour planes that meets the cut C(z), the plane's
closed contours (even-odd) become ``section - C(z)``, written back as one contour per exterior
ring and one per hole (even-odd again). Planes that do not meet the cut keep their items
untouched. OPEN_PLANAR contours are clipped as lines, POINT contours inside the cut dropped,
OPEN_NONPLANAR contours split around vertices in the cut. ROIs left without any contour are
removed from StructureSetROISequence, ROIContourSequence and RTROIObservationsSequence.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import shapely
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from shapely.geometry import LineString, Point, Polygon
from shapely.geometry.base import BaseGeometry

from rtdeface.landmarks import closed_volume_ml
from rtdeface.load import (
    CONTOUR_DATA_TAG,
    Contour,
    Roi,
    StructureSet,
    contour_data_array,
    copy_dataset,
    copy_encoding,
)
from rtdeface.region import DefacingRegion, even_odd, group_planes, polygon_from_points

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

COORD_DECIMALS = 6
"""Decimals (mm) written for new contour coordinates (DS values are at most 16 characters)."""

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


def _fmt(v: float) -> str:
    s = f"{v:.{COORD_DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _ring_points(coords: FloatArray, z_mm: float, y_mid_mm: float) -> list[str]:
    """Contour data strings for a ring (closing vertex dropped), y snapped off the cut line.

    ``y_mid_mm`` is the plane's cut line (y_mid, or the face profile's limit in full-face
    mode). A vertex within rounding of the cut line is written rounded *up* (posterior), so
    no written point falls into the region through rounding.
    """
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    if len(xy) > 1 and np.allclose(xy[0], xy[-1]):
        xy = xy[:-1]
    out: list[str] = []
    for x, y in xy:
        out.extend((_fmt(float(x)), _fmt(_snap_y(float(y), y_mid_mm)), _fmt(z_mm)))
    return out


def _snap_y(y: float, y_mid_mm: float) -> float:
    """A y within rounding of the cut line, moved to the line rounded up (posterior)."""
    scale = 10.0**COORD_DECIMALS
    if abs(y - y_mid_mm) < 2.0 / scale:
        return math.ceil(y_mid_mm * scale) / scale
    return y


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


def _new_item(template: Dataset, gtype: str, data: list[str]) -> Dataset:
    item = Dataset()
    copy_encoding(template, item)
    if "ContourImageSequence" in template:
        item.ContourImageSequence = copy.deepcopy(template.ContourImageSequence)
    item.ContourGeometricType = gtype
    item.NumberOfContourPoints = len(data) // 3
    raw = "\\".join(data).encode("ascii")
    if len(raw) % 2:
        raw += b" "
    # a raw element: written as formatted, without building one DSfloat per coordinate
    item[CONTOUR_DATA_TAG] = RawDataElement(
        Tag(CONTOUR_DATA_TAG), "DS", len(raw), raw, 0, False, True
    )
    return item


def _clip_closed_plane(
    contours: Sequence[Contour], items: Sequence[Dataset], cut: BaseGeometry, z: float, y_mid: float
) -> list[Dataset] | None:
    """New items for one plane, or None when no contour of the plane meets the cut.

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
    template = items[0]
    return [
        _new_item(template, "CLOSED_PLANAR", _ring_points(ring, z, y_mid))
        for ring in _polygon_rings(remaining)
    ]


def _clip_open(contour: Contour, item: Dataset, region: DefacingRegion) -> list[Dataset] | None:
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
                data: list[str] = []
                for x, y in np.asarray(part.coords):
                    y_out = _snap_y(float(y), y_line)
                    data.extend((_fmt(float(x)), _fmt(y_out), _fmt(contour.z_mm)))
                out.append(_new_item(item, "OPEN_PLANAR", data))
        return out
    # OPEN_NONPLANAR: keep runs of >= 2 consecutive vertices outside the cut
    out = []
    run: list[FloatArray] = []
    for p, bad in zip(pts, inside):
        if not bad:
            run.append(p)
            continue
        if len(run) >= 2:
            out.append(_new_item(item, "OPEN_NONPLANAR", [_fmt(float(v)) for q in run for v in q]))
        run = []
    if len(run) >= 2:
        out.append(_new_item(item, "OPEN_NONPLANAR", [_fmt(float(v)) for q in run for v in q]))
    return out


def _unchanged(roi: Roi, preserved: bool, volume_ml: float) -> RoiChange:
    """The change record of an ROI whose contours are kept as they are."""
    n = len(roi.contours)
    return RoiChange(
        roi.number, roi.name, roi.interpreted_type, preserved, volume_ml, volume_ml, 0, n, n, False
    )


def deface_structures(
    structure_set: StructureSet, region: DefacingRegion, default_thickness_mm: float
) -> StructuresResult:
    """Clip every non-preserved ROI of ``structure_set`` against the cut of ``region``.

    Parameters
    ----------
    structure_set : StructureSet
        The loaded structure set (its dataset is deep-copied, never modified).
    region : DefacingRegion
        R and P; ROIs whose number is in ``region.preserved_numbers`` are not touched.
    default_thickness_mm : float
        Slab thickness for volumes of single-plane ROIs (the CT slice spacing).
    """
    ds = copy_dataset(structure_set.dataset)
    preserved = set(region.preserved_numbers)
    rc_by_number = {int(rc.ReferencedROINumber): rc for rc in ds.get("ROIContourSequence", [])}
    changes: list[RoiChange] = []
    removed_numbers: set[int] = set()
    for roi in structure_set.rois:
        rc = rc_by_number.get(roi.number)
        n_before = len(roi.contours)
        vol_before = closed_volume_ml(roi.contours, default_thickness_mm)
        is_kept = roi.number in preserved
        if is_kept or rc is None or "ContourSequence" not in rc or not roi.contours:
            changes.append(_unchanged(roi, is_kept, vol_before))
            continue
        items = list(rc.ContourSequence)
        replacement: dict[int, list[Dataset]] = {}  # first item index of a group -> new items
        dropped: set[int] = set()
        planes_changed = 0
        closed = [c for c in roi.contours if c.geometric_type == "CLOSED_PLANAR"]
        zs = [c.z_mm for c in closed]
        for group in group_planes(zs):
            z = float(np.mean([zs[g] for g in group]))
            cut = region.cut_at(z)
            if cut is None:
                continue
            group_contours = [closed[g] for g in group]
            new = _clip_closed_plane(
                group_contours,
                [items[c.item_index] for c in group_contours],
                cut,
                z,
                float(region.y_limit(z)[0]),
            )
            if new is None:
                continue
            planes_changed += 1
            idxs = sorted(c.item_index for c in group_contours)
            replacement[idxs[0]] = new
            dropped.update(idxs[1:])
        for c in roi.contours:
            if c.geometric_type == "CLOSED_PLANAR":
                continue
            new = _clip_open(c, items[c.item_index], region)
            if new is not None:
                planes_changed += 1
                replacement[c.item_index] = new
        if not replacement:
            changes.append(_unchanged(roi, False, vol_before))
            continue
        new_items: list[Dataset] = []
        empty_indices = {i for i, it in enumerate(items) if contour_data_array(it).size == 0}
        for i, item in enumerate(items):
            if i in dropped or i in empty_indices:
                continue
            new_items.extend(replacement.get(i, [item]))
        for n, item in enumerate(new_items, start=1):
            if "ContourNumber" in item or any("ContourNumber" in it for it in items):
                item.ContourNumber = n
            item.pop("AttachedContours", None)
        rc.ContourSequence = DicomSequence(new_items)
        after = [
            Contour(str(it.ContourGeometricType), contour_data_array(it).reshape(-1, 3), i)
            for i, it in enumerate(new_items)
        ]
        vol_after = closed_volume_ml(after, default_thickness_mm)
        removed = len(new_items) == 0
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
                len(new_items),
                removed,
            )
        )
    if removed_numbers:
        _remove_rois(ds, removed_numbers)
        for number in sorted(removed_numbers):
            log.warning("ROI %d has no contour left after defacing; removed", number)
    return StructuresResult(ds, tuple(changes))


def _remove_rois(ds: Dataset, numbers: set[int]) -> None:
    """Remove ROIs from all three sequences (matched through ROINumber, not position)."""
    ds.StructureSetROISequence = DicomSequence(
        [s for s in ds.StructureSetROISequence if int(s.ROINumber) not in numbers]
    )
    ds.ROIContourSequence = DicomSequence(
        [s for s in ds.ROIContourSequence if int(s.ReferencedROINumber) not in numbers]
    )
    if "RTROIObservationsSequence" in ds:
        ds.RTROIObservationsSequence = DicomSequence(
            [s for s in ds.RTROIObservationsSequence if int(s.ReferencedROINumber) not in numbers]
        )


def roi_by_number(rois: Sequence[Roi]) -> dict[int, Roi]:
    """Map ROINumber -> Roi."""
    return {r.number: r for r in rois}
