"""The defacing pipeline for one case: landmarks -> region -> CT, ROIs, dose.

Plain data in, plain data out; no I/O here (see :mod:`rtdeface.load` and :mod:`rtdeface.write`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from rtdeface.ct import CtResult, deface_ct
from rtdeface.deid import SequenceScan, scan_raw_sequence
from rtdeface.dose import DoseResult, deface_dose
from rtdeface.errors import LandmarkError, UsageError
from rtdeface.eyefinder import find_eyes_in_image
from rtdeface.forking import Deferred
from rtdeface.fullface import (
    DEFAULT_FACE_DEPTH_MM,
    DEFAULT_FACE_MARGIN_MM,
    MODES,
    face_profile,
    select_oars,
)
from rtdeface.landmarks import (
    EyeLandmarks,
    cross_check,
    landmarks_from_rois,
    select_eye_rois,
)
from rtdeface.load import Case, RawContours, StructureSet
from rtdeface.region import (
    DefacingRegion,
    RoiSections,
    select_preserved,
    with_margin,
)
from rtdeface.structures import StructuresClip, StructuresResult, apply_clip, clip_structures

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
    mode : str
        One of :data:`rtdeface.fullface.MODES`: ``default`` (the published cut) or
        ``full-face`` (also the face below the eyes, see :mod:`rtdeface.fullface`).
    keep_oars : tuple of str
        Full-face mode: further OAR name patterns to preserve (``--keep-oar``).
    default_oars : bool
        Full-face mode: preserve the OARs of :data:`rtdeface.fullface.DEFAULT_OAR_PATTERNS`.
    face_margin_mm : float
        Full-face mode: the face is cut this far anterior to the bone front.
    face_depth_mm : float
        Full-face mode: largest distance below the eye plane the region reaches.
    """

    eye_rois: tuple[str, ...] = ()
    eyes: str = "auto"
    keep: tuple[str, ...] = ()
    keep_margin_mm: float = 0.0
    preserve_ptvs: bool = True
    eye_check: bool = True
    mode: str = "default"
    keep_oars: tuple[str, ...] = ()
    default_oars: bool = True
    face_margin_mm: float = DEFAULT_FACE_MARGIN_MM
    face_depth_mm: float = DEFAULT_FACE_DEPTH_MM

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.face_margin_mm < 0:
            raise UsageError(f"--face-margin must be >= 0 mm, got {self.face_margin_mm}")
        if self.face_depth_mm <= 0:
            raise UsageError(f"--face-depth must be > 0 mm, got {self.face_depth_mm}")
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
    structures_work : StructuresResult, StructuresJob or None
        The defaced structure set, or its clipping still running
        (``deface_case(..., defer=True)``); read it through :attr:`structures`.
    doses : tuple of DoseResult
        Same order as ``case.doses``.
    timings_s : dict of str to float
    eye_search : ImageEyeSearch or None
        The image cross-check still running (``deface_case(..., defer=True)``);
        :func:`complete_eye_check` joins it.
    """

    case: Case
    options: DefaceOptions
    landmarks: EyeLandmarks
    region: DefacingRegion
    ct: CtResult
    ct_preserved_in_region: int
    structures_work: StructuresResult | StructuresJob | None
    doses: tuple[DoseResult, ...]
    timings_s: dict[str, float] = field(default_factory=dict)
    eye_search: ImageEyeSearch | None = None

    @property
    def structures(self) -> StructuresResult | None:
        """The defaced structure set (None without RTSTRUCT); waits for a running clipping
        and raises its error."""
        work = self.structures_work
        return work.result(self.timings_s) if isinstance(work, StructuresJob) else work

    def cancel_pending(self) -> None:
        """Stop the work still running in child processes (the caller failed)."""
        if self.eye_search is not None:
            self.eye_search.cancel()
        if isinstance(self.structures_work, StructuresJob):
            self.structures_work.cancel()


class StructuresJob:
    """The clipping of the structure set (:func:`rtdeface.structures.clip_structures`),
    in a forked child beside the CT, dose and de-identification work when possible (see
    :class:`rtdeface.forking.Deferred`); :meth:`result` joins it once and keeps the result."""

    def __init__(
        self,
        structure_set: StructureSet,
        call: Deferred[tuple[StructuresClip, SequenceScan | None]],
    ) -> None:
        self._structure_set = structure_set
        self._call = call
        self._result: StructuresResult | None = None
        self.scanned: tuple[bytes, bool, bool, SequenceScan] | None = None
        """``(value, implicit, little, scan)``: the defaced structure set's ROIContourSequence
        value, its encoding and its scan (:func:`rtdeface.deid.scan_raw_sequence`), made
        beside the clipping (None until :meth:`result`, or without a ROIContourSequence)."""

    @property
    def forked(self) -> bool:
        """Whether the clipping runs in a child process (not yet joined)."""
        return self._call.forked

    @classmethod
    def start(
        cls,
        structure_set: StructureSet,
        region: DefacingRegion,
        thickness_mm: float,
        *,
        parallel: bool = True,
    ) -> StructuresJob:
        """Start clipping ``structure_set`` against ``region``."""
        call = Deferred.start(
            _clip_and_scan, structure_set, region, thickness_mm, parallel=parallel
        )
        return cls(structure_set, call)

    def result(self, timings: dict[str, float] | None = None) -> StructuresResult:
        """The defaced structure set (the clipping's error is raised here); ``timings``
        receives ``structures`` (clipping) and ``structures_wait`` (time spent waiting)."""
        if self._result is None:
            forked = self._call.forked
            t = time.perf_counter()
            clip, scan = self._call.result()
            raw = self._structure_set.raw_contours
            value = clip.roi_contours(raw)
            if scan is not None and raw is not None:
                codec = raw.codec
                written = _written_contours(raw, value)
                self.scanned = (written, codec.implicit, codec.little, scan)
            if timings is not None:
                timings["structures"] = clip.seconds
                if forked:
                    timings["structures_wait"] = time.perf_counter() - t
            self._result = apply_clip(self._structure_set, clip, value)
        return self._result

    def cancel(self) -> None:
        """Stop a running child."""
        self._call.cancel()


def _clip_and_scan(
    structure_set: StructureSet, region: DefacingRegion, thickness_mm: float
) -> tuple[StructuresClip, SequenceScan | None]:
    """The clipping, and the scan of the ROIContourSequence value it leaves, which
    de-identification and UID remapping need (so the process writing the case need not)."""
    clip = clip_structures(structure_set, region, thickness_mm)
    raw = structure_set.raw_contours
    if raw is None:
        return clip, None
    written = _written_contours(raw, clip.roi_contours(raw))
    return clip, scan_raw_sequence(written, raw.codec.implicit, raw.codec.little)


def _written_contours(raw: RawContours, value: bytes | None) -> bytes:
    """The ROIContourSequence value the defaced structure set holds (``value``: the
    rebuilt one, None when the clipping left the sequence unchanged)."""
    return raw.value if value is None else value


HuProvider = Callable[[], npt.NDArray[np.float32]]
"""Returns the CT in HU, shape (nk, ni, nj); decoded at most once per case."""


def once(case: Case) -> HuProvider:
    """A provider decoding ``case.ct`` to HU on first use and returning the same array after."""
    cache: list[npt.NDArray[np.float32]] = []

    def hu() -> npt.NDArray[np.float32]:
        if not cache:
            cache.append(case.ct.hu_volume())
        return cache[0]

    return hu


EYE_CHECK_MARGIN_MM = 40.0
"""The image cross-check of contoured eyes searches the CT slices within this distance (mm)
of the contoured eyes' z extent (a globe is about 24 mm tall; the search needs the orbit and
some head around it). Eyes contoured more than this far from the real ones are reported as a
failed cross-check."""


def eye_check_slab(case: Case, contoured: EyeLandmarks) -> tuple[int, int]:
    """Slice range ``[k0, k1)`` the cross-check of ``contoured`` searches (see
    :data:`EYE_CHECK_MARGIN_MM`)."""
    z = case.ct.grid.slice_z_mm()
    lo = min(e.z_min_mm for e in contoured.eyes) - EYE_CHECK_MARGIN_MM
    hi = max(e.z_max_mm for e in contoured.eyes) + EYE_CHECK_MARGIN_MM
    ks = np.flatnonzero((z >= lo) & (z <= hi))
    if ks.size == 0:
        return 0, case.ct.grid.shape[0]
    return int(ks.min()), int(ks.max()) + 1


def find_eyes_near(case: Case, contoured: EyeLandmarks) -> EyeLandmarks:
    """The image search for the eyes, on the CT slab around the contoured eyes.

    Raises
    ------
    LandmarkError
        As :func:`rtdeface.eyefinder.find_eyes_in_image`.
    """
    k0, k1 = eye_check_slab(case, contoured)
    grid = case.ct.grid.slab(k0, k1)
    return find_eyes_in_image(case.ct.hu_slab(k0, k1), grid)


EYE_SEARCH_NICE = 0
"""Priority decrease of the eye cross-check's child process. 0: the report waits for the
check, so a child at lower priority (tried: 5 and 10) starves while the clipping, writing and
defacing run and then holds up the end of the case (measured 7-9% slower)."""


class ImageEyeSearch:
    """The image search for the eyes of one case, run beside other work when possible.

    :meth:`start` forks a child process (Linux, two or more CPUs; see
    :class:`rtdeface.forking.Deferred`) that runs :func:`find_eyes_near` (at
    :data:`EYE_SEARCH_NICE`) while the parent goes on (the search holds the GIL for much of
    its time, so a thread would not overlap); :meth:`result` waits for it. Where forking is
    not available, or the child fails for any reason other than the search itself,
    :meth:`result` runs the search in this process. The result is the same either way.
    """

    def __init__(self, call: Deferred[EyeLandmarks]) -> None:
        self._call = call

    @property
    def forked(self) -> bool:
        """Whether the search runs in a child process (not yet joined)."""
        return self._call.forked

    @property
    def pid(self) -> int | None:
        """The child's process id, while it runs in one."""
        return self._call.pid

    @classmethod
    def start(cls, case: Case, contoured: EyeLandmarks, *, parallel: bool = True) -> ImageEyeSearch:
        """Start the search near ``contoured`` (in a child process when ``parallel`` and
        forking is possible; else :meth:`result` runs it)."""
        return cls(
            Deferred.start(find_eyes_near, case, contoured, parallel=parallel, nice=EYE_SEARCH_NICE)
        )

    def cancel(self) -> None:
        """Stop a running child (the caller failed and will not ask for the result)."""
        self._call.cancel()

    def result(self) -> tuple[EyeLandmarks | None, str]:
        """(landmarks found in the image, "") or (None, why the search failed)."""
        try:
            return self._call.result(), ""
        except LandmarkError as exc:
            return None, str(exc)


