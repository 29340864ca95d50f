"""The removal region R, the preserved set P and the cut C = R - P, in patient coordinates.

R is every point with ``z >= z_inferior_mm`` (superior to or on the inferior eye plane) and
``y < y_mid_mm`` (anterior to the eyes' A-P midpoint), over the full left-right width. P is the
union of the preserved ROIs (PTVs and any ROI the user keeps), each interpreted slab-wise: on a
plane at z an ROI's cross-section is the even-odd composition of its contours on its contour
plane nearest to z, when that plane is within half the ROI's plane spacing.

In full-face mode (:mod:`rtdeface.fullface`) R also holds, below the eye plane, every point
anterior to a per-plane limit ``y < y_front(z)`` (a :class:`FaceProfile`); a plane uses the
nearest profile plane within half its spacing, else no extra region.

Every grid samples C at its own voxel centres (:meth:`DefacingRegion.sample`); contours are
clipped against :meth:`DefacingRegion.cut_at` on their own planes. No mask is ever resampled
from one grid to another.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import Polygon, box
from shapely.geometry.base import BaseGeometry

from rtdeface.geometry import PLANE_MATCH_ATOL_MM, Grid
from rtdeface.load import Roi

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

HALF_PLANE_EXTENT_MM = 1.0e5
"""Half width (mm) of the rectangle standing in for the unbounded half plane y < y_mid."""


def polygon_from_points(points_lps_mm: FloatArray) -> BaseGeometry:
    """A valid polygonal geometry from one closed contour's (n, 3) points (x, y used).

    Self-intersecting contours are repaired with :func:`shapely.make_valid`; only polygonal
    parts are kept. Fewer than 3 distinct points give an empty polygon.
    """
    xy = points_lps_mm[:, :2]
    if len(xy) < 3:
        return Polygon()
    poly = Polygon(xy)
    if not poly.is_valid:
        fixed = shapely.make_valid(poly)
        parts = [g for g in shapely.get_parts(fixed) if g.geom_type in ("Polygon", "MultiPolygon")]
        return shapely.union_all(parts) if parts else Polygon()
    return poly


def even_odd(polygons: Sequence[BaseGeometry]) -> BaseGeometry:
    """Even-odd composition of the contours of one plane (holes are separate contours)."""
    if not polygons:
        return Polygon()
    if len(polygons) == 1:
        return polygons[0]
    return reduce(lambda a, b: a.symmetric_difference(b), polygons)


def group_planes(zs: Sequence[float]) -> list[list[int]]:
    """Group contour indices whose plane z agree within :data:`PLANE_MATCH_ATOL_MM`.

    Returns lists of indices into ``zs``, ordered by increasing z.
    """
    order = np.argsort(np.asarray(zs, dtype=np.float64), kind="stable")
    groups: list[list[int]] = []
    last = -np.inf
    for idx in order:
        z = zs[int(idx)]
        if groups and z - last <= PLANE_MATCH_ATOL_MM:
            groups[-1].append(int(idx))
        else:
            groups.append([int(idx)])
            last = z
    return groups


@dataclass(frozen=True, eq=False)
class RoiSections:
    """The closed-planar cross-sections of one ROI, plane by plane.

    Attributes
    ----------
    name : str
        ROI name.
    planes_z_mm : numpy.ndarray, shape (m,)
        Contour plane z (mm), increasing.
    geometries : tuple of shapely geometry
        Even-odd composition of the ROI's closed contours on each plane.
    half_thickness_mm : float
        Half the ROI's plane spacing: a plane's section stands for the slab z +/- this.
    number : int
        ROINumber (-1 when the sections do not come from a structure set ROI).
    """

    name: str
    planes_z_mm: FloatArray
    geometries: tuple[BaseGeometry, ...]
    half_thickness_mm: float
    number: int = -1

    @classmethod
    def from_roi(cls, roi: Roi, default_thickness_mm: float) -> RoiSections:
        """Build the sections of an ROI's CLOSED_PLANAR contours.

        ``default_thickness_mm`` (the CT slice spacing) is used when the ROI has one plane.
        """
        closed = [c for c in roi.contours if c.geometric_type == "CLOSED_PLANAR"]
        zs = [c.z_mm for c in closed]
        planes: list[float] = []
        geoms: list[BaseGeometry] = []
        for group in group_planes(zs):
            planes.append(float(np.mean([zs[g] for g in group])))
            geoms.append(even_odd([polygon_from_points(closed[g].points_lps_mm) for g in group]))
        z = np.asarray(planes, dtype=np.float64)
        thickness = float(np.median(np.diff(z))) if z.size > 1 else default_thickness_mm
        for g in geoms:
            shapely.prepare(g)
        return cls(roi.name, z, tuple(geoms), thickness / 2.0, roi.number)

    def plane_index(self, z_mm: float) -> int:
        """Index of the contour plane standing for z (nearest within half a spacing), or -1."""
        if self.planes_z_mm.size == 0:
            return -1
        k = int(np.argmin(np.abs(self.planes_z_mm - z_mm)))
        if abs(self.planes_z_mm[k] - z_mm) > self.half_thickness_mm + PLANE_MATCH_ATOL_MM:
            return -1
        return -1 if self.geometries[k].is_empty else k

    def at(self, z_mm: float) -> BaseGeometry | None:
        """Cross-section on the plane z: the nearest contour plane within half a spacing."""
        k = self.plane_index(z_mm)
        return None if k < 0 else self.geometries[k]


@dataclass(frozen=True, eq=False)
class FaceProfile:
    """Full-face mode: R below the eye plane is ``y < y_mm`` on the planes ``z_mm``.

    Attributes
    ----------
    z_mm : numpy.ndarray, shape (m,)
        Plane z (mm), increasing (the CT slices the profile was measured on).
    y_mm : numpy.ndarray, shape (m,)
        y limit (mm) on each plane: points with smaller y (anterior) are in R.
    half_thickness_mm : float
        A plane at z uses the nearest profile plane within this distance, else none.
    z_chin_mm : float
        The chin level found (documentation; the planes already encode the extent).
    """

    z_mm: FloatArray
    y_mm: FloatArray
    half_thickness_mm: float
    z_chin_mm: float

    def at(self, z_mm: float | FloatArray) -> FloatArray:
        """y limit on the planes ``z_mm`` (NaN where no profile plane stands for z)."""
        z = np.atleast_1d(np.asarray(z_mm, dtype=np.float64))
        out = np.full(z.shape, np.nan)
        if self.z_mm.size == 0:
            return out
        idx = np.clip(np.searchsorted(self.z_mm, z), 0, self.z_mm.size - 1)
        lower = np.clip(idx - 1, 0, self.z_mm.size - 1)
        near = np.where(np.abs(self.z_mm[lower] - z) <= np.abs(self.z_mm[idx] - z), lower, idx)
        ok = np.abs(self.z_mm[near] - z) <= self.half_thickness_mm + PLANE_MATCH_ATOL_MM
        out[ok] = self.y_mm[near[ok]]
        return out

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (read back by :meth:`from_dict`)."""
        return {
            "z_mm": [float(v) for v in self.z_mm],
            "y_mm": [float(v) for v in self.y_mm],
            "half_thickness_mm": float(self.half_thickness_mm),
            "z_chin_mm": float(self.z_chin_mm),
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> FaceProfile:
        """Inverse of :meth:`to_dict`."""
        z = np.asarray(d["z_mm"], dtype=np.float64)
        y = np.asarray(d["y_mm"], dtype=np.float64)
        order = np.argsort(z, kind="stable")
        return cls(
            z[order], y[order], float(str(d["half_thickness_mm"])), float(str(d["z_chin_mm"]))
        )


@dataclass(frozen=True, eq=False)
class DefacingRegion:
    """R, P and C in patient coordinates.

    Attributes
    ----------
    z_inferior_mm : float
        R is ``z >= z_inferior_mm`` (with :data:`PLANE_MATCH_ATOL_MM` slack, so the eye plane
        itself is in R).
    y_mid_mm : float
        R is ``y < y_mid_mm``.
    preserved : tuple of RoiSections
        The ROIs forming P.
    face : FaceProfile or None
        Full-face mode: below the eye plane R is also ``y < face.at(z)``. None: the published
        region only.
    """

    z_inferior_mm: float
    y_mid_mm: float
    preserved: tuple[RoiSections, ...] = ()
    face: FaceProfile | None = None
    _half_plane: BaseGeometry = field(init=False, repr=False)
    _cache: dict[tuple[str, tuple[int, ...]], BaseGeometry | None] = field(
        init=False, repr=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        hp = box(-HALF_PLANE_EXTENT_MM, -HALF_PLANE_EXTENT_MM, HALF_PLANE_EXTENT_MM, self.y_mid_mm)
        shapely.prepare(hp)
        object.__setattr__(self, "_half_plane", hp)

    @property
    def preserved_names(self) -> tuple[str, ...]:
        """Names of the preserved ROIs."""
        return tuple(p.name for p in self.preserved)

    @property
    def preserved_numbers(self) -> tuple[int, ...]:
        """ROINumbers of the preserved ROIs (ROIs are matched by number, never by name)."""
        return tuple(p.number for p in self.preserved)

    def in_region_z(self, z_mm: float | FloatArray) -> BoolArray:
        """Whether planes at ``z_mm`` are at or above the inferior eye plane."""
        return np.asarray(np.asarray(z_mm) >= self.z_inferior_mm - PLANE_MATCH_ATOL_MM)

    def y_limit(self, z_mm: float | FloatArray) -> FloatArray:
        """R's y limit on the planes ``z_mm``: R there is ``y < limit``; NaN where R is empty.

        ``y_mid_mm`` at or above the eye plane; below it, the face profile (full-face mode).
        """
        z = np.atleast_1d(np.asarray(z_mm, dtype=np.float64))
        above = self.in_region_z(z)
        out = np.where(above, self.y_mid_mm, np.nan)
        if self.face is not None and not above.all():
            out[~above] = self.face.at(z[~above])
        return np.asarray(out, dtype=np.float64)

    def region_at(self, z_mm: float) -> BaseGeometry | None:
        """R on the plane z (a half plane as a large rectangle), None where R is empty."""
        if bool(self.in_region_z(z_mm)):
            return self._half_plane
        if self.face is None:
            return None
        lim = float(self.face.at(z_mm)[0])
        if np.isnan(lim):
            return None
        hp = box(-HALF_PLANE_EXTENT_MM, -HALF_PLANE_EXTENT_MM, HALF_PLANE_EXTENT_MM, lim)
        shapely.prepare(hp)
        return hp

    def _key(self, z_mm: float) -> tuple[int, ...]:
        """Which contour plane of each preserved ROI stands for z (P(z) depends only on it)."""
        return tuple(p.plane_index(z_mm) for p in self.preserved)

    def preserved_at(self, z_mm: float) -> BaseGeometry | None:
        """P on the plane z (union of preserved sections), None when empty."""
        key = ("P", self._key(z_mm))
        if key not in self._cache:
            parts = [p.geometries[k] for p, k in zip(self.preserved, key[1]) if k >= 0]
            geom = None
            if parts:
                geom = parts[0] if len(parts) == 1 else shapely.union_all(parts)
                shapely.prepare(geom)
            self._cache[key] = geom
        return self._cache[key]

    def cut_at(self, z_mm: float) -> BaseGeometry | None:
        """C = R - P on the plane z, None when empty."""
        r = self.region_at(z_mm)
        if r is None:
            return None
        key: tuple[str, tuple[int, ...]] = ("C", self._key(z_mm))
        if not bool(self.in_region_z(z_mm)):
            key = (f"C{float(self.y_limit(z_mm)[0])!r}", key[1])
        if key not in self._cache:
            p = self.preserved_at(z_mm)
            cut = r if p is None else r.difference(p)
            if cut.is_empty:
                cut = None
            else:
                shapely.prepare(cut)
            self._cache[key] = cut
        return self._cache[key]

    def contains_points(self, points_lps_mm: FloatArray) -> BoolArray:
        """Whether each point (n, 3) lies in C (each point judged on its own plane)."""
        pts = np.asarray(points_lps_mm, dtype=np.float64).reshape(-1, 3)
        with np.errstate(invalid="ignore"):
            inside = pts[:, 1] < self.y_limit(pts[:, 2])
        for n in np.flatnonzero(inside):
            p = self.preserved_at(float(pts[n, 2]))
            if p is not None and shapely.intersects_xy(p, pts[n, 0], pts[n, 1]):
                inside[n] = False
        return np.asarray(inside, dtype=bool)

    def slices_in_region(self, grid: Grid) -> npt.NDArray[np.intp]:
        """Indices of the slices of ``grid`` that R meets (the only ones :meth:`sample` can
        mark), ascending."""
        return np.flatnonzero(np.isfinite(self.y_limit(grid.slice_z_mm())))

    def sample(self, grid: Grid) -> tuple[BoolArray, int]:
        """Sample C at the voxel centres of ``grid``.

        Returns
        -------
        cut : numpy.ndarray of bool, shape grid.shape
            True where the voxel centre lies in C.
        preserved_in_region : int
            Number of voxel centres in R that P keeps (the privacy cost of preserving).
        """
        z = grid.slice_z_mm()
        x, y = grid.plane_xy_mm()
        limits = self.y_limit(z)
        cut = zeroed_mask(grid.shape)
        kept = 0
        near = np.empty(x.shape, dtype=bool)  # scratch planes, reused for every slice
        side = np.empty(x.shape, dtype=bool)
        for k in self.slices_in_region(grid):
            plane = cut[k]
            np.less(y, limits[k], out=plane)
            if not plane.any():
                continue
            p = self.preserved_at(float(z[k]))
            if p is not None:  # only centres in P's bounding box are tested against P
                xmin, ymin, xmax, ymax = p.bounds
                np.greater_equal(x, xmin, out=near)
                near &= plane
                near &= np.less_equal(x, xmax, out=side)
                near &= np.greater_equal(y, ymin, out=side)
                near &= np.less_equal(y, ymax, out=side)
                sel = np.flatnonzero(near)
                hit = shapely.intersects_xy(p, x.ravel()[sel], y.ravel()[sel])
                plane.ravel()[sel[hit]] = False
                kept += int(np.count_nonzero(hit))
        return cut, kept


FRESH_MEMORY_BYTES = 1 << 20
"""Masks at least this large are backed by fresh anonymous memory (:func:`zeroed_mask`)."""


def zeroed_mask(shape: tuple[int, ...]) -> BoolArray:
    """A writable all-False boolean array; a large one is backed by a fresh anonymous
    mapping, so its pages cost nothing until written (``np.zeros`` may instead reuse freed
    heap memory and clear it page by page, which after a fork copies every page)."""
    size = int(np.prod(shape))
    if size < FRESH_MEMORY_BYTES:
        return np.zeros(shape, dtype=bool)
    # private: after a fork, a write by either process stays its own
    return np.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE), dtype=bool).reshape(shape)


