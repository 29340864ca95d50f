"""Deface the synthetic phantom in every storage variant; expectations come from the
phantom's analytic definition (box PTVs, eye spheres), never from running rtdeface."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from shapely.geometry import Polygon, box

from rtdeface.cli import main
from rtdeface.landmarks import closed_volume_ml
from rtdeface.load import contour_data_array, parse_structure_set
from rtdeface.phantom import (
    BOXES_MM,
    SAME_CT_LATTICE_VARIANTS,
    VARIANTS,
    compute_truth,
    write_phantom_case,
)
from rtdeface.validate import check_folder_references
from tests.helpers import read_ct, read_dose

Z_INF, Y_MID = 10.0, -66.0  # phantom truth (eye spheres at z 21, y -66, r 12; 2.5 mm slices)
(PX0, PX1), (PY0, PY1), (PZ0, PZ1) = BOXES_MM["PTV_Face"]
ALL_VARIANTS = tuple(VARIANTS)


def in_ptv_face(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    return (x > PX0) & (x < PX1) & (y > PY0) & (y < PY1) & (z > PZ0) & (z < PZ1)


def expected_cut(x: np.ndarray, y: np.ndarray, z: np.ndarray, variant: str = "hfs") -> np.ndarray:
    truth = compute_truth(variant)
    return (z >= truth.z_inferior_eye_mm) & (y < truth.y_mid_mm) & ~in_ptv_face(x, y, z)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("phantom")
    key = root / "key.txt"
    key.write_text("phantom-test-key-0123456789")
    out: dict[str, tuple[Path, Path]] = {}
    for name in ALL_VARIANTS:
        src = root / "in" / name
        write_phantom_case(src, name)
        dst = root / "out" / name
        code = main(["-q", "deface", str(src), "-o", str(dst), "--deid-key-file", str(key)])
        assert code == 0, name
        out[name] = (src, dst)
    return out


def _canonical(values: np.ndarray, z: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Values sorted by patient position (z, y, x): the same for any storage order."""
    zz = np.broadcast_to(z[:, None, None], values.shape)
    xx = np.broadcast_to(x[None], values.shape)
    yy = np.broadcast_to(y[None], values.shape)
    order = np.lexsort((np.round(xx, 3).ravel(), np.round(yy, 3).ravel(), np.round(zz, 3).ravel()))
    return values.ravel()[order]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_ct_exact_voxels(cases: dict[str, tuple[Path, Path]], variant: str) -> None:
    src, dst = cases[variant]
    _, stored0, _hu0, (z, x, y) = read_ct(src / "CT")
    _, stored1, hu1, centres1 = read_ct(dst / "CT")
    for a, b in zip((z, x, y), centres1):
        np.testing.assert_array_equal(a, b)
    cut = expected_cut(x[None], y[None], z[:, None, None], variant)
    assert int(cut.sum()) > 0
    assert np.all(hu1[cut] == -1000.0)
    np.testing.assert_array_equal(stored1[~cut], stored0[~cut])
    assert stored1.dtype == stored0.dtype


def test_variants_identical_in_patient_space(cases: dict[str, tuple[Path, Path]]) -> None:
    _, _, hu_ref, (z, x, y) = read_ct(cases["hfs"][1] / "CT")
    ref = _canonical(hu_ref, z, x, y)
    for variant in SAME_CT_LATTICE_VARIANTS:
        _, _, hu, (zv, xv, yv) = read_ct(cases[variant][1] / "CT")
        np.testing.assert_array_equal(_canonical(hu, zv, xv, yv), ref, err_msg=variant)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_dose_exact_voxels(cases: dict[str, tuple[Path, Path]], variant: str) -> None:
    src, dst = cases[variant]
    ds0, d0, c = read_dose(src / "RTDOSE.dcm")
    ds1, d1, _ = read_dose(dst / "RTDOSE_1.dcm")
    cut = expected_cut(c[..., 0], c[..., 1], c[..., 2], variant)
    assert d1.dtype == d0.dtype == np.uint32
    assert ds1.DoseGridScaling == ds0.DoseGridScaling
    assert int(d1[cut].max(initial=0)) == 0
    np.testing.assert_array_equal(d1[~cut], d0[~cut])
    if variant != "dose_partial":  # the partial grid stops below the eyes
        assert int((d0[cut] > 0).sum()) > 0
    assert "DVHSequence" not in ds1
    if variant == "hfs":
        assert "DVHSequence" in ds0


