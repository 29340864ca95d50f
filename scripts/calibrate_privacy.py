"""Calibrate the privacy-check thresholds on renderings (not run in CI).

Usage: python scripts/calibrate_privacy.py CASE [CASE ...] [--invesalius matrix.dat]

For every subject (a case folder's CT skin, the InVesalius Cranium head CT when given, the
synthetic phantom and the synthetic reference head) renders face views (front, +/-35 deg yaw,
+/-15 deg pitch) and non-face views (back of the head, +/-135 deg yaw, the top of the head),
prints the best MTCNN confidence and dlib HOG margin of each, and the dlib descriptor
distances: same subject at two views, and different subjects at the same view.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np

from rtdeface.geometry import Grid
from rtdeface.load import load_case
from rtdeface.phantom import write_phantom_case
from rtdeface.privacy import _face_box, load_detectors, reference_head, surfaces_of, to_rgb
from rtdeface.qa import SKIN_HU, MaskSurface, View, frame_for_head, render_mask

FACE_VIEWS = (
    View("front", 0),
    View("left35", 35),
    View("right35", -35),
    View("above15", 0, 15),
    View("below15", 0, -15),
)
NON_FACE_VIEWS = (View("back", 180), View("back_l", 135), View("back_r", -135), View("top", 0, 75))


def invesalius_surface(matrix: Path) -> MaskSurface:
    """Skin of InVesalius' Cranium.inv3 matrix.dat: int16 (108, 256, 256) z, y, x; y to the face."""
    vol = np.fromfile(matrix, dtype="<i2").reshape(108, 256, 256)
    affine = np.array([[0, 0, 0.957, 0], [0, -0.957, 0, 0], [1.5, 0, 0, 0], [0, 0, 0, 1.0]])
    return MaskSurface.from_mask(vol > SKIN_HU, Grid(affine, vol.shape))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*", type=Path)
    ap.add_argument("--invesalius", type=Path)
    args = ap.parse_args()
    det = load_detectors()
    subjects: dict[str, MaskSurface] = {}
    for c in args.cases:
        subjects[c.name] = surfaces_of(load_case(c))["CT"]
    if args.invesalius:
        subjects["invesalius"] = invesalius_surface(args.invesalius)
    with tempfile.TemporaryDirectory() as tmp:
        write_phantom_case(Path(tmp), "hfs")
        subjects["phantom"] = surfaces_of(load_case(Path(tmp)))["CT"]
    subjects["reference"] = reference_head()
    desc: dict[tuple[str, str], np.ndarray] = {}
    for name, surf in subjects.items():
        frame = frame_for_head(surf)
        for kind, views in (("face", FACE_VIEWS), ("non-face", NON_FACE_VIEWS)):
            for v in views:
                rgb = to_rgb(render_mask(surf, v, frame))
                m, h = det.detect(rgb)
                box = _face_box((m, h))
                if box is not None:
                    desc[(name, v.name)] = det.descriptor_at(rgb, box)
                print(f"{name:12} {kind:8} {v.name:8} mtcnn {m.score}  hog {h.score}")
    print("same subject, front vs other view:")
    for (n, v), d in desc.items():
        if v != "front" and (n, "front") in desc:
            print(f"  {n:12} front-{v:8} {np.linalg.norm(d - desc[(n, 'front')]):.3f}")
    print("different subjects, same view:")
    names = sorted(subjects)
    for a, b in itertools.combinations(names, 2):
        for v in FACE_VIEWS:
            if (a, v.name) in desc and (b, v.name) in desc:
                dist = np.linalg.norm(desc[(a, v.name)] - desc[(b, v.name)])
                print(f"  {a}-{b} {v.name:8} {dist:.3f}")


if __name__ == "__main__":
    main()