def preserved_sections(rois: Sequence[Roi], default_thickness_mm: float) -> tuple[RoiSections, ...]:
    """Sections of the given (preserved) ROIs."""
    return tuple(RoiSections.from_roi(r, default_thickness_mm) for r in rois)


PTV_NAME_PATTERN = r"(^|[^a-z])s?ptv"
"""An ROI whose name has a token starting with 'PTV' (or 'SPTV') is PTV-like."""

PTV_HELPER_PATTERN = r"ring|avoid|non[\s_-]*ptv|opt|shell|^\s*z|^\s*~|^\s*x_|-\s*[a-z]|minus|crop"
"""PTV-like names that are helpers, never preserved by default: rings, avoidance/optimisation
structures, 'nonPTV', 'z_'/'~'/'x_' prefixes, subtraction structures ('PTV-Cord', 'PTV70-PTV56')."""


def is_ptv(roi: Roi) -> bool:
    """The default preservation rule (see :data:`PTV_NAME_PATTERN`, :data:`PTV_HELPER_PATTERN`).

    An ROI is preserved when its RTROIInterpretedType is PTV or its name is PTV-like, and its
    name is not a helper.
    """
    name = roi.name.lower()
    if re.search(PTV_HELPER_PATTERN, name):
        return False
    return roi.interpreted_type.upper() == "PTV" or bool(re.search(PTV_NAME_PATTERN, name))


def select_preserved(
    rois: Sequence[Roi], keep_patterns: Sequence[str] = (), ptvs: bool = True
) -> list[Roi]:
    """ROIs forming P: PTVs (by :func:`is_ptv`) plus ROIs whose name matches a keep pattern.

    Keep patterns are case-insensitive regular expressions searched in the ROI name. ROIs with
    no closed contour cannot be preserved (they have no volume) and are left out.
    """
    compiled = [re.compile(p, re.IGNORECASE) for p in keep_patterns]
    out = []
    for r in rois:
        if not any(c.geometric_type == "CLOSED_PLANAR" for c in r.contours):
            continue
        if (ptvs and is_ptv(r)) or any(c.search(r.name) for c in compiled):
            out.append(r)
    return out


def with_margin(sections: RoiSections, margin_mm: float) -> RoiSections:
    """Sections grown by ``margin_mm`` in-plane (shapely buffer) and along z (slab half width)."""
    if margin_mm <= 0:
        return sections
    geoms = tuple(g.buffer(margin_mm) for g in sections.geometries)
    for g in geoms:
        shapely.prepare(g)
    return RoiSections(
        sections.name,
        sections.planes_z_mm,
        geoms,
        sections.half_thickness_mm + margin_mm,
        sections.number,
    )
