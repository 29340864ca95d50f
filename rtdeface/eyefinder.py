"""Find both eye globes in the CT image, for structure sets that have no eye contours.

The result mirrors the contour-based landmarks of :mod:`rtdeface.landmarks`, computed on the
detected eye masks (voxel centres instead of contour points):

* ``z_inferior_mm``: the lowest z of any CT slice (voxel-centre plane) holding eye voxels;
* the central eye plane: the eye slice nearest to the mean over both eyes of each eye's mean
  slice z (ties go to the lower z);
* ``y_mid_mm``: the midpoint of the smallest and largest y of the eye voxel centres (of both
  eyes) on the central plane.

Method
------
1. *Coarse volume*: the CT is block-averaged in index space to about
   :data:`COARSE_SPACING_MM` and re-indexed (transposes and flips, or a linear resampling for
   in-plane rotated grids) into a canonical array ordered ``(z, y, x)`` with every patient
   axis increasing, so no step depends on the patient position (HFS, HFP, FFS, FFP, decubitus).
2. *Globe score*: at every coarse voxel, the fraction of vitreous-like voxels in a small cube
   (the globe core) times the fraction of *non*-soft-tissue voxels (orbital fat, bone, air) in
   a cubic shell around it. The globe is the only water-like ball of its size wrapped in fat
   and bone; brain, muscle and glands have soft tissue around them.
3. *Pairing*: local maxima of the score are paired (left eye at +x, separation, same y and z
   within tolerances) and a pair is ranked by its scores and by air in front of both eyes
   (the face); the midpoint must lie near the head's left-right centre.
4. *Refinement* on the original grid around each eye: mean shift of the vitreous voxels to the
   globe centre, radius from the radial profile of vitreous voxels, mask = vitreous voxels of
   the connected component through the centre inside that radius, holes (lens) filled.
5. *Checks*: radius, volume, symmetry and the scan edges; a confidence in [0, 1] combines
   them, and :class:`~rtdeface.errors.LandmarkError` is raised when it is not plausible.

Every step works on whole arrays (numpy, :mod:`scipy.ndimage`, scikit-image); the only Python
loops run over a handful of candidates or refinement iterations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import fft as sp_fft
from scipy import ndimage as ndi
from skimage.feature import peak_local_max

from rtdeface.errors import LandmarkError
from rtdeface.geometry import Grid
from rtdeface.landmarks import Eye, EyeLandmarks

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

COARSE_SPACING_MM = 4.0
"""Target voxel size (mm) of the coarse search volume (block averages of the CT)."""

AXIS_ALIGNED_ATOL = 1e-3
"""Largest off-axis direction-cosine component for an index axis to count as a patient axis."""

VITREOUS_HU = (-20.0, 60.0)
"""Hounsfield range of vitreous humour after light smoothing (block mean or Gaussian)."""

SOFT_TISSUE_HU = (-30.0, 150.0)
"""Hounsfield range counted as soft tissue (muscle, brain, gland, vitreous) in the shell test."""

AIR_HU = -400.0
"""Below this, a voxel counts as air (in front of the face, outside the body)."""

BODY_HU = -400.0
"""Above this, a coarse voxel counts as body when locating the head's left-right centre."""

CORE_RADIUS_MM = 8.0
"""Radius (mm) of the ball that must be vitreous around a globe centre (globe radius ~12)."""

SHELL_RADII_MM = (13.0, 18.0)
"""Inner and outer radius (mm) of the shell just outside a globe: fat, bone, lids, air."""

MIN_CANDIDATE_SCORE = 0.2
"""Smallest globe score (core fraction x non-soft shell fraction) of a candidate eye."""

MAX_CANDIDATES = 24
"""At most this many candidates (best scores) are paired."""

CANDIDATE_MIN_DISTANCE_MM = 10.0
"""Candidates (local maxima of the score) are at least this far apart (mm)."""

ANTERIOR_AIR_Y_MM = (14.0, 40.0)
"""Range of distances (mm) anterior to a globe centre searched for air (in front of the face)."""

ANTERIOR_AIR_HALF_MM = 8.0
"""Half width (mm) in x and z of the box in front of a globe searched for air."""

ANTERIOR_AIR_MIN_FRACTION = 0.05
"""Air fraction in front of a globe at which the air factor of its pair score saturates."""

EYE_SEPARATION_MM = (44.0, 90.0)
"""Plausible left-right distance (mm) between the two globe centres (adults ~ 55-70 mm)."""

MAX_PAIR_DZ_MM = 12.0
"""Largest z difference (mm) between the two globe centres of a pair."""

MAX_PAIR_DY_MM = 14.0
"""Largest y (anterior-posterior) difference (mm) between the two globe centres of a pair."""