@pytest.mark.parametrize("variant", ["dose_desc", "dose_abs", "hfp", "ffdr", "hfdl"])
def test_dose_identical_in_patient_space(cases: dict[str, tuple[Path, Path]], variant: str) -> None:
    def canon(path: Path) -> np.ndarray:
        _, d, c = read_dose(path)
        order = np.lexsort(tuple(np.round(c[..., a], 3).ravel() for a in (0, 1, 2)))
        return d.ravel()[order]

    np.testing.assert_array_equal(
        canon(cases[variant][1] / "RTDOSE_1.dcm"), canon(cases["hfs"][1] / "RTDOSE_1.dcm")
    )


def _sections(rtstruct: Path) -> dict[str, dict[float, object]]:
    """ROI name -> plane z -> even-odd geometry (closed) or point/line coordinates."""
    ds = pydicom.dcmread(rtstruct)
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    out: dict[str, dict[float, object]] = {}
    for rc in ds.ROIContourSequence:
        planes: dict[float, object] = {}
        for item in rc.get("ContourSequence", []):
            pts = contour_data_array(item).reshape(-1, 3)
            assert int(item.NumberOfContourPoints) == len(pts)
            z = round(float(pts[0, 2]), 3)
            if item.ContourGeometricType == "CLOSED_PLANAR":
                poly = Polygon(pts[:, :2])
                assert poly.is_valid
                prev = planes.get(z)
                planes[z] = poly if prev is None else prev.symmetric_difference(poly)  # type: ignore[attr-defined]
            else:
                planes[z] = tuple(map(tuple, np.round(pts, 4)))
        out[names[int(rc.ReferencedROINumber)]] = planes
    return out


def test_contours_identical_across_variants(cases: dict[str, tuple[Path, Path]]) -> None:
    ref = _sections(cases["hfs"][1] / "RTSTRUCT.dcm")
    for variant in SAME_CT_LATTICE_VARIANTS:
        got = _sections(cases[variant][1] / "RTSTRUCT.dcm")
        assert set(got) == set(ref), variant
        for name, planes in ref.items():
            assert set(got[name]) == set(planes), (variant, name)
            for z, geom in planes.items():
                other = got[name][z]
                if isinstance(geom, Polygon) or hasattr(geom, "area"):
                    assert geom.symmetric_difference(other).area < 1e-6, (variant, name, z)  # type: ignore[attr-defined]
                else:
                    assert other == geom


@pytest.mark.parametrize("variant", ["hfs", "aniso"])
def test_roi_outcomes_exact(cases: dict[str, tuple[Path, Path]], variant: str) -> None:
    src, dst = cases[variant]
    before = _sections(src / "RTSTRUCT.dcm")
    after = _sections(dst / "RTSTRUCT.dcm")
    # entirely in the cut: removed from the structure set
    assert {"Lens_L", "Lens_R", "Mask_Line"} <= set(before) and not (
        {"Lens_L", "Lens_R", "Mask_Line"} & set(after)
    )
    # the PTV and the marker inside it are untouched
    assert after["PTV_Face"].keys() == before["PTV_Face"].keys()
    for z, g in before["PTV_Face"].items():
        assert g.symmetric_difference(after["PTV_Face"][z]).area == 0  # type: ignore[attr-defined]
    assert after["Marker"] == before["Marker"]
    # eyes centred on the midpoint: exactly their posterior half is left on every plane
    for eye in ("Eye_L", "Eye_R"):
        for z, g in before[eye].items():
            half = g.intersection(box(-1e3, Y_MID, 1e3, 1e3))  # type: ignore[attr-defined]
            assert after[eye][z].symmetric_difference(half).area < 1e-6  # type: ignore[attr-defined]
    # BODY = (BODY - R) + (BODY inside the PTV) on every plane, nothing in the cut
    ptv_xy = box(PX0, PY0, PX1, PY1)
    region = box(-1e4, -1e4, 1e4, Y_MID)
    z_inf = compute_truth(variant).z_inferior_eye_mm
    assert z_inf == (9.5 if variant == "aniso" else Z_INF)
    for z, g in before["BODY"].items():
        if z < z_inf:
            expected = g
        else:
            keep = ptv_xy if PZ0 < z < PZ1 else Polygon()
            expected = g.difference(region.difference(keep))  # type: ignore[attr-defined]
        assert after["BODY"][z].symmetric_difference(expected).area < 1e-6, z  # type: ignore[attr-defined]
    report = json.loads((dst / "rtdeface_report.json").read_text())
    assert sorted(report["rois_removed"]) == ["Lens_L", "Lens_R", "Mask_Line"]
    eye = next(r for r in report["rois"] if r["name"] == "Eye_L")
    assert eye["volume_after_ml"] == pytest.approx(eye["volume_before_ml"] / 2, rel=1e-9)


