"""QA images of a defaced case (PNG, plus one multi-page PDF for a batch), with matplotlib (Agg).

Per case, :func:`case_images` writes two PNGs into a QA folder (never inside the shareable
defaced folder; the CLI chooses it):

``qa_planes.png``
    Before / after: a sagittal plane through an eye (the eye with the largest x, i.e. the
    patient's left, from the report's landmarks; else through the preserved ROIs' or the CT's
    centre) and the axial plane at the inferior eye plane ``z_inferior_mm``; CT in grey, ROI
    outlines (preserved ROIs thick red, others thin), the cut boundary (dashed yellow:
    ``z = z_inferior_mm`` and ``y = y_mid_mm``) and a dose colour wash (doses above 5 % of the
    maximum).
``qa_surface.png``
    Before / after skin-surface renderings from the front and from 45 degrees to the patient's
    left: orthographic numpy ray casting through a body mask (CT > :data:`SKIN_HU` on a grid
    downsampled in-plane to about :data:`SURFACE_STEP_MM`), Lambert-shaded from the depth map.

Display only: the planes and renderings are sampled from each grid by nearest voxel (in patient
coordinates, so every orientation displays the same way); nothing here feeds any check.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
import shapely
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from shapely.geometry import Polygon

from rtdeface.dvh import dose_gy
from rtdeface.geometry import Grid
from rtdeface.load import Case, CtSeries
from rtdeface.region import DefacingRegion, RoiSections

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

SKIN_HU = -400.0
"""Body/air threshold (HU) of the skin surface rendering."""

SURFACE_STEP_MM = 2.0
"""Approximate sample spacing (mm) of the surface rendering."""

DOSE_WASH_FRACTION = 0.05
"""Doses below this fraction of the maximum are not colour-washed."""

WINDOW_HU = (-400.0, 600.0)
"""Grey window (HU) of the CT planes."""


def _sample_slice(
    values: npt.NDArray[np.floating[Any]], grid: Grid, k: int, x: FloatArray, y: FloatArray
) -> FloatArray:
    """Nearest-voxel values of slice ``k`` at in-plane points (x, y) (NaN outside the grid)."""
    z = float(grid.slice_z_mm()[k])
    kij = grid.to_index(np.stack([x, y, np.full_like(x, z)], axis=-1))
    i = np.rint(kij[..., 1]).astype(np.int64)
    j = np.rint(kij[..., 2]).astype(np.int64)
    ok = (i >= 0) & (i < grid.shape[1]) & (j >= 0) & (j < grid.shape[2])
    out = np.full(x.shape, np.nan)
    out[ok] = values[i[ok], j[ok]]
    return out


def _sample_volume(volume: FloatArray, grid: Grid, pts: FloatArray) -> FloatArray:
    """Nearest-voxel values of a volume at points (..., 3) (NaN outside the grid)."""
    kij = np.rint(grid.to_index(pts)).astype(np.int64)
    ok = np.all((kij >= 0) & (kij < np.asarray(grid.shape)), axis=-1)
    out = np.full(pts.shape[:-1], np.nan)
    out[ok] = volume[kij[ok, 0], kij[ok, 1], kij[ok, 2]]
    return out


def _extent_xy(grid: Grid) -> tuple[float, float, float, float]:
    x, y = grid.plane_xy_mm()
    return float(x.min()), float(x.max()), float(y.min()), float(y.max())


def eye_x_from_report(defaced_dir: Path) -> float | None:
    """x (mm) of the patient's left-most eye centre in ``rtdeface_report.json`` (None if absent)."""
    path = Path(defaced_dir) / "rtdeface_report.json"
    if not path.is_file():
        return None
    report: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    eyes = report.get("landmarks", {}).get("eyes", [])
    xs = [float(e["centre_mm"][0]) for e in eyes if e.get("centre_mm")]
    return max(xs) if xs else None