MAX_MIDLINE_OFFSET_MM = 25.0
"""Largest distance (mm) in x between the eyes' midpoint and the head's left-right centre."""

LOCAL_HALF_MM = 30.0
"""Half side (mm) of the box around each globe in which it is refined on the original grid."""

MEDIAN_SIZE_VOXELS = 3
"""Size (voxels) of the median filter applied before thresholding a globe: removes noise but,
unlike a Gaussian, does not erode the globe where it meets air."""

CENTRE_RIDGE_MM = 0.75
"""Voxels this close (mm) to the deepest vitreous depth form the ridge whose centroid is the
globe centre (sub-voxel precision)."""

CENTRE_SEARCH_RADIUS_MM = 9.0
"""The refined globe centre is searched within this distance (mm) of the coarse centre."""

RADIAL_BIN_MM = 0.5
"""Width (mm) of the radial shells used to estimate the globe radius."""

EDGE_DARK_FRACTION = 0.2
"""The globe edge is the first radial shell where this fraction is fat, air or bone."""

GLOBE_MASK_RADIUS_MM = 12.5
"""The globe mask keeps globe-like voxels within this distance (mm) of the refined centre: an
adult globe (axial length ~24 mm) with half a millimetre of slack. The lids, extraocular
muscles and optic nerve have the same density and touch the globe, so the threshold alone
cannot end the mask there."""

EYE_RADIUS_MM = (10.0, 13.5)
"""Plausible globe radius (mm); the estimate is clipped to it (adult globes ~ 11-12.5 mm)."""

HARD_RADIUS_MM = (7.0, 16.0)
"""Outside this radius estimate (mm) the candidate is not a globe and detection fails."""

EYE_VOLUME_ML = (3.0, 12.0)
"""Plausible volume (mL) of one detected globe mask (adult globes ~ 6-8 mL)."""

MIN_CONFIDENCE = 0.3
"""Below this confidence the detection is refused with :class:`LandmarkError`."""

REMEDY = (
    "pass --eye-roi NAME if the eyes are contoured under another name, or --eyes contours "
    "with eye contours added to the structure set"
)
"""What the user can do when the eyes cannot be found in the image."""


@dataclass(frozen=True, eq=False)
class _Canonical:
    """A coarse copy of the CT indexed ``(z, y, x)`` with increasing patient coordinates.

    Attributes
    ----------
    hu : numpy.ndarray, shape (nz, ny, nx), float32
        Block-averaged Hounsfield units.
    origin_mm : numpy.ndarray, shape (3,)
        Patient ``(x, y, z)`` (mm, LPS) of voxel ``(0, 0, 0)``.
    spacing_mm : numpy.ndarray, shape (3,)
        Positive voxel size (mm) along x, y and z.
    """

    hu: Float32Array
    origin_mm: FloatArray
    spacing_mm: FloatArray

    def to_patient(self, zyx: npt.ArrayLike) -> FloatArray:
        """Canonical indices ``(..., 3)`` as ``(z, y, x)`` to patient ``(x, y, z)`` mm."""
        idx = np.asarray(zyx, dtype=np.float64)[..., ::-1]
        return np.asarray(self.origin_mm + idx * self.spacing_mm, dtype=np.float64)

    def to_index(self, xyz: npt.ArrayLike) -> FloatArray:
        """Patient ``(..., 3)`` mm to fractional canonical indices ``(z, y, x)``."""
        p = np.asarray(xyz, dtype=np.float64)
        return np.asarray(((p - self.origin_mm) / self.spacing_mm)[..., ::-1], dtype=np.float64)


@dataclass(frozen=True)
class _Candidate:
    """A local maximum of the globe score (coarse)."""

    centre_mm: FloatArray
    score: float
    air_fraction: float


@dataclass(frozen=True, eq=False)
class _EyeMask:
    """One refined globe on the original grid.

    Attributes
    ----------
    centre_mm : numpy.ndarray, shape (3,)
        Refined centre (x, y, z), mm, LPS.
    radius_mm : float
        Radius estimate before clipping to :data:`EYE_RADIUS_MM`.
    points_mm : numpy.ndarray, shape (n, 3)
        Patient coordinates (mm) of the mask's voxel centres.
    touches_edge : str
        ``""``, or the scan edges the mask touches (``"superior"``, ``"inferior"``,
        ``"in-plane"``).
    volume_ml : float
        Volume of the mask, mL.
    """

    centre_mm: FloatArray
    radius_mm: float
    points_mm: FloatArray
    touches_edge: str
    volume_ml: float


