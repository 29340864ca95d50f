#!/usr/bin/env python3
"""Time a whole ``rtdeface deface`` of one case against its I/O floor, and peak memory.

The I/O floor is pydicom reading every file of the case (pixel data included) and writing it
unchanged to a new folder: no defacing tool can be faster. Both are timed in this process,
alternating, on the same disk, each into a fresh output folder; the script prints the medians
of wall time and of CPU time (this process plus its child processes: a single-case deface
builds the de-identification context, clips the structure set, runs the image eye
cross-check and writes part of the CT in forked children), the ratios and
the peak resident memory of each (measured in a child process).

Usage: python scripts/bench_deface.py CASE_DIR [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
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


CONFIGS = {
    "default": ["--random-key"],
    "no eye cross-check": ["--random-key", "--no-eye-check"],
    "core only (--no-deid --no-eye-check)": ["--no-deid", "--no-eye-check"],
}
"""Command-line variants timed: the default run and the run without the optional extras."""


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children (s)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def deface(case_dir: Path, out_dir: Path, extra: list[str] | None = None) -> float:
    """A whole deface (load, landmarks, region, CT/ROI/dose, de-identify, write); seconds."""
    return deface_timed(case_dir, out_dir, extra)[0]


def deface_timed(
    case_dir: Path, out_dir: Path, extra: list[str] | None = None
) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a whole deface."""
    from rtdeface.cli import main

    extra = CONFIGS["default"] if extra is None else extra
    c = cpu_seconds()
    t = time.perf_counter()
    code = main(["-q", "deface", str(case_dir), "-o", str(out_dir), *extra])
    elapsed = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"deface failed with exit code {code}")
    return elapsed, cpu_seconds() - c


def _child_peak_mb(kind: str, case_dir: Path) -> tuple[float, float]:
    """Peak RSS (MB) of a child process doing one ``kind`` run, and of its largest child."""
    code = (
        "import sys, tempfile, pathlib, resource;"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r});"
        "import bench_deface as b;"
        "d = pathlib.Path(tempfile.mkdtemp());"
        f"b.{kind}(pathlib.Path({str(case_dir)!r}), d / 'out' if {kind!r} == 'deface' else d);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    own, child = out.stdout.strip().splitlines()[-1].split()
    return int(own) / 1024.0, int(child) / 1024.0


def _r(values: list[float]) -> list[float]:
    return [round(v, 3) for v in values]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    # peak memory first, while this process is small: Linux keeps a forked child's maximum
    # RSS across exec, so children started later would inherit this process's size
    peak_floor = _child_peak_mb("io_floor", args.case_dir)
    peak_deface = _child_peak_mb("deface", args.case_dir)
    floor_s: list[float] = []
    runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
    cpus: dict[str, list[float]] = {name: [] for name in CONFIGS}
    base = Path(tempfile.mkdtemp(prefix="rtdeface-bench-"))
    try:
        # one warm-up of each (imports, page cache), then alternate
        io_floor(args.case_dir, Path(tempfile.mkdtemp(dir=base)))
        deface(args.case_dir, Path(tempfile.mkdtemp(dir=base)) / "out")
        for _ in range(args.repeat):
            floor_s.append(io_floor(args.case_dir, Path(tempfile.mkdtemp(dir=base))))
            for name, extra in CONFIGS.items():
                out = Path(tempfile.mkdtemp(dir=base)) / "out"
                wall, cpu = deface_timed(args.case_dir, out, extra)
                runs[name].append(wall)
                cpus[name].append(cpu)
            for child in base.iterdir():
                shutil.rmtree(child)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    floor = statistics.median(floor_s)
    full = statistics.median(runs["default"])
    print(f"case: {args.case_dir}")
    print(f"I/O floor (pydicom read + write): median {floor:.3f} s  runs {_r(floor_s)}")
    paired: dict[str, float] = {}
    for name, values in runs.items():
        med = statistics.median(values)
        cpu = statistics.median(cpus[name])
        # each repetition's run over the floor measured just before it: robust to a machine
        # whose speed drifts during the benchmark
        paired[name] = statistics.median(v / f for v, f in zip(values, floor_s))
        print(
            f"deface, {name}: median {med:.3f} s  ratio {med / floor:.2f}x "
            f"(paired {paired[name]:.2f}x)  CPU {cpu:.3f} s ({cpu / floor:.2f}x)  runs {_r(values)}"
        )
    print(
        f"ratio default deface / I/O floor: {full / floor:.2f}x, paired "
        f"{paired['default']:.2f}x  (target <= 2x)"
    )
    print(
        f"peak RSS: I/O floor {peak_floor[0]:.0f} MB, deface {peak_deface[0]:.0f} MB "
        f"(its largest forked child: {peak_deface[1]:.0f} MB)"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "floor_s": floor,
                    "deface_s": full,
                    "ratio": full / floor,
                    "paired_ratio": paired["default"],
                    "peak_floor_mb": peak_floor[0],
                    "peak_deface_mb": peak_deface[0],
                    "peak_deface_child_mb": peak_deface[1],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
