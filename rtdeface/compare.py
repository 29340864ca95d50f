"""Modes side by side: the privacy result and the utility cost of each defaced output of a case.

:func:`mode_summary` condenses one validated output (``rtdeface validate``) and its privacy
check (``rtdeface privacy``) into the numbers a user needs to choose a mode:

privacy
    per surface (CT, BODY, each dose) and view: the defaced rendering's MTCNN confidence and
    dlib HOG margin, whether a face is detected, the descriptor distance to the original and its
    baselines (different face at the same view, empty rendering); counts of views with a face
    detected, beyond the different-face baseline and beyond the empty-rendering floor;
utility
    per ROI the volume before and the volume lost (mL) and whether it was removed, clipped or
    unchanged; whether every PTV is identical (contours, CT voxels, DVHs); the DVH changes of the
    default full-face OARs (:data:`rtdeface.fullface.DEFAULT_OAR_PATTERNS`, matched in the
    original's ROI names whatever the mode).

:func:`compare_modes` puts several outputs of the same original side by side
(``rtdeface compare ORIGINAL DEFACED_A DEFACED_B``): ``compare.json``, ``compare.md`` (tables)
and ``compare.png`` (the renderings of each output beside the original's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from rtdeface.fullface import select_oars
from rtdeface.load import Case
from rtdeface.privacy import PrivacyReport
from rtdeface.region import is_ptv
from rtdeface.validate import CaseValidation

log = logging.getLogger(__name__)

VOLUME_ATOL_ML = 0.005
"""ROI volume changes below this (mL, half the report's 0.01 mL rounding) count as unchanged."""

COMPARE_VIEWS = ("front", "right35", "below15")
"""Views shown in the side-by-side picture (the JSON and Markdown hold every view)."""


def _roi_role(case: Case) -> dict[int, str]:
    """ROINumber -> ``PTV``, ``OAR`` (a default full-face OAR) or ``other``."""
    if case.structure_set is None:
        return {}
    rois = case.structure_set.rois
    oars = {r.number for r in select_oars(rois, ())}
    return {r.number: "PTV" if is_ptv(r) else "OAR" if r.number in oars else "other" for r in rois}


def privacy_summary(report: PrivacyReport) -> dict[str, Any]:
    """Per surface and view: detections, distance and baselines; counts over all views."""
    rows: list[dict[str, Any]] = []
    for s in report.surfaces:
        for v in s.views:
            m, h = v.defaced
            rows.append(
                {
                    "surface": s.surface,
                    "view": v.view,
                    "status": v.status,
                    "mtcnn": None if m.score is None else round(m.score, 4),
                    "dlib_hog": None if h.score is None else round(h.score, 4),
                    "face_detected": v.face_in_defaced,
                    "distance": None if v.distance is None else round(v.distance, 4),
                    "different_face_distance": None
                    if v.different_face_distance is None
                    else round(v.different_face_distance, 4),
                    "different_face_front": None
                    if s.different_face_distance is None
                    else round(s.different_face_distance, 4),
                    "no_face_distance": None
                    if v.no_face_distance is None
                    else round(v.no_face_distance, 4),
                    "beyond_different_face": v.beyond_different_face,
                    "beyond_no_face": v.beyond_no_face,
                }
            )
    judged = [r for r in rows if r["distance"] is not None]
    return {
        "status": report.status,
        "views": rows,
        "faces_detected": sum(bool(r["face_detected"]) for r in rows),
        "views_rendered": len(rows),
        "views_with_distance": len(judged),
        "beyond_different_face": sum(r["beyond_different_face"] is True for r in judged),
        "beyond_no_face": sum(r["beyond_no_face"] is True for r in judged),
        "max_dlib_hog": max(
            (r["dlib_hog"] for r in rows if r["dlib_hog"] is not None), default=None
        ),
        "max_mtcnn": max((r["mtcnn"] for r in rows if r["mtcnn"] is not None), default=None),
    }


def utility_summary(validation: CaseValidation, original: Case) -> dict[str, Any]:
    """Per-ROI volume lost, PTVs identical, DVH changes of the default OARs."""
    roles = _roi_role(original)
    rois: list[dict[str, Any]] = []
    for r in validation.rois:
        before = float(r.get("volume_before_ml") or 0.0)
        after = float(r.get("volume_after_ml") or 0.0)
        lost = round(before - after, 2)
        change = (
            "removed"
            if before > 0 and after <= VOLUME_ATOL_ML
            else "clipped"
            if lost > VOLUME_ATOL_ML
            else "unchanged"
        )
        rois.append(
            {
                "number": r["number"],
                "name": r["name"],
                "role": roles.get(int(r["number"]), "other"),
                "preserved": bool(r.get("preserved")),
                "volume_before_ml": round(before, 2),
                "volume_lost_ml": lost,
                "change": change,
            }
        )
    names = {r["name"]: r["role"] for r in rois}
    ptv_dvh = [d for d in validation.dvh if names.get(d.get("roi", "")) == "PTV"]
    ptv_rois = [r for r in rois if r["role"] == "PTV"]
    ptv_check = next((c for c in validation.checks if c.name == "preservation.ptv"), None)
    ptv_identical = (
        (ptv_check is None or ptv_check.status != "FAIL")
        and all(r["volume_lost_ml"] == 0.0 for r in ptv_rois)
        and all(bool(d.get("identical")) for d in ptv_dvh)
    )
    oar_dvh = []
    for d in validation.dvh:
        if names.get(d.get("roi", "")) != "OAR":
            continue
        diff = d.get("diff") or {}
        oar_dvh.append(
            {
                "dose": d.get("dose"),
                "roi": d["roi"],
                "identical": bool(d.get("identical")),
                "d_mean_gy": round(float(diff.get("d_mean_gy", 0.0)), 4),
                "d2_gy": round(float(diff.get("d2_gy", 0.0)), 4),
                "d_max_gy": round(float(diff.get("d_max_gy", 0.0)), 4),
            }
        )
    oar_rois = [r for r in rois if r["role"] == "OAR"]
    return {
        "mode": validation.cut.mode if validation.cut is not None else None,
        "validation_ok": validation.ok,
        "ptvs": [r["name"] for r in ptv_rois],
        "ptv_identical": ptv_identical,
        "default_oars": [r["name"] for r in oar_rois],
        "default_oar_volume_lost_ml": round(sum(r["volume_lost_ml"] for r in oar_rois), 2),
        "default_oar_dvh": oar_dvh,
        "default_oar_dvh_identical": all(d["identical"] for d in oar_dvh),
        "rois": rois,
        "removed": [r["name"] for r in rois if r["change"] == "removed"],
        "clipped": [r["name"] for r in rois if r["change"] == "clipped"],
    }


def mode_summary(
    label: str, validation: CaseValidation, original: Case, privacy: PrivacyReport | None
) -> dict[str, Any]:
    """The privacy result and utility cost of one defaced output (``privacy`` optional)."""
    return {
        "label": label,
        "defaced": validation.defaced,
        "mode": validation.cut.mode if validation.cut is not None else None,
        "privacy": None if privacy is None else privacy_summary(privacy),
        "utility": utility_summary(validation, original),
    }


def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_mode_summary(s: dict[str, Any]) -> str:
    """Plain-text block: privacy counts and utility cost of one output."""
    u = s["utility"]
    lines = [f"  mode {s['mode']} ({s['label']}):"]
    p = s["privacy"]
    if p is not None:
        lines.append(
            f"    privacy {p['status']}: face detected in {p['faces_detected']} of "
            f"{p['views_rendered']} views (max MTCNN {_f(p['max_mtcnn'])}, max HOG "
            f"{_f(p['max_dlib_hog'])}); distance beyond the different-face baseline in "
            f"{p['beyond_different_face']} of {p['views_with_distance']}, beyond the "
            f"empty-rendering floor in {p['beyond_no_face']} of {p['views_with_distance']}"
        )
    lines.append(
        f"    utility: PTVs identical {_f(u['ptv_identical'])}; default OARs lost "
        f"{u['default_oar_volume_lost_ml']:.2f} mL, DVHs identical "
        f"{_f(u['default_oar_dvh_identical'])}; removed: {', '.join(u['removed']) or 'none'}"
    )
    changed = [r for r in u["rois"] if r["change"] != "unchanged"]
    for r in changed:
        lines.append(
            f"      {r['name']}: -{r['volume_lost_ml']:.2f} mL of {r['volume_before_ml']:.2f} "
            f"({r['change']})"
        )
    return "\n".join(lines)


def format_markdown(original: str, summaries: Sequence[dict[str, Any]]) -> str:
    """Markdown tables: privacy per surface/view and utility per ROI, one column per output."""
    heads = [f"{s['label']} ({s['mode']})" for s in summaries]
    out = [f"# Modes compared: {original}", ""]
    out += ["## Summary", "", "| | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]

    def row(name: str, values: Sequence[str]) -> None:
        out.append(f"| {name} | " + " | ".join(values) + " |")

    privs = [s["privacy"] for s in summaries]
    utils = [s["utility"] for s in summaries]
    if all(p is not None for p in privs):
        row("privacy verdict", [p["status"] for p in privs])
        row(
            "views with a face detected",
            [f"{p['faces_detected']}/{p['views_rendered']}" for p in privs],
        )
        row(
            "highest MTCNN / HOG after",
            [f"{_f(p['max_mtcnn'])} / {_f(p['max_dlib_hog'])}" for p in privs],
        )
        row(
            "distance beyond different face (same view)",
            [f"{p['beyond_different_face']}/{p['views_with_distance']}" for p in privs],
        )
        row(
            "distance beyond empty rendering",
            [f"{p['beyond_no_face']}/{p['views_with_distance']}" for p in privs],
        )
    row("PTVs identical", [_f(u["ptv_identical"]) for u in utils])
    row("default OAR volume lost (mL)", [f"{u['default_oar_volume_lost_ml']:.2f}" for u in utils])
    row("default OAR DVHs identical", [_f(u["default_oar_dvh_identical"]) for u in utils])
    row("ROIs removed", [", ".join(u["removed"]) or "none" for u in utils])
    if all(p is not None for p in privs):
        out += [
            "",
            "## Privacy per surface and view",
            "",
            "After defacing: MTCNN confidence / dlib HOG margin (detected when >= 0.90 / >= 0.10), "
            "then descriptor distance to the original (different face at the same view; empty "
            "rendering).",
            "",
            *_table_head(["surface", "view"], heads),
        ]
        keys = [(r["surface"], r["view"]) for r in privs[0]["views"]]
        for key in keys:
            cells = []
            for p in privs:
                r = next((x for x in p["views"] if (x["surface"], x["view"]) == key), None)
                if r is None:
                    cells.append("-")
                    continue
                cells.append(
                    f"{_f(r['mtcnn'])} / {_f(r['dlib_hog'])}; {_f(r['distance'])} "
                    f"({_f(r['different_face_distance'])}; {_f(r['no_face_distance'])})"
                    + (" **face**" if r["face_detected"] else "")
                )
            out.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## ROI volume lost (mL)",
        "",
        *_table_head(["ROI", "role", "volume (mL)"], heads),
    ]
    for n, r in enumerate(utils[0]["rois"]):
        cells = []
        for u in utils:
            x = u["rois"][n]
            cells.append(
                f"{x['volume_lost_ml']:.2f}"
                + ("" if x["change"] == "unchanged" else f" ({x['change']})")
            )
        out.append(
            f"| {r['name']} | {r['role']} | {r['volume_before_ml']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    out += [
        "",
        "## DVH changes of the default OARs (Gy: Dmean, D2, Dmax)",
        "",
        *_table_head(["dose", "ROI"], heads),
    ]
    for n, d in enumerate(utils[0]["default_oar_dvh"]):
        cells = []
        for u in utils:
            x = u["default_oar_dvh"][n] if n < len(u["default_oar_dvh"]) else None
            if x is None:
                cells.append("-")
            elif x["identical"]:
                cells.append("identical")
            else:
                cells.append(f"{x['d_mean_gy']:+.2f}, {x['d2_gy']:+.2f}, {x['d_max_gy']:+.2f}")
        out.append(f"| {d['dose']} | {d['roi']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _table_head(lead: Sequence[str], heads: Sequence[str]) -> list[str]:
    """The header and separator lines of a Markdown table: ``lead`` columns, then ``heads``."""
    columns = [*lead, *heads]
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def side_by_side_png(
    path: Path,
    reports: Sequence[tuple[str, PrivacyReport]],
    views: Sequence[str] = COMPARE_VIEWS,
) -> Path:
    """Renderings of the original and of every output, per surface and view, in one PNG.

    Rows are surface/view pairs, columns the original then each output (from the privacy
    reports' rendering files).
    """
    first = reports[0][1]
    keys = [(s.surface, v) for s in first.surfaces for v in views]
    cols = 1 + len(reports)
    fig, axes = plt.subplots(
        len(keys), cols, figsize=(1.9 * cols, 1.9 * len(keys)), squeeze=False, dpi=80
    )
    for row, (surface, view) in enumerate(keys):
        for col in range(cols):
            ax = axes[row][col]
            ax.axis("off")
            rep = first if col == 0 else reports[col - 1][1]
            s = next((x for x in rep.surfaces if x.surface == surface), None)
            v = None if s is None else next((x for x in s.views if x.view == view), None)
            if v is None or len(v.images) < 2:
                continue
            img = plt.imread(v.images[0] if col == 0 else v.images[1])
            ax.imshow(img)
            title = "original" if col == 0 else reports[col - 1][0]
            if col > 0:
                m, h = v.defaced
                title += f"\nM {_f(m.score)} H {_f(h.score)} d {_f(v.distance)}" + (
                    " FACE" if v.face_in_defaced else ""
                )
            else:
                title = f"{surface} {view}\n{title}"
            ax.set_title(title, fontsize=6)
    fig.tight_layout(pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = [
    "COMPARE_VIEWS",
    "VOLUME_ATOL_ML",
    "format_markdown",
    "format_mode_summary",
    "mode_summary",
    "privacy_summary",
    "side_by_side_png",
    "utility_summary",
]