def _ct_planes(
    ct: CtSeries, x0: float, z0: float, step: float
) -> tuple[FloatArray, FloatArray, tuple[float, ...], tuple[float, ...], int]:
    """Sagittal (z rows increasing, y columns) and axial (y rows, x columns) HU planes."""
    g = ct.grid
    xmin, xmax, ymin, ymax = _extent_xy(g)
    ys = np.arange(ymin, ymax + step / 2, step)
    xs = np.arange(xmin, xmax + step / 2, step)
    z = g.slice_z_mm()
    order = np.argsort(z)
    sag = np.full((z.size, ys.size), np.nan)
    for row, k in enumerate(order):
        sag[row] = _sample_slice(ct.hu_slice(int(k)), g, int(k), np.full_like(ys, x0), ys)
    k0 = int(np.argmin(np.abs(z - z0)))
    xx, yy = np.meshgrid(xs, ys)
    ax = _sample_slice(ct.hu_slice(k0), g, k0, xx, yy)
    sag_ext = (float(ys[0]), float(ys[-1]), float(z.min()), float(z.max()))
    ax_ext = (float(xs[0]), float(xs[-1]), float(ys[-1]), float(ys[0]))
    return sag, ax, sag_ext, ax_ext, k0


def _dose_planes(
    case: Case,
    x0: float,
    z_axial: float,
    sag_ext: tuple[float, ...],
    ax_ext: tuple[float, ...],
    sag_shape: tuple[int, int],
    ax_shape: tuple[int, int],
) -> tuple[FloatArray | None, FloatArray | None]:
    if not case.doses:
        return None, None
    d = case.doses[0]
    gy = dose_gy(d)
    ys = np.linspace(sag_ext[0], sag_ext[1], sag_shape[1])
    zs = np.linspace(sag_ext[2], sag_ext[3], sag_shape[0])
    yy, zz = np.meshgrid(ys, zs)
    sag = _sample_volume(gy, d.grid, np.stack([np.full_like(yy, x0), yy, zz], axis=-1))
    xs = np.linspace(ax_ext[0], ax_ext[1], ax_shape[1])
    ya = np.linspace(ax_ext[3], ax_ext[2], ax_shape[0])
    xx, yy2 = np.meshgrid(xs, ya)
    axial = _sample_volume(gy, d.grid, np.stack([xx, yy2, np.full_like(xx, z_axial)], axis=-1))
    return sag, axial


def _sections(case: Case) -> list[RoiSections]:
    if case.structure_set is None:
        return []
    t = case.ct.grid.spacing_mm[0]
    return [RoiSections.from_roi(r, t) for r in case.structure_set.rois]


