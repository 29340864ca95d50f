"""Time the privacy check of one case: python scripts/bench_privacy.py CASE_ORIG CASE_DEFACED."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from rtdeface.load import load_case
from rtdeface.privacy import check_privacy, load_detectors


def main() -> None:
    t0 = time.perf_counter()
    detectors = load_detectors()
    t1 = time.perf_counter()
    original, defaced = load_case(Path(sys.argv[1])), load_case(Path(sys.argv[2]))
    t2 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = check_privacy(original, defaced, Path(tmp), detectors)
    t3 = time.perf_counter()
    print(
        f"privacy check: {report.status}; load detectors {t1 - t0:.1f} s, load cases "
        f"{t2 - t1:.1f} s, render + detect {t3 - t2:.1f} s, total {t3 - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
