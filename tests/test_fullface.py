"""Full-face mode (issue #8) on the phantom: the face below the eyes is removed to the bony
level, PTVs and the default OARs are untouched, contours and dose follow the same region, the
default mode is unchanged, and (with the privacy extra) no face is detected in any view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import shapely

from rtdeface.cli import main
from rtdeface.fullface import select_oars
from rtdeface.load import load_case
from rtdeface.phantom import BOXES_MM, write_phantom_case
from rtdeface.pipeline import DefaceOptions, deface_case
from rtdeface.region import polygon_from_points
from rtdeface.validate import read_cut
from tests.helpers import read_ct, read_dose

HEAD_CENTRE = np.array([0.0, 5.0, 15.0])
HEAD_SEMI = np.array([72.0, 92.0, 92.0])
"""The phantom's head ellipsoid, restated here (nose, lips and chin protrude from it)."""

FACE_Y_MM = -85.0
"""Anterior to this, below the eyes, the phantom holds only facial soft tissue (no bone)."""

PTV_NAMES = ("PTV_Face", "PTV_Neck")
OAR_NAMES = ("Brainstem", "Parotid_L", "Parotid_R", "SpinalCord")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fullface")
    orig = root / "orig"
    write_phantom_case(orig, "hfs")
    out = {"orig": orig}
    for mode in ("default", "full-face"):
        dst = root / mode
        args = ["-q", "deface", str(orig), "-o", str(dst), "--no-deid", "--no-eye-check"]
        assert main([*args, "--mode", mode]) == 0
        out[mode] = dst
    plain = root / "plain"
    assert main(["-q", "deface", str(orig), "-o", str(plain), "--no-deid", "--no-eye-check"]) == 0
    out["plain"] = plain
    return out