def _block_mean(
    hu: Float32Array, factors: tuple[int, int, int]
) -> tuple[Float32Array, FloatArray, FloatArray]:
    """Coarsen by about ``factors``: stride by half the factor, then average 2-blocks.

    Returns
    -------
    coarse : numpy.ndarray, shape (mk, mi, mj), float32
        Block means; trailing remainders are dropped.
    step : numpy.ndarray, shape (3,)
        Original index step between consecutive coarse voxels, per axis.
    first : numpy.ndarray, shape (3,)
        Original (fractional) index of the centre of coarse voxel 0, per axis.
    """
    stride = [f // 2 if f >= 4 else 1 for f in factors]
    sub = hu[:: stride[0], :: stride[1], :: stride[2]]
    block = [min(max(1, f // st), n) for f, st, n in zip(factors, stride, sub.shape, strict=True)]
    n = [s // b for s, b in zip(sub.shape, block, strict=True)]
    cropped = sub[: n[0] * block[0], : n[1] * block[1], : n[2] * block[2]]
    blocks = cropped.reshape(n[0], block[0], n[1], block[1], n[2], block[2])
    coarse = np.asarray(blocks.mean(axis=(1, 3, 5), dtype=np.float32), dtype=np.float32)
    st_arr = np.asarray(stride, dtype=np.float64)
    b_arr = np.asarray(block, dtype=np.float64)
    return coarse, st_arr * b_arr, st_arr * (b_arr - 1.0) / 2.0


def _canonical_coarse(hu: Float32Array, grid: Grid) -> _Canonical:
    """Block-average the CT to about :data:`COARSE_SPACING_MM` and index it ``(z, y, x)``.

    Parameters
    ----------
    hu : numpy.ndarray, shape (nk, ni, nj), float32
        CT in HU in the grid's index order.
    grid : Grid
        Geometry of ``hu``.

    Returns
    -------
    _Canonical
        Coarse volume whose axes are patient z, y, x, each increasing.
    """
    spacing = np.asarray(grid.spacing_mm, dtype=np.float64)
    factors = tuple(int(max(1, round(COARSE_SPACING_MM / s))) for s in spacing)
    fac = (factors[0], factors[1], factors[2])
    coarse, step, first = _block_mean(hu, fac)
    # Index n of the coarse grid is index step * n + first of the original one.
    scale = np.eye(4)
    scale[:3, :3] = np.diag(step)
    scale[:3, 3] = first
    affine = grid.affine @ scale
    steps = affine[:3, :3]
    norms = np.linalg.norm(steps, axis=0)
    unit = steps / norms
    patient_axis = np.argmax(np.abs(unit), axis=0)  # patient axis of each index axis
    aligned = bool(
        np.all(np.abs(unit[patient_axis, np.arange(3)]) > 1.0 - AXIS_ALIGNED_ATOL)
        and sorted(patient_axis.tolist()) == [0, 1, 2]
    )
    if aligned:
        # canonical axis c (0 = z, 1 = y, 2 = x) takes the index axis holding patient axis 2 - c
        perm = [int(np.flatnonzero(patient_axis == 2 - c)[0]) for c in range(3)]
        arr = coarse.transpose(perm)
        origin = affine[:3, 3].copy()
        flips: list[int] = []
        for c, a in enumerate(perm):
            p = 2 - c
            if affine[p, a] < 0:
                flips.append(c)
                origin[p] += affine[p, a] * (coarse.shape[a] - 1)
        if flips:
            arr = np.flip(arr, axis=tuple(flips))
        out_spacing = np.asarray([norms[perm[2]], norms[perm[1]], norms[perm[0]]])
        return _Canonical(np.ascontiguousarray(arr, dtype=np.float32), origin, out_spacing)
    # In-plane rotated grid: resample linearly onto an axis-aligned box covering it.
    nk, ni, nj = coarse.shape
    corners = np.array(
        [[k, i, j] for k in (0, nk - 1) for i in (0, ni - 1) for j in (0, nj - 1)], dtype=float
    )
    pts = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    in_plane = float(min(norms[1], norms[2]))
    out_spacing = np.asarray([in_plane, in_plane, float(norms[0])])
    shape_xyz = np.floor((hi - lo) / out_spacing + 1e-6).astype(int) + 1
    # output index (z, y, x) -> patient -> coarse index (k, i, j)
    to_patient = np.zeros((4, 4))
    to_patient[0, 2], to_patient[1, 1], to_patient[2, 0] = out_spacing
    to_patient[:3, 3] = lo
    to_patient[3, 3] = 1.0
    matrix = np.linalg.inv(affine) @ to_patient
    arr = ndi.affine_transform(
        coarse,
        matrix[:3, :3],
        offset=matrix[:3, 3],
        output_shape=(int(shape_xyz[2]), int(shape_xyz[1]), int(shape_xyz[0])),
        order=1,
        cval=-1000.0,
    )
    return _Canonical(np.asarray(arr, dtype=np.float32), lo, out_spacing)


def _ball_offsets_mm(
    radius_mm: float, spacing_zyx_mm: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, tuple[int, int, int]]:
    """Offsets (mm) along z, y, x of a kernel box covering a ball, and its half sizes (voxels)."""
    half = [int(np.ceil(radius_mm / s)) for s in spacing_zyx_mm]
    dz, dy, dx = np.meshgrid(
        *(
            np.arange(-h, h + 1, dtype=np.float64) * s
            for h, s in zip(half, spacing_zyx_mm, strict=True)
        ),
        indexing="ij",
    )
    return dz, dy, dx, (half[0], half[1], half[2])


def _correlate(
    pairs: list[tuple[Float32Array, FloatArray]], half: tuple[int, int, int]
) -> list[Float32Array]:
    """Normalised correlation of volumes with kernels (FFT, edge-replicated borders).

    Parameters
    ----------
    pairs : list of (volume, kernel)
        Volumes of one shape (nz, ny, nx); kernels of shape ``2 * half + 1`` with non-negative
        weights.
    half : tuple of 3 int
        Kernel half sizes (voxels).

    Returns
    -------
    list of numpy.ndarray, each shape (nz, ny, nx), float32
        ``out[p] = sum_o volume[p + o] * kernel[o] / sum(kernel)``; outside the volume the
        border values are repeated.
    """
    shape = pairs[0][0].shape
    fshape = [sp_fft.next_fast_len(n + 2 * h, real=True) for n, h in zip(shape, half, strict=True)]
    crop = tuple(slice(2 * h, 2 * h + n) for h, n in zip(half, shape, strict=True))
    out = []
    for v, k in pairs:
        flipped = np.ascontiguousarray(k[::-1, ::-1, ::-1] / k.sum(), dtype=np.float32)
        vf = sp_fft.rfftn(np.pad(v, [(h, h) for h in half], mode="edge"), fshape)
        res = sp_fft.irfftn(vf * sp_fft.rfftn(flipped, fshape), fshape)[crop]
        out.append(np.asarray(res, dtype=np.float32))
    return out


def _globe_score(vol: _Canonical) -> Float32Array:
    """Globe score at every coarse voxel, shape (nz, ny, nx), values in [0, 1].

    The product of three fractions around the voxel: vitreous-like voxels in a ball of radius
    :data:`CORE_RADIUS_MM` (the globe's core), non-soft-tissue voxels in the spherical shell
    :data:`SHELL_RADII_MM` (just outside the globe), and fat-or-bone voxels in the posterior
    half of that shell (the orbit behind the globe; +y is posterior).
    """
    h = vol.hu
    vit = ((h >= VITREOUS_HU[0]) & (h <= VITREOUS_HU[1])).astype(np.float32)
    soft = ((h > SOFT_TISSUE_HU[0]) & (h < SOFT_TISSUE_HU[1])).astype(np.float32)
    fat_or_bone = (((h <= SOFT_TISSUE_HU[0]) & (h > AIR_HU)) | (h >= SOFT_TISSUE_HU[1])).astype(
        np.float32
    )
    dz, dy, dx, half = _ball_offsets_mm(SHELL_RADII_MM[1], vol.spacing_mm[::-1])
    r = np.sqrt(dz**2 + dy**2 + dx**2)
    core_k = (r <= CORE_RADIUS_MM).astype(np.float64)
    shell_k = ((r >= SHELL_RADII_MM[0]) & (r <= SHELL_RADII_MM[1])).astype(np.float64)
    post_k = shell_k * (dy >= 0.0)
    core, shell_soft, posterior = _correlate(
        [(vit, core_k), (soft, shell_k), (fat_or_bone, post_k)], half
    )
    score = np.clip(core, 0, 1) * np.clip(1.0 - shell_soft, 0, 1) * np.clip(posterior, 0, 1)
    return np.asarray(score, dtype=np.float32)


def _anterior_air(vol: _Canonical, centre_mm: FloatArray) -> float:
    """Fraction of air voxels in a box in front of (anterior to, smaller y) a globe centre."""
    lo = centre_mm - np.array([ANTERIOR_AIR_HALF_MM, ANTERIOR_AIR_Y_MM[1], ANTERIOR_AIR_HALF_MM])
    hi = centre_mm + np.array([ANTERIOR_AIR_HALF_MM, -ANTERIOR_AIR_Y_MM[0], ANTERIOR_AIR_HALF_MM])
    a = np.floor(vol.to_index(lo)).astype(int)
    b = np.ceil(vol.to_index(hi)).astype(int) + 1
    shape = np.asarray(vol.hu.shape)
    a, b = np.clip(a, 0, shape), np.clip(b, 0, shape)
    box = vol.hu[a[0] : b[0], a[1] : b[1], a[2] : b[2]]
    return float(np.mean(box < AIR_HU)) if box.size else 1.0


def _candidates(vol: _Canonical, score: Float32Array) -> list[_Candidate]:
    """Local maxima of the globe score above :data:`MIN_CANDIDATE_SCORE`, best first."""
    min_dist = max(1, round(CANDIDATE_MIN_DISTANCE_MM / float(vol.spacing_mm.max())))
    peaks = peak_local_max(  # type: ignore[no-untyped-call]
        score,
        min_distance=min_dist,
        threshold_abs=MIN_CANDIDATE_SCORE,
        exclude_border=False,
        num_peaks=MAX_CANDIDATES,
    )
    out = []
    for p in peaks:
        centre = vol.to_patient(p.astype(np.float64))
        out.append(
            _Candidate(
                centre_mm=centre,
                score=float(score[tuple(p)]),
                air_fraction=_anterior_air(vol, centre),
            )
        )
    return out


def _best_pair(cands: list[_Candidate]) -> tuple[_Candidate, _Candidate, float] | None:
    """Best (left, right, pair score) among candidates under the pairing constraints."""
    if len(cands) < 2:
        return None
    c = np.stack([k.centre_mm for k in cands])
    s = np.asarray([k.score for k in cands])
    air = np.clip(np.asarray([k.air_fraction for k in cands]) / ANTERIOR_AIR_MIN_FRACTION, 0, 1)
    dx = c[:, None, 0] - c[None, :, 0]  # left (row) minus right (column)
    dy = np.abs(c[:, None, 1] - c[None, :, 1])
    dz = np.abs(c[:, None, 2] - c[None, :, 2])
    ok = (
        (dx >= EYE_SEPARATION_MM[0])
        & (dx <= EYE_SEPARATION_MM[1])
        & (dy <= MAX_PAIR_DY_MM)
        & (dz <= MAX_PAIR_DZ_MM)
    )
    if not ok.any():
        return None
    symmetry = np.exp(-((dy / MAX_PAIR_DY_MM) ** 2) - (dz / MAX_PAIR_DZ_MM) ** 2)
    pair = np.sqrt(s[:, None] * s[None, :]) * (0.5 + 0.25 * (air[:, None] + air[None, :]))
    pair = np.where(ok, pair * symmetry, -1.0)
    li, ri = np.unravel_index(int(np.argmax(pair)), pair.shape)
    return cands[int(li)], cands[int(ri)], float(pair[li, ri])


def _head_centre_xy(vol: _Canonical, z_mm: float) -> tuple[float, float] | None:
    """Centroid (x, y) in mm of the body's largest cross-section on the coarse plane at z.

    A binary opening first removes thin shells (a thermoplastic mask, the couch surface).
    """
    return _head_centre_on(vol, _coarse_plane(vol, z_mm))


def _coarse_plane(vol: _Canonical, z_mm: float) -> int:
    """Index of the coarse plane nearest to ``z_mm`` (clipped to the volume)."""
    return int(np.clip(round(float(vol.to_index([0.0, 0.0, z_mm])[0])), 0, vol.hu.shape[0] - 1))


def _head_centre_on(vol: _Canonical, kz: int) -> tuple[float, float] | None:
    """:func:`_head_centre_xy` on coarse plane ``kz``."""
    body = ndi.binary_opening(vol.hu[kz] > BODY_HU)
    labels, n = ndi.label(body)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    return (
        float(vol.origin_mm[0] + vol.spacing_mm[0] * cols.mean()),
        float(vol.origin_mm[1] + vol.spacing_mm[1] * rows.mean()),
    )


def _local_box(grid: Grid, centre_mm: FloatArray, half_mm: float) -> tuple[slice, slice, slice]:
    """Index slices of the grid covering the cube ``centre +- half_mm`` (clipped to the grid)."""
    offsets = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], float)
    idx = grid.to_index(centre_mm + half_mm * offsets)
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, np.asarray(grid.shape) - 1)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 1, np.asarray(grid.shape))
    return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))


