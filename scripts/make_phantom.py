"""Write synthetic head-and-neck phantom cases (CT, RTSTRUCT, RTDOSE, RTPLAN) as DICOM.

Examples
--------
``python scripts/make_phantom.py OUT_DIR --variant hfs`` writes one case into OUT_DIR;
``python scripts/make_phantom.py OUT_DIR --all`` writes every variant into OUT_DIR/<variant>/.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rtdeface.phantom import VARIANTS, write_phantom_case


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return 0 on success, 2 on a usage error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="output directory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--variant", default="hfs", choices=sorted(VARIANTS), help="storage variant (default hfs)"
    )
    group.add_argument("--all", action="store_true", help="write every variant in a subfolder")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    names = sorted(VARIANTS) if args.all else [args.variant]
    for name in names:
        target = args.out_dir / name if args.all else args.out_dir
        case = write_phantom_case(target, name)
        t = case.truth
        print(
            f"{name}: {len(case.ct_paths)} CT slices -> {target} "
            f"(z_inferior_eye={t.z_inferior_eye_mm} mm, y_mid={t.y_mid_mm} mm)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
