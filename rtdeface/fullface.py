"""Full-face mode: below the eye plane, also remove the facial surface down to the chin.

The published cut (z >= z_inferior and y < y_mid) leaves the nose, lips and chin. The opt-in
full-face mode flattens the face below the inferior eye plane to its bony level: on every CT
slice between the chin level and the eye plane, everything anterior to

``y_front(z) = (most anterior bone within +/- FACE_WINDOW_MM of z) - margin``

is in R (the full left-right width, like the published region). Bone is CT voxels above
:data:`BONE_HU` inside the patient (the largest connected component above
:data:`BODY_HU`), after an in-plane opening that drops shells thinner than
:data:`THIN_SHELL_MM` (thermoplastic masks, bolus, couch edges). The running minimum over
+/- :data:`FACE_WINDOW_MM` bridges the gap between the teeth of an open mouth and the
piriform aperture, so the cut stays at the facial skeleton's envelope instead of stepping into
the mouth or the nose on those slices (a stepped surface that opens cavities still looks
face-like to a HOG detector).

The chin level is the lowest slice, at most ``depth_mm`` below the eye plane, whose bone
reaches anterior to ``y_mid + CHIN_BAND_MM`` (the mandible; the hyoid and the vertebrae lie
further back); when no slice qualifies, ``z_inferior - depth_mm`` is used. The profile also
covers :data:`CHIN_MARGIN_MM` below the chin level (with the chin's value), which removes the soft
tissue hanging below the chin bone.

Just below the eye plane the facial skeleton (nasal bones, frontal processes of the maxilla)
lies anterior to ``y_mid``, so a bone-level limit there leaves a ledge under the published cut:
the nasal root, which on onko_hn_eyes was the last thing a HOG detector scored (0.08 from the
front, threshold 0.10). The published cut is therefore continued straight down for
:data:`NOSE_BAND_MM` below the eye plane (limit ``max(y_front(z), y_mid)``, the same coronal plane
as above the eyes), and the bone-level limit takes over below that band. P (PTVs, default OARs)
stays preserved everywhere, so the band removes only unpreserved tissue and bone.

Lateral coverage (a wedge-shaped surface that also cuts the cheeks and temples back at 27-63
degrees lateral to the eyes) was measured and not adopted: over every view of the CT, BODY and
dose surfaces it moved the descriptor distances by less than their view-to-view noise (mean gap
to the empty-rendering distance -0.032 -> -0.004 to -0.029 on onko_hn_eyes, -0.008 -> -0.006 to
-0.026 on the phantom), a shallow wedge let HOG find a face (0.12), and it removes far more
tissue.

The result is a :class:`rtdeface.region.FaceProfile` (one y limit per CT slice), a plain
function of patient coordinates: every grid (CT, each dose grid) and every ROI plane samples it
at its own positions through :class:`rtdeface.region.DefacingRegion`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from rtdeface.geometry import PLANE_MATCH_ATOL_MM, Grid
from rtdeface.load import Roi
from rtdeface.region import FaceProfile

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

MODES = ("default", "full-face")
"""Defacing modes: the published cut, or the published cut plus the face below the eyes."""

BONE_HU = 250.0
"""HU above which a voxel counts as bone for the face profile."""

BODY_HU = -300.0
"""HU above which a voxel counts as patient (or attached material) for the head component."""

THIN_SHELL_MM = 2.0
"""In-plane opening size (mm): bright structures thinner than this are not bone."""

FACE_WINDOW_MM = 20.0
"""Half width (mm, along z) of the running minimum over the bone front. Calibrated on
onko_hn_eyes: 10 mm leaves a stepped cut surface opening the nasal and oral cavities in which
dlib HOG still scores 0.14 (front view); 20 mm gives 0.08, 30 mm -0.06 (threshold 0.10), but
30 mm carries the phantom's forehead bone down over its lips (HOG 0.50 from below)."""

CHIN_MARGIN_MM = 10.0
"""The profile reaches this far below the chin level (with the chin's limit)."""

CHIN_BAND_MM = 20.0
"""Bone anterior to ``y_mid + CHIN_BAND_MM`` below the eyes is facial bone (mandible/maxilla)."""

NOSE_BAND_MM = 20.0
"""Below the eye plane, the published cut (``y < y_mid``) continues this far (mm) down before the
bone-level limit takes over. Measured (``rtdeface privacy``; highest dlib HOG margin over every
view of the CT, BODY and dose surfaces, threshold 0.10): onko_hn_eyes 0.08 without the band,
-0.08 / -0.10 / -0.29 with 10 / 20 / 30 mm; the phantom -0.07 without, -0.04 / -0.15 / -0.27.
20 mm covers the nasal bones of an adult (about 20-25 mm long)."""

DEFAULT_FACE_MARGIN_MM = 3.0
"""Default distance (mm) anterior to the bone front at which the face is cut."""

DEFAULT_FACE_DEPTH_MM = 110.0
"""Default largest distance (mm) below the inferior eye plane that the full-face region reaches."""

DEFAULT_OAR_PATTERNS: tuple[str, ...] = (
    r"mandib",
    r"oral|cavity",
    r"parotid",
    r"submand",
    r"cord",
    r"brain[\s_-]*stem",
    r"laryn|glottis",
    r"constrict|(^|[^a-z])pcm",
)
"""Case-insensitive name patterns of the OARs preserved by default in full-face mode (HNC:
mandible, oral cavity, parotids, submandibular glands, spinal cord, brainstem, larynx,
pharyngeal constrictors)."""

OAR_HELPER_PATTERN = r"ring|avoid|opt|^\s*z_|^\s*~|^\s*x_"
"""OAR-like names that are planning helpers and never preserved by the default OAR patterns."""