def _draw_planes(
    axes: Sequence[Any],
    case: Case,
    region: DefacingRegion,
    x0: float,
    step: float,
    label: str,
    vmax: float | None,
) -> Any:
    sag, axial, sag_ext, ax_ext, k0 = _ct_planes(case.ct, x0, region.z_inferior_mm, step)
    z_ax = float(case.ct.grid.slice_z_mm()[k0])
    dsag, dax = _dose_planes(case, x0, z_ax, sag_ext, ax_ext, sag.shape, axial.shape)
    preserved = set(region.preserved_names)
    sections = _sections(case)
    colours = plt.get_cmap("tab20")
    mappable = None
    for n, (ax, img, dimg, ext) in enumerate(
        ((axes[0], sag, dsag, sag_ext), (axes[1], axial, dax, ax_ext))
    ):
        origin = "lower" if n == 0 else "upper"
        ax.imshow(
            img,
            cmap="gray",
            vmin=WINDOW_HU[0],
            vmax=WINDOW_HU[1],
            extent=ext,
            origin=origin,
            interpolation="nearest",
        )
        if dimg is not None and vmax:
            wash = np.ma.masked_where(~(dimg > DOSE_WASH_FRACTION * vmax), dimg)
            mappable = ax.imshow(
                wash,
                cmap="jet",
                alpha=0.35,
                vmin=0,
                vmax=vmax,
                extent=ext,
                origin=origin,
                interpolation="nearest",
            )
        ax.set_facecolor("black")
    # ROI outlines: sagittal from a mask on the plane's sample grid, axial from the polygons
    ys = np.linspace(sag_ext[0], sag_ext[1], sag.shape[1])
    zs = np.linspace(sag_ext[2], sag_ext[3], sag.shape[0])
    for n, s in enumerate(sections):
        if s.planes_z_mm.size == 0:
            continue
        keep = s.name in preserved
        style: dict[str, Any] = {
            "color": "red" if keep else colours(n % 20),
            "linewidth": 1.6 if keep else 0.7,
        }
        mask = np.zeros(sag.shape, dtype=bool)
        for r, z in enumerate(zs):
            geom = s.at(float(z))
            if geom is not None:
                mask[r] = shapely.intersects_xy(geom, np.full_like(ys, x0), ys)
        if mask.any():
            axes[0].contour(
                ys,
                zs,
                mask.astype(float),
                levels=[0.5],
                colors=[style["color"]],
                linewidths=style["linewidth"],
            )
        geom = s.at(z_ax)
        if geom is not None:
            for part in shapely.get_parts(geom):
                if isinstance(part, Polygon):
                    for ring in (part.exterior, *part.interiors):
                        xy = np.asarray(ring.coords)
                        axes[1].plot(xy[:, 0], xy[:, 1], **style)
    # the cut boundary
    y_lo = sag_ext[0]
    cut = {"color": "yellow", "linestyle": "--", "linewidth": 1.2}
    axes[0].plot([y_lo, region.y_mid_mm], [region.z_inferior_mm] * 2, **cut)
    axes[0].plot([region.y_mid_mm] * 2, [region.z_inferior_mm, sag_ext[3]], **cut)
    axes[1].axhline(region.y_mid_mm, **cut)
    axes[0].set_xlim(sag_ext[0], sag_ext[1])
    axes[0].set_ylim(sag_ext[2], sag_ext[3])
    axes[1].set_xlim(ax_ext[0], ax_ext[1])
    axes[1].set_ylim(ax_ext[2], ax_ext[3])
    axes[0].set_title(f"{label}: sagittal x = {x0:.1f} mm", fontsize=9)
    axes[1].set_title(f"{label}: axial z = {z_ax:.1f} mm (inferior eye plane)", fontsize=9)
    axes[0].set_xlabel("y (mm, anterior <- -> posterior)", fontsize=8)
    axes[0].set_ylabel("z (mm, superior up)", fontsize=8)
    axes[1].set_xlabel("x (mm, patient right <- -> left)", fontsize=8)
    axes[1].set_ylabel("y (mm, anterior up)", fontsize=8)
    for ax in axes:
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
    return mappable


def _body_volume(ct: CtSeries, step_mm: float) -> tuple[npt.NDArray[np.bool_], Grid]:
    """Body mask (HU > :data:`SKIN_HU`) downsampled in-plane by an integer factor, and its grid."""
    g = ct.grid
    s = max(1, round(step_mm / min(g.spacing_mm[1], g.spacing_mm[2])))
    first = ct.hu_slice(0)[::s, ::s]
    vol = np.zeros((g.shape[0], *first.shape), dtype=bool)
    for k in range(g.shape[0]):
        vol[k] = ct.hu_slice(k)[::s, ::s] > SKIN_HU
    affine = g.affine.copy()
    affine[:3, 1:3] *= s
    return vol, Grid(affine, (g.shape[0], first.shape[0], first.shape[1]))


