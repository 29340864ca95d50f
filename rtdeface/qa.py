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
from dataclasses import dataclass
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
    if region.face is not None and region.face.z_mm.size:
        # full-face mode: the per-plane limit below the eye plane, one step per profile plane
        f = region.face
        axes[0].plot(
            np.repeat(f.y_mm, 2),
            np.column_stack([f.z_mm - f.half_thickness_mm, f.z_mm + f.half_thickness_mm]).ravel(),
            **cut,
        )
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
        f"{title}   cut: z >= {region.z_inferior_mm:.2f} mm and y < {region.y_mid_mm:.2f} mm"
        f"{' + full face below the eyes' if region.face is not None else ''}; "
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


# --------------------------------------------------------------------------- any-view rendering


@dataclass(frozen=True)
class View:
    """A viewing direction for :func:`render_mask`.

    Attributes
    ----------
    name : str
        Short label (used in file names).
    yaw_deg : float
        Rotation of the camera about the patient z axis, from straight in front of the face
        towards the patient's left (negative: towards the patient's right).
    pitch_deg : float
        Elevation of the camera above the axial plane (positive: looking down from above).
    """

    name: str
    yaw_deg: float
    pitch_deg: float = 0.0

    def basis(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Unit vectors (u, v, d) in patient coordinates (LPS).

        ``u`` points to the image's right (patient left at yaw 0), ``v`` to the image's top
        (superior at pitch 0) and ``d`` along the viewing rays, away from the camera
        (posterior at yaw 0).
        """
        th, ph = np.deg2rad(self.yaw_deg), np.deg2rad(self.pitch_deg)
        u = np.array([np.cos(th), np.sin(th), 0.0])
        horizontal = np.array([-np.sin(th), np.cos(th), 0.0])
        d = np.cos(ph) * horizontal + np.array([0.0, 0.0, -np.sin(ph)])
        v = np.cross(u, d)
        return u, v / np.linalg.norm(v), d / np.linalg.norm(d)


@dataclass(frozen=True)
class RenderFrame:
    """The orthographic image plane shared by every rendering of one case.

    Attributes
    ----------
    centre_mm : tuple of 3 float
        Patient point (LPS, mm) at the image centre and at depth 0.
    half_width_mm, half_height_mm : float
        Half the image size (mm) along u and v.
    half_depth_mm : float
        Rays run from ``-half_depth_mm`` to ``+half_depth_mm`` around the centre.
    pixel_mm : float
        Pixel size (mm) of the image and ray step.
    """

    centre_mm: tuple[float, float, float]
    half_width_mm: float
    half_height_mm: float
    half_depth_mm: float
    pixel_mm: float


HEAD_HEIGHT_MM = 250.0
"""Height (mm) of the rendered window below the top of the head (a head with its chin)."""

HEAD_WIDTH_BAND_MM = 190.0
"""The frame's width is the widest extent of the body within this distance (mm) of its top."""

RENDER_PIXEL_MM = 1.5
"""Pixel size (mm) of the privacy renderings (a 150 mm wide face spans about 100 pixels)."""

COARSE_MM = 4.0
"""Block size (mm) of the pooled mask that bounds where each ray can first hit."""


@dataclass(frozen=True, eq=False)
class MaskSurface:
    """A voxel mask prepared for rendering from any view.

    Attributes
    ----------
    mask : numpy.ndarray of bool, shape ``grid.shape``
        Voxels (k, i, j) inside the surface.
    grid : Grid
        Its geometry.
    blocks_lps_mm : numpy.ndarray, shape (n, 3)
        Centres (patient mm, LPS) of the occupied blocks of about :data:`COARSE_MM`.
    blocks_kij : numpy.ndarray of int, shape (n, 3)
        Block indices of the same blocks.
    block_half_diagonal_mm : float
        Half the diagonal of one block (mm).
    """

    mask: npt.NDArray[np.bool_]
    grid: Grid
    blocks_lps_mm: FloatArray
    blocks_kij: npt.NDArray[np.int64]
    block_half_diagonal_mm: float

    @classmethod
    def from_mask(cls, mask: npt.NDArray[np.bool_], grid: Grid) -> MaskSurface:
        """Pool ``mask`` (shape ``grid.shape``) into blocks of about :data:`COARSE_MM`."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != grid.shape:
            raise ValueError(f"mask shape {m.shape} differs from grid shape {grid.shape}")
        sp = np.asarray(grid.spacing_mm)
        f = np.maximum(1, np.rint(COARSE_MM / sp)).astype(int)
        n = -(-np.asarray(m.shape) // f)
        padded = np.zeros(tuple(int(x) for x in n * f), dtype=bool)
        padded[: m.shape[0], : m.shape[1], : m.shape[2]] = m
        pooled = padded.reshape(n[0], f[0], n[1], f[1], n[2], f[2]).any(axis=(1, 3, 5))
        blocks = np.argwhere(pooled).astype(np.int64)
        kij = blocks.astype(np.float64) * f + (f - 1) / 2.0
        return cls(m, grid, grid.to_patient(kij), blocks, float(np.linalg.norm(f * sp) / 2))


def frame_for_head(
    surface: MaskSurface,
    pixel_mm: float = RENDER_PIXEL_MM,
    head_height_mm: float = HEAD_HEIGHT_MM,
) -> RenderFrame:
    """A frame around the head: the top ``head_height_mm`` of the body, as wide as the skull.

    The body is the largest connected set of occupied blocks of ``surface`` (so a couch or a
    mask frame apart from the patient does not widen the frame).

    Raises
    ------
    ValueError
        When the mask is empty.
    """
    from scipy import ndimage

    pts = surface.blocks_lps_mm
    if pts.shape[0] == 0:
        raise ValueError("empty body mask: nothing to render")
    ijk = surface.blocks_kij
    occ = np.zeros(tuple(int(x) for x in ijk.max(axis=0) + 1), dtype=bool)
    occ[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    labels, n = ndimage.label(occ)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        pts = pts[labels[ijk[:, 0], ijk[:, 1], ijk[:, 2]] == int(np.argmax(sizes)) + 1]
    z_top = float(pts[:, 2].max())
    head = pts[pts[:, 2] >= z_top - head_height_mm]
    skull = pts[pts[:, 2] >= z_top - HEAD_WIDTH_BAND_MM]
    lo, hi = head.min(axis=0), head.max(axis=0)
    s_lo, s_hi = skull.min(axis=0), skull.max(axis=0)
    centre = np.array([(s_lo[0] + s_hi[0]) / 2, (s_lo[1] + s_hi[1]) / 2, (lo[2] + hi[2]) / 2])
    margin = 8.0 + surface.block_half_diagonal_mm
    return RenderFrame(
        (float(centre[0]), float(centre[1]), float(centre[2])),
        float(max(s_hi[0] - s_lo[0], s_hi[1] - s_lo[1]) / 2 + margin),
        float((hi[2] - lo[2]) / 2 + margin),
        float(np.linalg.norm(hi - lo) / 2 + margin),
        pixel_mm,
    )


def _ray_starts(
    surface: MaskSurface,
    basis: tuple[FloatArray, FloatArray, FloatArray],
    frame: RenderFrame,
    n_cols: int,
    n_rows: int,
) -> FloatArray:
    """Depth (mm) at which each pixel's ray must start (NaN: the ray cannot hit the mask).

    Every occupied block is projected onto a coarse image keeping the nearest depth, widened
    by one coarse pixel and moved towards the camera by the block's half diagonal, so no ray
    starts behind its first hit. Returned flat, shape (n_rows * n_cols,), row-major.
    """
    from scipy import ndimage

    u, v, d = basis
    out = np.full(n_rows * n_cols, np.nan)
    if surface.blocks_lps_mm.shape[0] == 0:
        return out
    rel = surface.blocks_lps_mm - np.asarray(frame.centre_mm)
    half_diag = surface.block_half_diagonal_mm
    cpx = max(frame.pixel_mm, half_diag)
    cu = np.floor((rel @ u + frame.half_width_mm) / cpx).astype(np.int64)
    cv = np.floor((frame.half_height_mm - rel @ v) / cpx).astype(np.int64)
    nu = int(np.ceil(2 * frame.half_width_mm / cpx)) + 1
    nv = int(np.ceil(2 * frame.half_height_mm / cpx)) + 1
    ok = (cu >= 0) & (cu < nu) & (cv >= 0) & (cv < nv)
    coarse = np.full((nv, nu), np.inf)
    np.minimum.at(coarse, (cv[ok], cu[ok]), (rel @ d)[ok])
    coarse = ndimage.minimum_filter(coarse, size=3, mode="constant", cval=np.inf)
    cols = np.minimum(((np.arange(n_cols) * frame.pixel_mm) // cpx).astype(int), nu - 1)
    rows = np.minimum(((np.arange(n_rows) * frame.pixel_mm) // cpx).astype(int), nv - 1)
    fine = coarse[rows[:, None], cols[None, :]] - half_diag - frame.pixel_mm
    fine[~np.isfinite(fine)] = np.nan
    return np.asarray(fine.ravel(), dtype=np.float64)


def render_mask(surface: MaskSurface, view: View, frame: RenderFrame) -> FloatArray:
    """Shaded surface of a voxel mask seen from ``view``: orthographic ray casting.

    Every pixel's ray steps by ``frame.pixel_mm`` (starting where :func:`_ray_starts` says it
    cannot yet have hit) and stops at the first voxel inside the mask (nearest voxel centre,
    through the grid's own affine, so any orientation renders the same); the depth map is
    smoothed over about half a slice spacing (so thick slices do not show as terraces) and
    Lambert-shaded with a light near the camera, slightly above and to the right.

    Parameters
    ----------
    surface : MaskSurface
        The mask and its geometry.
    view, frame : View, RenderFrame
        Camera direction and image plane.

    Returns
    -------
    numpy.ndarray of float64, shape (rows, columns)
        Shade in [0, 1]; row 0 is the top of the image; NaN where a ray misses.
    """
    mask, grid = surface.mask, surface.grid
    from scipy import ndimage

    u, v, d = view.basis()
    px = frame.pixel_mm
    us = np.arange(-frame.half_width_mm, frame.half_width_mm + px / 2, px)
    vs = np.arange(frame.half_height_mm, -frame.half_height_mm - px / 2, -px)
    c = np.asarray(frame.centre_mm, dtype=np.float64)
    start = _ray_starts(surface, (u, v, d), frame, us.size, vs.size)
    depth = np.full(start.size, np.nan)
    active = np.flatnonzero(np.isfinite(start))
    if active.size:
        rows, cols = np.divmod(active, us.size)
        base_mm = c + us[cols, None] * u + vs[rows, None] * v + start[active, None] * d
        base = grid.to_index(base_mm).astype(np.float32)
        step = (grid.to_index(c + px * d) - grid.to_index(c)).astype(np.float32)
        shape = np.asarray(grid.shape)
        t_max = 2.0 * frame.half_depth_mm
        t_start = start[active]
        chunk = 16
        n_steps = np.arange(chunk, dtype=np.float32)
        offset = 0
        while active.size and offset * px < t_max:
            idx = base[None, :, :] + (n_steps[:, None, None] + offset) * step
            idx = np.rint(idx).astype(np.int32)
            ok = np.all((idx >= 0) & (idx < shape), axis=-1)
            np.clip(idx, 0, shape - 1, out=idx)
            hit = mask[idx[..., 0], idx[..., 1], idx[..., 2]] & ok
            anyhit = hit.any(axis=0)
            first = np.argmax(hit, axis=0)
            depth[active[anyhit]] = t_start[anyhit] + (offset + first[anyhit]) * px
            keep = ~anyhit
            active, base, t_start = active[keep], base[keep], t_start[keep]
            offset += chunk
    depth_img = depth.reshape(vs.size, us.size)
    valid = np.isfinite(depth_img)
    if not valid.any():
        return depth_img
    sigma = max(1.0, 0.5 * max(grid.spacing_mm) / px)
    filled = np.where(valid, depth_img, 0.0)
    num = ndimage.gaussian_filter(filled, sigma)
    den = ndimage.gaussian_filter(valid.astype(np.float64), sigma)
    smooth = np.where(valid, num / np.maximum(den, 1e-6), np.nan)
    smooth_f = np.where(valid, smooth, np.nanmax(smooth))
    dv, du = np.gradient(smooth_f, px, px)
    # depth grows away from the camera; rows go down the image (towards -v)
    normal = np.stack([du, -dv, -np.ones_like(du)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = np.array([0.2, 0.35, -1.0])
    light /= np.linalg.norm(light)
    shade = 0.12 + 0.88 * np.clip(normal @ light, 0, 1)
    shade[~valid] = np.nan
    return np.asarray(shade, dtype=np.float64)


__all__ = [
    "COARSE_MM",
    "HEAD_HEIGHT_MM",
    "HEAD_WIDTH_BAND_MM",
    "RENDER_PIXEL_MM",
    "MaskSurface",
    "RenderFrame",
    "View",
    "case_images",
    "eye_x_from_report",
    "frame_for_head",
    "render_mask",
    "render_surface",
    "write_pdf",
]
