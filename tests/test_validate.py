"""`rtdeface validate`: all checks pass on defaced phantom output; each tamper is named.

Tampers are applied to a copy of the defaced output with pydicom, at positions chosen from the
phantom's analytic definition (PTV_Face box, eye landmarks), never from rtdeface's own output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtdeface.cli import main
from rtdeface.dvh import RoiMask, cumulative_dvh, d_at_percent
from rtdeface.load import contour_data_array
from rtdeface.phantom import BOXES_MM, compute_truth, write_phantom_case
from rtdeface.validate import FAIL, PASS, pairs_from_manifest, summarise, validate_pair
from tests.helpers import read_ct, read_dose

TRUTH = compute_truth("hfs")
(PX0, PX1), (PY0, PY1), (PZ0, PZ1) = BOXES_MM["PTV_Face"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("validate")
    src = root / "case"
    write_phantom_case(src, "hfs")
    out = root / "out"
    assert main(["-q", "deface", str(src), "-o", str(out), "--random-key"]) == 0
    return src, out


def _copy(out: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "tampered"
    shutil.copytree(out, dst)
    return dst


def _run(src: Path, dst: Path, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    qa = tmp_path / "qa"
    code = main(["-q", "validate", str(src), str(dst), "--qa", str(qa), "--no-images", *extra])
    return code, json.loads((qa / "validation.json").read_text())


def _failed(result: dict) -> dict[str, list[str]]:
    return {c["name"]: c["problems"] for c in result["checks"] if c["status"] == FAIL}


# ----------------------------------------------------------------------------- tampers


def tamper_ptv_voxel(dst: Path) -> None:
    """Add 100 stored units to one CT voxel at the centre of PTV_Face."""
    x, y, z = (PX0 + PX1) / 2, (PY0 + PY1) / 2, (PZ0 + PZ1) / 2
    files = sorted((dst / "CT").glob("*.dcm"))
    best = min(files, key=lambda p: abs(float(pydicom.dcmread(p).ImagePositionPatient[2]) - z))
    ds = pydicom.dcmread(best)
    ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
    i = round((y - ipp[1]) / float(ds.PixelSpacing[0]))
    j = round((x - ipp[0]) / float(ds.PixelSpacing[1]))
    arr = ds.pixel_array.copy()
    arr[i, j] += 100
    ds.PixelData = arr.tobytes()
    ds.save_as(best)


def tamper_body_point(dst: Path) -> None:
    """Move one BODY vertex on a plane above the eye plane 20 mm anterior, into the cut."""
    ds = pydicom.dcmread(dst / "RTSTRUCT.dcm")
    number = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == "BODY")
    rc = next(r for r in ds.ROIContourSequence if int(r.ReferencedROINumber) == number)
    z_plane = TRUTH.z_inferior_eye_mm + 10.0
    for item in rc.ContourSequence:
        pts = contour_data_array(item).reshape(-1, 3)
        if abs(pts[0, 2] - z_plane) > 0.01:
            continue
        # the most anterior vertex well left of PTV_Face (x > 30 mm)
        cand = np.flatnonzero(pts[:, 0] > PX1 + 14)
        n = int(cand[np.argmin(pts[cand, 1])])
        pts[n, 1] -= 20.0
        item.ContourData = [f"{v:.6f}" for v in pts.ravel()]
        ds.save_as(dst / "RTSTRUCT.dcm")
        return
    raise AssertionError("no BODY contour on the chosen plane")


def tamper_dose_voxel(dst: Path) -> None:
    """Set one dose voxel whose centre lies in the cut (from the phantom truth) to 1 Gy."""
    ds, _dose, centres = read_dose(dst / "RTDOSE_1.dcm")
    x, y, z = centres[..., 0], centres[..., 1], centres[..., 2]
    in_face = (x > PX0) & (x < PX1) & (y > PY0) & (y < PY1) & (z > PZ0) & (z < PZ1)
    cut = (z >= TRUTH.z_inferior_eye_mm) & (y < TRUTH.y_mid_mm - 5) & ~in_face & (np.abs(x) > 25)
    k, i, j = np.argwhere(cut)[0]
    frames = ds.pixel_array.copy()
    # read_dose returns the grid in file order (frame, row, column)
    frames[k, i, j] = round(1.0 / float(ds.DoseGridScaling))
    ds.PixelData = frames.astype(frames.dtype).tobytes()
    ds.save_as(dst / "RTDOSE_1.dcm")


def tamper_reference(dst: Path) -> None:
    """Point the RTPLAN's ReferencedStructureSetSequence at a UID that is not in the output."""
    path = dst / "RTPLAN_1.dcm"
    ds = pydicom.dcmread(path)
    ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = "2.25.123456789"
    ds.save_as(path)


