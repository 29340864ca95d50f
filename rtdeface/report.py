"""Per-case JSON report: landmarks, cut, voxels changed, preserved-in-region, ROI changes,
dose voxels zeroed, timings. It carries no identifiers (no input paths, no patient data)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from rtdeface import __version__
from rtdeface.deid import DeidRecord, case_identity_tokens, is_safe_text
from rtdeface.pipeline import DefacedCase
from rtdeface.structures import RoiChange
from rtdeface.write import OutputObject


def output_roi_names(outputs: Sequence[OutputObject]) -> dict[int, str]:
    """ROINumber -> ROIName as written (after de-identification's Clean Descriptors)."""
    for o in outputs:
        if o.role == "RTSTRUCT":
            return {int(r.ROINumber): str(r.ROIName) for r in o.dataset.StructureSetROISequence}
    return {}


def case_report(
    defaced: DefacedCase,
    outputs: Sequence[OutputObject] = (),
    deid: DeidRecord | None = None,
) -> dict[str, Any]:
    """The report of one defaced case as JSON-ready data.

    With de-identification, ROI names are those written (a name Clean Descriptors replaced
    appears replaced here too; a removed ROI appears as ``ROI_<number>``), and the report
    carries the pseudonym but never the original PatientID or the date offset.
    """
    case = defaced.case
    lm = defaced.landmarks
    ct_ml = case.ct.grid.voxel_volume_ml
    written = output_roi_names(outputs)
    number_of = {r.name: r.number for r in case.structure_set.rois} if case.structure_set else {}

    tokens: frozenset[str] = deid.identity_tokens if deid is not None else frozenset()
    if deid is not None and not tokens:
        sources = [case.ct.datasets[0]]
        if case.structure_set is not None:
            sources.append(case.structure_set.dataset)
        tokens = case_identity_tokens(sources)

    def name(original: str, number: int | None = None) -> str:
        """The ROI name as written (by ROINumber when known; names may repeat)."""
        if number is None:
            number = number_of.get(original)
        if deid is None or number is None or number < 0:
            return original
        if number in written:
            return written[number]
        # removed ROI: same rule as Clean Descriptors applies to written labels
        return original if is_safe_text(original, tokens, label=True) else f"ROI_{number}"

    def roi_entry(change: RoiChange) -> dict[str, Any]:
        entry = dataclasses.asdict(change)
        entry["name"] = name(change.name, change.number)
        return entry

    eyes = []
    for e in lm.eyes:
        d = dataclasses.asdict(e)
        d["name"] = name(e.name)
        eyes.append(d)
    report: dict[str, Any] = {
        "rtdeface_version": __version__,
        "method": "O'Sullivan-Steben et al. 2025 (arXiv 2508.13914): remove z >= z_inferior_eye "
        "and y < y_mid_eyes, except preserved ROIs",
        "landmarks": {
            "source": lm.source,
            "eye_rois": [name(e.name) for e in lm.eyes],
            "z_inferior_mm": lm.z_inferior_mm,
            "y_mid_mm": lm.y_mid_mm,
            "z_central_mm": lm.z_central_mm,
            "confidence": lm.confidence,
            "eyes": eyes,
            "warnings": list(lm.warnings),
            "image_cross_check": dataclasses.asdict(lm.cross_check) if lm.cross_check else None,
        },
        "cut": {
            "rule": "z >= z_inferior_mm and y < y_mid_mm, minus preserved ROIs",
            "z_inferior_mm": defaced.region.z_inferior_mm,
            "y_mid_mm": defaced.region.y_mid_mm,
            "preserved_rois": [name(p.name, p.number) for p in defaced.region.preserved],
            "keep_margin_mm": defaced.options.keep_margin_mm,
            "mode": defaced.options.mode,
            **(
                {
                    "face_rule": "also, below the eye plane: y < y_front(z) (the bone front "
                    "minus face_margin_mm) on the planes of face_profile",
                    "face_margin_mm": defaced.options.face_margin_mm,
                    "face_depth_mm": defaced.options.face_depth_mm,
                    "face_profile": defaced.region.face.to_dict()
                    if defaced.region.face is not None
                    else None,
                }
                if defaced.options.mode == "full-face"
                else {}
            ),
        },
        "ct": {
            "shape_kij": list(case.ct.grid.shape),
            "spacing_mm_kij": list(case.ct.grid.spacing_mm),
            "voxels_in_cut": defaced.ct.voxels_in_cut,
            "voxels_changed": defaced.ct.voxels_changed,
            "slices_changed": len(defaced.ct.slices),
            "preserved_voxels_in_region": defaced.ct_preserved_in_region,
            "preserved_ml_in_region": round(defaced.ct_preserved_in_region * ct_ml, 3),
        },
        "rois": [roi_entry(c) for c in defaced.structures.changes]
        if defaced.structures is not None
        else [],
        "rois_removed": [name(c.name, c.number) for c in defaced.structures.changes if c.removed]
        if defaced.structures
        else [],
        "doses": [
            {
                "index": n,
                "shape_kij": list(d.grid.shape),
                "voxels_in_cut": r.voxels_in_cut,
                "voxels_zeroed": r.voxels_zeroed,
                "max_dose_removed_gy": r.max_dose_removed_gy,
                "preserved_voxels_in_region": r.preserved_in_region,
                "dvh_sequence_dropped": r.had_dvh,
            }
            for n, (d, r) in enumerate(zip(case.doses, defaced.doses), start=1)
        ],
        "plans": len(case.plans),
        "ignored_objects": len(case.ignored),
        "outputs": [o.relpath for o in outputs],
        "timings_s": {k: round(v, 4) for k, v in defaced.timings_s.items()},
        "deidentification": {
            "applied": deid is not None,
            "profile": deid.profile if deid else None,
            "options": list(deid.options) if deid else [],
            "pseudonym": deid.pseudonym if deid else None,
            "objects": deid.n_objects if deid else 0,
            "action_counts": dict(sorted(deid.action_counts.items())) if deid else {},
        },
    }
    return report


def to_json(report: dict[str, Any]) -> bytes:
    """Serialise a report (sorted keys, indented, UTF-8)."""
    return (json.dumps(report, indent=1, sort_keys=True, default=float) + "\n").encode()
