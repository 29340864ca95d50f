"""`rtdeface compare` and `validate --privacy`: privacy result and utility cost per mode, side by
side, on the phantom (issue #8, items 2-3 of Build)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtdeface.cli import main
from rtdeface.phantom import write_phantom_case

PTVS = ["PTV_Face", "PTV_Neck"]
OARS = ["Brainstem", "Parotid_L", "Parotid_R", "SpinalCord"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    orig = root / "orig"
    write_phantom_case(orig, "hfs")
    out = {"orig": orig, "root": root}
    for mode in ("default", "full-face"):
        dst = root / mode
        args = ["-q", "deface", str(orig), "-o", str(dst), "--no-deid", "--no-eye-check"]
        assert main([*args, "--mode", mode]) == 0
        out[mode] = dst
    return out


def _lost(summary: dict, name: str) -> float:  # type: ignore[type-arg]
    return next(r["volume_lost_ml"] for r in summary["utility"]["rois"] if r["name"] == name)


def test_compare_utility_without_privacy(
    outputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = outputs["root"] / "cmp_utility"
    argv = ["compare", str(outputs["orig"]), str(outputs["default"]), str(outputs["full-face"])]
    assert main([*argv, "-o", str(out), "--no-privacy"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    default, full = doc["outputs"]
    assert (default["mode"], full["mode"]) == ("default", "full-face")
    for s in (default, full):
        u = s["utility"]
        assert s["privacy"] is None
        assert u["ptvs"] == PTVS and u["ptv_identical"] is True
        assert u["default_oars"] == OARS
        assert u["default_oar_volume_lost_ml"] == 0.0
        assert u["default_oar_dvh_identical"] is True
        assert u["removed"] == ["Lens_L", "Lens_R"]
        assert _lost(s, "Eye_L") == 3.66 and _lost(s, "Bone_Skull") == 2.52
    # the published cut keeps the face below the eyes; full-face mode removes it
    assert _lost(default, "BODY") == 44.64 and _lost(full, "BODY") == 81.70
    assert _lost(default, "Mouth_Avoid") == 0.0 and _lost(full, "Mouth_Avoid") == 11.80
    assert "Mouth_Avoid" in full["utility"]["clipped"]
    md = (out / "compare.md").read_text()
    assert "| default OAR volume lost (mL) | 0.00 | 0.00 |" in md
    assert "| Mouth_Avoid | other | 18.00 | 0.00 | 11.80 (clipped) |" in md
    assert not (out / "compare.png").exists()  # no renderings without the privacy check
    assert "mode full-face (full-face)" in capsys.readouterr().out


def test_compare_bad_input(outputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    orig, dflt = str(outputs["orig"]), str(outputs["default"])
    assert main(["compare", orig, dflt, dflt, "--no-privacy"]) == 2
    assert "distinct folder names" in capsys.readouterr().err
    missing = str(outputs["root"] / "nowhere")
    assert main(["compare", orig, missing, "--no-privacy"]) == 2
    assert "no such defaced output folder" in capsys.readouterr().err
    inside = str(outputs["default"] / "cmp")
    assert main(["compare", orig, dflt, "-o", inside, "--no-privacy"]) == 2


def _need_privacy() -> None:
    pytest.importorskip("face_recognition_models")
    from rtdeface import privacy

    if not privacy.privacy_available()[0]:  # pragma: no cover
        pytest.skip("privacy extra not installed")


def test_compare_modes_side_by_side(outputs: dict[str, Path]) -> None:
    _need_privacy()
    out = outputs["root"] / "cmp"
    argv = ["-q", "compare", str(outputs["orig"]), str(outputs["default"])]
    # the default mode still shows a face (from below): compare exits 1, as privacy does
    assert main([*argv, str(outputs["full-face"]), "-o", str(out)]) == 1
    doc = json.loads((out / "compare.json").read_text())
    default, full = (s["privacy"] for s in doc["outputs"])
    assert default["status"] == "FAIL" and full["status"] == "PASS"
    assert full["faces_detected"] == 0 and default["faces_detected"] == 2
    assert full["max_mtcnn"] is None and full["max_dlib_hog"] < 0.0
    assert full["views_rendered"] == default["views_rendered"] == 15  # CT, BODY, dose x 5
    seen = {(r["surface"], r["view"]) for r in default["views"] if r["face_detected"]}
    assert seen == {("CT", "below15"), ("BODY", "below15")}  # chin and lips from below
    for r in full["views"]:
        assert r["face_detected"] is False
        if r["distance"] is not None:
            assert r["different_face_distance"] is not None and r["no_face_distance"] is not None
            assert r["beyond_no_face"] == (r["distance"] >= r["no_face_distance"])
    png = out / "compare.png"
    assert png.is_file() and png.stat().st_size > 10_000
    for label in ("default", "full-face"):
        assert (out / label / "privacy_CT.png").is_file()


def test_validate_privacy_states_the_cost_of_its_mode(
    outputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _need_privacy()
    qa = outputs["root"] / "qa_ff"
    argv = ["validate", str(outputs["orig"]), str(outputs["full-face"]), "--privacy"]
    assert main([*argv, "--no-images", "--no-phi", "--qa", str(qa)]) == 0
    printed = capsys.readouterr().out
    assert "mode full-face (full-face):" in printed
    assert "privacy PASS: face detected in 0 of 15 views" in printed
    assert "utility: PTVs identical yes; default OARs lost 0.00 mL, DVHs identical yes" in printed
    s = json.loads((qa / "mode_summary.json").read_text())
    assert s["mode"] == "full-face" and s["privacy"]["faces_detected"] == 0
    assert s["utility"]["default_oar_volume_lost_ml"] == 0.0
    assert _lost(s, "BODY") == 81.70
    v = json.loads((qa / "validation.json").read_text())
    assert v["mode_summary"] == s


@pytest.mark.realdata
def test_real_case_modes_side_by_side(shared_data: Path, tmp_path: Path) -> None:
    """The README's onko_hn_eyes rows: no face in any view in full-face mode, PTVs and default
    OARs intact in both modes, the External and lips losses in mL."""
    _need_privacy()
    orig = shared_data / "onko_hn_eyes"
    outs = []
    for mode in ("default", "full-face"):
        dst = tmp_path / f"onko_{mode}"
        assert (
            main(["-q", "deface", str(orig), "-o", str(dst), "--random-key", "--mode", mode]) == 0
        )
        outs.append(str(dst))
    out = tmp_path / "cmp"
    assert main(["-q", "compare", str(orig), *outs, "-o", str(out)]) == 1  # default shows a face
    default, full = json.loads((out / "compare.json").read_text())["outputs"]
    p, u = full["privacy"], full["utility"]
    assert p["status"] == "PASS" and p["faces_detected"] == 0 and p["views_rendered"] == 15
    assert p["max_mtcnn"] is None and p["max_dlib_hog"] < 0.0  # a clear margin below 0.10
    assert default["privacy"]["faces_detected"] == 5
    for s in (default, full):
        assert s["utility"]["ptv_identical"] is True
        assert s["utility"]["default_oar_volume_lost_ml"] == 0.0
        assert s["utility"]["default_oar_dvh_identical"] is True
    assert set(u["ptvs"]) == {"PTV_70cf", "SPTV 70", "PTV_56cf", "SPTV 56"}
    assert _lost(default, "External ROI_1") == 100.24 and _lost(full, "External ROI_1") == 152.13
    assert _lost(default, "lips") == 0.0 and _lost(full, "lips") == 0.05
    assert "lips" in u["clipped"]
