"""The ``rtdeface`` command line: the only place that configures logging or prints.

Exit codes: 0 every case done, 1 a case failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rtdeface import __version__
from rtdeface.errors import RtDefaceError, UsageError
from rtdeface.pipeline import EYE_MODES, DefaceOptions, deface_case, find_landmarks
from rtdeface.region import select_preserved

if TYPE_CHECKING:
    from rtdeface.deid import DeidOptions
    from rtdeface.load import Case

log = logging.getLogger("rtdeface")

REPORT_NAME = "rtdeface_report.json"
"""Name of the per-case report written beside the defaced objects."""


def _add_case_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("landmarks and preservation")
    g.add_argument(
        "--eye-roi",
        action="append",
        default=[],
        metavar="NAME",
        help="exact ROI name of an eye (repeat for both eyes); overrides the name patterns",
    )
    g.add_argument(
        "--eyes",
        choices=EYE_MODES,
        default="auto",
        help="where the eyes come from: contours, the CT image, or auto (contours when "
        "present, else the image) [default: auto]",
    )
    g.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also preserve ROIs whose name matches this regular expression (case-insensitive; "
        "repeatable)",
    )
    g.add_argument(
        "--keep-margin",
        type=float,
        default=0.0,
        metavar="MM",
        help="margin (mm) around every preserved ROI [default: 0]",
    )
    g.add_argument(
        "--no-ptv",
        action="store_true",
        help="do not preserve PTVs (only --keep ROIs are preserved)",
    )


def _add_deid_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "de-identification (PS3.15 Annex E Basic Profile with RT-aware options; on by default)"
    )
    g.add_argument(
        "--deid-key-file",
        type=Path,
        metavar="FILE",
        help="secret key (file bytes) for UIDs, pseudonyms and date offsets; the same key links "
        "objects exported in different runs [default: $RTDEFACE_KEY]",
    )
    g.add_argument(
        "--random-key",
        action="store_true",
        help="use a random key when none is given (outputs of different runs will not link)",
    )
    g.add_argument(
        "--pseudonym-csv",
        type=Path,
        metavar="CSV",
        help="two columns: original PatientID,pseudonym [default: keyed hash 'RTD-...']",
    )
    g.add_argument("--pseudonym-prefix", default="RTD-", help="prefix of keyed-hash pseudonyms")
    g.add_argument(
        "--uid-root", default="2.25.", help="root of generated UIDs [default: 2.25.]"
    )
    g.add_argument(
        "--keep-private",
        action="append",
        default=[],
        metavar="GGGG,EEEE|GGGG,CREATOR",
        help="keep this private element or private block (repeatable); others are removed",
    )
    g.add_argument(
        "--no-patient-characteristics",
        action="store_true",
        help="do not retain PatientSex/Age/Size/Weight (Retain Patient Characteristics off)",
    )
    g.add_argument(
        "--audit",
        type=Path,
        metavar="FILE",
        help="audit file (original PatientID -> pseudonym, date offset, counts), mode 0600, "
        "never inside the output [default: OUT_DIR.audit.json beside OUT_DIR]",
    )
    g.add_argument(
        "--what-if",
        action="store_true",
        help="print what de-identification would do to each attribute class; write nothing",
    )
    g.add_argument(
        "--no-deid",
        action="store_true",
        help="debugging only: skip de-identification (the output keeps every identifier)",
    )


def _parse_keep_private(values: Sequence[str]) -> tuple[tuple[int, int | str], ...]:
    out: list[tuple[int, int | str]] = []
    for v in values:
        group, _, rest = v.partition(",")
        try:
            g = int(group, 16)
        except ValueError as exc:
            raise UsageError(f"--keep-private {v!r}: group must be hex (e.g. 0029,1010)") from exc
        try:
            out.append((g, int(rest, 16)))
        except ValueError:
            if not rest:
                raise UsageError(f"--keep-private {v!r}: give GGGG,EEEE or GGGG,CREATOR") from None
            out.append((g, rest))
    return tuple(out)


def _deid_options(args: argparse.Namespace) -> DeidOptions | None:
    from rtdeface.deid import DeidOptions, load_key, read_pseudonym_csv

    if args.no_deid:
        log.warning("--no-deid: the output keeps every identifier; do not share it")
        return None
    key, random = load_key(args.deid_key_file, random_key=args.random_key)
    if random:
        log.warning("random de-identification key: outputs of other runs will not link")
    return DeidOptions(
        key=key,
        uid_root=args.uid_root,
        pseudonym_map=read_pseudonym_csv(args.pseudonym_csv) if args.pseudonym_csv else None,
        pseudonym_prefix=args.pseudonym_prefix,
        retain_patient_characteristics=not args.no_patient_characteristics,
        keep_private=_parse_keep_private(args.keep_private),
    )


def _options(args: argparse.Namespace) -> DefaceOptions:
    return DefaceOptions(
        eye_rois=tuple(args.eye_roi),
        eyes=args.eyes,
        keep=tuple(args.keep),
        keep_margin_mm=args.keep_margin,
        preserve_ptvs=not args.no_ptv,
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation tests)."""
    parser = argparse.ArgumentParser(
        prog="rtdeface",
        description="Deface head-and-neck radiotherapy DICOM (CT, RTSTRUCT, RTDOSE, RTPLAN) "
        "in patient coordinates, preserving PTVs.",
    )
    parser.add_argument("--version", action="version", version=f"rtdeface {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="log details")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "deface",
        help="deface one case folder into a new output folder",
        description="Deface one case: CT + RTSTRUCT (+ RTDOSE, RTPLAN) found by content in "
        "CASE_DIR. The output folder must not exist (or be empty); inputs are never modified.",
    )
    p.add_argument("case_dir", type=Path, metavar="CASE_DIR")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR")
    _add_case_options(p)
    _add_deid_options(p)

    p = sub.add_parser(
        "inspect",
        help="show series, ROIs, eyes, landmarks, cut and preserved ROIs; writes nothing",
    )
    p.add_argument("case_dir", type=Path, metavar="CASE_DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_case_options(p)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("rtdeface: %(levelname)s: %(message)s"))
    root = logging.getLogger("rtdeface")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _cmd_deface(args: argparse.Namespace) -> int:
    from rtdeface.load import load_case
    from rtdeface.report import case_report, to_json
    from rtdeface.write import build_outputs, write_atomic

    options = _options(args)
    deid = _deid_options(args)
    output = Path(args.output).absolute()
    source = Path(args.case_dir).absolute()
    if output == source or source in output.parents:
        raise UsageError(f"output {output} lies inside the input {source}; choose another folder")
    audit = (args.audit or output.with_name(output.name + ".audit.json")).absolute()
    if deid is not None and (audit == output or output in audit.parents):
        raise UsageError(f"--audit {audit} lies inside the output; it holds identifiers")
    t0 = time.perf_counter()
    case = load_case(args.case_dir)
    t_load = time.perf_counter() - t0
    if args.what_if:
        return _what_if(case, deid)
    defaced = deface_case(case, options)
    t = time.perf_counter()
    outputs, record = build_outputs(defaced, deid)
    defaced.timings_s["load"] = t_load
    defaced.timings_s["build_outputs"] = time.perf_counter() - t
    report = case_report(defaced, outputs, record)
    t = time.perf_counter()
    out = write_atomic(outputs, output, {REPORT_NAME: to_json(report)})
    if record is not None:
        from rtdeface.deid import write_audit

        write_audit(audit, [record])
    if not args.quiet:
        lm = defaced.landmarks
        removed = ", ".join(defaced.structures.removed_rois) if defaced.structures else ""
        changed = (
            sum(1 for c in defaced.structures.changes if c.planes_changed)
            if defaced.structures
            else 0
        )
        print(
            f"defaced {args.case_dir} -> {out} in {time.perf_counter() - t0:.2f} s "
            f"(write {time.perf_counter() - t:.2f} s)\n"
            f"  eyes ({lm.source}): {', '.join(e.name for e in lm.eyes)}; "
            f"cut z >= {lm.z_inferior_mm:.2f} mm, y < {lm.y_mid_mm:.2f} mm\n"
            f"  CT voxels changed: {defaced.ct.voxels_changed}; preserved in region: "
            f"{defaced.ct_preserved_in_region} "
            f"({report['ct']['preserved_ml_in_region']} mL) in "
            f"{', '.join(defaced.region.preserved_names) or 'no ROI'}\n"
            f"  ROIs changed: {changed}; removed: {removed or 'none'}; "
            f"dose voxels zeroed: {[d.voxels_zeroed for d in defaced.doses]}\n"
            f"  report: {out / REPORT_NAME}"
            + (
                f"\n  de-identified as {record.pseudonym}; audit (keep private): {audit}"
                if record is not None
                else "\n  NOT de-identified (--no-deid)"
            )
        )
    return 0


def _what_if(case: Case, deid: DeidOptions | None) -> int:
    """Print, per attribute class, what de-identification would do (nothing is written)."""
    from rtdeface.deid import what_if

    if deid is None:
        raise UsageError("--what-if describes de-identification; it cannot go with --no-deid")
    objects = [case.ct.datasets[0]]
    if case.structure_set is not None:
        objects.append(case.structure_set.dataset)
    objects.extend(d.dataset for d in case.doses)
    objects.extend(ds for _, ds in case.plans)
    rows: dict[tuple[str, str, str], list[str]] = {}
    for ds in objects:
        modality = str(ds.get("Modality", "?"))
        for e in what_if(ds, deid, ct_defaced=True):
            rows.setdefault((modality, e.action, e.keyword or e.tag), []).append(
                f"{e.before!r} -> {e.after!r}"
            )
    print(f"what-if (first CT slice stands for all {len(case.ct.datasets)} slices); nothing written")
    print(f"{'object':<9} {'action':<16} {'attribute':<36} {'n':>5}  example")
    for (modality, action, attr), examples in sorted(rows.items()):
        print(f"{modality:<9} {action:<16} {attr:<36} {len(examples):>5}  {examples[0]}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rtdeface.landmarks import is_eye_name
    from rtdeface.load import load_case

    options = _options(args)
    case = load_case(args.case_dir)
    g = case.ct.grid
    z = g.slice_z_mm()
    info: dict[str, object] = {
        "ct": {
            "slices": g.shape[0],
            "rows_columns": [g.shape[1], g.shape[2]],
            "spacing_mm_kij": [round(s, 4) for s in g.spacing_mm],
            "z_range_mm": [float(z.min()), float(z.max())],
            "patient_position": str(case.ct.datasets[0].get("PatientPosition", "")),
            "transfer_syntax": str(case.ct.datasets[0].file_meta.TransferSyntaxUID.name),
        },
        "doses": [
            {"shape_kij": list(d.grid.shape), "spacing_mm_kij": [round(s, 4) for s in d.grid.spacing_mm]}
            for d in case.doses
        ],
        "plans": len(case.plans),
        "ignored_objects": len(case.ignored),
    }
    if case.structure_set is not None:
        preserved = {
            r.name
            for r in select_preserved(case.structure_set.rois, options.keep, options.preserve_ptvs)
        }
        info["rois"] = [
            {
                "number": r.number,
                "name": r.name,
                "type": r.interpreted_type,
                "contours": len(r.contours),
                "eye_name": is_eye_name(r.name),
                "preserved": r.name in preserved,
            }
            for r in case.structure_set.rois
        ]
    try:
        lm = find_landmarks(case, options)
        info["landmarks"] = {
            "source": lm.source,
            "eyes": [e.name for e in lm.eyes],
            "z_inferior_mm": lm.z_inferior_mm,
            "y_mid_mm": lm.y_mid_mm,
            "z_central_mm": lm.z_central_mm,
            "confidence": lm.confidence,
            "warnings": list(lm.warnings),
            "cut": f"z >= {lm.z_inferior_mm:.2f} mm and y < {lm.y_mid_mm:.2f} mm",
        }
        status = 0
    except RtDefaceError as exc:
        info["landmarks"] = {"error": str(exc)}
        status = 1
    if args.json:
        print(json.dumps(info, indent=1))
        return status
    ct = info["ct"]
    assert isinstance(ct, dict)
    print(f"CT: {ct['slices']} slices {ct['rows_columns'][0]}x{ct['rows_columns'][1]}, "
          f"spacing {ct['spacing_mm_kij']} mm, z {ct['z_range_mm']} mm, "
          f"{ct['patient_position']}, {ct['transfer_syntax']}")
    for d in info["doses"]:  # type: ignore[attr-defined]
        print(f"RTDOSE: {d['shape_kij']} spacing {d['spacing_mm_kij']} mm")
    print(f"RTPLAN: {info['plans']}")
    for r in info.get("rois", []):  # type: ignore[attr-defined]
        flags = ("preserved " if r["preserved"] else "") + ("eye-name" if r["eye_name"] else "")
        print(f"  ROI {r['number']:>3} {r['name']:<28} {r['type']:<10} {r['contours']:>4} contours  {flags}")
    lmi = info["landmarks"]
    assert isinstance(lmi, dict)
    if "error" in lmi:
        print(f"landmarks: ERROR {lmi['error']}")
    else:
        print(f"landmarks ({lmi['source']}: {', '.join(lmi['eyes'])}): {lmi['cut']}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 a case failed, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version exit 0, errors exit 2
        return int(exc.code or 0)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("rtdeface: error: a command is required (deface, inspect)", file=sys.stderr)
        return 2
    _configure_logging(args)
    try:
        if args.command == "deface":
            return _cmd_deface(args)
        return _cmd_inspect(args)
    except UsageError as exc:
        print(f"rtdeface: error: {exc}", file=sys.stderr)
        return 2
    except RtDefaceError as exc:
        print(f"rtdeface: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