def find_landmarks(
    case: Case,
    options: DefaceOptions,
    hu: HuProvider | None = None,
    *,
    defer_check: bool = False,
) -> EyeLandmarks:
    """Eye landmarks from contours and/or the image, as ``options.eyes`` says.

    ``hu`` supplies the CT in HU for the image search (default: decode it on demand). The
    cross-check of contoured eyes searches the slab around them (:func:`find_eyes_near`);
    with ``defer_check`` it is not run here: the contoured landmarks are returned and the
    caller runs it (see :func:`deface_case`).
    """
    hu = hu or case.ct.hu_volume
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
                if options.eyes == "auto" and options.eye_check and not defer_check:
                    try:
                        image = find_eyes_near(case, contoured)
                    except LandmarkError as exc:
                        return cross_check(contoured, None, str(exc))
                    return cross_check(contoured, image)
                return contoured
        if options.eyes == "contours" or options.eye_rois:
            raise contour_error
    try:
        return find_eyes_in_image(hu(), case.ct.grid)
    except LandmarkError as exc:
        if contour_error is not None:
            raise LandmarkError(f"{contour_error} (image search also failed: {exc})") from exc
        raise


def build_region(
    case: Case, landmarks: EyeLandmarks, options: DefaceOptions, hu: HuProvider | None = None
) -> DefacingRegion:
    """R from the landmarks (and the face profile in full-face mode), P from the preserved ROIs.

    In full-face mode P also holds the OARs of :func:`rtdeface.fullface.select_oars`; ``hu``
    supplies the CT in HU for the face profile (default: decode it on demand).
    """
    hu = hu or case.ct.hu_volume
    preserved: tuple[RoiSections, ...] = ()
    full = options.mode == "full-face"
    if case.structure_set is not None:
        rois = select_preserved(case.structure_set.rois, options.keep, options.preserve_ptvs)
        if full:
            numbers = {r.number for r in rois}
            oars = select_oars(case.structure_set.rois, options.keep_oars, options.default_oars)
            rois += [r for r in oars if r.number not in numbers]
        thickness = case.ct.grid.spacing_mm[0]
        preserved = tuple(
            with_margin(RoiSections.from_roi(r, thickness), options.keep_margin_mm) for r in rois
        )
    face = None
    if full:
        face = face_profile(
            hu(),
            case.ct.grid,
            landmarks.z_inferior_mm,
            landmarks.y_mid_mm,
            options.face_margin_mm,
            options.face_depth_mm,
        )
        if face is None:
            log.warning("full-face: no bone below the eye plane; only the published region is cut")
    return DefacingRegion(landmarks.z_inferior_mm, landmarks.y_mid_mm, preserved, face)