def _in_ptv(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    inside = np.zeros(np.broadcast(x, y, z).shape, dtype=bool)
    for name in PTV_NAMES:
        (x0, x1), (y0, y1), (z0, z1) = BOXES_MM[name]
        inside |= (x > x0) & (x < x1) & (y > y0) & (y < y1) & (z > z0) & (z < z1)
    return inside


def test_face_below_the_eyes_becomes_air(cases: dict[str, Path]) -> None:
    _, _, hu0, (z, x, y) = read_ct(cases["orig"])
    _, _, hu_def, _ = read_ct(cases["default"])
    _, _, hu_ff, _ = read_ct(cases["full-face"])
    zz = z[:, None, None]
    q = sum(
        ((c - HEAD_CENTRE[n]) / HEAD_SEMI[n]) ** 2 for n, c in enumerate((x[None], y[None], zz))
    )
    cut = read_cut(cases["full-face"])
    # nose, lips and chin: tissue protruding anterior from the head ellipsoid, below the eyes,
    # and anterior to the phantom's most anterior facial bone (skull front, about y = -80 mm)
    # less the 3 mm margin and a voxel
    face = (hu0 > -500) & (q >= 1.0) & (y[None] < FACE_Y_MM) & (zz < cut.z_inferior_mm)
    face &= zz > -64.0
    face &= ~_in_ptv(x[None], y[None], zz)
    assert face.sum() > 100
    assert np.all(hu_ff[face] == -1000.0)
    assert np.count_nonzero(hu_def[face] == -1000.0) < face.sum() // 10  # default keeps them


def test_ptvs_and_default_oars_identical(cases: dict[str, Path]) -> None:
    _, _, hu0, (z, x, y) = read_ct(cases["orig"])
    _, _, hu_ff, _ = read_ct(cases["full-face"])
    ptv = _in_ptv(x[None], y[None], z[:, None, None])
    assert np.array_equal(hu0[ptv], hu_ff[ptv])
    o = pydicom.dcmread(cases["orig"] / "RTSTRUCT.dcm")
    d = pydicom.dcmread(next(cases["full-face"].rglob("RTSTRUCT*.dcm")))

    def contours(ds: pydicom.Dataset) -> dict[str, list[list[float]]]:
        names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
        return {
            names[int(rc.ReferencedROINumber)]: [
                [float(v) for v in c.ContourData] for c in rc.get("ContourSequence", [])
            ]
            for rc in ds.ROIContourSequence
        }

    co, cd = contours(o), contours(d)
    for name in (*PTV_NAMES, *OAR_NAMES):
        assert co[name] == cd[name], name
    report = json.loads((cases["full-face"] / "rtdeface_report.json").read_text())
    assert report["cut"]["mode"] == "full-face"
    assert set(report["cut"]["preserved_rois"]) == {*PTV_NAMES, *OAR_NAMES}
    rois = {r["name"]: r for r in report["rois"]}
    for name in OAR_NAMES:
        assert rois[name]["volume_after_ml"] == rois[name]["volume_before_ml"]


def test_contours_have_no_area_and_dose_is_zero_in_the_region(cases: dict[str, Path]) -> None:
    orig = load_case(cases["orig"])
    dfc = load_case(cases["full-face"])
    options = DefaceOptions(mode="full-face", eye_check=False)
    region = deface_case(orig, options).region
    assert region.face is not None and region.face.z_mm.size > 0
    assert dfc.structure_set is not None
    kept = set(region.preserved_names)
    checked = 0
    for roi in dfc.structure_set.rois:
        if roi.name in kept:
            continue
        for c in roi.contours:
            if c.geometric_type != "CLOSED_PLANAR":
                continue
            cut = region.cut_at(c.z_mm)
            if cut is None:
                continue
            checked += 1
            assert polygon_from_points(c.points_lps_mm).intersection(cut).area < 1e-3
    assert checked > 0
    _, stored, centres = read_dose(next(cases["full-face"].rglob("RTDOSE*.dcm")))
    flat = centres.reshape(-1, 3)
    inside = region.contains_points(flat).reshape(stored.shape)
    assert inside.sum() > 0
    assert np.all(stored[inside] == 0)
    _, stored0, _ = read_dose(cases["orig"] / "RTDOSE.dcm")
    assert np.array_equal(stored[~inside], stored0[~inside])


def test_default_mode_unchanged(cases: dict[str, Path]) -> None:
    def pixel_bytes(folder: Path) -> list[bytes]:
        _, stored, _, _ = read_ct(folder)
        return [s.tobytes() for s in stored]

    assert pixel_bytes(cases["default"]) == pixel_bytes(cases["plain"])
    a = pydicom.dcmread(next(cases["default"].rglob("RTSTRUCT*.dcm")))
    b = pydicom.dcmread(next(cases["plain"].rglob("RTSTRUCT*.dcm")))
    assert a.ROIContourSequence == b.ROIContourSequence
    report = json.loads((cases["default"] / "rtdeface_report.json").read_text())
    assert report["cut"]["mode"] == "default" and "face_profile" not in report["cut"]
    # above the eye plane, full-face mode is the published cut
    _, _, hu_def, (z, _, _) = read_ct(cases["default"])
    _, _, hu_ff, _ = read_ct(cases["full-face"])
    above = z >= read_cut(cases["default"]).z_inferior_mm - 1e-3
    assert np.array_equal(hu_def[above], hu_ff[above])


def test_validate_rebuilds_the_full_face_cut(cases: dict[str, Path], tmp_path: Path) -> None:
    cut = read_cut(cases["full-face"])
    assert cut.mode == "full-face" and cut.face is not None
    args = ["-q", "validate", str(cases["orig"]), str(cases["full-face"])]
    assert main([*args, "--no-images", "--no-phi", "--qa", str(tmp_path / "qa")]) == 0
    v = json.loads((tmp_path / "qa" / "validation.json").read_text())
    dvh = [r for r in v["dvh"] if r.get("roi") in PTV_NAMES or r.get("name") in PTV_NAMES]
    assert all(c["status"] != "FAIL" for c in v["checks"])
    assert dvh == [] or all(r.get("identical", True) for r in dvh)


def test_oar_selection_patterns() -> None:
    case = load_case_phantom_rois()
    names = {r.name for r in select_oars(case, ())}
    assert names == set(OAR_NAMES)  # Mouth_Avoid is a helper, not the oral cavity
    assert {r.name for r in select_oars(case, ("mouth",), defaults=False)} == {"Mouth_Avoid"}


def load_case_phantom_rois() -> list:  # type: ignore[type-arg]
    """The phantom's ROIs (written once to a temporary folder)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write_phantom_case(Path(d), "hfs")
        ss = load_case(Path(d)).structure_set
        assert ss is not None
        return list(ss.rois)


def test_no_face_detected_in_any_view(cases: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("face_recognition_models")
    from rtdeface import privacy

    if not privacy.privacy_available()[0]:  # pragma: no cover
        pytest.skip("privacy extra not installed")
    report = privacy.check_privacy(
        load_case(cases["orig"]),
        load_case(cases["full-face"]),
        tmp_path,
        privacy.load_detectors(),
    )
    assert report.ok, privacy.format_report(report)
    for s in report.surfaces:
        for v in s.views:
            assert v.status != privacy.FAIL, (s.surface, v.view)


def test_shapely_region_matches_points(cases: dict[str, Path]) -> None:
    region = deface_case(
        load_case(cases["orig"]), DefaceOptions(mode="full-face", eye_check=False)
    ).region
    assert region.face is not None
    z = float(region.face.z_mm[len(region.face.z_mm) // 2])
    lim = float(region.y_limit(z)[0])
    cut = region.cut_at(z)
    assert cut is not None
    pts = np.array([[70.0, lim - 0.5, z], [70.0, lim + 0.5, z]])
    assert list(region.contains_points(pts)) == [True, False]
    assert shapely.intersects_xy(cut, 70.0, lim - 0.5)


def test_nose_band_continues_the_published_cut(cases: dict[str, Path]) -> None:
    from rtdeface.fullface import NOSE_BAND_MM

    cut = read_cut(cases["full-face"])
    assert cut.face is not None
    z, y = cut.face.z_mm, cut.face.y_mm
    band = z >= cut.z_inferior_mm - NOSE_BAND_MM - 1e-3
    assert band.sum() == 8  # 2.5 mm slices from 7.5 down to -10 mm (eye plane at 10 mm)
    assert np.all(y[band] >= cut.y_mid_mm)
    assert np.all(y[~band] < cut.y_mid_mm)  # below the band: the bone-level limit


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The phantom wearing a thermoplastic mask shell molded to the face."""
    from rtdeface.phantom import Variant

    root = tmp_path_factory.mktemp("masked")
    orig = root / "orig"
    write_phantom_case(orig, Variant("hfs_mask", face_mask=True))
    out = {"orig": orig}
    for mode in ("default", "full-face"):
        dst = root / mode
        args = ["-q", "deface", str(orig), "-o", str(dst), "--no-deid", "--no-eye-check"]
        assert main([*args, "--mode", mode]) == 0
        out[mode] = dst
    return out


def test_mask_in_front_of_the_face_is_removed(masked: dict[str, Path]) -> None:
    from rtdeface.phantom import MASK_HU

    _, _, hu0, (z, x, y) = read_ct(masked["orig"])
    _, _, hu_def, _ = read_ct(masked["default"])
    _, _, hu_ff, _ = read_ct(masked["full-face"])
    mask = hu0 == MASK_HU
    assert mask.sum() == 7584
    cut = read_cut(masked["full-face"])
    assert cut.face is not None
    zz = z[:, None, None]
    below = mask & (zz < cut.z_inferior_mm)
    lim = cut.face.at(z)[:, None, None]
    with np.errstate(invalid="ignore"):
        front = below & (y[None] < lim) & ~_in_ptv(x[None], y[None], zz)
    assert front.sum() == 2246  # the shell over the nose, lips and chin
    assert np.all(hu_ff[front] == -1000.0)
    assert np.all(hu_def[below] == MASK_HU)  # the published cut leaves it below the eyes
    above = mask & (zz >= cut.z_inferior_mm)
    assert np.array_equal(hu_def[above], hu_ff[above])
    # PTVs and the default OARs are untouched by the mask variant too
    ptv = _in_ptv(x[None], y[None], zz)
    assert np.array_equal(hu0[ptv], hu_ff[ptv])
    report = json.loads((masked["full-face"] / "rtdeface_report.json").read_text())
    rois = {r["name"]: r for r in report["rois"]}
    for name in (*PTV_NAMES, *OAR_NAMES):
        assert rois[name]["volume_after_ml"] == rois[name]["volume_before_ml"], name


def test_masked_phantom_shows_no_face_in_full_face_mode(
    masked: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("face_recognition_models")
    from rtdeface import privacy

    if not privacy.privacy_available()[0]:  # pragma: no cover
        pytest.skip("privacy extra not installed")
    det = privacy.load_detectors()
    orig = load_case(masked["orig"])
    full = privacy.check_privacy(orig, load_case(masked["full-face"]), tmp_path / "ff", det)
    assert full.ok, privacy.format_report(full)
    ct = next(s for s in full.surfaces if s.surface == "CT")
    assert all(v.face_in_original for v in ct.views if v.view in ("front", "below15"))
    default = privacy.check_privacy(orig, load_case(masked["default"]), tmp_path / "d", det)
    assert not default.ok  # the mask and the face below the eyes still show a face