# ----------------------------------------------------------------------------- tests


def test_phantom_all_checks_pass(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = phantom
    qa = tmp_path / "qa"
    assert main(["-q", "validate", str(src), str(out), "--qa", str(qa)]) == 0
    result = json.loads((qa / "validation.json").read_text())
    assert result["ok"]
    status = {c["name"]: c["status"] for c in result["checks"]}
    for name in (
        "removal.ct",
        "removal.contours",
        "removal.dose",
        "preservation.ct_outside_cut",
        "preservation.dose_outside_cut",
        "preservation.ptv",
        "preservation.rois",
        "dvh",
        "dicom.parse",
        "dicom.required",
        "dicom.references",
        "dicom.phi",
    ):
        assert status[name] == PASS, name
    # the independent validator runs where dicom3tools is installed (CI installs it)
    assert status["dicom.validator"] == (PASS if shutil.which("dciodvfy") else "N/A")
    assert result["cut"]["z_inferior_mm"] == pytest.approx(TRUTH.z_inferior_eye_mm)
    rois = {r["name"]: r for r in result["rois"]}
    # published grouping: OARs below the cut keep Dice 1.0; the eyes lose their anterior half
    for name in ("Parotid_L", "Parotid_R", "SpinalCord", "Mouth_Avoid", "PTV_Neck"):
        assert rois[name]["group"] == "below" and rois[name]["dice"] == 1.0
    assert rois["Brainstem"]["group"] == "on_cut_slices" and rois["Brainstem"]["dice"] == 1.0
    assert rois["Eye_L"]["group"] == "in_region" and rois["Eye_L"]["dice"] < 1.0
    assert rois["Lens_L"]["volume_after_ml"] == 0.0
    # PTV_Face overlaps the region: the part anterior to y_mid above the eye plane
    ptvs = {p["name"]: p for p in result["ptvs"]["ptvs"]}
    assert result["ptvs"]["class"] == "overlapping"
    assert ptvs["PTV_Neck"]["class"] == "below"
    face = ptvs["PTV_Face"]
    assert face["class"] == "overlapping"
    expected_ml = (PX1 - PX0) * (TRUTH.y_mid_mm - PY0) * (PZ1 - TRUTH.z_inferior_eye_mm) / 1000
    assert face["volume_in_region_ml"] == pytest.approx(expected_ml, rel=0.15)
    # DVHs: identical for preserved ROIs and ROIs outside the region, BODY mean dose drops
    dvh = {(d["roi"]): d for d in result["dvh"]}
    assert dvh["PTV_Face"]["identical"] and dvh["SpinalCord"]["identical"]
    assert not dvh["BODY"]["identical"] and dvh["BODY"]["diff"]["d_mean_gy"] < 0
    cross = next(c for c in result["checks"] if c["name"] == "dvh.dicom_cross_check")
    item = cross["data"]["items"][0]
    assert item["compared"] and item["d_mean_gy"]["ours"] == pytest.approx(60.0)
    assert item["volume_ml"]["ours"] == pytest.approx(item["volume_ml"]["stored"], rel=0.05)
    assert sorted(p.name for p in qa.glob("*.png")) == ["qa_planes.png", "qa_surface.png"]
    assert not list(out.glob("*.png"))  # nothing written into the shareable folder


def test_ptv_voxel_tamper(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = phantom
    dst = _copy(out, tmp_path)
    tamper_ptv_voxel(dst)
    code, result = _run(src, dst, tmp_path)
    assert code == 1
    failed = _failed(result)
    assert any("PTV_Face" in p and "CT voxel" in p for p in failed["preservation.ptv"])
    assert "1 CT voxel(s) outside the cut differ" in failed["preservation.ct_outside_cut"][0]
    assert "removal.contours" not in failed and "dicom.references" not in failed


def test_body_contour_tamper(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = phantom
    dst = _copy(out, tmp_path)
    tamper_body_point(dst)
    code, result = _run(src, dst, tmp_path)
    assert code == 1
    failed = _failed(result)
    assert set(failed) == {"removal.contours"}
    assert (
        "'BODY'" in failed["removal.contours"][0]
        and "inside the cut" in failed["removal.contours"][0]
    )


def test_dose_tamper(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = phantom
    dst = _copy(out, tmp_path)
    tamper_dose_voxel(dst)
    code, result = _run(src, dst, tmp_path)
    assert code == 1
    failed = _failed(result)
    assert "removal.dose" in failed
    assert "1 voxel(s) in the cut are not zero (max 1.0000 Gy)" in failed["removal.dose"][0]
    assert "preservation.dose_outside_cut" not in failed


def test_new_validator_error_is_named(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    if not shutil.which("dciodvfy"):
        pytest.skip("dciodvfy (dicom3tools) not installed")
    src, out = phantom
    dst = _copy(out, tmp_path)
    plan = next(dst.glob("RTPLAN*.dcm"))
    ds = pydicom.dcmread(plan)
    ds.PatientSex = "not/valid"  # an invalid CS value the input does not have
    ds.save_as(plan)
    code, result = _run(src, dst, tmp_path)
    assert code == 1
    problems = _failed(result)["dicom.validator"]
    assert any(p.startswith("RTPLAN: Error") and "Sex" in p for p in problems)


def test_reference_tamper(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = phantom
    dst = _copy(out, tmp_path)
    tamper_reference(dst)
    code, result = _run(src, dst, tmp_path)
    assert code == 1
    failed = _failed(result)
    assert "dicom.references" in failed
    assert any("2.25.123456789" in p for p in failed["dicom.references"])


def test_all_tampers_named(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = phantom
    dst = _copy(out, tmp_path)
    for tamper in (tamper_ptv_voxel, tamper_body_point, tamper_dose_voxel, tamper_reference):
        tamper(dst)
    code, result = _run(src, dst, tmp_path)
    assert code == 1
    failed = _failed(result)
    assert {
        "preservation.ptv",
        "preservation.ct_outside_cut",
        "removal.contours",
        "removal.dose",
        "dicom.references",
    } <= set(failed)


def test_no_report_needs_z_y(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = phantom
    dst = _copy(out, tmp_path)
    (dst / "rtdeface_report.json").unlink()
    assert main(["-q", "validate", str(src), str(dst), "--qa", str(tmp_path / "q")]) == 2
    z, y = str(TRUTH.z_inferior_eye_mm), str(TRUTH.y_mid_mm)
    code, result = _run(src, dst, tmp_path, "--z", z, "--y", y)
    assert code == 0, _failed(result)
    assert result["cut"]["source"] == "options"


def test_qa_inside_defaced_refused(phantom: tuple[Path, Path]) -> None:
    src, out = phantom
    assert main(["-q", "validate", str(src), str(out), "--qa", str(out / "qa")]) == 2
    assert not (out / "qa").exists()


def test_summary_over_two_pairs(phantom: tuple[Path, Path], tmp_path: Path) -> None:
    src, out = phantom
    dst = _copy(out, tmp_path)
    tamper_dose_voxel(dst)
    qa = tmp_path / "qa"
    args = ["-q", "validate", str(src), str(out), str(src), str(dst), "--qa", str(qa)]
    assert main([*args, "--no-images", "--no-phi", "--summary"]) == 1
    summary = json.loads((qa / "summary.json").read_text())
    assert summary["cases"] == 2 and summary["cases_passed"] == 1
    assert summary["ptv_location"]["counts"] == {"below": 2, "on_cut_slices": 0, "overlapping": 2}
    assert summary["oar_dice"]["below"]["SpinalCord"] == {"n": 2, "mean": 1.0, "min": 1.0}
    assert [f["check"] for f in summary["failures"]] == ["removal.dose"]
    assert "overlapping the region | 2 | 50.0" in (qa / "summary.md").read_text()


def test_manifest_pairs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "RTD-A_1").mkdir(parents=True)
    (out / "RTD-B_2").mkdir()
    (out / "rtdeface_manifest.json").write_text(
        json.dumps({"cases": {"RTD-A_1": {"status": "done"}, "RTD-B_2": {"status": "failed"}}})
    )
    (tmp_path / "out.audit-cases.json").write_text(
        json.dumps({"cases": {"RTD-A_1": {"input_folder": "p1/case"}}})
    )
    assert pairs_from_manifest(tmp_path / "in", out) == [
        (tmp_path / "in" / "p1" / "case", out / "RTD-A_1")
    ]
    assert pairs_from_manifest(tmp_path / "in", tmp_path) is None


def test_dvh_definitions() -> None:
    dose = np.array([[[0.0, 1.0, 2.0, 3.0]]])
    mask = RoiMask((1, 1, 4), {0: np.array([[True, True, True, False]])})
    h = cumulative_dvh(dose, mask, 0.5)
    assert h.voxels == 3 and h.volume_ml == 1.5
    assert h.d_mean_gy == 1.0 and h.d_max_gy == 2.0 and h.d_min_gy == 0.0
    np.testing.assert_allclose(
        h.volume_at(np.array([0.0, 0.5, 1.0, 1.5, 2.0, 2.01])), [1.5, 1.0, 1.0, 0.5, 0.5, 0.0]
    )
    desc = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert d_at_percent(desc, 95) == 1.0 and d_at_percent(desc, 2) == 5.0


def test_summarise_empty() -> None:
    s = summarise([])
    assert s["cases"] == 0 and s["failures"] == []


def test_validate_pair_library(phantom: tuple[Path, Path]) -> None:
    src, out = phantom
    v, (orig, dfc, region) = validate_pair(src, out, phi=False)
    assert v.ok and orig is not None and dfc is not None and region is not None
    assert v.check("removal.ct").data["voxels_above_air"] == 0
    _, stored0, _, _ = read_ct(src / "CT")
    assert v.check("removal.ct").data["voxels_in_cut"] < stored0.size


@pytest.mark.realdata
def test_realdata_all_checks_pass(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "onko_hn_eyes"
    out = tmp_path / "out"
    assert main(["-q", "deface", str(src), "-o", str(out), "--random-key"]) == 0
    qa = tmp_path / "qa"
    assert main(["-q", "validate", str(src), str(out), "--qa", str(qa)]) == 0
    result = json.loads((qa / "validation.json").read_text())
    assert result["ok"], _failed(result)
    assert result["ptvs"]["class"] == "below"
    rois = {r["name"]: r for r in result["rois"]}
    assert rois["Brainstem"]["dice"] == 1.0 and rois["Cord"]["dice"] == 1.0
    assert rois["Eye_R"]["group"] == "in_region"
    assert (qa / "qa_planes.png").is_file() and (qa / "qa_surface.png").is_file()