def deface_case(
    case: Case,
    options: DefaceOptions | None = None,
    *,
    defer: bool = False,
    parallel: bool = False,
) -> DefacedCase:
    """Deface one loaded case (CT, every ROI, every dose grid) without writing anything.

    With ``parallel`` (for a single case on an otherwise idle machine, not inside worker
    pools) the structure set is clipped in a forked child beside the CT and dose work
    (:class:`StructuresJob`), and the image cross-check of contoured eyes (``--eyes auto``;
    it only reports, it never changes the cut) runs in another (:class:`ImageEyeSearch`).
    Both are joined before this returns or, with ``defer``, later: the structures on the
    first read of :attr:`DefacedCase.structures` (e.g. by
    :func:`rtdeface.write.build_outputs` after the CT, dose and plan objects), the
    cross-check by
    :func:`complete_eye_check`, so that they overlap with de-identification and writing too;
    call :meth:`DefacedCase.cancel_pending` if the caller fails before that.
    """
    options = options or DefaceOptions()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    hu = once(case)  # the image search and the face profile share one decoded volume
    landmarks = find_landmarks(case, options, hu, defer_check=True)
    search = None
    if (
        options.eyes == "auto"
        and options.eye_check
        and landmarks.source != "image"
        and case.structure_set is not None
    ):
        search = ImageEyeSearch.start(case, landmarks, parallel=parallel)
    timings["landmarks"] = time.perf_counter() - t0
    structures: StructuresJob | None = None
    try:
        t = time.perf_counter()
        region = build_region(case, landmarks, options, hu)
        if case.structure_set is not None:
            thickness = case.ct.grid.spacing_mm[0]
            structures = StructuresJob.start(
                case.structure_set, region, thickness, parallel=parallel
            )
        cut, kept = region.sample(case.ct.grid)
        ct = deface_ct(case.ct, cut, region.slices_in_region(case.ct.grid))
        timings["ct"] = time.perf_counter() - t
        t = time.perf_counter()
        doses = tuple(deface_dose(d, region) for d in case.doses)
        timings["dose"] = time.perf_counter() - t
    except BaseException:
        if search is not None:
            search.cancel()
        if structures is not None:
            structures.cancel()
        raise
    log.info(
        "defaced: z >= %.2f mm, y < %.2f mm; %d CT voxels changed, %d preserved in region",
        region.z_inferior_mm,
        region.y_mid_mm,
        ct.voxels_changed,
        kept,
    )
    defaced = DefacedCase(
        case, options, landmarks, region, ct, kept, structures, doses, timings, search
    )
    if defer:
        return defaced
    try:
        defaced.structures  # noqa: B018 (joins the clipping; its error is raised here)
    except BaseException:
        defaced.cancel_pending()
        raise
    return complete_eye_check(defaced)


def complete_eye_check(defaced: DefacedCase) -> DefacedCase:
    """Join the pending image cross-check of :func:`deface_case` (a no-op when none)."""
    if defaced.eye_search is None:
        return defaced
    t = time.perf_counter()
    image, error = defaced.eye_search.result()
    landmarks = cross_check(defaced.landmarks, image, error)
    timings = dict(defaced.timings_s)
    timings["eye_check_wait"] = time.perf_counter() - t
    return dataclasses.replace(defaced, landmarks=landmarks, timings_s=timings, eye_search=None)