def neighbour_count(mask: BoolArray, size: int) -> npt.NDArray[np.uint16]:
    """How many voxels of each voxel's ``size`` x ``size`` x ``size`` neighbourhood are set in
    ``mask`` (odd ``size``; outside the array the edge voxels are repeated, as
    ``scipy.ndimage`` filters do with ``mode="nearest"``)."""
    half = size // 2
    count = np.pad(mask, half, mode="edge").astype(np.uint16)
    for axis in range(mask.ndim):
        n = mask.shape[axis]
        lead = (slice(None),) * axis
        total = count[(*lead, slice(0, n))].copy()
        for o in range(1, size):
            total += count[(*lead, slice(o, o + n))]
        count = total
    return count


class MedianClasses:
    """Threshold tests on the ``size``-cube median filter of ``a``, without filtering.

    The median of the ``n = size**3`` neighbours (odd ``n``) is below ``t`` exactly when more
    than ``n // 2`` of them are, and above ``t`` exactly when more than ``n // 2`` of them
    are; so each test is a neighbour count (:func:`neighbour_count`) and selects the same
    voxels as the test on ``scipy.ndimage.median_filter(a, size, mode="nearest")``, at a
    fraction of the cost of sorting every neighbourhood.
    """

    def __init__(self, a: Float32Array, size: int) -> None:
        self._a = a
        self._size = size
        self._rank = size**3 // 2

    def below(self, t: float) -> BoolArray:
        """Voxels whose median is < ``t``."""
        return np.asarray(neighbour_count(self._a < t, self._size) > self._rank)

    def above(self, t: float) -> BoolArray:
        """Voxels whose median is > ``t``."""
        return np.asarray(neighbour_count(self._a > t, self._size) > self._rank)