@pytest.mark.parametrize("variant", ["hfs", "ffp", "aniso"])
def test_reported_volumes_are_those_of_the_files(
    cases: dict[str, tuple[Path, Path]], variant: str
) -> None:
    # the report's volumes after the cut are derived from the planes the cut changed; they
    # equal the volumes measured afresh on the written structure set
    src, dst = cases[variant]
    report = json.loads((dst / "rtdeface_report.json").read_text())
    thickness = 3.0 if variant == "aniso" else 2.5  # the CT slice spacing
    for name, path, key in (
        ("input", src / "RTSTRUCT.dcm", "volume_before_ml"),
        ("output", dst / "RTSTRUCT.dcm", "volume_after_ml"),
    ):
        rois = {r.name: r for r in parse_structure_set(pydicom.dcmread(path), path).rois}
        for entry in report["rois"]:
            if entry["name"] not in rois:
                assert name == "output" and entry["removed"] and entry[key] == 0.0
                continue
            measured = closed_volume_ml(rois[entry["name"]].contours, thickness)
            assert entry[key] == measured, (name, entry)  # exactly: the same measurement
    changed = [r for r in report["rois"] if r["planes_changed"]]
    assert {"BODY", "Eye_L", "Eye_R"} <= {r["name"] for r in changed}


def test_report_preserved_voxels_in_region(cases: dict[str, tuple[Path, Path]]) -> None:
    report = json.loads((cases["hfs"][1] / "rtdeface_report.json").read_text())
    # CT centres on odd mm: x -15..15 (16), y -99..-67 (17); planes z 10..30 step 2.5 (9)
    assert report["ct"]["preserved_voxels_in_region"] == 16 * 17 * 9
    assert report["ct"]["preserved_ml_in_region"] == pytest.approx(2448 * 0.01, abs=1e-3)
    assert report["landmarks"]["z_inferior_mm"] == Z_INF
    assert report["landmarks"]["y_mid_mm"] == pytest.approx(Y_MID, abs=1e-9)
    assert report["cut"]["preserved_rois"] == ["PTV_Face", "PTV_Neck"]
    assert report["deidentification"]["applied"] is True


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_references_resolve(cases: dict[str, tuple[Path, Path]], variant: str) -> None:
    refs = check_folder_references(cases[variant][1])
    assert refs.ok, refs.problems
    assert refs.checked > 100


def test_every_object_is_new_and_headers_marked(cases: dict[str, tuple[Path, Path]]) -> None:
    src, dst = cases["hfs"]
    uids_in = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in src.rglob("*.dcm")
    }
    outs = [pydicom.dcmread(p, stop_before_pixels=True) for p in dst.rglob("*.dcm")]
    assert len(outs) == len(uids_in) == 92 + 3
    assert not uids_in & {ds.SOPInstanceUID for ds in outs}
    for ds in outs:
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.PatientName == ds.PatientID != "PH-0001"
        if ds.Modality == "CT":
            assert ds.ImageType[0] == "DERIVED"
            assert ds.RecognizableVisualFeatures == "NO"
