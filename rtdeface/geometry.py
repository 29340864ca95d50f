"""Voxel grids in DICOM patient coordinates (LPS, mm): the one affine builder.

Index convention (declared once, used everywhere)
-------------------------------------------------
Arrays are indexed numpy-style as ``(k, i, j)`` = (slice, row, column). The affine ``A``
(4 x 4) maps a homogeneous index column ``[k, i, j, 1]`` to patient coordinates
``[x, y, z, 1]`` in mm::

    A[:3, 0] = slice step   (unit slice normal * signed slice spacing)
    A[:3, 1] = row step     (IOP[3:6] * PixelSpacing[0]: moving down one row, i + 1)
    A[:3, 2] = column step  (IOP[0:3] * PixelSpacing[1]: moving right one column, j + 1)
    A[:3, 3] = ImagePositionPatient of slice k = 0 (centre of voxel (0, 0, 0))

Patient coordinates are LPS: +x patient left, +y posterior, +z superior, whatever the
PatientPosition. rtdeface supports *axial* grids only: the slice normal must be parallel to
the z axis (any in-plane orientation, so HFS/HFP/FFS/FFP and decubitus are all fine); gantry
tilt and oblique acquisitions raise :class:`~rtdeface.errors.GeometryError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from rtdeface.errors import GeometryError

FloatArray = npt.NDArray[np.float64]

ORIENTATION_ATOL = 1e-4
"""Tolerance on ImageOrientationPatient direction cosines (unit length, orthogonality)."""

AXIAL_ATOL = 1e-3
"""Largest allowed |component| of the slice normal along x or y for a grid to count as axial."""

SLICE_SPACING_RTOL = 0.01
"""Largest allowed deviation of one slice gap from the median gap, relative to that median."""

SLICE_SPACING_ATOL_MM = 0.01
"""Absolute slack (mm) added to the relative slice-gap tolerance (rounding in DS strings)."""

IN_PLANE_OFFSET_ATOL_MM = 0.05
"""Largest allowed in-plane shift (mm) between consecutive slice origins (gantry tilt guard)."""

PLANE_MATCH_ATOL_MM = 0.05
"""Two planes (contour z, slice z) within this distance (mm) are the same plane."""


def affine_from_attributes(
    image_position_patient: npt.ArrayLike,
    image_orientation_patient: npt.ArrayLike,
    pixel_spacing: npt.ArrayLike,
    slice_step_mm: float,
) -> FloatArray:
    """Build the 4 x 4 index-to-patient affine of a grid (the module's index convention).

    Parameters
    ----------
    image_position_patient : sequence of 3 float
        IPP of the first slice (k = 0), mm, LPS.
    image_orientation_patient : sequence of 6 float
        IOP: row direction cosines (IOP[0:3], column index j) then column direction cosines
        (IOP[3:6], row index i).
    pixel_spacing : sequence of 2 float
        DICOM PixelSpacing = [row spacing (between rows, along i), column spacing (along j)], mm.
    slice_step_mm : float
        Signed distance (mm) from slice k to k + 1 along the unit normal IOP[0:3] x IOP[3:6].

    Returns
    -------
    numpy.ndarray, shape (4, 4), float64
        Maps ``[k, i, j, 1]`` to ``[x, y, z, 1]`` (mm, LPS).
    """
    iop = np.asarray(image_orientation_patient, dtype=np.float64)
    if iop.shape != (6,):
        raise GeometryError(f"ImageOrientationPatient must have 6 values, got {iop.tolist()}")
    row_dir, col_dir = iop[:3], iop[3:]
    if not (
        np.isclose(np.linalg.norm(row_dir), 1.0, atol=ORIENTATION_ATOL)
        and np.isclose(np.linalg.norm(col_dir), 1.0, atol=ORIENTATION_ATOL)
        and abs(float(row_dir @ col_dir)) < ORIENTATION_ATOL
    ):
        raise GeometryError(
            f"ImageOrientationPatient {iop.tolist()} is not two orthonormal direction cosines; "
            "the file is corrupt or not an image plane"
        )
    spacing = np.asarray(pixel_spacing, dtype=np.float64)
    if spacing.shape != (2,) or np.any(spacing <= 0):
        raise GeometryError(f"PixelSpacing must be two positive numbers, got {spacing.tolist()}")
    normal = np.cross(row_dir, col_dir)
    affine = np.eye(4)
    affine[:3, 0] = normal * float(slice_step_mm)
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = row_dir * spacing[1]
    affine[:3, 3] = np.asarray(image_position_patient, dtype=np.float64)
    return affine


def slice_normal(image_orientation_patient: npt.ArrayLike) -> FloatArray:
    """Unit slice normal IOP[0:3] x IOP[3:6], shape (3,)."""
    iop = np.asarray(image_orientation_patient, dtype=np.float64)
    n = np.cross(iop[:3], iop[3:])
    return np.asarray(n / np.linalg.norm(n), dtype=np.float64)


def check_regular_positions(
    positions_mm: FloatArray, what: str, remedy: str = "re-export the complete series"
) -> float:
    """Check sorted plane positions along a normal form a regular lattice; return the step.

    Parameters
    ----------
    positions_mm : numpy.ndarray, shape (n,)
        Plane positions (mm) along the slice normal, already in index order.
    what : str
        Name of the series or object, for messages.
    remedy : str
        What the user should do when the check fails.

    Returns
    -------
    float
        The signed mean step (mm) between consecutive planes (1.0 for a single plane).

    Raises
    ------
    GeometryError
        Duplicate positions, missing planes (a gap of about twice the usual step) or
        irregular spacing beyond :data:`SLICE_SPACING_RTOL` / :data:`SLICE_SPACING_ATOL_MM`.
    """
    if positions_mm.size < 2:
        return 1.0
    gaps = np.diff(positions_mm)
    abs_gaps = np.abs(gaps)
    dup = np.flatnonzero(abs_gaps <= SLICE_SPACING_ATOL_MM)
    if dup.size:
        raise GeometryError(
            f"{what}: duplicate slice position {positions_mm[dup[0]]:.3f} mm "
            f"({dup.size} duplicate(s)); remove the duplicate files or {remedy}"
        )
    if np.any(np.sign(gaps) != np.sign(gaps[0])):
        raise GeometryError(f"{what}: slice positions are not monotonic; {remedy}")
    median = float(np.median(abs_gaps))
    tol = SLICE_SPACING_RTOL * median + SLICE_SPACING_ATOL_MM
    bad = np.flatnonzero(np.abs(abs_gaps - median) > tol)
    if bad.size:
        b = int(bad[0])
        ratio = abs_gaps[b] / median
        kind = (
            f"missing slice(s) between {positions_mm[b]:.3f} and {positions_mm[b + 1]:.3f} mm"
            if ratio > 1.5
            else f"irregular slice spacing {abs_gaps[b]:.3f} mm vs usual {median:.3f} mm "
            f"at {positions_mm[b]:.3f} mm"
        )
        raise GeometryError(f"{what}: {kind}; {remedy} (tolerance {tol:.3f} mm)")
    return float((positions_mm[-1] - positions_mm[0]) / (positions_mm.size - 1))


@dataclass(frozen=True, eq=False)
class Grid:
    """A regular axial voxel grid: shape ``(nk, ni, nj)`` and its index-to-patient affine.

    Valid once constructed: the affine is 4 x 4 with last row ``[0, 0, 0, 1]``, its three step
    columns are mutually orthogonal and non-zero, and the slice step is parallel to z (axial).

    Attributes
    ----------
    affine : numpy.ndarray, shape (4, 4)
        ``[k, i, j, 1] -> [x, y, z, 1]`` (mm, LPS); see the module docstring.
    shape : tuple of 3 int
        ``(nk, ni, nj)``.
    """

    affine: FloatArray
    shape: tuple[int, int, int]
    _inverse: FloatArray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        a = np.asarray(self.affine, dtype=np.float64)
        if a.shape != (4, 4) or not np.allclose(a[3], [0, 0, 0, 1]):
            raise GeometryError(f"grid affine must be 4x4 with last row [0,0,0,1], got {a}")
        steps = a[:3, :3]
        norms = np.linalg.norm(steps, axis=0)
        if np.any(norms <= 0):
            raise GeometryError(f"grid affine has a zero step: {norms.tolist()}")
        unit = steps / norms
        if not np.allclose(unit.T @ unit, np.eye(3), atol=ORIENTATION_ATOL):
            raise GeometryError("grid affine steps are not orthogonal (sheared grid); unsupported")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise GeometryError(f"grid shape must be 3 positive ints, got {self.shape}")
        if abs(unit[0, 0]) > AXIAL_ATOL or abs(unit[1, 0]) > AXIAL_ATOL:
            raise GeometryError(
                f"slice normal {np.round(unit[:, 0], 4).tolist()} is not along z: oblique or "
                "non-axial series are not supported; reformat to axial slices first"
            )
        object.__setattr__(self, "affine", a)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "_inverse", np.linalg.inv(a))

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Absolute voxel spacing (mm) along k, i, j."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(n[0]), float(n[1]), float(n[2]))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL (cm^3)."""
        s = self.spacing_mm
        return s[0] * s[1] * s[2] / 1000.0

    def to_patient(self, kij: npt.ArrayLike) -> FloatArray:
        """Map indices to patient coordinates.

        Parameters
        ----------
        kij : array_like, shape (..., 3)
            Fractional or integer indices ``(k, i, j)``.

        Returns
        -------
        numpy.ndarray, shape (..., 3)
            ``(x, y, z)`` in mm, LPS.
        """
        p = np.asarray(kij, dtype=np.float64)
        return np.asarray(p @ self.affine[:3, :3].T + self.affine[:3, 3], dtype=np.float64)

    def to_index(self, xyz: npt.ArrayLike) -> FloatArray:
        """Map patient coordinates (mm, LPS), shape (..., 3), to fractional ``(k, i, j)``."""
        p = np.asarray(xyz, dtype=np.float64)
        return np.asarray(p @ self._inverse[:3, :3].T + self._inverse[:3, 3], dtype=np.float64)

    def slab(self, k0: int, k1: int) -> Grid:
        """The grid of slices ``k0 .. k1 - 1`` (index ``k`` of the slab is ``k0 + k`` here)."""
        if not 0 <= k0 < k1 <= self.shape[0]:
            raise GeometryError(f"slab [{k0}, {k1}) is outside the grid's {self.shape[0]} slices")
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, 3] + k0 * self.affine[:3, 0]
        return Grid(affine, (k1 - k0, self.shape[1], self.shape[2]))

    def slice_z_mm(self) -> FloatArray:
        """z (mm) of every slice, shape (nk,), in index order."""
        k = np.arange(self.shape[0], dtype=np.float64)
        return np.asarray(self.affine[2, 0] * k + self.affine[2, 3], dtype=np.float64)

    def plane_xy_mm(self) -> tuple[FloatArray, FloatArray]:
        """Patient x and y (mm) of the voxel centres of one plane, each shape (ni, nj).

        The same for every slice, because an axial grid's slice step has no x or y part.
        """
        i = np.arange(self.shape[1], dtype=np.float64)[:, None]
        j = np.arange(self.shape[2], dtype=np.float64)[None, :]
        a = self.affine
        x = a[0, 1] * i + a[0, 2] * j + a[0, 3]
        y = a[1, 1] * i + a[1, 2] * j + a[1, 3]
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def slice_index_at(self, z_mm: float, atol_mm: float = PLANE_MATCH_ATOL_MM) -> int | None:
        """Index of the slice whose plane is within ``atol_mm`` of ``z_mm``, else None."""
        z = self.slice_z_mm()
        k = int(np.argmin(np.abs(z - z_mm)))
        return k if abs(z[k] - z_mm) <= atol_mm else None


__all__ = [
    "AXIAL_ATOL",
    "IN_PLANE_OFFSET_ATOL_MM",
    "ORIENTATION_ATOL",
    "PLANE_MATCH_ATOL_MM",
    "SLICE_SPACING_ATOL_MM",
    "SLICE_SPACING_RTOL",
    "Grid",
    "affine_from_attributes",
    "check_regular_positions",
    "slice_normal",
]
