"""Time the image eye finder on one case and compare it with contoured eyes when present.

Usage: ``python scripts/bench_eyefinder.py CASE_DIR``. Prints the median detection time over
5 runs (the CT is loaded once, outside the timing) and, when the structure set has eye ROIs,
the differences (mm) of the landmarks and eye centres against those contours.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rtdeface.errors import RtDefaceError
from rtdeface.eyefinder import find_eyes_in_image
from rtdeface.landmarks import landmarks_from_rois, select_eye_rois
from rtdeface.load import load_case

RUNS = 5
"""Number of timed detections; the median is reported."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 0 on success, 1 when loading or detection fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        case = load_case(args.case_dir)
        hu = case.ct.hu_volume()
        times = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            lm = find_eyes_in_image(hu, case.ct.grid)
            times.append(time.perf_counter() - t0)
    except RtDefaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"case {args.case_dir}: CT {case.ct.grid.shape}, spacing {case.ct.grid.spacing_mm} mm")
    print(f"detection time: median {statistics.median(times):.3f} s over {RUNS} runs")
    print(
        f"image landmarks: z_inferior {lm.z_inferior_mm:.2f} mm, y_mid {lm.y_mid_mm:.2f} mm, "
        f"central plane {lm.z_central_mm:.2f} mm, confidence {lm.confidence:.2f}"
    )
    for eye in lm.eyes:
        c = ", ".join(f"{v:.1f}" for v in eye.centre_mm)
        print(f"  {eye.name}: centre ({c}) mm, volume {eye.volume_ml:.2f} mL")
    if case.structure_set is None:
        print("no structure set: no contoured eyes to compare with")
        return 0
    try:
        rois, _ = select_eye_rois(case.structure_set, case.ct.grid)
    except RtDefaceError:
        print("no eye contours in the structure set to compare with")
        return 0
    ref = landmarks_from_rois(rois, case.ct.grid.spacing_mm[0])
    print(
        f"contoured eyes ({', '.join(r.name for r in rois)}): z_inferior {ref.z_inferior_mm:.2f}"
        f" mm, y_mid {ref.y_mid_mm:.2f} mm; differences image - contours: "
        f"z_inferior {lm.z_inferior_mm - ref.z_inferior_mm:+.2f} mm, "
        f"y_mid {lm.y_mid_mm - ref.y_mid_mm:+.2f} mm"
    )
    by_side = {e.side: e for e in ref.eyes}
    for eye in lm.eyes:
        if eye.side in by_side:
            d = np.subtract(eye.centre_mm, by_side[eye.side].centre_mm)
            print(f"  {eye.side} centre difference {np.round(d, 1).tolist()} mm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