def select_oars(rois: Sequence[Roi], patterns: Sequence[str], defaults: bool = True) -> list[Roi]:
    """ROIs preserved as OARs in full-face mode.

    Parameters
    ----------
    rois : sequence of Roi
        The structure set's ROIs.
    patterns : sequence of str
        Extra case-insensitive regular expressions (``--keep-oar``), searched in the name.
    defaults : bool
        Also match :data:`DEFAULT_OAR_PATTERNS` (helpers matching :data:`OAR_HELPER_PATTERN`
        are left out of the defaults, never out of explicit patterns).

    Returns
    -------
    list of Roi
        Matching ROIs with at least one closed contour, in structure set order.
    """
    extra = [re.compile(p, re.IGNORECASE) for p in patterns]
    default = [re.compile(p, re.IGNORECASE) for p in DEFAULT_OAR_PATTERNS] if defaults else []
    out = []
    for r in rois:
        if not any(c.geometric_type == "CLOSED_PLANAR" for c in r.contours):
            continue
        helper = re.search(OAR_HELPER_PATTERN, r.name, re.IGNORECASE) is not None
        if any(c.search(r.name) for c in extra) or (
            not helper and any(c.search(r.name) for c in default)
        ):
            out.append(r)
    return out


def _head_bone(hu: npt.NDArray[np.floating[Any]], pixel_mm: float) -> BoolArray:
    """Bone voxels of the patient: HU > BONE_HU, opened in-plane, in the largest body component."""
    n = max(1, round(THIN_SHELL_MM / pixel_mm))
    bone = hu > BONE_HU
    if n > 1:
        bone = ndimage.binary_opening(bone, structure=np.ones((1, n, n), dtype=bool))
    labels, count = ndimage.label(hu > BODY_HU)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        bone &= labels == int(np.argmax(sizes))
    return np.asarray(bone, dtype=bool)


def face_profile(
    hu: npt.NDArray[np.floating[Any]],
    grid: Grid,
    z_inferior_mm: float,
    y_mid_mm: float,
    margin_mm: float = DEFAULT_FACE_MARGIN_MM,
    depth_mm: float = DEFAULT_FACE_DEPTH_MM,
) -> FaceProfile | None:
    """The full-face y limit per CT slice below the inferior eye plane.

    Parameters
    ----------
    hu : numpy.ndarray, shape grid.shape
        CT in HU.
    grid : Grid
        The CT grid (axial); slices are judged at their own voxel centres.
    z_inferior_mm, y_mid_mm : float
        The published landmarks.
    margin_mm : float
        The cut lies this far anterior to the bone front.
    depth_mm : float
        Largest distance below the eye plane the region reaches.

    Returns
    -------
    FaceProfile or None
        One y limit per CT slice from the chin level (minus :data:`CHIN_MARGIN_MM`) up to the
        slice below the eye plane (``y_mid`` or deeper within :data:`NOSE_BAND_MM` of the eye
        plane); None when no slice there holds bone.
    """
    z = grid.slice_z_mm()
    _, y = grid.plane_xy_mm()
    below = z < z_inferior_mm - PLANE_MATCH_ATOL_MM
    in_depth = below & (z >= z_inferior_mm - depth_mm - PLANE_MATCH_ATOL_MM)
    ks = np.flatnonzero(in_depth)
    if ks.size == 0:
        return None
    k0, k1 = int(ks.min()), int(ks.max()) + 1
    pixel = min(grid.spacing_mm[1], grid.spacing_mm[2])
    bone = _head_bone(hu[k0:k1], pixel)
    # most anterior bone y per slice (inf when the slice holds none), vectorised over slices
    front = np.where(bone, y[None], np.inf).min(axis=(1, 2))
    facial = np.flatnonzero(front < y_mid_mm + CHIN_BAND_MM)
    if facial.size:
        z_chin = float(z[k0:k1][facial].min())
    else:
        z_chin = z_inferior_mm - depth_mm
        log.warning(
            "full-face: no facial bone found within %.0f mm below the eye plane; the region "
            "reaches z_inferior - %.0f mm",
            depth_mm,
            depth_mm,
        )
    dz = abs(float(grid.spacing_mm[0]))
    used = z[k0:k1] >= z_chin - PLANE_MATCH_ATOL_MM
    raw = np.where(used, front, np.inf)
    size = 2 * round(FACE_WINDOW_MM / dz) + 1
    env = ndimage.minimum_filter1d(raw, size=size, mode="constant", cval=np.inf)
    zs = z[k0:k1]
    limit = env - margin_mm
    keep = np.isfinite(env) & (zs >= z_chin - CHIN_MARGIN_MM - PLANE_MATCH_ATOL_MM)
    band = zs >= z_inferior_mm - NOSE_BAND_MM - PLANE_MATCH_ATOL_MM
    limit[band] = np.maximum(np.where(np.isfinite(limit[band]), limit[band], -np.inf), y_mid_mm)
    keep |= band
    if not keep.any():
        return None
    order = np.argsort(zs[keep])
    return FaceProfile(
        np.asarray(zs[keep][order], dtype=np.float64),
        np.asarray(limit[keep][order], dtype=np.float64),
        dz / 2.0,
        z_chin,
    )


__all__ = [
    "BODY_HU",
    "BONE_HU",
    "CHIN_BAND_MM",
    "CHIN_MARGIN_MM",
    "DEFAULT_FACE_DEPTH_MM",
    "DEFAULT_FACE_MARGIN_MM",
    "DEFAULT_OAR_PATTERNS",
    "FACE_WINDOW_MM",
    "MODES",
    "NOSE_BAND_MM",
    "OAR_HELPER_PATTERN",
    "THIN_SHELL_MM",
    "face_profile",
    "select_oars",
]