def _refine_eye(hu: Float32Array, grid: Grid, centre_mm: FloatArray) -> _EyeMask:
    """Refine one globe on the original grid: centre, radius and voxel mask.

    The centre is the point deepest inside the vitreous (maximum of its distance transform)
    within :data:`CENTRE_SEARCH_RADIUS_MM` of the coarse centre;
    the radius is where orbital fat, air or bone first make up :data:`EDGE_DARK_FRACTION` of
    a thin spherical shell (a plausibility check); the mask is the globe-like tissue (holes
    filled) within :data:`GLOBE_MASK_RADIUS_MM`, the connected part through the centre.

    Parameters
    ----------
    hu : numpy.ndarray, shape (nk, ni, nj), float32
        CT in HU.
    grid : Grid
        Geometry of ``hu``.
    centre_mm : numpy.ndarray, shape (3,)
        Coarse centre (x, y, z), mm, LPS.
    """
    box = _local_box(grid, centre_mm, LOCAL_HALF_MM)
    start = np.asarray([s.start for s in box])
    spacing = np.asarray(grid.spacing_mm, dtype=np.float64)
    smooth = MedianClasses(hu[box], MEDIAN_SIZE_VOXELS)  # tests on the median-filtered box
    below_vitreous = smooth.below(VITREOUS_HU[0])
    globe = ndi.binary_fill_holes(~below_vitreous & ~smooth.above(VITREOUS_HU[1]))
    k, i, j = np.meshgrid(
        *(np.arange(s.start, s.stop, dtype=np.float64) for s in box), indexing="ij"
    )
    xyz = grid.to_patient(np.stack([k, i, j], axis=-1))  # (mk, mi, mj, 3)
    # Centre: the point deepest inside the vitreous (distance transform), to sub-voxel
    # precision as the centroid of the near-maximal ridge around it.
    depth = ndi.distance_transform_edt(globe, sampling=spacing)
    near = np.linalg.norm(xyz - centre_mm, axis=-1) <= CENTRE_SEARCH_RADIUS_MM
    depth_near = np.where(near, depth, 0.0)
    top = float(depth_near.max())
    ridge_labels, _ = ndi.label(depth_near >= top - CENTRE_RIDGE_MM)
    peak = np.unravel_index(int(np.argmax(depth_near)), depth.shape)
    ridge = ridge_labels == ridge_labels[peak]
    centre = np.asarray(xyz[ridge].mean(axis=0), dtype=np.float64)
    sub = grid.to_index(centre) - start
    # Radius: first thin shell where fat, air or bone reach EDGE_DARK_FRACTION.
    dist = np.linalg.norm(xyz - centre, axis=-1)
    dark = below_vitreous | smooth.above(SOFT_TISSUE_HU[1])
    bins = np.floor(dist / RADIAL_BIN_MM).astype(np.int64).ravel()
    n_bins = int(LOCAL_HALF_MM / RADIAL_BIN_MM)
    total = np.bincount(bins, minlength=n_bins)[:n_bins]
    hits = np.bincount(bins, weights=dark.ravel().astype(np.float64), minlength=n_bins)[:n_bins]
    frac = np.where(total > 0, hits / np.maximum(total, 1), 0.0)
    first = int(HARD_RADIUS_MM[0] / RADIAL_BIN_MM)
    edge = np.flatnonzero(frac[first:] >= EDGE_DARK_FRACTION)
    radius = float((first + edge[0]) * RADIAL_BIN_MM) if edge.size else LOCAL_HALF_MM
    mask = globe & (dist <= GLOBE_MASK_RADIUS_MM)
    labels, _ = ndi.label(mask)
    centre_idx = tuple(int(v) for v in np.clip(np.round(sub), 0, np.asarray(mask.shape) - 1))
    keep = int(labels[centre_idx])
    if keep == 0:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = int(np.argmax(sizes))
    mask = (labels == keep) if keep else mask
    edges: list[str] = []
    z_all = grid.slice_z_mm()
    ks = np.flatnonzero(mask.any(axis=(1, 2))) + box[0].start
    if ks.size:
        for kk in {0, grid.shape[0] - 1} & {int(ks.min()), int(ks.max())}:
            edges.append("superior" if kk == int(np.argmax(z_all)) else "inferior")
    rows = np.flatnonzero(mask.any(axis=(0, 2))) + box[1].start
    cols = np.flatnonzero(mask.any(axis=(0, 1))) + box[2].start
    if (rows.size and (rows.min() == 0 or rows.max() == grid.shape[1] - 1)) or (
        cols.size and (cols.min() == 0 or cols.max() == grid.shape[2] - 1)
    ):
        edges.append("in-plane")
    points = xyz[mask]
    return _EyeMask(
        centre_mm=centre,
        radius_mm=radius,
        points_mm=points,
        touches_edge=" and ".join(sorted(set(edges))),
        volume_ml=float(mask.sum()) * grid.voxel_volume_ml,
    )


