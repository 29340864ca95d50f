"""Per-case JSON report: landmarks, cut, voxels changed, preserved-in-region, ROI changes,
dose voxels zeroed, timings. It carries no identifiers (no input paths, no patient data)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from rtdeface import __version__
from rtdeface.pipeline import DefacedCase
from rtdeface.write import OutputObject


def case_report(defaced: DefacedCase, outputs: Sequence[OutputObject] = ()) -> dict[str, Any]:
    """The report of one defaced case as JSON-ready data."""
    case = defaced.case
    lm = defaced.landmarks
    ct_ml = case.ct.grid.voxel_volume_ml
    report: dict[str, Any] = {
        "rtdeface_version": __version__,
        "method": "O'Sullivan-Steben et al. 2025 (arXiv 2508.13914): remove z >= z_inferior_eye "
        "and y < y_mid_eyes, except preserved ROIs",
        "landmarks": {
            "source": lm.source,
            "eye_rois": [e.name for e in lm.eyes],
            "z_inferior_mm": lm.z_inferior_mm,
            "y_mid_mm": lm.y_mid_mm,
            "z_central_mm": lm.z_central_mm,
            "confidence": lm.confidence,
            "eyes": [dataclasses.asdict(e) for e in lm.eyes],
            "warnings": list(lm.warnings),
        },
        "cut": {
            "rule": "z >= z_inferior_mm and y < y_mid_mm, minus preserved ROIs",
            "z_inferior_mm": defaced.region.z_inferior_mm,
            "y_mid_mm": defaced.region.y_mid_mm,
            "preserved_rois": list(defaced.region.preserved_names),
            "keep_margin_mm": defaced.options.keep_margin_mm,
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
        "rois": [dataclasses.asdict(c) for c in defaced.structures.changes]
        if defaced.structures is not None
        else [],
        "rois_removed": list(defaced.structures.removed_rois) if defaced.structures else [],
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
    }
    return report


def to_json(report: dict[str, Any]) -> bytes:
    """Serialise a report (sorted keys, indented, UTF-8)."""
    return (json.dumps(report, indent=1, sort_keys=True, default=float) + "\n").encode()
