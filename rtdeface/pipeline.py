"""The defacing pipeline for one case: landmarks -> region -> CT, ROIs, dose.

Plain data in, plain data out; no I/O here (see :mod:`rtdeface.load` and :mod:`rtdeface.write`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from rtdeface.ct import CtResult, deface_ct
from rtdeface.dose import DoseResult, deface_dose
from rtdeface.errors import LandmarkError, UsageError
from rtdeface.landmarks import (
    EyeLandmarks,
    cross_check,
    landmarks_from_rois,
    select_eye_rois,
)
from rtdeface.load import Case
from rtdeface.region import (
    DefacingRegion,
    RoiSections,
    select_preserved,
    with_margin,
)
from rtdeface.structures import StructuresResult, deface_structures

log = logging.getLogger(__name__)

EYE_MODES = ("auto", "contours", "image")
"""Where the eye landmarks come from: contoured eyes, the CT image, or contours when present."""


@dataclass(frozen=True)
class DefaceOptions:
    """What to cut and what to keep.

    Attributes
    ----------
    eye_rois : tuple of str
        Exact ROI names of the eyes (overrides the name patterns).
    eyes : str
        One of :data:`EYE_MODES`.
    keep : tuple of str
        Regular expressions (case-insensitive) of further ROI names to preserve.
    keep_margin_mm : float
        Margin (mm) added around every preserved ROI.
    preserve_ptvs : bool
        Preserve PTVs (the published method; on by default).
    eye_check : bool
        In ``auto`` mode, also find the eyes in the image and report (and warn about) their
        disagreement with the contoured eyes.
    """

    eye_rois: tuple[str, ...] = ()
    eyes: str = "auto"
    keep: tuple[str, ...] = ()
    keep_margin_mm: float = 0.0
    preserve_ptvs: bool = True
    eye_check: bool = True

    def __post_init__(self) -> None:
        if self.eyes not in EYE_MODES:
            raise UsageError(f"--eyes must be one of {', '.join(EYE_MODES)}, got {self.eyes!r}")
        if self.keep_margin_mm < 0:
            raise UsageError(f"--keep-margin must be >= 0 mm, got {self.keep_margin_mm}")


@dataclass(frozen=True, eq=False)
class DefacedCase:
    """Everything computed for one case, ready to be written and reported.

    Attributes
    ----------
    case : Case
    options : DefaceOptions
    landmarks : EyeLandmarks
    region : DefacingRegion
    ct : CtResult
    ct_preserved_in_region : int
        CT voxel centres in R kept because they are in P.
    structures : StructuresResult or None
    doses : tuple of DoseResult
        Same order as ``case.doses``.
    timings_s : dict of str to float
    """

    case: Case
    options: DefaceOptions
    landmarks: EyeLandmarks
    region: DefacingRegion
    ct: CtResult
    ct_preserved_in_region: int
    structures: StructuresResult | None
    doses: tuple[DoseResult, ...]
    timings_s: dict[str, float] = field(default_factory=dict)


def find_landmarks(case: Case, options: DefaceOptions) -> EyeLandmarks:
    """Eye landmarks from contours and/or the image, as ``options.eyes`` says."""
    thickness = case.ct.grid.spacing_mm[0]
    contour_error: LandmarkError | None = None
    if options.eyes in ("auto", "contours"):
        if case.structure_set is None:
            contour_error = LandmarkError(
                f"{case.source}: no RTSTRUCT in the case, so no eye contours; "
                "use --eyes image to find the eyes in the CT"
            )
        else:
            try:
                rois, warnings = select_eye_rois(case.structure_set, case.ct.grid, options.eye_rois)
                contoured = landmarks_from_rois(rois, thickness, warnings)
            except LandmarkError as exc:
                contour_error = exc
            else:
                if options.eyes == "auto" and options.eye_check:
                    from rtdeface.eyefinder import find_eyes_in_image

                    try:
                        image = find_eyes_in_image(case.ct.hu_volume(), case.ct.grid)
                    except LandmarkError as exc:
                        return cross_check(contoured, None, str(exc))
                    return cross_check(contoured, image)
                return contoured
        if options.eyes == "contours" or options.eye_rois:
            raise contour_error
    try:
        from rtdeface.eyefinder import find_eyes_in_image
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        raise contour_error or LandmarkError(str(exc)) from exc
    try:
        return find_eyes_in_image(case.ct.hu_volume(), case.ct.grid)
    except LandmarkError as exc:
        if contour_error is not None:
            raise LandmarkError(f"{contour_error} (image search also failed: {exc})") from exc
        raise


def build_region(case: Case, landmarks: EyeLandmarks, options: DefaceOptions) -> DefacingRegion:
    """R from the landmarks, P from the preserved ROIs of the structure set."""
    preserved: tuple[RoiSections, ...] = ()
    if case.structure_set is not None:
        rois = select_preserved(case.structure_set.rois, options.keep, options.preserve_ptvs)
        thickness = case.ct.grid.spacing_mm[0]
        preserved = tuple(
            with_margin(RoiSections.from_roi(r, thickness), options.keep_margin_mm) for r in rois
        )
    return DefacingRegion(landmarks.z_inferior_mm, landmarks.y_mid_mm, preserved)


def deface_case(case: Case, options: DefaceOptions | None = None) -> DefacedCase:
    """Deface one loaded case (CT, every ROI, every dose grid) without writing anything."""
    options = options or DefaceOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    landmarks = find_landmarks(case, options)
    timings["landmarks"] = time.perf_counter() - t0
    t = time.perf_counter()
    region = build_region(case, landmarks, options)
    cut, kept = region.sample(case.ct.grid)
    ct = deface_ct(case.ct, cut)
    timings["ct"] = time.perf_counter() - t
    t = time.perf_counter()
    structures = None
    if case.structure_set is not None:
        structures = deface_structures(case.structure_set, region, case.ct.grid.spacing_mm[0])
    timings["structures"] = time.perf_counter() - t
    t = time.perf_counter()
    doses = tuple(deface_dose(d, region) for d in case.doses)
    timings["dose"] = time.perf_counter() - t
    log.info(
        "defaced: z >= %.2f mm, y < %.2f mm; %d CT voxels changed, %d preserved in region",
        region.z_inferior_mm,
        region.y_mid_mm,
        ct.voxels_changed,
        kept,
    )
    return DefacedCase(case, options, landmarks, region, ct, kept, structures, doses, timings)
