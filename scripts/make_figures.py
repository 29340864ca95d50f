"""Render the README figures of the two defacing modes from the synthetic phantom only.

``python scripts/make_figures.py [OUT_DIR]`` (default ``sample_data/figures``) writes the
phantom wearing a thermoplastic mask (:class:`rtdeface.phantom.Variant` ``face_mask``) into a
temporary folder, defaces it in the default and in the full-face mode (no de-identification),
and writes:

``sagittal_modes.png``
    the midline sagittal CT plane: original, default mode, full-face mode, with each mode's
    cut boundary (R's y limit per plane) and the PTVs;
``surfaces_modes.png``
    skin renderings (CT > -400 HU, the privacy check's renderer) from the front, 35 degrees to
    the patient's right and 15 degrees from below: original, default mode, full-face mode.

Never reads real data. Each PNG stays below 150 KB.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from rtdeface.cli import main as rtdeface_main
from rtdeface.load import Case, load_case
from rtdeface.phantom import BOXES_MM, Variant, write_phantom_case
from rtdeface.qa import SKIN_HU, MaskSurface, View, frame_for_head, render_mask
from rtdeface.validate import read_cut

ROOT = Path(__file__).resolve().parents[1]
MODES = ("default", "full-face")
VIEWS = (View("front", 0.0), View("right 35°", -35.0), View("below 15°", 0.0, -15.0))
PTVS = ("PTV_Face", "PTV_Neck")


def _sagittal(case: Case) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """HU on the CT column nearest x = 0 (rows: z increasing upwards), and its (y, z) extent."""
    grid = case.ct.grid
    x, y = grid.plane_xy_mm()
    j = int(np.argmin(np.abs(x[0])))
    hu = case.ct.hu_volume()[:, :, j]  # (z, y) for an axial HFS grid
    z = grid.slice_z_mm()
    return hu, (float(y[0, j]), float(y[-1, j]), float(z[0]), float(z[-1]))


FRONT_MM = -130.0
"""Anterior end (y, mm) of the plotted boundary (the left edge of the plots' window)."""


def _limit_line(defaced: Path, z: np.ndarray) -> tuple[list[float], list[float]]:
    """R's boundary on the sagittal plane from the output's report, as a polyline (y, z).

    Each CT plane with a y limit contributes a vertical segment over its slab; the line closes
    anteriorly under the lowest plane (R is anterior of the line and above that step).
    """
    from rtdeface.region import DefacingRegion

    cut = read_cut(defaced)
    region = DefacingRegion(cut.z_inferior_mm, cut.y_mid_mm, (), cut.face)
    lim = region.y_limit(z)
    half = abs(float(np.median(np.diff(z)))) / 2
    ys: list[float] = []
    zs: list[float] = []
    for k in np.argsort(-z):
        if np.isfinite(lim[k]):
            ys += [float(lim[k]), float(lim[k])]
            zs += [float(z[k] + half), float(z[k] - half)]
    ys.append(FRONT_MM)
    zs.append(zs[-1])
    return ys, zs


def sagittal_figure(orig: Path, outputs: dict[str, Path], path: Path) -> Path:
    """Original and each mode's midline sagittal plane with the cut boundary."""
    cases = {"original": orig, **outputs}
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 3.4), dpi=80)
    for ax, (label, folder) in zip(axes, cases.items()):
        case = load_case(folder)
        hu, (y0, y1, z0, z1) = _sagittal(case)
        ax.imshow(hu, cmap="gray", vmin=-400, vmax=600, origin="lower", extent=(y0, y1, z0, z1))
        for name in PTVS:
            (_, _), (ya, yb), (za, zb) = BOXES_MM[name]
            ax.plot([ya, yb, yb, ya, ya], [za, za, zb, zb, za], color="red", lw=0.8)
        if label != "original":
            ys, zs = _limit_line(folder, case.ct.grid.slice_z_mm())
            ax.plot(ys, zs, color="yellow", lw=1.2, ls="--")
        ax.set_xlim(FRONT_MM, 40)
        ax.set_ylim(-90, 110)
        ax.invert_xaxis()  # anterior (small y) on the right, the face looking right
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("y (mm, anterior →)", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("z (mm)", fontsize=7)
    fig.suptitle(
        "Midline sagittal CT: cut boundary (yellow, R is anterior of it), PTVs (red)", fontsize=8
    )
    fig.tight_layout(pad=0.3)
    fig.savefig(path)
    plt.close(fig)
    return path


def surfaces_figure(orig: Path, outputs: dict[str, Path], path: Path) -> Path:
    """Skin renderings of the original and each mode from three views."""
    cases = {"original": orig, **outputs}
    surfaces = {}
    for label, folder in cases.items():
        case = load_case(folder)
        surfaces[label] = MaskSurface.from_mask(case.ct.hu_volume() > SKIN_HU, case.ct.grid)
    frame = frame_for_head(surfaces["original"])
    fig, axes = plt.subplots(len(VIEWS), 3, figsize=(5.4, 1.9 * len(VIEWS)), dpi=80)
    for r, view in enumerate(VIEWS):
        for c, (label, surf) in enumerate(surfaces.items()):
            ax = axes[r][c]
            ax.imshow(render_mask(surf, view, frame), cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
            ax.set_title(f"{label}, {view.name}", fontsize=7)
    fig.tight_layout(pad=0.2)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Write the figures; return 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, nargs="?", default=ROOT / "sample_data" / "figures")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        orig = Path(tmp) / "phantom_mask"
        write_phantom_case(orig, Variant("hfs_mask", face_mask=True))
        outputs: dict[str, Path] = {}
        for mode in MODES:
            dst = Path(tmp) / mode
            argv_ = ["-q", "deface", str(orig), "-o", str(dst), "--no-deid", "--no-eye-check"]
            if rtdeface_main([*argv_, "--mode", mode]) != 0:
                print(f"deface --mode {mode} failed", file=sys.stderr)
                return 1
            outputs[f"{mode} mode"] = dst
        for p in (
            sagittal_figure(orig, outputs, args.out_dir / "sagittal_modes.png"),
            surfaces_figure(orig, outputs, args.out_dir / "surfaces_modes.png"),
        ):
            print(f"{p} ({p.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
