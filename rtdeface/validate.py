"""Validation of a defaced case against its original: removal, preservation, DVHs, DICOM.

:func:`check_references` / :func:`check_folder_references` check that every reference in an
output resolves within the output. :func:`validate_pair` compares an original case with its
defaced copy and returns a :class:`CaseValidation`: a list of :class:`Check` results (PASS,
FAIL, N/A or INFO, each with its numbers), the per-ROI volume/Dice table grouped as in the
published analysis, the PTV location class and the DVH comparison. :func:`summarise` turns
several validations into the paper-style dataset tables.

Matching. CT slices are matched by position (the two CT grids must have the same shape and
affine within :data:`GRID_ATOL_MM`), ROIs by ROINumber first and name second (de-identification
may rename an ROI ``ROI_<n>``), dose grids by geometry (and, among grids with the same geometry,
by the fewest differing voxels). UIDs and file names are never used to match.

The cut. R (``z >= z_inferior_mm`` and ``y < y_mid_mm``), P (the preserved ROIs of the
*original* structure set, grown by the report's ``keep_margin_mm``) and C = R - P are rebuilt
with :class:`rtdeface.region.DefacingRegion` from the defaced case's ``rtdeface_report.json``
(or from explicit values) and sampled at each grid's own voxel centres. In full-face mode the
report's ``cut.face_profile`` (per-plane y limits below the eye plane) is part of R.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import shapely
from pydicom.dataset import Dataset
from shapely.geometry import LineString

from rtdeface.discover import iter_files, read_dicom
from rtdeface.dvh import Dvh, RoiMask, compare_with_dvh_sequence, cumulative_dvh, dose_gy, voxelise
from rtdeface.errors import RtDefaceError, UsageError
from rtdeface.geometry import Grid
from rtdeface.load import Case, DoseGrid, Roi, StructureSet
from rtdeface.phi import scan_phi
from rtdeface.region import (
    DefacingRegion,
    FaceProfile,
    RoiSections,
    even_odd,
    group_planes,
    polygon_from_points,
    select_preserved,
    with_margin,
)

log = logging.getLogger(__name__)

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ReferenceReport:
    """Result of :func:`check_references`.

    Attributes
    ----------
    problems : tuple of str
        One line per dangling or inconsistent reference (empty when all resolve).
    checked : int
        Number of references checked.
    """

    problems: tuple[str, ...]
    checked: int

    @property
    def ok(self) -> bool:
        """True when every reference resolves."""
        return not self.problems


@dataclass
class _Index:
    sop: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> modality
    series: set[str] = field(default_factory=set)
    studies: set[str] = field(default_factory=set)
    for_uids: set[str] = field(default_factory=set)
    ct_slices: set[str] = field(default_factory=set)


def _s(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v)


def check_references(objects: Sequence[tuple[str, Dataset]]) -> ReferenceReport:
    """Check that every cross-reference among ``objects`` resolves.

    Parameters
    ----------
    objects : sequence of (name, Dataset)
        All objects of one case; ``name`` is used in messages (e.g. a relative path).

    Checks: file meta SOP class/instance equal the dataset's; RTSTRUCT frame of reference,
    referenced study, series and every ContourImageSequence item; ROI numbers across the three
    structure-set sequences; RTPLAN ReferencedStructureSetSequence / ReferencedDoseSequence;
    RTDOSE ReferencedRTPlanSequence / ReferencedStructureSetSequence and frame of reference.
    """
    idx = _Index()
    for _, ds in objects:
        idx.sop[_s(ds, "SOPInstanceUID")] = _s(ds, "Modality")
        idx.series.add(_s(ds, "SeriesInstanceUID"))
        idx.studies.add(_s(ds, "StudyInstanceUID"))
        if _s(ds, "FrameOfReferenceUID"):
            idx.for_uids.add(_s(ds, "FrameOfReferenceUID"))
        if _s(ds, "Modality") == "CT":
            idx.ct_slices.add(_s(ds, "SOPInstanceUID"))
    problems: list[str] = []
    checked = 0

    def need(cond: bool, msg: str) -> None:
        nonlocal checked
        checked += 1
        if not cond:
            problems.append(msg)

    def refs(name: str, items: Iterable[Dataset], want: str) -> None:
        for item in items:
            uid = _s(item, "ReferencedSOPInstanceUID")
            need(
                idx.sop.get(uid) == want,
                f"{name}: references {want} {uid or '(empty)'} that is not in the output",
            )

    for name, ds in objects:
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            need(
                str(meta.MediaStorageSOPInstanceUID) == _s(ds, "SOPInstanceUID"),
                f"{name}: file meta MediaStorageSOPInstanceUID differs from SOPInstanceUID",
            )
            need(
                str(meta.get("MediaStorageSOPClassUID", "")) == _s(ds, "SOPClassUID"),
                f"{name}: file meta MediaStorageSOPClassUID differs from SOPClassUID",
            )
        modality = _s(ds, "Modality")
        if modality == "RTSTRUCT":
            numbers = {int(r.ROINumber) for r in ds.get("StructureSetROISequence", [])}
            for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
                need(
                    _s(fr, "FrameOfReferenceUID") in idx.for_uids,
                    f"{name}: ReferencedFrameOfReferenceUID {_s(fr, 'FrameOfReferenceUID')} "
                    "matches no image",
                )
                for st in fr.get("RTReferencedStudySequence", []):
                    need(
                        _s(st, "ReferencedSOPInstanceUID") in idx.studies,
                        f"{name}: RTReferencedStudy {_s(st, 'ReferencedSOPInstanceUID')} unknown",
                    )
                    for se in st.get("RTReferencedSeriesSequence", []):
                        need(
                            _s(se, "SeriesInstanceUID") in idx.series,
                            f"{name}: RTReferencedSeries {_s(se, 'SeriesInstanceUID')} unknown",
                        )
                        refs(name, se.get("ContourImageSequence", []), "CT")
            for ssr in ds.get("StructureSetROISequence", []):
                need(
                    _s(ssr, "ReferencedFrameOfReferenceUID") in idx.for_uids,
                    f"{name}: ROI {ssr.ROINumber} frame of reference matches no image",
                )
            for rc in ds.get("ROIContourSequence", []):
                need(
                    int(rc.ReferencedROINumber) in numbers,
                    f"{name}: ROIContourSequence references missing ROI {rc.ReferencedROINumber}",
                )
                for item in rc.get("ContourSequence", []):
                    refs(
                        f"{name} ROI {rc.ReferencedROINumber}",
                        item.get("ContourImageSequence", []),
                        "CT",
                    )
            for obs in ds.get("RTROIObservationsSequence", []):
                need(
                    int(obs.ReferencedROINumber) in numbers,
                    f"{name}: RTROIObservations references missing ROI {obs.ReferencedROINumber}",
                )
        elif modality == "RTPLAN":
            refs(name, ds.get("ReferencedStructureSetSequence", []), "RTSTRUCT")
            refs(name, ds.get("ReferencedDoseSequence", []), "RTDOSE")
        elif modality == "RTDOSE":
            refs(name, ds.get("ReferencedRTPlanSequence", []), "RTPLAN")
            refs(name, ds.get("ReferencedStructureSetSequence", []), "RTSTRUCT")
            need(
                _s(ds, "FrameOfReferenceUID") in idx.for_uids,
                f"{name}: FrameOfReferenceUID matches no image",
            )
    return ReferenceReport(tuple(problems), checked)


def read_case_objects(folder: Path) -> list[tuple[str, Dataset]]:
    """Header-only read of every DICOM object below ``folder`` as ``(relative path, dataset)``."""
    out = []
    for path in iter_files(Path(folder)):
        ds = read_dicom(path, header_only=True)
        if ds is not None:
            out.append((str(path.relative_to(folder)), ds))
    return out


def check_folder_references(folder: Path) -> ReferenceReport:
    """:func:`check_references` on every DICOM object below ``folder``."""
    return check_references(read_case_objects(folder))


# --------------------------------------------------------------------------- constants

AIR_THRESHOLD_HU = -900.0
"""A CT voxel in the cut above this (HU) counts as not removed (option ``--air-hu``)."""

CONTOUR_AREA_TOL_MM2 = 1e-3
"""Largest area (mm^2) of a non-preserved ROI allowed inside the cut on one contour plane."""

CONTOUR_LENGTH_TOL_MM = 1e-3
"""Largest length (mm) of an open contour allowed inside the cut on one plane."""

GRID_ATOL_MM = 1e-3
"""Two grids are the same when their affines agree within this (mm) and their shapes match."""

REPORT_NAME = "rtdeface_report.json"
"""The per-case report written beside the defaced objects (source of the cut)."""

PASS, FAIL, NOT_APPLICABLE, INFO = "PASS", "FAIL", "N/A", "INFO"
"""Check statuses. Only FAIL makes a validation fail."""

ROI_GROUPS = ("below", "on_cut_slices", "in_region")
"""ROI location groups of the published analysis: entirely below the cut (z range below
z_inferior), on the cut slices (z range reaches z >= z_inferior) but without volume in R, and
with volume in R (their CT voxel centres in R)."""

PTV_CLASSES = ("below", "on_cut_slices", "overlapping")
"""PTV location classes (same tests as :data:`ROI_GROUPS`; 'overlapping' = has volume in R)."""

COMMON_TYPE1 = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
)
_IMAGE_PIXEL = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelData",
)
REQUIRED_TYPE1: dict[str, tuple[str, ...]] = {
    "CT": (
        *COMMON_TYPE1,
        *_IMAGE_PIXEL,
        "ImageType",
        "FrameOfReferenceUID",
        "PixelSpacing",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "RescaleIntercept",
        "RescaleSlope",
    ),
    "RTSTRUCT": (
        *COMMON_TYPE1,
        "StructureSetLabel",
        "StructureSetROISequence",
        "ROIContourSequence",
        "RTROIObservationsSequence",
    ),
    "RTDOSE": (
        *COMMON_TYPE1,
        *_IMAGE_PIXEL,
        "FrameOfReferenceUID",
        "DoseUnits",
        "DoseType",
        "DoseSummationType",
        "PixelSpacing",
        "ImageOrientationPatient",
        "ImagePositionPatient",
    ),
    "RTPLAN": (*COMMON_TYPE1, "RTPlanLabel", "RTPlanGeometry"),
}
"""A short list of Type 1 attributes (present and non-empty) per modality, checked in every
output object (RTDOSE also needs DoseGridScaling and, multi-frame, GridFrameOffsetVector;
RTSTRUCT contour items need ContourGeometricType, NumberOfContourPoints matching ContourData)."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    """One check: a status, a one-line summary with the numbers, and the problems found.

    Attributes
    ----------
    name : str
        Dotted name, e.g. ``removal.ct``.
    status : str
        :data:`PASS`, :data:`FAIL`, :data:`NOT_APPLICABLE` or :data:`INFO`.
    summary : str
        One line with the numbers.
    problems : tuple of str
        One line per problem (empty unless FAIL, or notes for N/A).
    data : dict
        JSON-ready numbers.
    """

    name: str
    status: str
    summary: str
    problems: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "status": self.status,
            "summary": self.summary,
            "problems": list(self.problems),
            "data": self.data,
        }


def _check(name: str, ok: bool, summary: str, problems: Sequence[str] = (), **data: Any) -> Check:
    return Check(name, PASS if ok else FAIL, summary, tuple(problems), dict(data))


@dataclass(frozen=True)
class CutSpec:
    """The cut to validate against.

    Attributes
    ----------
    z_inferior_mm, y_mid_mm : float
        R is ``z >= z_inferior_mm`` and ``y < y_mid_mm``.
    preserved_rois : tuple of str or None
        Names (as written in the defaced RTSTRUCT) of the preserved ROIs; None means the
        default rule (:func:`rtdeface.region.select_preserved`).
    keep_margin_mm : float
        Margin around preserved ROIs.
    source : str
        ``report`` or ``options``.
    deid_applied : bool or None
        Whether the output was de-identified (None: unknown, no report).
    mode : str
        ``default`` or ``full-face`` (from the report; ``default`` without one).
    face : FaceProfile or None
        Full-face mode: the per-plane y limits below the eye plane, from the report.
    """

    z_inferior_mm: float
    y_mid_mm: float
    preserved_rois: tuple[str, ...] | None = None
    keep_margin_mm: float = 0.0
    source: str = "options"
    deid_applied: bool | None = None
    mode: str = "default"
    face: FaceProfile | None = None


def read_cut(defaced_dir: Path, z_mm: float | None = None, y_mm: float | None = None) -> CutSpec:
    """The cut from ``DEFACED/rtdeface_report.json``; explicit ``z_mm``/``y_mm`` override it.

    Raises
    ------
    UsageError
        No report and no explicit ``z_mm`` and ``y_mm``.
    """
    path = Path(defaced_dir) / REPORT_NAME
    report: dict[str, Any] = {}
    if path.is_file():
        report = json.loads(path.read_text(encoding="utf-8"))
    cut = report.get("cut", {})
    z = z_mm if z_mm is not None else cut.get("z_inferior_mm")
    y = y_mm if y_mm is not None else cut.get("y_mid_mm")
    if z is None or y is None:
        raise UsageError(
            f"{defaced_dir}: no {REPORT_NAME} with the cut; pass --z MM and --y MM "
            "(inferior eye plane z and eyes' A-P midpoint y)"
        )
    preserved = cut.get("preserved_rois")
    deid = report.get("deidentification", {}).get("applied") if report else None
    profile = cut.get("face_profile")
    return CutSpec(
        z_inferior_mm=float(z),
        y_mid_mm=float(y),
        preserved_rois=tuple(preserved) if preserved is not None else None,
        keep_margin_mm=float(cut.get("keep_margin_mm", 0.0) or 0.0),
        source="report" if report and z_mm is None and y_mm is None else "options",
        deid_applied=None if deid is None else bool(deid),
        mode=str(cut.get("mode", "default")),
        face=FaceProfile.from_dict(profile) if isinstance(profile, dict) else None,
    )


@dataclass(frozen=True, eq=False)
class CaseValidation:
    """Everything :func:`validate_pair` found for one original/defaced pair.

    Attributes
    ----------
    name : str
        Case label (the defaced folder's name).
    original, defaced : str
        The two folders.
    cut : CutSpec or None
        None when the cut could not be determined.
    checks : tuple of Check
    rois : list of dict
        Per ROI: number, names, preserved, group, volumes (mL) before/after, Dice.
    ptvs : dict
        PTV location class of the case and per PTV.
    dvh : list of dict
        Per dose grid and ROI: identity and metric differences.
    qa_images : list of str
        QA image files written (filled in by the caller).
    """

    name: str
    original: str
    defaced: str
    cut: CutSpec | None
    checks: tuple[Check, ...]
    rois: list[dict[str, Any]] = field(default_factory=list)
    ptvs: dict[str, Any] = field(default_factory=dict)
    dvh: list[dict[str, Any]] = field(default_factory=list)
    qa_images: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed."""
        return all(c.status != FAIL for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        """The failed checks."""
        return [c for c in self.checks if c.status == FAIL]

    def check(self, name: str) -> Check:
        """The check called ``name``."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the content of ``validation.json``)."""
        return {
            "name": self.name,
            "original": self.original,
            "defaced": self.defaced,
            "ok": self.ok,
            "cut": None
            if self.cut is None
            else {
                "z_inferior_mm": self.cut.z_inferior_mm,
                "y_mid_mm": self.cut.y_mid_mm,
                "mode": self.cut.mode,
                "face_profile": self.cut.face.to_dict() if self.cut.face is not None else None,
                "preserved_rois": None
                if self.cut.preserved_rois is None
                else list(self.cut.preserved_rois),
                "keep_margin_mm": self.cut.keep_margin_mm,
                "source": self.cut.source,
                "deidentified": self.cut.deid_applied,
            },
            "checks": [c.to_dict() for c in self.checks],
            "rois": self.rois,
            "ptvs": self.ptvs,
            "dvh": self.dvh,
            "qa_images": self.qa_images,
        }


# --------------------------------------------------------------------------- matching


def match_rois(
    original: StructureSet, defaced: StructureSet | None
) -> list[tuple[Roi, Roi | None]]:
    """Pair every original ROI with its defaced ROI: by ROINumber, else by (unique) name."""
    if defaced is None:
        return [(r, None) for r in original.rois]
    by_number = {r.number: r for r in defaced.rois}
    names: dict[str, list[Roi]] = {}
    for r in defaced.rois:
        names.setdefault(r.name, []).append(r)
    out: list[tuple[Roi, Roi | None]] = []
    for r in original.rois:
        d = by_number.get(r.number)
        if d is None and len(names.get(r.name, [])) == 1:
            d = names[r.name][0]
        out.append((r, d))
    return out


def same_grid(a: Grid, b: Grid) -> bool:
    """Same shape and affine within :data:`GRID_ATOL_MM`."""
    return a.shape == b.shape and bool(np.allclose(a.affine, b.affine, atol=GRID_ATOL_MM))


def match_doses(original: Sequence[DoseGrid], defaced: Sequence[DoseGrid]) -> list[int | None]:
    """For each original dose grid, the index of its defaced grid (None when missing).

    Grids match by geometry; among several with the same geometry, the one with the fewest
    differing stored values wins. Each defaced grid is used once.
    """
    used: set[int] = set()
    out: list[int | None] = []
    for o in original:
        cands = [i for i, d in enumerate(defaced) if i not in used and same_grid(o.grid, d.grid)]
        if len(cands) > 1:
            s0 = o.stored()
            cands.sort(key=lambda i: int(np.count_nonzero(defaced[i].stored() != s0)))
        out.append(cands[0] if cands else None)
        if cands:
            used.add(cands[0])
    return out


def build_region(
    original: Case, defaced: Case | None, cut: CutSpec
) -> tuple[DefacingRegion, list[Roi], list[str]]:
    """R, P, C from the cut, P from the *original* ROIs named in the report.

    Returns the region, the preserved original ROIs and problems (names not found).
    """
    problems: list[str] = []
    rois: list[Roi] = []
    ss = original.structure_set
    thickness = original.ct.grid.spacing_mm[0]
    if ss is not None:
        if cut.preserved_rois is None:
            rois = select_preserved(ss.rois)
        else:
            dss = defaced.structure_set if defaced is not None else None
            by_name = {r.name: r for r in dss.rois} if dss is not None else {}
            orig_numbers = {r.number: r for r in ss.rois}
            orig_names = {r.name: r for r in ss.rois}
            for name in cut.preserved_rois:
                d = by_name.get(name)
                if d is not None and d.number in orig_numbers:
                    rois.append(orig_numbers[d.number])
                elif name in orig_names:
                    rois.append(orig_names[name])
                else:
                    problems.append(f"preserved ROI {name!r} of the report is in neither case")
    sections = tuple(
        with_margin(RoiSections.from_roi(r, thickness), cut.keep_margin_mm) for r in rois
    )
    region = DefacingRegion(cut.z_inferior_mm, cut.y_mid_mm, sections, cut.face)
    return region, rois, problems


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True, eq=False)
class _CtComparison:
    above_air: int
    max_hu_in_cut: float
    cut_voxels: int
    differ_outside: int
    diff_slices: dict[int, BoolArray]  # every differing voxel (inside or outside the cut)
    first_outside: tuple[int, int, int] | None


def _compare_ct(original: Case, defaced: Case, cut: BoolArray, air_hu: float) -> _CtComparison:
    above = 0
    max_hu = -math.inf
    differ = 0
    first: tuple[int, int, int] | None = None
    diffs: dict[int, BoolArray] = {}
    for k in range(original.ct.grid.shape[0]):
        s0 = original.ct.stored_slice(k)
        s1 = defaced.ct.stored_slice(k)
        d = s0 != s1
        if d.any():
            diffs[k] = d
            out = d & ~cut[k]
            n = int(np.count_nonzero(out))
            if n and first is None:
                i, j = np.argwhere(out)[0]
                first = (k, int(i), int(j))
            differ += n
        ck = cut[k]
        if ck.any():
            ds = defaced.ct.datasets[k]
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            hu = s1[ck].astype(np.float64) * slope + intercept
            above += int(np.count_nonzero(hu > air_hu))
            max_hu = max(max_hu, float(hu.max()))
    return _CtComparison(
        above,
        max_hu if math.isfinite(max_hu) else float("nan"),
        int(cut.sum()),
        differ,
        diffs,
        first,
    )


def _closed_planes(roi: Roi) -> list[tuple[float, Any]]:
    closed = [c for c in roi.contours if c.geometric_type == "CLOSED_PLANAR"]
    zs = [c.z_mm for c in closed]
    out = []
    for group in group_planes(zs):
        z = float(np.mean([zs[g] for g in group]))
        out.append((z, even_odd([polygon_from_points(closed[g].points_lps_mm) for g in group])))
    return out


def check_contour_removal(
    defaced: StructureSet | None, region: DefacingRegion, preserved_numbers: set[int]
) -> Check:
    """No non-preserved ROI (BODY included) has area (or open-contour length, or a point) in C."""
    if defaced is None:
        return Check("removal.contours", NOT_APPLICABLE, "no RTSTRUCT in the defaced case")
    problems: list[str] = []
    worst = 0.0
    planes_checked = 0
    for roi in defaced.rois:
        if roi.number in preserved_numbers:
            continue
        total = 0.0
        bad_planes: list[tuple[float, float]] = []
        for z, geom in _closed_planes(roi):
            c = region.cut_at(z)
            if c is None or geom.is_empty:
                continue
            planes_checked += 1
            area = float(geom.intersection(c).area)
            worst = max(worst, area)
            if area > CONTOUR_AREA_TOL_MM2:
                bad_planes.append((z, area))
                total += area
        if bad_planes:
            z0, a0 = max(bad_planes, key=lambda t: t[1])
            problems.append(
                f"ROI {roi.name!r} (#{roi.number}): {total:.3f} mm^2 inside the cut on "
                f"{len(bad_planes)} plane(s), worst {a0:.3f} mm^2 at z = {z0:.2f} mm"
            )
        for c in roi.contours:
            if c.geometric_type == "CLOSED_PLANAR":
                continue
            cut = region.cut_at(c.z_mm)
            if cut is None:
                continue
            pts = c.points_lps_mm
            if c.geometric_type == "POINT" or len(pts) < 2:
                inside = shapely.contains_xy(cut, pts[:, 0], pts[:, 1])
                if inside.any():
                    problems.append(
                        f"ROI {roi.name!r} (#{roi.number}): {int(inside.sum())} point(s) inside "
                        f"the cut at z = {c.z_mm:.2f} mm"
                    )
            else:
                length = float(LineString(pts[:, :2]).intersection(cut).length)
                if length > CONTOUR_LENGTH_TOL_MM:
                    problems.append(
                        f"ROI {roi.name!r} (#{roi.number}): open contour {length:.3f} mm inside "
                        f"the cut at z = {c.z_mm:.2f} mm"
                    )
    return _check(
        "removal.contours",
        not problems,
        f"{planes_checked} contour planes of non-preserved ROIs on cut planes; largest area "
        f"inside the cut {worst:.2e} mm^2 (tolerance {CONTOUR_AREA_TOL_MM2:g} mm^2 per plane)",
        problems,
        largest_area_in_cut_mm2=worst,
        planes_checked=planes_checked,
    )


def _contours_identical(a: Roi, b: Roi) -> tuple[bool, str]:
    def key(roi: Roi) -> list[tuple[str, Any]]:
        items = [(c.geometric_type, c.points_lps_mm) for c in roi.contours]
        items.sort(key=lambda t: (t[0], round(float(t[1][0, 2]), 3), t[1].shape[0], t[1].tobytes()))
        return items

    ka, kb = key(a), key(b)
    if len(ka) != len(kb):
        return False, f"{len(ka)} contours before, {len(kb)} after"
    for n, ((ta, pa), (tb, pb)) in enumerate(zip(ka, kb)):
        if ta != tb or pa.shape != pb.shape:
            return False, f"contour {n} changed type or point count"
        if not np.array_equal(pa, pb):
            dmax = float(np.max(np.abs(pa - pb)))
            return False, f"contour {n} at z = {pa[0, 2]:.2f} mm moved by up to {dmax:.4f} mm"
    return True, ""


def _dice(a: RoiMask, b: RoiMask | None) -> float | None:
    na = a.count()
    nb = b.count() if b is not None else 0
    if na + nb == 0:
        return None
    inter = a.overlap(b) if b is not None else 0
    return 2.0 * inter / (na + nb)


def _region_voxels(mask: RoiMask, region: DefacingRegion, grid: Grid) -> int:
    """ROI voxels whose centres lie in R (``y < region.y_limit(z)`` on their slice)."""
    z = grid.slice_z_mm()
    _, y = grid.plane_xy_mm()
    limits = region.y_limit(z)
    return int(
        sum(
            int(np.count_nonzero(m & (y < limits[k])))
            for k, m in mask.slices.items()
            if np.isfinite(limits[k])
        )
    )


REGION_OVERLAP_MM2 = 1e-6
"""An ROI whose contours overlap the cut by more than this area (mm^2) on any plane is 'in the
region' even when no CT voxel centre of it lies there."""


def _roi_group(roi: Roi, mask: RoiMask, region: DefacingRegion, grid: Grid) -> tuple[str, int]:
    zs = [float(c.points_lps_mm[:, 2].max()) for c in roi.contours]
    if not zs:
        return "below", 0
    if not bool(region.in_region_z(max(zs))) and (
        region.face is None
        or not np.isfinite(
            region.y_limit(np.concatenate([c.points_lps_mm[:, 2] for c in roi.contours]))
        ).any()
    ):
        return "below", 0
    if not any(c.geometric_type == "CLOSED_PLANAR" for c in roi.contours):
        pts = np.concatenate([c.points_lps_mm for c in roi.contours])
        with np.errstate(invalid="ignore"):
            in_r = pts[:, 1] < region.y_limit(pts[:, 2])
        return ("in_region", 0) if bool(in_r.any()) else ("on_cut_slices", 0)
    n = _region_voxels(mask, region, grid)
    if n:
        return "in_region", n
    # no CT voxel centre, but the contours may still overlap the cut by less than a voxel (then
    # another grid, e.g. a dose grid, can sample that sliver): judge the polygons themselves
    sections = RoiSections.from_roi(roi, grid.spacing_mm[0])
    for z, geom in zip(sections.planes_z_mm, sections.geometries):
        cut = region.cut_at(float(z))
        if cut is not None and geom.intersection(cut).area > REGION_OVERLAP_MM2:
            return "in_region", 0
    return "on_cut_slices", 0


def _fmt_f(v: float | None, nd: int = 4) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def validate_cases(
    original: Case,
    defaced: Case,
    cut: CutSpec,
    *,
    air_hu: float = AIR_THRESHOLD_HU,
) -> tuple[list[Check], list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    """The geometric checks (removal, preservation, DVH, PTV location) of two loaded cases.

    Returns
    -------
    checks : list of Check
    rois : list of dict
        ROI table (see :class:`CaseValidation`).
    ptvs : dict
        PTV location class.
    dvh : list of dict
        DVH comparison rows.
    """
    checks: list[Check] = []
    region, preserved, problems = build_region(original, defaced, cut)
    preserved_numbers_orig = {r.number for r in preserved}
    g = original.ct.grid
    if problems:
        checks.append(_check("cut.preserved_rois", False, "preserved ROIs of the report", problems))
    if not same_grid(g, defaced.ct.grid):
        checks.append(
            _check(
                "ct.geometry",
                False,
                "CT grids differ",
                [
                    f"CT grid {g.shape} vs {defaced.ct.grid.shape} or affine differs; slices "
                    "cannot "
                    "be matched by position"
                ],
            )
        )
        return checks, [], {}, []
    checks.append(_check("ct.geometry", True, f"CT grids match ({g.shape[0]} slices by position)"))

    # ---- a. removal: CT
    cut_ct, kept_ct = region.sample(g)
    cmp = _compare_ct(original, defaced, cut_ct, air_hu)
    checks.append(
        _check(
            "removal.ct",
            cmp.above_air == 0,
            f"{cmp.cut_voxels} CT voxels in the cut; {cmp.above_air} above {air_hu:g} HU "
            f"(max {_fmt_f(cmp.max_hu_in_cut, 1)} HU)",
            [
                f"{cmp.above_air} CT voxel(s) in the cut above {air_hu:g} HU (max "
                f"{cmp.max_hu_in_cut:.1f} HU)"
            ]
            if cmp.above_air
            else [],
            voxels_in_cut=cmp.cut_voxels,
            voxels_above_air=cmp.above_air,
            max_hu_in_cut=cmp.max_hu_in_cut,
        )
    )

    # ---- a. removal: contours
    def_by_orig: dict[int, Roi | None] = {}
    pairs: list[tuple[Roi, Roi | None]] = []
    if original.structure_set is not None:
        pairs = match_rois(original.structure_set, defaced.structure_set)
        def_by_orig = {o.number: d for o, d in pairs}
    preserved_numbers_def = {
        d.number for n, d in def_by_orig.items() if d is not None and n in preserved_numbers_orig
    }
    checks.append(check_contour_removal(defaced.structure_set, region, preserved_numbers_def))

    # ---- a. removal: dose; b. dose outside the cut
    dose_match = match_doses(original.doses, defaced.doses)
    dose_problems: list[str] = []
    keep_problems: list[str] = []
    dose_data = []
    dose_cuts: list[BoolArray] = []
    for n, (od, di) in enumerate(zip(original.doses, dose_match), start=1):
        cut_d, kept_d = region.sample(od.grid)
        dose_cuts.append(cut_d)
        if di is None:
            dose_problems.append(f"RTDOSE {n}: no defaced dose grid with the same geometry")
            continue
        dd = defaced.doses[di]
        s0, s1 = od.stored(), dd.stored()
        nz = int(np.count_nonzero(s1[cut_d]))
        max_gy = float(s1[cut_d].max(initial=0)) * dd.scaling
        if nz:
            dose_problems.append(
                f"RTDOSE {n}: {nz} voxel(s) in the cut are not zero (max {max_gy:.4f} Gy)"
            )
        diff_out = int(np.count_nonzero((s0 != s1) & ~cut_d))
        if diff_out or not math.isclose(od.scaling, dd.scaling, rel_tol=0, abs_tol=0):
            keep_problems.append(
                f"RTDOSE {n}: {diff_out} voxel(s) outside the cut differ"
                + ("" if od.scaling == dd.scaling else "; DoseGridScaling changed")
            )
        dose_data.append(
            {
                "dose": n,
                "voxels_in_cut": int(cut_d.sum()),
                "nonzero_in_cut": nz,
                "max_gy_in_cut": max_gy,
                "differ_outside_cut": diff_out,
                "preserved_voxels_in_region": kept_d,
            }
        )
    if original.doses:
        checks.append(
            _check(
                "removal.dose",
                not dose_problems,
                "; ".join(
                    f"RTDOSE {d['dose']}: {d['voxels_in_cut']} voxels in the cut, "
                    f"{d['nonzero_in_cut']} non-zero"
                    for d in dose_data
                )
                or "no dose grid matched",
                dose_problems,
                doses=dose_data,
            )
        )
    else:
        checks.append(Check("removal.dose", NOT_APPLICABLE, "no RTDOSE in the case"))

    # ---- b. CT and dose bit-identical outside the cut
    ct_problems = []
    if cmp.differ_outside:
        ct_problems.append(
            f"{cmp.differ_outside} CT voxel(s) outside the cut differ (first at k,i,j = "
            f"{cmp.first_outside})"
        )
    for k in range(g.shape[0]):
        a, b = original.ct.datasets[k], defaced.ct.datasets[k]
        for kw in ("RescaleSlope", "RescaleIntercept", "PixelRepresentation", "BitsStored"):
            if str(a.get(kw, "")) != str(b.get(kw, "")):
                ct_problems.append(f"CT slice {k}: {kw} changed {a.get(kw)} -> {b.get(kw)}")
    checks.append(
        _check(
            "preservation.ct_outside_cut",
            not ct_problems,
            f"{cmp.differ_outside} CT voxels outside the cut differ",
            ct_problems[:20],
            voxels_differ_outside_cut=cmp.differ_outside,
        )
    )
    if original.doses:
        checks.append(
            _check(
                "preservation.dose_outside_cut",
                not keep_problems,
                f"{sum(d['differ_outside_cut'] for d in dose_data)} dose voxels outside the cut "
                "differ",
                keep_problems,
            )
        )

    # ---- b. ROI volumes / Dice, PTV identity; d. PTV location
    thickness = g.spacing_mm[0]
    ml = g.voxel_volume_ml
    rows: list[dict[str, Any]] = []
    ptv_problems: list[str] = []
    roi_problems: list[str] = []
    ptv_rows: list[dict[str, Any]] = []
    groups_of: dict[int, str] = {}
    sections_of: dict[int, tuple[RoiSections, RoiSections | None]] = {}
    for o, d in pairs:
        so = RoiSections.from_roi(o, thickness)
        sd = RoiSections.from_roi(d, thickness) if d is not None else None
        sections_of[o.number] = (so, sd)
        mo = voxelise(so, g)
        md = voxelise(sd, g) if sd is not None else None
        group, in_r = _roi_group(o, mo, region, g)
        groups_of[o.number] = group
        dice = _dice(mo, md)
        is_p = o.number in preserved_numbers_orig
        row = {
            "number": o.number,
            "name": o.name,
            "defaced_name": d.name if d is not None else None,
            "type": o.interpreted_type,
            "preserved": is_p,
            "group": group,
            "voxels_before": mo.count(),
            "voxels_after": md.count() if md is not None else 0,
            "volume_before_ml": round(mo.count() * ml, 4),
            "volume_after_ml": round((md.count() if md is not None else 0) * ml, 4),
            "voxels_in_region": in_r,
            "dice": None if dice is None else round(dice, 6),
        }
        rows.append(row)
        if is_p:
            same, why = (
                (False, "missing from the defaced RTSTRUCT")
                if d is None
                else (_contours_identical(o, d))
            )
            changed = sum(
                int(np.count_nonzero(m & cmp.diff_slices[k]))
                for k, m in mo.slices.items()
                if k in cmp.diff_slices
            )
            if not same:
                ptv_problems.append(f"{o.name}: contours differ ({why})")
            if changed:
                ptv_problems.append(f"{o.name}: {changed} CT voxel(s) inside the ROI changed")
            ptv_rows.append(
                {
                    "name": o.name,
                    "class": "overlapping" if group == "in_region" else group,
                    "voxels_in_region": in_r,
                    "volume_in_region_ml": round(in_r * ml, 4),
                    "volume_ml": row["volume_before_ml"],
                    "contours_identical": same,
                    "ct_voxels_changed": changed,
                }
            )
        elif group in ("below", "on_cut_slices") and (
            dice is not None and (dice != 1.0 or row["voxels_before"] != row["voxels_after"])
        ):
            roi_problems.append(
                f"ROI {o.name!r} ({group.replace('_', ' ')}): Dice {dice:.6f}, "
                f"{row['volume_before_ml']} -> {row['volume_after_ml']} mL"
            )
        elif group in ("below", "on_cut_slices") and d is None and o.contours:
            roi_problems.append(f"ROI {o.name!r} ({group}): missing from the defaced RTSTRUCT")
    if original.structure_set is None:
        checks.append(Check("preservation.ptv", NOT_APPLICABLE, "no RTSTRUCT"))
    else:
        checks.append(
            _check(
                "preservation.ptv",
                not ptv_problems,
                f"{len(ptv_rows)} preserved ROI(s) "
                f"({', '.join(r['name'] for r in ptv_rows) or 'none'}): contours and CT voxels "
                + ("identical" if not ptv_problems else "CHANGED"),
                ptv_problems,
            )
        )
        by_group = {
            grp: [r for r in rows if r["group"] == grp and not r["preserved"]] for grp in ROI_GROUPS
        }

        def _mean_dice(rs: list[dict[str, Any]]) -> str:
            ds = [r["dice"] for r in rs if r["dice"] is not None]
            return f"{np.mean(ds):.4f} (min {min(ds):.4f})" if ds else "-"

        checks.append(
            _check(
                "preservation.rois",
                not roi_problems,
                "; ".join(
                    f"{grp.replace('_', ' ')}: {len(by_group[grp])} ROIs, Dice "
                    f"{_mean_dice(by_group[grp])}"
                    for grp in ROI_GROUPS
                ),
                roi_problems,
            )
        )
    classes = [r["class"] for r in ptv_rows]
    case_class = next((c for c in reversed(PTV_CLASSES) if c in classes), None)
    ptvs = {
        "class": case_class,
        "ptvs": ptv_rows,
        "preserved_ct_voxels_in_region": kept_ct,
        "preserved_ml_in_region": round(kept_ct * ml, 4),
        "overlap_ml": round(sum(r["volume_in_region_ml"] for r in ptv_rows), 4),
    }
    checks.append(
        Check(
            "ptv.location",
            INFO,
            f"{case_class or 'no PTV'}"
            + (
                f": {ptvs['overlap_ml']} mL of PTV in the region, {kept_ct} CT voxels preserved "
                "in R"
                if case_class == "overlapping"
                else ""
            ),
            data=ptvs,
        )
    )

    # ---- c. DVH
    dvh_rows: list[dict[str, Any]] = []
    dvh_problems: list[str] = []
    cross: list[dict[str, Any]] = []
    for n, (od, di) in enumerate(zip(original.doses, dose_match), start=1):
        if di is None:
            continue
        dd = defaced.doses[di]
        gy0, gy1 = dose_gy(od), dose_gy(dd)
        vml = od.grid.voxel_volume_ml
        ours: dict[int, Dvh] = {}
        for o, _ in pairs:
            so, sd = sections_of[o.number]
            if so.planes_z_mm.size == 0:
                continue
            h0 = cumulative_dvh(gy0, voxelise(so, od.grid), vml)
            ours[o.number] = h0
            h1 = (
                cumulative_dvh(gy1, voxelise(sd, dd.grid), vml)
                if sd is not None and sd.planes_z_mm.size
                else cumulative_dvh(gy1, RoiMask(dd.grid.shape), vml)
            )
            same = h0.same_as(h1)
            must = o.number in preserved_numbers_orig or groups_of[o.number] != "in_region"
            row = {
                "dose": n,
                "roi": o.name,
                "group": "preserved" if o.number in preserved_numbers_orig else groups_of[o.number],
                "identical": same,
                "before": h0.metrics(),
                "after": h1.metrics(),
                "diff": {
                    k: None
                    if math.isnan(v0 := h0.metrics()[k]) or math.isnan(v1 := h1.metrics()[k])
                    else round(v1 - v0, 4)
                    for k in ("d_mean_gy", "d95_gy", "d2_gy", "d_max_gy", "volume_ml")
                },
            }
            dvh_rows.append(row)
            if must and not same and h0.voxels:
                dvh_problems.append(
                    f"RTDOSE {n} ROI {o.name!r} ({row['group']}): DVH changed (Dmean "
                    f"{h0.d_mean_gy:.3f} -> {h1.d_mean_gy:.3f} Gy, "
                    f"{h0.voxels} -> {h1.voxels} voxels)"
                )
        if "DVHSequence" in od.dataset:
            for entry in compare_with_dvh_sequence(od.dataset, ours):
                entry["dose"] = n
                cross.append(entry)
    if original.doses and original.structure_set is not None:
        n_same = sum(1 for r in dvh_rows if r["identical"])
        checks.append(
            _check(
                "dvh",
                not dvh_problems,
                f"{len(dvh_rows)} DVHs ({DVH_BIN_TEXT}); {n_same} identical; required identical "
                "for preserved ROIs and ROIs outside the region",
                dvh_problems,
            )
        )
        compared = [c for c in cross if c.get("compared")]
        checks.append(
            Check(
                "dvh.dicom_cross_check",
                INFO if compared else NOT_APPLICABLE,
                (
                    f"{len(compared)} stored DVH(s) compared; largest curve difference "
                    f"{max((c['max_curve_difference_percent'] or 0) for c in compared):.2f} % of "
                    "volume; Dmean ours/stored "
                    + ", ".join(
                        f"{c['d_mean_gy']['ours']}/{c['d_mean_gy']['stored']}" for c in compared[:5]
                    )
                )
                if compared
                else "the original RTDOSE carries no comparable DVHSequence",
                data={"items": cross},
            )
        )
    return checks, rows, ptvs, dvh_rows


DVH_BIN_TEXT = "cumulative, 0.01 Gy bins, ROI voxelised at the dose grid's voxel centres"


# --------------------------------------------------------------------------- DICOM checks


def _missing_type1(ds: Dataset) -> list[str]:
    modality = str(ds.get("Modality", ""))
    want = REQUIRED_TYPE1.get(modality, COMMON_TYPE1)
    out = [kw for kw in want if kw not in ds or ds[kw].value in (None, "", b"")]
    if modality == "RTDOSE":
        if "DoseGridScaling" not in ds:
            out.append("DoseGridScaling")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1 and "GridFrameOffsetVector" not in ds:
            out.append("GridFrameOffsetVector")
    if modality == "RTSTRUCT":
        for rc in ds.get("ROIContourSequence", []) or []:
            for n, item in enumerate(rc.get("ContourSequence", []) or []):
                if "ContourGeometricType" not in item or "NumberOfContourPoints" not in item:
                    out.append(f"ROI {rc.get('ReferencedROINumber')} contour {n}: type/count")
                    continue
                data = item.get("ContourData") or []
                if int(item.NumberOfContourPoints) * 3 != len(data):
                    out.append(
                        f"ROI {rc.get('ReferencedROINumber')} contour {n}: NumberOfContourPoints "
                        f"{item.NumberOfContourPoints} != {len(data) // 3} points"
                    )
    return out


def _parse_all(folder: Path) -> tuple[list[tuple[str, Dataset]], list[str]]:
    objects: list[tuple[str, Dataset]] = []
    problems: list[str] = []
    for path in iter_files(Path(folder)):
        rel = str(path.relative_to(folder))
        if path.suffix.lower() == ".json":
            continue
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" in ds:
                _ = ds.pixel_array
        except Exception as exc:  # any parse/decode failure is a finding, not a crash
            problems.append(f"{rel}: does not parse ({type(exc).__name__}: {exc})")
            continue
        objects.append((rel, ds))
    return objects, problems


def case_datasets(case: Case) -> list[Dataset]:
    """Every dataset of a loaded case (CT slices, RTSTRUCT, RTDOSE, RTPLAN)."""
    out = list(case.ct.datasets)
    if case.structure_set is not None:
        out.append(case.structure_set.dataset)
    out.extend(d.dataset for d in case.doses)
    out.extend(ds for _, ds in case.plans)
    return out


DCIODVFY = "dciodvfy"
"""David Clunie's IOD validator (Debian/Ubuntu package ``dicom3tools``): offline, independent."""

VALIDATOR_CT_SAMPLES = 3
"""CT slices validated per series (first, middle and last file in sorted order)."""


def dicom_validator_available() -> tuple[bool, str]:
    """Whether the independent validator ``dciodvfy`` (package dicom3tools) is on the PATH."""
    exe = shutil.which(DCIODVFY)
    if exe is None:
        return False, (
            "dciodvfy is not installed (apt-get install dicom3tools); "
            "dicom-validator is not used because it downloads the standard at run time"
        )
    return True, exe


def _normalise_validator_line(line: str) -> str:
    """An error line without its values, so input and output errors compare by kind."""
    line = re.sub(r"<[^>]*>", "<>", line)
    line = re.sub(r"\[[^\]]*\]", "[]", line)
    return re.sub(r"\d+", "N", line).strip()


def _validator_error_kinds(exe: str, folder: Path) -> dict[str, set[str]]:
    """Error kinds reported by dciodvfy per modality, on the RT objects and sample CT slices."""
    by_modality: dict[str, list[Path]] = {}
    for name, ds in read_case_objects(folder):
        by_modality.setdefault(str(ds.get("Modality", "?")), []).append(folder / name)
    kinds: dict[str, set[str]] = {}
    for modality, paths in sorted(by_modality.items()):
        paths = sorted(paths)
        if modality == "CT" and len(paths) > VALIDATOR_CT_SAMPLES:
            paths = [paths[0], paths[len(paths) // 2], paths[-1]]
        for path in paths:
            proc = subprocess.run(
                [exe, str(path)], capture_output=True, text=True, timeout=120, check=False
            )
            for line in (proc.stdout + proc.stderr).splitlines():
                if line.startswith("Error"):
                    kinds.setdefault(modality, set()).add(_normalise_validator_line(line))
    return kinds


def check_dicom(
    original: Case | None,
    original_dir: Path,
    defaced_dir: Path,
    deid_applied: bool | None,
    *,
    phi: bool = True,
    independent: bool = True,
) -> list[Check]:
    """Every object parses, Type 1 attributes present, references resolve, no PHI, validator."""
    checks: list[Check] = []
    objects, problems = _parse_all(defaced_dir)
    checks.append(
        _check(
            "dicom.parse",
            not problems and bool(objects),
            f"{len(objects)} object(s) parse (pixel data decoded)",
            problems or ([] if objects else ["no DICOM object in the defaced folder"]),
        )
    )
    before: dict[str, set[str]] = {}
    if original is not None:
        for ds in case_datasets(original):
            before.setdefault(str(ds.get("Modality", "")), set()).update(_missing_type1(ds))
    req_problems: list[str] = []
    inherited = 0
    for rel, ds in objects:
        for kw in _missing_type1(ds):
            if kw in before.get(str(ds.get("Modality", "")), set()):
                inherited += 1
            else:
                req_problems.append(f"{rel}: Type 1 {kw} missing or empty")
    checks.append(
        _check(
            "dicom.required",
            not req_problems,
            f"Type 1 attributes of {len(objects)} object(s)"
            + (f"; {inherited} already missing in the input" if inherited else ""),
            req_problems[:50],
        )
    )
    refs = check_references(objects)
    checks.append(
        _check(
            "dicom.references",
            refs.ok,
            f"{refs.checked} references checked, {len(refs.problems)} dangling",
            refs.problems[:50],
        )
    )
    if not phi:
        checks.append(Check("dicom.phi", NOT_APPLICABLE, "PHI scan skipped (--no-phi)"))
    elif deid_applied is False:
        checks.append(
            Check(
                "dicom.phi",
                NOT_APPLICABLE,
                "not applicable: the output was made with --no-deid (report "
                "deidentification.applied is false)",
            )
        )
    elif original is None:
        checks.append(Check("dicom.phi", NOT_APPLICABLE, "original case could not be loaded"))
    else:
        hits = scan_phi(case_datasets(original), [defaced_dir])
        checks.append(
            _check(
                "dicom.phi",
                not hits,
                f"{len(hits)} identifying value(s) of the original found in the output",
                [f"{h.where}: {h.value!r} (from {h.original_field})" for h in hits[:50]],
            )
        )
    ok, what = dicom_validator_available() if independent else (False, "skipped (option)")
    if not ok:
        checks.append(Check("dicom.validator", NOT_APPLICABLE, f"skipped: {what}"))
    else:
        try:
            before = _validator_error_kinds(what, original_dir)
            after = _validator_error_kinds(what, defaced_dir)
        except (OSError, subprocess.SubprocessError) as exc:
            checks.append(Check("dicom.validator", NOT_APPLICABLE, f"skipped: {exc}"))
        else:
            new_kinds = [
                f"{modality}: {kind}"
                for modality, kinds in sorted(after.items())
                for kind in sorted(kinds - before.get(modality, set()))
            ]
            n0 = sum(len(k) for k in before.values())
            n1 = sum(len(k) for k in after.values())
            checks.append(
                _check(
                    "dicom.validator",
                    not new_kinds,
                    f"dciodvfy: {n0} kind(s) of error in the input, {n1} in the output, "
                    f"{len(new_kinds)} new",
                    new_kinds[:50],
                )
            )
    return checks


# --------------------------------------------------------------------------- one pair


def validate_pair(
    original_dir: Path,
    defaced_dir: Path,
    *,
    z_mm: float | None = None,
    y_mm: float | None = None,
    air_hu: float = AIR_THRESHOLD_HU,
    phi: bool = True,
    independent: bool = True,
    loaded: tuple[Case, Case] | None = None,
) -> tuple[CaseValidation, tuple[Case | None, Case | None, DefacingRegion | None]]:
    """Validate one defaced case against its original (see the module docstring).

    Returns
    -------
    validation : CaseValidation
    context : (original Case, defaced Case, DefacingRegion), each None when unavailable
        For the QA images.
    """
    from rtdeface.load import load_case

    original_dir, defaced_dir = Path(original_dir), Path(defaced_dir)
    checks: list[Check] = []
    cut = read_cut(defaced_dir, z_mm, y_mm)
    orig: Case | None = None
    dfc: Case | None = None
    if loaded is not None:
        orig, dfc = loaded
    else:
        for label, folder in (("original", original_dir), ("defaced", defaced_dir)):
            try:
                case = load_case(folder)
            except RtDefaceError as exc:
                checks.append(_check(f"load.{label}", False, f"{label} case", [str(exc)]))
                continue
            if label == "original":
                orig = case
            else:
                dfc = case
    rois: list[dict[str, Any]] = []
    ptvs: dict[str, Any] = {}
    dvh: list[dict[str, Any]] = []
    region = None
    if orig is not None and dfc is not None:
        more, rois, ptvs, dvh = validate_cases(orig, dfc, cut, air_hu=air_hu)
        checks.extend(more)
        region = build_region(orig, dfc, cut)[0]
    checks.extend(
        check_dicom(
            orig, original_dir, defaced_dir, cut.deid_applied, phi=phi, independent=independent
        )
    )
    result = CaseValidation(
        name=defaced_dir.name,
        original=str(original_dir),
        defaced=str(defaced_dir),
        cut=cut,
        checks=tuple(checks),
        rois=rois,
        ptvs=ptvs,
        dvh=dvh,
    )
    log.info("validated %s: %s", defaced_dir, "ok" if result.ok else "FAILED")
    return result, (orig, dfc, region)


# --------------------------------------------------------------------------- batch pairing


MANIFEST_NAMES = ("rtdeface_manifest.json", "manifest.json")
"""Batch manifests written by ``rtdeface deface`` in batch mode, in OUTPUT_ROOT."""

AUDIT_CASES_SUFFIX = ".audit-cases.json"
"""``OUTPUT_ROOT<suffix>`` beside the batch output maps case folders to their input folders."""

DONE_STATUSES = frozenset({"done", "ok", "success"})


def pairs_from_manifest(original_root: Path, output_root: Path) -> list[tuple[Path, Path]] | None:
    """Original/defaced folder pairs of a batch, from the manifest in ``output_root``.

    Returns None when there is no manifest (treat the arguments as a single pair). Format (read
    leniently, as written by :mod:`rtdeface.batch`): ``{"cases": {name: {"status": "done",
    ...}}}`` (or a list of dicts with a ``name``/``output`` key); the defaced folder is
    ``OUTPUT_ROOT/<name>``. The input folder comes from the entry (``input_folder``, ``input``,
    ``source``) or else from ``OUTPUT_ROOT.audit-cases.json`` (``cases[name].input_folder``);
    relative input paths are resolved against ``original_root``. Cases not done, or whose input
    cannot be found, are skipped with a warning.
    """
    output_root = Path(output_root)
    path = next((output_root / n for n in MANIFEST_NAMES if (output_root / n).is_file()), None)
    if path is None:
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    cases = data.get("cases", data) if isinstance(data, dict) else data
    if isinstance(cases, list):
        cases = {str(e.get("name") or e.get("output")): e for e in cases if isinstance(e, dict)}
    audit_path = output_root.with_name(output_root.name + AUDIT_CASES_SUFFIX)
    audit: dict[str, Any] = {}
    if audit_path.is_file():
        audit = json.loads(audit_path.read_text(encoding="utf-8")).get("cases", {})
    pairs: list[tuple[Path, Path]] = []
    for name, e in sorted(cases.items()) if isinstance(cases, dict) else []:
        if not isinstance(e, dict) or str(e.get("status", "done")).lower() not in DONE_STATUSES:
            continue
        src = next(
            (e[k] for k in ("input_folder", "input", "source", "original") if e.get(k)),
            audit.get(name, {}).get("input_folder"),
        )
        out = output_root / str(e.get("output") or name)
        if src is None or not out.is_dir():
            log.warning("batch case %s: input folder unknown or output missing; skipped", name)
            continue
        pairs.append((Path(original_root) / src, out))
    return pairs


# --------------------------------------------------------------------------- reporting


def format_case(v: CaseValidation) -> str:
    """Human-readable table of one validation."""
    lines = [f"{v.name}: {'PASS' if v.ok else 'FAIL'}  ({v.original} -> {v.defaced})"]
    if v.cut is not None:
        lines.append(
            f"  cut ({v.cut.source}): z >= {v.cut.z_inferior_mm:.2f} mm, "
            f"y < {v.cut.y_mid_mm:.2f} mm;"
            + (
                f" full-face below the eyes on {v.cut.face.z_mm.size} planes "
                f"(chin level {v.cut.face.z_chin_mm:.1f} mm);"
                if v.cut.face is not None
                else ""
            )
            + f" preserved {', '.join(v.cut.preserved_rois or ()) or '(default rule)'}"
        )
    for c in v.checks:
        lines.append(f"  {c.status:<5} {c.name:<30} {c.summary}")
        for p in c.problems[:10]:
            lines.append(f"          - {p}")
        if len(c.problems) > 10:
            lines.append(f"          ... {len(c.problems) - 10} more")
    if v.rois:
        lines.append(
            f"  {'ROI':<28} {'group':<14} {'P':<2} {'before mL':>10} {'after mL':>10} {'Dice':>8}"
        )
        for r in v.rois:
            lines.append(
                f"  {r['name'][:28]:<28} {r['group']:<14} {'P' if r['preserved'] else '':<2} "
                f"{r['volume_before_ml']:>10.3f} {r['volume_after_ml']:>10.3f} "
                f"{_fmt_f(r['dice']):>8}"
            )
    changed = [d for d in v.dvh if not d["identical"]]
    if changed:
        lines.append(f"  DVH changes ({len(changed)}; Gy, after - before):")
        lines.append(f"  {'ROI':<28} {'dose':>4} {'dDmean':>8} {'dD95':>8} {'dD2':>8} {'dDmax':>8}")
        for d in changed:
            df = d["diff"]
            lines.append(
                f"  {d['roi'][:28]:<28} {d['dose']:>4} {_fmt_f(df['d_mean_gy'], 3):>8} "
                f"{_fmt_f(df['d95_gy'], 3):>8} {_fmt_f(df['d2_gy'], 3):>8} "
                f"{_fmt_f(df['d_max_gy'], 3):>8}"
            )
    return "\n".join(lines)


def summarise(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Dataset tables over several validations (``CaseValidation.to_dict()`` results).

    Returns the number of cases and failures (with reasons), the PTV location classes (per PTV
    and per case, counts and %), and per-OAR Dice by location group (n, mean, min).
    """
    n = len(cases)
    failures = [
        {
            "case": c["name"],
            "check": ch["name"],
            "reason": "; ".join(ch["problems"][:3]) or ch["summary"],
        }
        for c in cases
        for ch in c["checks"]
        if ch["status"] == FAIL
    ]
    ptv_counts = dict.fromkeys(PTV_CLASSES, 0)
    case_counts = dict.fromkeys(PTV_CLASSES, 0)
    overlap_ml: list[float] = []
    for c in cases:
        for p in c.get("ptvs", {}).get("ptvs", []):
            ptv_counts[p["class"]] += 1
            if p["class"] == "overlapping":
                overlap_ml.append(p["volume_in_region_ml"])
        cls = c.get("ptvs", {}).get("class")
        if cls:
            case_counts[cls] += 1
    n_ptv = sum(ptv_counts.values())
    dice: dict[str, dict[str, list[float]]] = {g: {} for g in ROI_GROUPS}
    for c in cases:
        for r in c.get("rois", []):
            if r["preserved"] or r["dice"] is None:
                continue
            dice[r["group"]].setdefault(r["name"], []).append(float(r["dice"]))
    oar = {
        g: {
            name: {"n": len(v), "mean": round(float(np.mean(v)), 6), "min": round(min(v), 6)}
            for name, v in sorted(by.items())
        }
        for g, by in dice.items()
    }
    return {
        "cases": n,
        "cases_passed": sum(1 for c in cases if c["ok"]),
        "cases_failed": sorted({f["case"] for f in failures}),
        "ptv_location": {
            "ptvs": n_ptv,
            "counts": ptv_counts,
            "percent": {
                k: round(100.0 * v / n_ptv, 1) if n_ptv else 0.0 for k, v in ptv_counts.items()
            },
            "cases_by_worst_class": case_counts,
            "overlap_ml_mean": round(float(np.mean(overlap_ml)), 3) if overlap_ml else None,
        },
        "oar_dice": oar,
        "failures": failures,
    }


def format_summary(s: dict[str, Any]) -> str:
    """The dataset tables as Markdown (printed and written as ``summary.md``)."""
    p = s["ptv_location"]
    lines = [
        "## Dataset summary",
        "",
        f"Cases: {s['cases']}; passed all checks: {s['cases_passed']}; failed: "
        f"{len(s['cases_failed'])}",
        "",
        "### PTV location relative to the removal region",
        "",
        "| location | PTVs | % of PTVs | cases (worst PTV) |",
        "|---|---:|---:|---:|",
    ]
    labels = {
        "below": "entirely below the cut",
        "on_cut_slices": "on the cut slices, no overlap",
        "overlapping": "overlapping the region",
    }
    for k in PTV_CLASSES:
        lines.append(
            f"| {labels[k]} | {p['counts'][k]} | {p['percent'][k]:.1f} | "
            f"{p['cases_by_worst_class'][k]} |"
        )
    if p["overlap_ml_mean"] is not None:
        lines.append(
            f"\nMean PTV volume inside the region (overlapping PTVs): {p['overlap_ml_mean']} mL"
        )
    lines += ["", "### OAR Dice (defaced vs original, CT grid) by location", ""]
    lines += ["| location | ROI | n | mean Dice | min Dice |", "|---|---|---:|---:|---:|"]
    for g in ROI_GROUPS:
        for name, v in s["oar_dice"][g].items():
            lines.append(
                f"| {g.replace('_', ' ')} | {name} | {v['n']} | {v['mean']:.4f} | {v['min']:.4f} |"
            )
    lines += ["", "### Failures", ""]
    if not s["failures"]:
        lines.append("none")
    else:
        lines += ["| case | check | reason |", "|---|---|---|"]
        for f in s["failures"]:
            lines.append(f"| {f['case']} | {f['check']} | {f['reason']} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "AIR_THRESHOLD_HU",
    "CONTOUR_AREA_TOL_MM2",
    "FAIL",
    "INFO",
    "NOT_APPLICABLE",
    "PASS",
    "CaseValidation",
    "Check",
    "CutSpec",
    "ReferenceReport",
    "build_region",
    "check_contour_removal",
    "check_dicom",
    "check_folder_references",
    "check_references",
    "format_case",
    "format_summary",
    "match_doses",
    "match_rois",
    "pairs_from_manifest",
    "read_cut",
    "summarise",
    "validate_cases",
    "validate_pair",
]