def _eye(mask: _EyeMask, side: str) -> Eye:
    """An :class:`Eye` from a refined mask."""
    p = mask.points_mm
    c = mask.centre_mm
    return Eye(
        name=f"image:{side}",
        side=side,
        centre_mm=(float(c[0]), float(c[1]), float(c[2])),
        z_min_mm=float(p[:, 2].min()),
        z_max_mm=float(p[:, 2].max()),
        y_min_mm=float(p[:, 1].min()),
        y_max_mm=float(p[:, 1].max()),
        volume_ml=mask.volume_ml,
    )


def _fmt(p: FloatArray) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in p) + ")"


def _ramp(value: float, good: tuple[float, float], soft_mm: float) -> float:
    """1 inside ``good``, falling linearly to 0 at ``soft_mm`` beyond either end."""
    below = max(0.0, good[0] - value)
    above = max(0.0, value - good[1])
    return float(max(0.0, 1.0 - (below + above) / soft_mm))


def find_eyes_in_image(hu: npt.NDArray[np.floating], grid: Grid) -> EyeLandmarks:
    """Detect both eye globes in a CT and return the eye landmarks.

    Parameters
    ----------
    hu : numpy.ndarray, shape (nk, ni, nj)
        CT in Hounsfield units (float32 preferred), in the grid's index order; slices may be
        stored in any order and any axial orientation.
    grid : Grid
        Index-to-patient geometry of ``hu`` (LPS, mm).

    Returns
    -------
    EyeLandmarks
        ``source="image"``, ``eyes=(left, right)`` (left = patient left, +x), the landmarks of
        the module docstring computed on the detected globe masks, and a ``confidence`` in
        [0, 1] from the globe scores, radii, volumes and left-right symmetry.

    Raises
    ------
    LandmarkError
        No eye-like pair in the scan (e.g. the scan ends below the eyes), only one eye, a globe
        cut by the edge of the scan, or an implausible size, position or confidence.
    """
    vol_hu = np.asarray(hu, dtype=np.float32)
    if vol_hu.shape != grid.shape:
        raise LandmarkError(f"CT array shape {vol_hu.shape} does not match its grid {grid.shape}")
    z = grid.slice_z_mm()
    scan = f"scan z {float(z.min()):.1f}..{float(z.max()):.1f} mm"
    vol = _canonical_coarse(vol_hu, grid)
    score = _globe_score(vol)
    cands = _candidates(vol, score)
    # Eyes lie in the anterior half of the head (smaller y than the body's centroid).
    cand_planes = [_coarse_plane(vol, float(c.centre_mm[2])) for c in cands]
    heads = {kz: _head_centre_on(vol, kz) for kz in set(cand_planes)}  # planes are shared
    centres = [heads[kz] for kz in cand_planes]
    cands = [c for c, h in zip(cands, centres, strict=True) if h is None or c.centre_mm[1] < h[1]]
    log.debug("eye candidates: %s", [(_fmt(c.centre_mm), round(c.score, 2)) for c in cands])
    best = _best_pair(cands)
    if best is None:
        if not cands:
            found = "no eye-like region"
        else:
            top = cands[0]
            found = (
                f"{len(cands)} eye-like region(s) but no left-right pair, best at "
                f"{_fmt(top.centre_mm)} mm (score {top.score:.2f}), so at most one eye"
            )
        raise LandmarkError(
            f"eyes not found in the CT image: {found} ({scan}; the scan may end below the eyes, "
            f"or one eye is missing); {REMEDY}"
        )
    left_c, right_c, pair_score = best
    mid_x = 0.5 * (left_c.centre_mm[0] + right_c.centre_mm[0])
    head = _head_centre_xy(vol, 0.5 * (left_c.centre_mm[2] + right_c.centre_mm[2]))
    head_x = None if head is None else head[0]
    if head_x is not None and abs(mid_x - head_x) > MAX_MIDLINE_OFFSET_MM:
        raise LandmarkError(
            f"eyes not found in the CT image: the best eye-like pair at {_fmt(left_c.centre_mm)} "
            f"and {_fmt(right_c.centre_mm)} mm is {abs(mid_x - head_x):.0f} mm off the head's "
            f"left-right centre x = {head_x:.1f} mm ({scan}); {REMEDY}"
        )
    left = _refine_eye(vol_hu, grid, left_c.centre_mm)
    right = _refine_eye(vol_hu, grid, right_c.centre_mm)
    for side, m in (("left", left), ("right", right)):
        where = _fmt(m.centre_mm)
        if m.touches_edge:
            raise LandmarkError(
                f"the {side} eye found at {where} mm is cut by the {m.touches_edge} edge of the "
                f"scan ({scan}), so the eye landmarks cannot be measured; {REMEDY}"
            )
        if not HARD_RADIUS_MM[0] <= m.radius_mm <= HARD_RADIUS_MM[1]:
            raise LandmarkError(
                f"the {side} eye candidate at {where} mm has an implausible radius "
                f"{m.radius_mm:.1f} mm (expected {EYE_RADIUS_MM[0]}-{EYE_RADIUS_MM[1]} mm); "
                f"{REMEDY}"
            )
        if m.points_mm.shape[0] == 0:
            raise LandmarkError(f"the {side} eye candidate at {where} mm is empty; {REMEDY}")
    # Landmarks on the masks (module docstring).
    pts = np.concatenate([left.points_mm, right.points_mm])
    z_inferior = float(pts[:, 2].min())
    eye_planes = [np.unique(m.points_mm[:, 2]) for m in (left, right)]
    z_target = float(np.mean([p.mean() for p in eye_planes]))
    planes = np.unique(pts[:, 2])
    dist = np.abs(planes - z_target)
    z_central = float(planes[np.flatnonzero(dist <= dist.min() + 1e-6)[0]])
    on_plane = pts[np.isclose(pts[:, 2], z_central, atol=1e-3)]
    y_mid = float(0.5 * (on_plane[:, 1].min() + on_plane[:, 1].max()))
    # Confidence: scores, size, volume, symmetry, midline.
    d = left.centre_mm - right.centre_mm
    factors = {
        "score": min(1.0, pair_score / 0.6),
        "radius": min(_ramp(m.radius_mm, EYE_RADIUS_MM, 3.0) for m in (left, right)),
        "volume": min(_ramp(m.volume_ml, EYE_VOLUME_ML, 3.0) for m in (left, right)),
        "symmetry": float(np.exp(-((d[1] / 8.0) ** 2) - (d[2] / 8.0) ** 2)),
        "separation": _ramp(float(d[0]), EYE_SEPARATION_MM, 10.0),
        "midline": 1.0 if head_x is None else _ramp(abs(mid_x - head_x), (0.0, 10.0), 20.0),
    }
    confidence = float(np.clip(np.prod(list(factors.values())) ** (1 / len(factors)), 0, 1))
    log.info(
        "eyes found in the image: left %s, right %s mm, radii %.1f/%.1f mm, confidence %.2f (%s)",
        _fmt(left.centre_mm),
        _fmt(right.centre_mm),
        left.radius_mm,
        right.radius_mm,
        confidence,
        ", ".join(f"{k} {v:.2f}" for k, v in factors.items()),
    )
    if confidence < MIN_CONFIDENCE or min(factors.values()) <= 0.0:
        weakest = min(factors, key=lambda k: factors[k])
        raise LandmarkError(
            f"eyes found in the CT image at {_fmt(left.centre_mm)} and {_fmt(right.centre_mm)} mm "
            f"are not plausible (confidence {confidence:.2f}, weakest: {weakest} "
            f"{factors[weakest]:.2f}); {REMEDY}"
        )
    warnings: list[str] = []
    if confidence < 0.6:
        warnings.append(f"eyes found in the CT image with low confidence {confidence:.2f}")
    return EyeLandmarks(
        z_inferior_mm=z_inferior,
        y_mid_mm=y_mid,
        z_central_mm=z_central,
        source="image",
        eyes=(_eye(left, "left"), _eye(right, "right")),
        confidence=confidence,
        warnings=tuple(warnings),
    )


__all__ = [
    "ANTERIOR_AIR_HALF_MM",
    "ANTERIOR_AIR_MIN_FRACTION",
    "ANTERIOR_AIR_Y_MM",
    "COARSE_SPACING_MM",
    "EYE_RADIUS_MM",
    "EYE_SEPARATION_MM",
    "EYE_VOLUME_ML",
    "MIN_CONFIDENCE",
    "VITREOUS_HU",
    "find_eyes_in_image",
]
