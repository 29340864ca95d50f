"""The ``rtdeface`` command line: the only place that configures logging or prints.

Exit codes: 0 every case done, 1 a case failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtdeface import __version__
from rtdeface.errors import InputError, RtDefaceError, UsageError
from rtdeface.fullface import DEFAULT_FACE_DEPTH_MM, DEFAULT_FACE_MARGIN_MM, MODES
from rtdeface.pipeline import (
    EYE_MODES,
    DefacedCase,
    DefaceOptions,
    complete_eye_check,
    deface_case,
    find_landmarks,
)
from rtdeface.region import DefacingRegion, select_preserved

if TYPE_CHECKING:
    from rtdeface.batch import CaseResult
    from rtdeface.deid import DeidOptions, SessionJob
    from rtdeface.discover import TreeCases
    from rtdeface.load import Case
    from rtdeface.write import CaseWriter

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
        "--no-eye-check",
        action="store_true",
        help="with --eyes auto and contoured eyes, skip finding the eyes in the image as a "
        "cross-check",
    )
    g.add_argument(
        "--no-ptv",
        action="store_true",
        help="do not preserve PTVs (only --keep ROIs are preserved)",
    )
    f = p.add_argument_group("defacing mode")
    f.add_argument(
        "--mode",
        choices=MODES,
        default="default",
        help="default: the published cut (superior to the inferior eye plane and anterior to "
        "the eyes' midpoint); full-face: also flatten the face below the eyes (nose, lips, "
        "chin, mask) to the bony level, down to the chin, preserving PTVs and the default "
        "HNC OARs [default: default]",
    )
    f.add_argument(
        "--keep-oar",
        action="append",
        default=[],
        metavar="PATTERN",
        help="full-face mode: also preserve OARs whose name matches this regular expression "
        "(case-insensitive; repeatable)",
    )
    f.add_argument(
        "--no-default-oars",
        action="store_true",
        help="full-face mode: do not preserve the default OARs (mandible, oral cavity, "
        "parotids, submandibular glands, spinal cord, brainstem, larynx, constrictors)",
    )
    f.add_argument(
        "--face-margin",
        type=float,
        default=DEFAULT_FACE_MARGIN_MM,
        metavar="MM",
        help="full-face mode: cut this far anterior to the bone front "
        f"[default: {DEFAULT_FACE_MARGIN_MM:g}]",
    )
    f.add_argument(
        "--face-depth",
        type=float,
        default=DEFAULT_FACE_DEPTH_MM,
        metavar="MM",
        help="full-face mode: largest distance below the eye plane the region reaches "
        f"(it stops at the chin when found) [default: {DEFAULT_FACE_DEPTH_MM:g}]",
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
    g.add_argument("--uid-root", default="2.25.", help="root of generated UIDs [default: 2.25.]")
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
        eye_check=not args.no_eye_check,
        mode=args.mode,
        keep_oars=tuple(args.keep_oar),
        default_oars=not args.no_default_oars,
        face_margin_mm=args.face_margin,
        face_depth_mm=args.face_depth,
    )


def _face_line(region: DefacingRegion) -> str:
    """The full-face part of the deface summary ('' in the default mode)."""
    face = region.face
    if face is None or face.z_mm.size == 0:
        return ""
    return (
        f"\n  full-face: y < bone front - margin on {face.z_mm.size} planes, "
        f"z {face.z_mm[0]:.1f}..{face.z_mm[-1]:.1f} mm (chin level {face.z_chin_mm:.1f} mm)"
    )


def _add_batch_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batch (an INPUT tree with several cases)")
    g.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="cases defaced in parallel by a process pool [default: CPU count]",
    )
    g.add_argument(
        "--fail-fast",
        action="store_true",
        help="stop starting new cases after the first failure (default: record it and go on)",
    )
    g.add_argument(
        "--batch",
        action="store_true",
        help="use the batch layout (OUT_DIR/<pseudonym>_<hash>/, manifest, summary) even when "
        "INPUT holds a single case",
    )
    g.add_argument(
        "--log-file",
        type=Path,
        metavar="FILE",
        help="batch log (paths, UIDs and names scrubbed) [default: OUT_DIR/rtdeface.log]",
    )
    d = g.add_mutually_exclusive_group()
    d.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run the cases on this Dask distributed scheduler (needs rtdeface[dask]; INPUT "
        "and OUT_DIR must have the same paths on every worker; the key travels with each task)",
    )
    d.add_argument(
        "--dask-local",
        type=int,
        metavar="N",
        help="run the cases on a local Dask cluster of N single-threaded worker processes",
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
        help="deface one case folder, or every case of a tree, into a new output folder",
        description="Deface every case found by content below INPUT (any layout: one folder "
        "per patient, one flat folder, nested TPS exports; non-DICOM files are skipped). "
        "When INPUT holds one CT series the case is written directly into OUT_DIR; otherwise "
        "each case gets OUT_DIR/<pseudonym>_<hash>/ with a manifest, summary.csv/json and a "
        "log (batch mode; rerun to resume). Inputs are never modified.",
    )
    p.add_argument("case_dir", type=Path, metavar="INPUT")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR")
    _add_case_options(p)
    _add_deid_options(p)
    _add_batch_options(p)

    p = sub.add_parser(
        "inspect",
        help="show the cases of a tree, or the series, ROIs, eyes, landmarks, cut and "
        "preserved ROIs of one case; writes nothing",
    )
    p.add_argument("case_dir", type=Path, metavar="INPUT")
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="processes reading headers [default: CPU count]",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_case_options(p)

    p = sub.add_parser(
        "validate",
        help="prove removal, PTV/OAR/dose preservation and DICOM integrity of defaced output",
        description="Compare ORIGINAL with DEFACED (pairs; a batch OUTPUT_ROOT with its "
        "manifest expands to all its cases). Writes validation.json and QA images into the QA "
        "folder (default: DEFACED/../<DEFACED name>_qa; never inside DEFACED). Exit 1 when any "
        "check fails.",
    )
    p.add_argument("pairs", nargs="+", type=Path, metavar="ORIGINAL DEFACED")
    p.add_argument(
        "--z",
        type=float,
        metavar="MM",
        help="inferior eye plane z (mm) when DEFACED has no rtdeface_report.json",
    )
    p.add_argument("--y", type=float, metavar="MM", help="eyes' A-P midpoint y (mm), as --z")
    p.add_argument(
        "--air-hu",
        type=float,
        default=-900.0,
        metavar="HU",
        help="CT voxels in the cut must be at or below this [default: -900]",
    )
    p.add_argument("--qa", type=Path, metavar="DIR", help="QA folder (images, validation.json)")
    p.add_argument("--no-images", action="store_true", help="write no QA images")
    p.add_argument("--no-phi", action="store_true", help="skip the PHI scan")
    p.add_argument(
        "--summary",
        action="store_true",
        help="print and write the dataset tables (summary.json, summary.md)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--privacy",
        action="store_true",
        help="also run the privacy check (face detection on renderings; needs "
        "rtdeface[privacy]) into QA/privacy; a face still detectable fails the case",
    )

    p = sub.add_parser(
        "privacy",
        help="render the face from the CT, BODY contour and dose before/after and look for a "
        "face (needs rtdeface[privacy])",
        description="Render the skin (CT), the BODY/EXTERNAL contour and each dose grid's "
        "low-isodose surface of ORIGINAL and DEFACED from 5 views, run MTCNN and the dlib HOG "
        "detector on every rendering and compare dlib face descriptors. Writes PNGs and "
        "privacy.json into OUT (default: DEFACED/../<DEFACED name>_privacy; never inside "
        "DEFACED). Exit 0: no face detected after defacing in any view; 1: a face is still "
        "detectable; 2: usage error or the privacy extra is missing.",
    )
    p.add_argument("original", type=Path, metavar="ORIGINAL")
    p.add_argument("defaced", type=Path, metavar="DEFACED")
    p.add_argument("-o", "--output", type=Path, metavar="OUT", help="folder for the renderings")
    p.add_argument(
        "--reference",
        type=Path,
        metavar="CASE",
        help="another subject's case for the different-face baseline [default: a synthetic "
        "reference head]",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")

    p = sub.add_parser(
        "compare",
        help="put several defaced outputs of one case (e.g. default and full-face mode) side "
        "by side: privacy result and utility cost (needs rtdeface[privacy] unless "
        "--no-privacy)",
        description="Validate every DEFACED output against ORIGINAL, run the privacy check on "
        "each, and write compare.json, compare.md (per output: faces detected per surface and "
        "view, descriptor distances against their baselines, per-ROI volume lost in mL, PTVs "
        "identical, DVH changes of the default OARs) and compare.png (renderings side by "
        "side) into OUT (default: ORIGINAL name + _compare beside the first DEFACED; never "
        "inside a DEFACED). Exit 1 when an output fails validation or the privacy check.",
    )
    p.add_argument("original", type=Path, metavar="ORIGINAL")
    p.add_argument("defaced", nargs="+", type=Path, metavar="DEFACED")
    p.add_argument("-o", "--output", type=Path, metavar="OUT", help="folder for the comparison")
    p.add_argument(
        "--reference",
        type=Path,
        metavar="CASE",
        help="another subject's case for the different-face baseline (as in privacy)",
    )
    p.add_argument(
        "--no-privacy", action="store_true", help="utility only (no renderings, no detectors)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
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
    from rtdeface.report import case_report, to_json
    from rtdeface.write import CaseWriter, build_outputs, check_output_free

    t_start = time.perf_counter()
    tree = _discover_tree(args, keep_datasets=True)
    if tree is not None and (tree.ct_series > 1 or args.batch):
        # the workers read their own cases: do not hold the whole reads meanwhile
        index = dataclasses.replace(tree.index, datasets={})
        return _cmd_deface_batch(args, dataclasses.replace(tree, index=index))
    options = _options(args)
    deid = _deid_options(args)
    output = Path(args.output).absolute()
    source = Path(args.case_dir).absolute()
    if output == source or source in output.parents:
        raise UsageError(f"output {output} lies inside the input {source}; choose another folder")
    audit = (args.audit or output.with_name(output.name + ".audit.json")).absolute()
    if deid is not None and (audit == output or output in audit.parents):
        raise UsageError(f"--audit {audit} lies inside the output; it holds identifiers")
    if not args.what_if:
        check_output_free(output)
    t0 = t_start
    if args.what_if:
        return _what_if(_load_single(args, tree)[0], deid)
    case, session = _load_single(args, tree, deid)
    t_load = time.perf_counter() - t0
    pending: DefacedCase | None = None  # what to stop if the case fails
    writer: CaseWriter | None = None
    try:
        defaced = pending = deface_case(case, options, defer=True, parallel=True)
        t = time.perf_counter()
        # the CT slices are written by a child process as soon as they are final, while this
        # one finishes the structure set, the doses and plans, and the report
        writer = CaseWriter(output)
        outputs, record = build_outputs(
            defaced, deid, context=session, ct_ready=partial(writer.write, background=True)
        )
        defaced.timings_s["load"] = t_load
        defaced.timings_s["build_outputs"] = time.perf_counter() - t
        defaced = complete_eye_check(defaced)  # the image cross-check ran beside the work above
        report = case_report(defaced, outputs, record)
        t = time.perf_counter()
        writer.write([o for o in outputs if o.role != "CT"])
        out = writer.commit({REPORT_NAME: to_json(report)})
    except BaseException:
        if pending is not None:
            pending.cancel_pending()
        if session is not None:
            session.cancel()
        if writer is not None:
            writer.abort()
        raise
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
            f"cut z >= {lm.z_inferior_mm:.2f} mm, y < {lm.y_mid_mm:.2f} mm"
            + (f" (confidence {lm.confidence:.2f})" if lm.confidence is not None else "")
            + (f"\n  {lm.cross_check.message}" if lm.cross_check else "")
            + _face_line(defaced.region)
            + "\n"
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
    print(
        f"what-if (first CT slice stands for all {len(case.ct.datasets)} slices); nothing written"
    )
    print(f"{'object':<9} {'action':<16} {'attribute':<36} {'n':>5}  example")
    for (modality, action, attr), examples in sorted(rows.items()):
        print(f"{modality:<9} {action:<16} {attr:<36} {len(examples):>5}  {examples[0]}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rtdeface.landmarks import is_eye_name
    from rtdeface.load import load_case

    tree = _discover_tree(args)
    if tree is not None and tree.ct_series > 1:
        return _inspect_tree(args, tree)
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
            {
                "shape_kij": list(d.grid.shape),
                "spacing_mm_kij": [round(s, 4) for s in d.grid.spacing_mm],
            }
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
    print(
        f"CT: {ct['slices']} slices {ct['rows_columns'][0]}x{ct['rows_columns'][1]}, "
        f"spacing {ct['spacing_mm_kij']} mm, z {ct['z_range_mm']} mm, "
        f"{ct['patient_position']}, {ct['transfer_syntax']}"
    )
    for d in info["doses"]:  # type: ignore[attr-defined]
        print(f"RTDOSE: {d['shape_kij']} spacing {d['spacing_mm_kij']} mm")
    print(f"RTPLAN: {info['plans']}")
    for r in info.get("rois", []):  # type: ignore[attr-defined]
        flags = ("preserved " if r["preserved"] else "") + ("eye-name" if r["eye_name"] else "")
        print(
            f"  ROI {r['number']:>3} {r['name']:<28} {r['type']:<10} "
            f"{r['contours']:>4} contours  {flags}"
        )
    lmi = info["landmarks"]
    assert isinstance(lmi, dict)
    if "error" in lmi:
        print(f"landmarks: ERROR {lmi['error']}")
    else:
        print(f"landmarks ({lmi['source']}: {', '.join(lmi['eyes'])}): {lmi['cut']}")
    return status


# ------------------------------------------------------------------------------ batch mode


def _discover_tree(args: argparse.Namespace, keep_datasets: bool = False) -> TreeCases | None:
    """Discovery of INPUT; None when INPUT is not a folder (legacy errors).

    Header-only, except with ``keep_datasets`` for a tree small enough to be one case: then
    every file is read whole once and the datasets are kept for :func:`_load_single`.
    """
    from rtdeface.discover import KEEP_DATASETS_MAX_BYTES, discover_cases

    if not Path(args.case_dir).is_dir():
        return None
    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    limit = KEEP_DATASETS_MAX_BYTES if keep_datasets else 0
    return discover_cases(args.case_dir, args.jobs, limit)


def _load_single(
    args: argparse.Namespace, tree: TreeCases | None, deid: DeidOptions | None = None
) -> tuple[Case, SessionJob | None]:
    """The one case of INPUT, from the datasets discovery kept (else read here).

    With ``deid``, the de-identification context of the case's objects is started in a child
    process before the case is loaded (:class:`rtdeface.deid.SessionJob`) and returned too.
    """
    from rtdeface.deid import SessionJob
    from rtdeface.discover import assemble_single_case
    from rtdeface.load import load_case, load_case_files

    if tree is None or not tree.index.datasets:
        return load_case(args.case_dir), None
    if tree.index.unreadable:
        raise InputError(tree.index.unreadable[0][1])
    source = Path(args.case_dir)
    files = assemble_single_case(list(tree.index.records), source)
    datasets = tree.index.datasets
    session = None
    rs = (files.rtstruct,) if files.rtstruct is not None else ()
    paths = [r.path for r in (*files.ct, *rs, *files.doses, *files.plans)]
    if deid is not None and all(p in datasets for p in paths):  # else built when needed
        session = SessionJob([datasets[p] for p in paths], deid, ct_defaced=True)
    try:
        return load_case_files(files, source, datasets), session
    except BaseException:
        if session is not None:
            session.cancel()
        raise


def _inspect_tree(args: argparse.Namespace, tree: TreeCases) -> int:
    """Print the case table of a tree (one row per case) and its problems; write nothing."""
    root = tree.index.root
    rows = []
    for n, c in enumerate(tree.cases, start=1):
        counts = c.counts()
        rel = str(c.folder.relative_to(root)) if c.folder != root else "."
        rows.append({"case": n, "folder": rel, **counts})
    errors = [p for p in tree.problems if p.is_error]
    if args.json:
        print(
            json.dumps(
                {
                    "cases": rows,
                    "problems": [
                        {
                            "kind": p.kind,
                            "error": p.is_error,
                            "detail": p.detail,
                            "files": len(p.files),
                        }
                        for p in tree.problems
                    ],
                    "non_dicom_files": len(tree.index.non_dicom),
                },
                indent=1,
            )
        )
        return 1 if errors else 0
    print(
        f"{len(tree.cases)} case(s) in {root} "
        f"({len(tree.index.records)} DICOM objects, {len(tree.index.non_dicom)} non-DICOM "
        "files skipped)"
    )
    print(f"{'#':>4}  {'CT':>5} {'RTSTRUCT':>8} {'RTDOSE':>6} {'RTPLAN':>6} {'other':>5}  folder")
    for r in rows:
        print(
            f"{r['case']:>4}  {r['CT']:>5} {r['RTSTRUCT']:>8} {r['RTDOSE']:>6} {r['RTPLAN']:>6} "
            f"{r['OTHER']:>5}  {r['folder']}"
        )
    for p in tree.problems:
        print(f"{'ERROR' if p.is_error else 'warning'}: {p.detail}")
    return 1 if errors else 0


def _dask_client(args: argparse.Namespace) -> Any:
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise UsageError(
            "--scheduler/--dask-local need Dask: pip install 'rtdeface[dask]'"
        ) from exc
    if args.scheduler:
        return Client(args.scheduler)  # type: ignore[no-untyped-call]
    if args.dask_local < 1:
        raise UsageError(f"--dask-local must be >= 1, got {args.dask_local}")
    cluster = LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=args.dask_local, threads_per_worker=1, processes=True, dashboard_address=None
    )
    return Client(cluster)  # type: ignore[no-untyped-call]


class _Progress:
    """tqdm bar on a terminal, plain lines otherwise, nothing with --quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total = total
        self.quiet = quiet
        self.t0 = time.monotonic()
        self.bar: Any = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

            self.bar = tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, result: CaseResult, done: int, total: int) -> None:
        if self.quiet:
            return
        what = "reused" if result.reused else result.status
        if self.bar is not None:
            self.bar.set_postfix_str(f"{result.name} {what}", refresh=False)
            self.bar.update(1)
            return
        elapsed = time.monotonic() - self.t0
        rate = done / elapsed * 60 if elapsed > 0 else 0.0
        eta = (total - done) / (done / elapsed) if done and elapsed > 0 else 0.0
        print(
            f"rtdeface: [{done}/{total}] {result.name} {what}; {rate:.1f} cases/min, "
            f"ETA {eta:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _BarSafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Console log handler that prints above an active tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _cmd_deface_batch(args: argparse.Namespace, tree: TreeCases) -> int:
    """Deface every case of a tree into OUT_DIR/<case>/ (parallel, resumable)."""
    from rtdeface import batch

    if args.what_if:
        raise UsageError("--what-if describes one case; give one case folder as INPUT")
    options = _options(args)
    deid = _deid_options(args)
    root = tree.index.root
    output = Path(args.output).absolute()
    if output == root or root in output.parents or output in root.parents:
        raise UsageError(f"output {output} and input {root} overlap; choose another folder")
    audit_main, audit_cases = batch.audit_paths(output, args.audit)
    for a in (audit_main, audit_cases):
        if deid is not None and (a == output or output in a.parents):
            raise UsageError(f"--audit {a} lies inside the output; it holds identifiers")
    manifest = batch.prepare_output(output)
    scrubber = batch.scrubber_for(tree)
    logger = logging.getLogger("rtdeface")
    console = logger.handlers[0] if logger.handlers else logging.StreamHandler(sys.stderr)
    console.setLevel(logger.level)
    bar_safe = _BarSafeHandler(sys.stderr)
    bar_safe.setFormatter(console.formatter)
    bar_safe.setLevel(logger.level)
    file_level = logging.DEBUG if args.verbose else logging.INFO
    log_path = Path(args.log_file or output / batch.LOG_NAME).absolute()
    file_handler = logging.FileHandler(log_path, encoding="utf-8")
    file_handler.setLevel(file_level)
    file_handler.addFilter(scrubber)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.handlers[:] = [bar_safe, file_handler]
    logger.setLevel(min(file_level, console.level))
    progress: _Progress | None = None
    client: Any = None
    try:
        with batch.OutputLock(output):
            batch.clean_leftovers(output)
            plan = batch.plan_batch(tree, output, options, deid, manifest, file_level)
            for note in plan.warnings:
                log.warning("%s", note)
            if args.scheduler or args.dask_local:
                client = _dask_client(args)
            progress = _Progress(len(plan.tasks), args.quiet)
            result = batch.run_batch(
                plan,
                output,
                manifest,
                jobs=args.jobs,
                client=client,
                fail_fast=args.fail_fast,
                audit=args.audit,
                scrubber=scrubber,
                progress=progress,
            )
    finally:
        if progress is not None:
            progress.close()
        if client is not None:
            cluster = getattr(client, "cluster", None)
            client.close()
            if cluster is not None and args.dask_local:
                cluster.close()
        file_handler.close()
        logger.handlers[:] = [console]
    done = [r for r in result.results if r.status == "done"]
    reused = sum(1 for r in done if r.reused)
    details = {r.name: r.detail for r in result.results}
    folders = {t.name: t.case.folder for t in plan.tasks}
    for r in result.results:
        if r.status == "failed":
            rel = folders[r.name].relative_to(root) if folders[r.name] != root else Path(".")
            print(f"rtdeface: FAILED {r.name} (input {rel}): {details[r.name]}", file=sys.stderr)
    for d in plan.problem_details:
        print(f"rtdeface: ERROR {d}", file=sys.stderr)
    if not args.quiet:
        print(
            f"{len(done)} of {len(plan.tasks)} case(s) done ({reused} already done earlier), "
            f"{sum(1 for r in result.results if r.status == 'failed')} failed, "
            f"{sum(1 for r in result.results if r.status == 'cancelled')} not run, "
            f"{len(plan.problem_rows)} other problem(s) -> {output}\n"
            f"  summary: {output / batch.SUMMARY_CSV}, {output / batch.SUMMARY_JSON}\n"
            f"  log: {log_path}"
            + (f"\n  audit (keep private): {audit_main}" if deid is not None else "")
        )
    return 1 if result.failed else 0


def _cmd_validate(args: argparse.Namespace) -> int:
    """Validate ORIGINAL/DEFACED pairs; QA folder per case; summary over several cases."""
    from rtdeface.validate import (
        CaseValidation,
        Check,
        format_case,
        format_summary,
        pairs_from_manifest,
        summarise,
        validate_pair,
    )

    paths: list[Path] = [Path(p).absolute() for p in args.pairs]
    if len(paths) % 2:
        raise UsageError(
            f"validate takes ORIGINAL DEFACED pairs, got {len(paths)} path(s); give the original "
            "case (or input root) followed by its defaced output (or output root)"
        )
    pairs: list[tuple[Path, Path]] = []
    batch = False
    for original, defaced in zip(paths[0::2], paths[1::2]):
        expanded = pairs_from_manifest(original, defaced)
        if expanded is None:
            pairs.append((original, defaced))
        else:
            pairs.extend(expanded)
            batch = True
    if not pairs:
        raise UsageError("no case to validate (the batch manifest lists no finished case)")
    multi = batch or len(pairs) > 1
    first_out = paths[1]
    qa_root = (args.qa or first_out.with_name(first_out.name + "_qa")).absolute()
    for _, defaced in pairs:
        if qa_root == defaced or defaced in qa_root.parents:
            raise UsageError(f"--qa {qa_root} lies inside the defaced output {defaced}")
    results: list[CaseValidation] = []
    images: list[Path] = []
    detectors = None
    if args.privacy:
        from rtdeface.privacy import load_detectors

        detectors = load_detectors()  # UsageError (exit 2) with the install hint when missing
    for n, (original, defaced) in enumerate(pairs):
        qa_dir = qa_root / f"{n + 1:04d}_{defaced.name}" if multi else qa_root
        try:
            v, (orig, dfc, region) = validate_pair(
                original,
                defaced,
                z_mm=args.z,
                y_mm=args.y,
                air_hu=args.air_hu,
                phi=not args.no_phi,
            )
        except UsageError:
            if not multi:
                raise
            v = CaseValidation(
                defaced.name,
                str(original),
                str(defaced),
                None,
                (Check("cut", "FAIL", "no cut", ("no rtdeface_report.json and no --z/--y",)),),
            )
            orig = dfc = region = None
        if not args.no_images and orig is not None and dfc is not None and region is not None:
            from rtdeface.qa import case_images, eye_x_from_report

            pngs = case_images(orig, dfc, region, qa_dir, defaced.name, eye_x_from_report(defaced))
            v.qa_images.extend(str(p) for p in pngs)
            images.extend(pngs)
        summary_mode: dict[str, object] | None = None
        if detectors is not None and orig is not None and dfc is not None:
            import dataclasses

            from rtdeface.privacy import check_privacy, verdict_text

            pr = check_privacy(orig, dfc, qa_dir / "privacy", detectors)
            (qa_dir / "privacy" / "privacy.json").write_text(
                json.dumps(pr.to_dict(), indent=1) + "\n", "utf-8"
            )
            status = "PASS" if pr.status == "PASS" else "FAIL" if pr.status == "FAIL" else "INFO"
            problems = tuple(
                f"{r.surface} {r.view}: face still detectable after defacing"
                for s in pr.surfaces
                for r in s.views
                if r.status == "FAIL"
            )
            privacy_check = Check(
                "privacy.face", status, verdict_text(pr), problems, {"report": pr.to_dict()}
            )
            v = dataclasses.replace(v, checks=(*v.checks, privacy_check))
            from rtdeface.compare import format_mode_summary, mode_summary

            summary_mode = mode_summary(defaced.name, v, orig, pr)
            (qa_dir / "mode_summary.json").write_text(
                json.dumps(summary_mode, indent=1) + "\n", "utf-8"
            )
            if not args.quiet and not args.json:
                print(format_mode_summary(summary_mode))
        qa_dir.mkdir(parents=True, exist_ok=True)
        doc = v.to_dict()
        if summary_mode is not None:
            doc["mode_summary"] = summary_mode  # privacy result and utility cost of its mode
        (qa_dir / "validation.json").write_text(
            json.dumps(doc, indent=1, default=float) + "\n", encoding="utf-8"
        )
        results.append(v)
        if not args.quiet and not args.json:
            print(format_case(v))
            print(f"  validation: {qa_dir / 'validation.json'}")
            print()
    dicts = [v.to_dict() for v in results]
    summary = None
    if multi or args.summary:
        summary = summarise(dicts)
        qa_root.mkdir(parents=True, exist_ok=True)
        (qa_root / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", "utf-8")
        (qa_root / "summary.md").write_text(format_summary(summary), "utf-8")
        if images:
            from rtdeface.qa import write_pdf

            write_pdf(images, qa_root / "qa.pdf")
        if not args.quiet and not args.json:
            print(format_summary(summary))
            print(f"summary: {qa_root / 'summary.md'}")
    if args.json:
        print(json.dumps({"cases": dicts, "summary": summary}, indent=1, default=float))
    return 0 if all(v.ok for v in results) else 1


def _cmd_privacy(args: argparse.Namespace) -> int:
    """Privacy check of one ORIGINAL/DEFACED pair; exit 1 when a face is still detectable."""
    from rtdeface.load import load_case
    from rtdeface.privacy import check_privacy, format_report, load_detectors

    detectors = load_detectors()  # UsageError (exit 2) with the install hint when missing
    original, defaced = Path(args.original).absolute(), Path(args.defaced).absolute()
    out = (args.output or defaced.with_name(defaced.name + "_privacy")).absolute()
    if out == defaced or defaced in out.parents:
        raise UsageError(f"--output {out} lies inside the defaced output {defaced}")
    reference = load_case(args.reference) if args.reference else None
    report = check_privacy(
        load_case(original), load_case(defaced), out, detectors, reference=reference
    )
    (out / "privacy.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n", "utf-8")
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    elif not args.quiet:
        print(format_report(report))
        print(f"  report: {out / 'privacy.json'}")
    return 0 if report.ok else 1


def _cmd_compare(args: argparse.Namespace) -> int:
    """Several defaced outputs of one original side by side (privacy and utility)."""
    from rtdeface.compare import (
        format_markdown,
        format_mode_summary,
        mode_summary,
        side_by_side_png,
    )
    from rtdeface.load import load_case
    from rtdeface.privacy import PrivacyReport, check_privacy, load_detectors
    from rtdeface.validate import validate_pair

    original = Path(args.original).absolute()
    outputs = [Path(d).absolute() for d in args.defaced]
    if len({d.name for d in outputs}) != len(outputs):
        raise UsageError(
            "compare labels outputs by folder name and got duplicates "
            f"({', '.join(d.name for d in outputs)}); give the outputs distinct folder names"
        )
    out = (args.output or outputs[0].with_name(original.name + "_compare")).absolute()
    for d in outputs:
        if out == d or d in out.parents:
            raise UsageError(f"--output {out} lies inside the defaced output {d}")
        if not d.is_dir():
            raise UsageError(f"{d}: no such defaced output folder; give a folder written by deface")
    detectors = None if args.no_privacy else load_detectors()
    reference = load_case(args.reference) if args.reference else None
    orig = load_case(original)
    summaries: list[dict[str, object]] = []
    reports: list[tuple[str, PrivacyReport]] = []
    ok = True
    for d in outputs:
        dfc = load_case(d)
        v, _ = validate_pair(original, d, phi=False, independent=False, loaded=(orig, dfc))
        pr = None
        if detectors is not None:
            pr = check_privacy(orig, dfc, out / d.name, detectors, reference=reference)
            reports.append((d.name, pr))
        ok &= v.ok and (pr is None or pr.ok)
        summaries.append(mode_summary(d.name, v, orig, pr))
    out.mkdir(parents=True, exist_ok=True)
    doc = {"original": str(original), "outputs": summaries}
    (out / "compare.json").write_text(json.dumps(doc, indent=1) + "\n", "utf-8")
    (out / "compare.md").write_text(format_markdown(str(original), summaries), "utf-8")
    if reports:
        side_by_side_png(out / "compare.png", reports)
    if args.json:
        print(json.dumps(doc, indent=1))
    elif not args.quiet:
        print(f"compare: {original}")
        for s in summaries:
            print(format_mode_summary(s))
        print(f"  tables: {out / 'compare.md'}")
    return 0 if ok else 1


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
        if args.command == "validate":
            return _cmd_validate(args)
        if args.command == "privacy":
            return _cmd_privacy(args)
        if args.command == "compare":
            return _cmd_compare(args)
        return _cmd_inspect(args)
    except UsageError as exc:
        print(f"rtdeface: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rtdeface: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except RtDefaceError as exc:
        print(f"rtdeface: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
