"""Batch throughput (cases per minute) for 1..N worker processes.

Cases: generated phantom cases and copies of the real case in ../shared/data (copied to a
temporary folder, never into the repository). Prints cases/min per worker count and the
scaling ratio against one worker (target on a 2-core machine: 2 workers >= 1.8x).

    python scripts/bench_batch.py --workers 2 --phantoms 8 --real 4
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from rtdeface.batch import OutputLock, plan_batch, prepare_output, run_batch
from rtdeface.deid import DeidOptions
from rtdeface.discover import discover_cases
from rtdeface.phantom import VARIANTS, write_phantom_case
from rtdeface.pipeline import DefaceOptions

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "onko_hn_eyes"


def copy_case(src: Path, dst: Path, n: int) -> None:
    """Copy a case giving every instance, series, study and frame UID a new value (so the
    copies are distinct cases, not duplicates), references kept consistent."""
    import pydicom

    from rtdeface.uids import UidMapper, remap_uids

    mapper = UidMapper(f"bench-copy-{n}".encode())
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        remap_uids(ds, mapper, lambda u: not u.startswith("1.2.840.10008"))
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out)


def bench(inp: Path, workers: int, tmp: Path) -> float:
    """Cases per minute of one batch run (discovery excluded) with ``workers`` processes."""
    tree = discover_cases(inp, workers)
    out = tmp / f"out-{inp.name}-{workers}"
    manifest = prepare_output(out)
    deid = DeidOptions(key=b"bench-key-0123456789abcdef")
    plan = plan_batch(tree, out, DefaceOptions(), deid, manifest)
    t0 = time.perf_counter()
    with OutputLock(out):
        result = run_batch(plan, out, manifest, jobs=workers, audit=tmp / f"a{workers}.json")
    dt = time.perf_counter() - t0
    assert result.failed == 0, [r.detail for r in result.results if r.status != "done"]
    shutil.rmtree(out)
    return len(plan.tasks) / dt * 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--phantoms", type=int, default=8, help="phantom cases (0 to skip)")
    ap.add_argument("--real", type=int, default=4, help="copies of the real case (0 to skip)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="rtdeface-bench-") as td:
        tmp = Path(td)
        sets: dict[str, Path] = {}
        if args.phantoms:
            names = sorted(VARIANTS)
            for n in range(args.phantoms):
                write_phantom_case(tmp / "phantom" / f"c{n}", names[n % len(names)])
            sets["phantom"] = tmp / "phantom"
        if args.real and SHARED.is_dir():
            for n in range(args.real):
                copy_case(SHARED, tmp / "real" / f"c{n}", n)
            sets["real"] = tmp / "real"
        elif args.real:
            print(f"real data not found at {SHARED}; skipped")
        for label, inp in sets.items():
            rates = {w: bench(inp, w, tmp) for w in range(1, args.workers + 1)}
            for w, r in rates.items():
                print(f"{label:8s} workers={w}: {r:7.2f} cases/min  ratio {r / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
