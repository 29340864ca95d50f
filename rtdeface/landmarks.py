"""Eye landmarks: the inferior eye plane (z) and the eyes' anterior-posterior midpoint (y).

Definitions (O'Sullivan-Steben, Galarneau, Kildea; defaceRT ``get_eye_contours``), all in
patient coordinates (LPS, mm):

* ``z_inferior_mm``: the smallest z of any contour point of the eye ROIs (the inferior-most
  eye contour plane).
* central eye plane ``z_central_mm``: among the eye ROIs' contour planes, the one nearest to
  the mean over eyes of each eye's mean contour-plane z (ties go to the lower z).
* ``y_mid_mm``: the midpoint of the smallest and largest y of all eye contour points lying on
  the central eye plane.

The removal region is then every point with ``z >= z_inferior_mm`` and ``y < y_mid_mm``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from rtdeface.errors import LandmarkError
from rtdeface.geometry import PLANE_MATCH_ATOL_MM, Grid
from rtdeface.load import Contour, Roi, StructureSet
from rtdeface.region import even_odd, group_planes, polygon_from_points

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Eye:
    """One eye (globe) in patient coordinates.

    Attributes
    ----------
    name : str
        ROI name, or ``"image:left"`` / ``"image:right"`` for eyes found in the image.
    side : str
        ``"left"`` (patient left, +x), ``"right"`` or ``"unknown"``.
    centre_mm : tuple of 3 float
        Centre (x, y, z), mm, LPS.
    z_min_mm, z_max_mm, y_min_mm, y_max_mm : float
        Extent, mm.
    volume_ml : float
        Volume, mL.
    """

    name: str
    side: str
    centre_mm: tuple[float, float, float]
    z_min_mm: float
    z_max_mm: float
    y_min_mm: float
    y_max_mm: float
    volume_ml: float


EYE_AGREEMENT_TOL_MM = 5.0
"""Contoured and image-found landmarks further apart than this (mm, in z or y) raise a warning."""


@dataclass(frozen=True)
class EyeCrossCheck:
    """Contoured eyes compared with the eyes found in the image.

    Attributes
    ----------
    dz_inferior_mm, dy_mid_mm : float or None
        Image minus contours (mm); None when the image search failed.
    image_confidence : float or None
        Confidence of the image search.
    agree : bool
        Both differences within :data:`EYE_AGREEMENT_TOL_MM`.
    message : str
        Human-readable summary.
    """

    dz_inferior_mm: float | None
    dy_mid_mm: float | None
    image_confidence: float | None
    agree: bool
    message: str


@dataclass(frozen=True)
class EyeLandmarks:
    """The landmarks that define the removal region.

    Attributes
    ----------
    z_inferior_mm : float
        Inferior-most eye plane (mm); the region is ``z >= z_inferior_mm``.
    y_mid_mm : float
        Eyes' anterior-posterior midpoint (mm); the region is ``y < y_mid_mm``.
    z_central_mm : float
        Central eye plane used for ``y_mid_mm``.
    source : str
        ``"contours"``, ``"image"`` or ``"manual"``.
    eyes : tuple of Eye
        The eyes used.
    confidence : float or None
        Detection confidence in [0, 1] for image-derived landmarks; None for contours.
    warnings : tuple of str
        Non-fatal findings (e.g. a single eye).
    """

    z_inferior_mm: float
    y_mid_mm: float
    z_central_mm: float
    source: str
    eyes: tuple[Eye, ...]
    confidence: float | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    cross_check: EyeCrossCheck | None = None


DEFAULT_EYE_PATTERN = r"eye|globe|orbit|bulbus|oculi|oculus|auge|oeil|œil|ojo|occhio|bulbe"
"""Names that denote an eye globe (case-insensitive search). 'Orbit' is often used for the globe."""

DEFAULT_EYE_EXCLUDE = (
    r"prv|lens|linse|crystal|optic|opt_?n|nerve|nrv|lacrim|ring|avoid|cornea|retina|chiasm"
    r"|ptv|ctv|gtv|itv|planning|expan|\+|\d\s*mm\b|\d\s*cm\b|lid|brow|muscle|fat|wall|bone"
    r"|^\s*z_|^\s*z[A-Z]|^\s*~|^\s*x_|^\s*_|dose|opt"
)
"""Helpers that must not be taken for an eye: PRVs, lenses, optic nerves, lacrimal glands,
rings, avoidance/optimisation structures, expansions, 'z_' / '~' / 'x_' prefixed helpers."""

LEFT_TOKENS = frozenset(
    {"l", "lt", "left", "links", "li", "sin", "sinister", "os", "g", "gauche", "izq"}
)
"""Name tokens meaning patient left."""

RIGHT_TOKENS = frozenset(
    {"r", "rt", "right", "rechts", "re", "dx", "dex", "dexter", "od", "d", "droit", "der"}
)
"""Name tokens meaning patient right."""

EYE_VOLUME_RANGE_ML = (1.5, 20.0)
"""Plausible volume of one contoured globe (mL); adult globes are about 6-8 mL."""


def _tokens(name: str) -> list[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return [t for t in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if t]


def side_from_name(name: str) -> str:
    """``left``, ``right`` or ``unknown`` from an ROI name (e.g. Eye_Lt, Globe_R, OD)."""
    toks = set(_tokens(name))
    left, right = bool(toks & LEFT_TOKENS), bool(toks & RIGHT_TOKENS)
    if left and not right:
        return "left"
    if right and not left:
        return "right"
    return "unknown"


def is_eye_name(
    name: str, pattern: str = DEFAULT_EYE_PATTERN, exclude: str = DEFAULT_EYE_EXCLUDE
) -> bool:
    """Whether an ROI name denotes an eye globe under the given patterns."""
    return bool(re.search(pattern, name, re.IGNORECASE)) and not re.search(
        exclude, name, re.IGNORECASE
    )


def _planes(contours: Sequence[Contour]) -> dict[float, list[Contour]]:
    planes: dict[float, list[Contour]] = {}
    zs = [c.z_mm for c in contours]
    for group in group_planes(zs):
        planes[float(np.mean([zs[g] for g in group]))] = [contours[g] for g in group]
    return planes


@dataclass(frozen=True, eq=False)
class ClosedPlanes:
    """The closed planar contours of one ROI grouped by plane, with each plane's area.

    Attributes
    ----------
    contours : tuple of Contour
        The ROI's CLOSED_PLANAR contours, in their order.
    groups : tuple of tuple of int
        Per plane (increasing z), the indices into ``contours`` of the plane's contours
        (:func:`rtdeface.region.group_planes`).
    z_mm : numpy.ndarray, shape (n_planes,)
        Plane z (mm): the mean of its contours' mean z.
    area_mm2 : numpy.ndarray, shape (n_planes,)
        The even-odd area of each plane's contours.
    default_thickness_mm : float
        Slab thickness used when there is only one plane.
    """

    contours: tuple[Contour, ...]
    groups: tuple[tuple[int, ...], ...]
    z_mm: npt.NDArray[np.float64]
    area_mm2: npt.NDArray[np.float64]
    default_thickness_mm: float

    def volume_ml(self) -> float:
        """Volume (mL): the planes' areas (summed in plane order) times the median plane
        spacing (:attr:`default_thickness_mm` for a single plane)."""
        if self.z_mm.size == 0:
            return 0.0
        z = self.z_mm
        thickness = float(np.median(np.diff(z))) if z.size > 1 else self.default_thickness_mm
        return float(sum(self.area_mm2.tolist()) * thickness / 1000.0)


def closed_planes(
    contours: Sequence[Contour], default_thickness_mm: float, known: ClosedPlanes | None = None
) -> ClosedPlanes:
    """Group the closed planar contours of ``contours`` by plane and measure every plane.

    Vectorised: the rings that need measuring are built and checked in one shapely call
    each; planes with one valid contour take its area, others go through
    :func:`even_odd_area` (invalid contours are repaired first with
    :func:`rtdeface.region.polygon_from_points`). A plane made of the very same contour
    objects, in the same order, as a plane of ``known`` takes that plane's area (e.g. the
    planes the cut left alone, measured before it): the result is the same as measuring it.
    """
    closed = tuple(c for c in contours if c.geometric_type == "CLOSED_PLANAR")
    if not closed:
        empty = np.zeros(0, dtype=np.float64)
        return ClosedPlanes(closed, (), empty, empty, default_thickness_mm)
    lengths = np.asarray([len(c.points_lps_mm) for c in closed], dtype=np.int64)
    flat = np.concatenate([c.points_lps_mm for c in closed])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    zs = np.add.reduceat(flat[:, 2], starts) / lengths
    groups = [tuple(g) for g in group_planes(zs.tolist())]
    plane_z = np.asarray([float(np.mean(zs[list(g)])) for g in groups], dtype=np.float64)
    areas = np.full(len(groups), np.nan, dtype=np.float64)
    if known is not None:
        by_members = {
            tuple(id(known.contours[i]) for i in g): a
            for g, a in zip(known.groups, known.area_mm2.tolist(), strict=True)
        }
        for n, g in enumerate(groups):
            found = by_members.get(tuple(id(closed[i]) for i in g))
            if found is not None:
                areas[n] = found
    todo = [n for n in range(len(groups)) if np.isnan(areas[n])]
    need = sorted({i for n in todo for i in groups[n]})
    polys = np.full(len(closed), None, dtype=object)
    valid = np.zeros(len(closed), dtype=bool)
    ringable = np.asarray([i for i in need if lengths[i] >= 3], dtype=np.int64)
    if ringable.size:
        keep = np.zeros(len(closed), dtype=bool)
        keep[ringable] = True
        points = flat[np.repeat(keep, lengths)][:, :2]
        index = np.repeat(np.arange(ringable.size), lengths[ringable])  # 0..n-1, no gaps
        polys[ringable] = shapely.polygons(shapely.linearrings(points, indices=index))
        valid[ringable] = shapely.is_valid(polys[ringable].astype(object))

    def polygon(i: int) -> BaseGeometry:
        if valid[i]:
            return polys[i]
        return polygon_from_points(closed[i].points_lps_mm)

    for n in todo:
        g = groups[n]
        if len(g) == 1:
            i = g[0]
            areas[n] = float(shapely.area(polys[i])) if valid[i] else polygon(i).area
        else:
            areas[n] = even_odd_area([polygon(i) for i in g])
    return ClosedPlanes(closed, tuple(groups), plane_z, areas, default_thickness_mm)


def closed_volume_ml(contours: Sequence[Contour], default_thickness_mm: float) -> float:
    """Volume (mL) of closed planar contours: even-odd area per plane x plane spacing
    (:class:`ClosedPlanes`)."""
    return closed_planes(contours, default_thickness_mm).volume_ml()


def even_odd_area(polygons: Sequence[BaseGeometry]) -> float:
    """Area (mm^2) of the even-odd composition of one plane's contours.

    When no two contours' boundaries meet (each pair is nested or apart, as holes and islands
    are), the composition's area is the sum of the areas with sign (-1)^depth, depth being
    the number of contours that contain the contour; that needs only containment tests. Any
    other configuration (crossing or touching contours, repaired self-intersections) is
    composed with :func:`rtdeface.region.even_odd`.
    """
    polys = [p for p in polygons if not p.is_empty]
    if not polys:
        return 0.0
    if len(polys) == 1:
        return float(polys[0].area)
    if not all(isinstance(p, Polygon) for p in polys):
        return float(even_odd(polygons).area)
    arr = np.asarray(polys, dtype=object)
    b = shapely.bounds(arr)
    overlap = (
        (b[:, None, 0] <= b[None, :, 2])
        & (b[None, :, 0] <= b[:, None, 2])
        & (b[:, None, 1] <= b[None, :, 3])
        & (b[None, :, 1] <= b[:, None, 3])
    )
    np.fill_diagonal(overlap, False)
    depth = np.zeros(len(polys), dtype=np.int64)
    for i, j in zip(*np.nonzero(np.triu(overlap))):
        a, c = polys[int(i)], polys[int(j)]
        if a.contains_properly(c):
            depth[j] += 1
        elif c.contains_properly(a):
            depth[i] += 1
        elif not a.disjoint(c):
            return float(even_odd(polygons).area)
    areas = shapely.area(arr).astype(np.float64)
    return float(np.sum(np.where(depth % 2 == 0, areas, -areas)))


def eye_from_roi(roi: Roi, default_thickness_mm: float) -> Eye:
    """Describe a contoured eye (extent, centre, volume) from its closed contours."""
    closed = [c for c in roi.contours if c.geometric_type == "CLOSED_PLANAR"]
    pts = np.concatenate([c.points_lps_mm for c in closed])
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    centre = (lo + hi) / 2.0
    return Eye(
        name=roi.name,
        side=side_from_name(roi.name),
        centre_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        z_min_mm=float(lo[2]),
        z_max_mm=float(hi[2]),
        y_min_mm=float(lo[1]),
        y_max_mm=float(hi[1]),
        volume_ml=closed_volume_ml(closed, default_thickness_mm),
    )


def select_eye_rois(
    structure_set: StructureSet,
    ct_grid: Grid,
    eye_roi_names: Sequence[str] = (),
    pattern: str = DEFAULT_EYE_PATTERN,
    exclude: str = DEFAULT_EYE_EXCLUDE,
) -> tuple[list[Roi], list[str]]:
    """Choose the eye ROIs: the named ones, else at most one left and one right by pattern.

    Returns
    -------
    rois : list of Roi
        One or two eyes (left first when known).
    warnings : list of str
        Non-fatal findings (single eye, ambiguous candidates, implausible ones skipped).

    Raises
    ------
    LandmarkError
        No usable eye ROI; the message lists the ROI names seen and the options to pass.
    """
    names_seen = [r.name for r in structure_set.rois]
    thickness = ct_grid.spacing_mm[0]
    warnings: list[str] = []
    if eye_roi_names:
        wanted = {n.strip().lower() for n in eye_roi_names}
        chosen = [r for r in structure_set.rois if r.name.strip().lower() in wanted]
        missing = wanted - {r.name.strip().lower() for r in chosen}
        if missing:
            raise LandmarkError(
                f"{structure_set.path}: --eye-roi {', '.join(sorted(missing))} not found; "
                f"ROI names seen: {', '.join(repr(n) for n in names_seen)}"
            )
        chosen = [r for r in chosen if any(c.geometric_type == "CLOSED_PLANAR" for c in r.contours)]
        if not chosen:
            raise LandmarkError(
                f"{structure_set.path}: the ROIs given with --eye-roi have no closed contours"
            )
        return chosen, warnings
    candidates = [
        r
        for r in structure_set.rois
        if is_eye_name(r.name, pattern, exclude)
        and any(c.geometric_type == "CLOSED_PLANAR" for c in r.contours)
    ]
    z_ct = ct_grid.slice_z_mm()
    z_lo, z_hi = float(z_ct.min()), float(z_ct.max())
    plausible: list[tuple[Roi, Eye]] = []
    for r in candidates:
        eye = eye_from_roi(r, thickness)
        if eye.z_min_mm < z_lo - thickness or eye.z_max_mm > z_hi + thickness:
            warnings.append(f"eye ROI {r.name!r} lies outside the CT z range; ignored")
            continue
        lo_ml, hi_ml = EYE_VOLUME_RANGE_ML
        if not lo_ml <= eye.volume_ml <= hi_ml:
            warnings.append(
                f"eye ROI {r.name!r} volume {eye.volume_ml:.2f} mL outside the plausible "
                f"{lo_ml}-{hi_ml} mL; ignored (name it with --eye-roi to force it)"
            )
            continue
        plausible.append((r, eye))
    if not plausible:
        detail = f" ({'; '.join(warnings)})" if warnings else ""
        raise LandmarkError(
            f"{structure_set.path}: no eye ROI found{detail}; ROI names seen: "
            f"{', '.join(repr(n) for n in names_seen)}; pass --eye-roi NAME (repeatable) to name "
            "the eye contours, or --eyes image to find the eyes in the CT"
        )
    by_side: dict[str, list[tuple[Roi, Eye]]] = {"left": [], "right": [], "unknown": []}
    for r, e in plausible:
        by_side[e.side].append((r, e))
    if by_side["unknown"] and len(plausible) == 2 and not (by_side["left"] and by_side["right"]):
        # sides from position: patient left is +x
        (ra, ea), (rb, eb) = plausible
        by_side = {"left": [], "right": [], "unknown": []}
        left, right = (
            ((ra, ea), (rb, eb)) if ea.centre_mm[0] > eb.centre_mm[0] else ((rb, eb), (ra, ea))
        )
        by_side["left"].append(left)
        by_side["right"].append(right)
    chosen = []
    for side in ("left", "right"):
        cands = by_side[side]
        if not cands:
            continue
        cands.sort(key=lambda re_: abs(re_[1].volume_ml - 7.0))
        if len(cands) > 1:
            warnings.append(
                f"several {side} eye ROIs ({', '.join(r.name for r, _ in cands)}); using "
                f"{cands[0][0].name!r} (pass --eye-roi to choose)"
            )
        chosen.append(cands[0][0])
    if not chosen:
        chosen = [by_side["unknown"][0][0]]
    if len(chosen) == 1:
        warnings.append(f"only one eye ROI ({chosen[0].name!r}); landmarks come from a single eye")
    return chosen, warnings


def landmarks_from_rois(
    rois: Sequence[Roi], default_thickness_mm: float, warnings: Sequence[str] = ()
) -> EyeLandmarks:
    """Compute the published landmarks from eye contours (see the module docstring)."""
    eyes = tuple(eye_from_roi(r, default_thickness_mm) for r in rois)
    closed = [[c for c in r.contours if c.geometric_type == "CLOSED_PLANAR"] for r in rois]
    all_pts = np.concatenate([c.points_lps_mm for cs in closed for c in cs])
    z_inferior = float(all_pts[:, 2].min())
    plane_sets = [sorted(_planes(cs)) for cs in closed]
    z_avg = float(np.mean([np.mean(p) for p in plane_sets]))
    all_planes = np.asarray(sorted({z for p in plane_sets for z in p}), dtype=np.float64)
    dist = np.abs(all_planes - z_avg)
    z_central = float(all_planes[np.flatnonzero(dist <= dist.min() + 1e-9)[0]])
    on_plane = all_pts[np.abs(all_pts[:, 2] - z_central) <= PLANE_MATCH_ATOL_MM]
    y_mid = float((on_plane[:, 1].min() + on_plane[:, 1].max()) / 2.0)
    for w in warnings:
        log.warning("%s", w)
    return EyeLandmarks(
        z_inferior_mm=z_inferior,
        y_mid_mm=y_mid,
        z_central_mm=z_central,
        source="contours",
        eyes=eyes,
        confidence=None,
        warnings=tuple(warnings),
    )


def cross_check(
    contoured: EyeLandmarks, image: EyeLandmarks | None, error: str = ""
) -> EyeLandmarks:
    """Attach the comparison of contoured and image-found landmarks (warn on disagreement)."""
    if image is None:
        check = EyeCrossCheck(None, None, None, False, f"image cross-check not possible: {error}")
        return dataclasses.replace(contoured, cross_check=check)
    dz = image.z_inferior_mm - contoured.z_inferior_mm
    dy = image.y_mid_mm - contoured.y_mid_mm
    agree = abs(dz) <= EYE_AGREEMENT_TOL_MM and abs(dy) <= EYE_AGREEMENT_TOL_MM
    msg = (
        f"eyes found in the image differ from the contoured eyes by dz {dz:+.1f} mm, "
        f"dy {dy:+.1f} mm (tolerance {EYE_AGREEMENT_TOL_MM} mm)"
    )
    warnings = contoured.warnings
    if not agree:
        msg += "; check the eye contours (names, laterality, slices) or pass --eye-roi / --eyes"
        log.warning("%s", msg)
        warnings = (*warnings, msg)
    check = EyeCrossCheck(dz, dy, image.confidence, agree, msg)
    return dataclasses.replace(contoured, cross_check=check, warnings=warnings)
