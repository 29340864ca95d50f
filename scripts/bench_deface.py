#!/usr/bin/env python3
"""Time a whole ``rtdeface deface`` of one case against its I/O floor, and peak memory.

The I/O floor is pydicom reading every file of the case (pixel data included) and writing it
unchanged to a new folder: no defacing tool can be faster. Both are timed in this process,
alternating, on the same disk, each into a fresh output folder; the script prints the medians,
the ratio and the peak resident memory of each (measured in a child process).

Usage: python scripts/bench_deface.py CASE_DIR [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom

from rtdeface.discover import iter_files, read_dicom


def io_floor(case_dir: Path, out_dir: Path) -> float:
    """Read every DICOM file of the case and write it unchanged; seconds."""
    t = time.perf_counter()
    for n, path in enumerate(iter_files(case_dir)):
        ds = read_dicom(path, header_only=False)
        if ds is not None:
            pydicom.dcmwrite(out_dir / f"{n:05d}.dcm", ds, enforce_file_format=True)
    return time.perf_counter() - t


def deface(case_dir: Path, out_dir: Path) -> float:
    """A whole deface (load, landmarks, region, CT/ROI/dose, build, write); seconds."""
    from rtdeface.cli import main

    t = time.perf_counter()
    code = main(["-q", "deface", str(case_dir), "-o", str(out_dir)])
    elapsed = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"deface failed with exit code {code}")
    return elapsed


def _child_peak_mb(kind: str, case_dir: Path) -> float:
    """Peak RSS (MB) of a child process doing one ``kind`` run."""
    code = (
        "import sys, tempfile, pathlib, resource;"
        "sys.path.insert(0, %r);"
        "import bench_deface as b;"
        "d = pathlib.Path(tempfile.mkdtemp());"
        "b.%s(pathlib.Path(%r), d / 'out' if %r == 'deface' else d);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    ) % (str(Path(__file__).parent), kind, str(case_dir), kind)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    floor_s, deface_s = [], []
    base = Path(tempfile.mkdtemp(prefix="rtdeface-bench-"))
    try:
        # one warm-up of each (imports, page cache), then alternate
        io_floor(args.case_dir, Path(tempfile.mkdtemp(dir=base)))
        deface(args.case_dir, Path(tempfile.mkdtemp(dir=base)) / "out")
        for _ in range(args.repeat):
            floor_s.append(io_floor(args.case_dir, Path(tempfile.mkdtemp(dir=base))))
            deface_s.append(deface(args.case_dir, Path(tempfile.mkdtemp(dir=base)) / "out"))
            for child in base.iterdir():
                shutil.rmtree(child)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    floor, full = statistics.median(floor_s), statistics.median(deface_s)
    peak_floor = _child_peak_mb("io_floor", args.case_dir)
    peak_deface = _child_peak_mb("deface", args.case_dir)
    print(f"case: {args.case_dir}")
    print(f"I/O floor (pydicom read + write): median {floor:.3f} s  runs {[round(v, 3) for v in floor_s]}")
    print(f"rtdeface deface:                  median {full:.3f} s  runs {[round(v, 3) for v in deface_s]}")
    print(f"ratio deface / I/O floor: {full / floor:.2f}x  (target <= 2x)")
    print(f"peak RSS: I/O floor {peak_floor:.0f} MB, deface {peak_deface:.0f} MB")
    if args.json:
        print(json.dumps({"floor_s": floor, "deface_s": full, "ratio": full / floor,
                          "peak_floor_mb": peak_floor, "peak_deface_mb": peak_deface}))
    _ = resource
    return 0


if __name__ == "__main__":
    sys.exit(main())