def render_surface(
    ct: CtSeries, azimuth_deg: float, step_mm: float = SURFACE_STEP_MM
) -> tuple[FloatArray, tuple[float, float, float, float]]:
    """Shaded skin surface seen from the front, rotated ``azimuth_deg`` towards patient left.

    Orthographic ray casting: for every image row (one CT slice, so z up) and column u, the
    first body voxel along the viewing direction gives the depth; Lambert shading of the depth
    map's normals. Returns the image (rows = increasing z; NaN where a ray misses the body) and
    its extent (u_min, u_max, z_min, z_max) in mm.
    """
    vol, g = _body_volume(ct, step_mm)
    xmin, xmax, ymin, ymax = _extent_xy(g)
    centre = np.array([(xmin + xmax) / 2, (ymin + ymax) / 2])
    radius = float(np.hypot(xmax - xmin, ymax - ymin) / 2)
    th = np.deg2rad(azimuth_deg)
    view = np.array([-np.sin(th), np.cos(th)])  # from anterior towards posterior at 0 deg
    uvec = np.array([np.cos(th), np.sin(th)])  # patient left to the viewer's right
    u = np.arange(-radius, radius, step_mm)
    t = np.arange(-radius, radius, step_mm)
    px = centre[0] + u[None, :] * uvec[0] + t[:, None] * view[0]
    py = centre[1] + u[None, :] * uvec[1] + t[:, None] * view[1]
    z = g.slice_z_mm()
    order = np.argsort(z)
    depth = np.full((z.size, u.size), np.nan)
    for row, k in enumerate(order):
        hit = _sample_slice(vol[int(k)].astype(np.float64), g, int(k), px, py)
        solid = np.nan_to_num(hit) > 0.5
        first = np.argmax(solid, axis=0)
        anyhit = solid.any(axis=0)
        depth[row, anyhit] = t[first[anyhit]]
    dz = abs(float(np.median(np.diff(np.sort(z))))) if z.size > 1 else step_mm
    filled = np.where(np.isnan(depth), np.nanmax(depth) if np.isfinite(depth).any() else 0, depth)
    dv, du = np.gradient(filled, dz, step_mm)
    normal = np.stack([-du, -dv, np.ones_like(du)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = np.array([-0.3, 0.4, 1.0])
    light /= np.linalg.norm(light)
    shade = 0.15 + 0.85 * np.clip(normal @ light, 0, 1)
    shade[np.isnan(depth)] = np.nan
    return shade, (float(u[0]), float(u[-1]), float(z.min()), float(z.max()))


def _title(fig: Figure, title: str, region: DefacingRegion) -> None:
    fig.suptitle(
        f"{title}   cut: z >= {region.z_inferior_mm:.2f} mm and y < {region.y_mid_mm:.2f} mm; "
        f"preserved: {', '.join(region.preserved_names) or 'none'}",
        fontsize=9,
    )


def case_images(
    original: Case,
    defaced: Case,
    region: DefacingRegion,
    out_dir: Path,
    title: str,
    eye_x_mm: float | None = None,
) -> list[Path]:
    """Write ``qa_planes.png`` and ``qa_surface.png`` for one case; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = original.ct.grid
    if eye_x_mm is None:
        xmin, xmax, _, _ = _extent_xy(g)
        eye_x_mm = (xmin + xmax) / 2
    step = min(g.spacing_mm[1], g.spacing_mm[2])
    vmax = float(max((dose_gy(d).max() for d in original.doses), default=0.0)) or None
    fig, axes = plt.subplots(2, 2, figsize=(11, 10), dpi=110)
    m = _draw_planes(axes[:, 0], original, region, eye_x_mm, step, "before", vmax)
    _draw_planes(axes[:, 1], defaced, region, eye_x_mm, step, "after", vmax)
    if m is not None:
        fig.colorbar(m, ax=axes, shrink=0.6, label="dose (Gy)")
    _title(fig, title, region)
    planes = out_dir / "qa_planes.png"
    fig.savefig(planes)
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(10, 10), dpi=100)
    for col, (case, label) in enumerate(((original, "before"), (defaced, "after"))):
        for row, az in enumerate((0.0, 45.0)):
            img, ext = render_surface(case.ct, az)
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, extent=ext, origin="lower")
            ax.set_facecolor("black")
            ax.set_title(
                f"{label}: skin surface, {'front' if az == 0 else f'{az:.0f} deg left'}", fontsize=9
            )
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
    _title(fig, title, region)
    surface = out_dir / "qa_surface.png"
    fig.savefig(surface)
    plt.close(fig)
    log.info("QA images written to %s", out_dir)
    return [planes, surface]


def write_pdf(pngs: Sequence[Path], path: Path) -> Path:
    """One multi-page PDF with one PNG per page (for a batch)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with PdfPages(path) as pdf:
        for png in pngs:
            img = plt.imread(png)
            fig = plt.figure(figsize=(img.shape[1] / 100, img.shape[0] / 100), dpi=100)
            fig.figimage(img)
            pdf.savefig(fig)
            plt.close(fig)
    return path


__all__ = ["case_images", "eye_x_from_report", "render_surface", "write_pdf"]
