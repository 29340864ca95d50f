"""Real anonymised HNC case (../shared/data/onko_hn_eyes); skipped cleanly when absent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from shapely import contains_xy
from shapely.geometry import Polygon

from rtdeface.cli import main
from rtdeface.validate import check_folder_references
from tests.helpers import read_ct, read_dose

pytestmark = pytest.mark.realdata

Z_INFERIOR = -628.0
Y_MID = -280.4295  # truth_onko_hn_eyes.json
PTVS = ("PTV_70cf", "SPTV 70", "PTV_56cf", "SPTV 56")


@pytest.fixture(scope="module")
def defaced(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "out"
    args = ["-q", "deface", str(shared_data / "onko_hn_eyes"), "-o", str(out), "--random-key"]
    assert main(args) == 0
    return out


def _ptv_mask(rs: pydicom.Dataset, centres: tuple[np.ndarray, ...]) -> np.ndarray:
    """Voxel centres inside any PTV (contours on CT planes; no holes on the cut slices)."""
    numbers = {int(r.ROINumber) for r in rs.StructureSetROISequence if r.ROIName in PTVS}
    zs, x, y = centres
    mask = np.zeros((zs.size, *x.shape), dtype=bool)
    for rc in rs.ROIContourSequence:
        if int(rc.ReferencedROINumber) not in numbers:
            continue
        for item in rc.ContourSequence:
            pts = np.array(item.ContourData, dtype=float).reshape(-1, 3)
            k = int(np.argmin(np.abs(zs - pts[0, 2])))
            mask[k] |= contains_xy(Polygon(pts[:, :2]), x, y)
    return mask


def test_outputs_and_references(defaced: Path) -> None:
    assert len(list((defaced / "CT").glob("*.dcm"))) == 186
    assert sorted(p.name for p in defaced.glob("*.dcm")) == [
        "RTDOSE_1.dcm",
        "RTPLAN_1.dcm",
        "RTSTRUCT.dcm",
    ]
    refs = check_folder_references(defaced)
    assert refs.ok, refs.problems
    assert refs.checked > 3000


def test_ct_cut_and_bit_identity(shared_data: Path, defaced: Path) -> None:
    _, stored0, hu0, centres = read_ct(shared_data / "onko_hn_eyes" / "CT")
    dss1, stored1, hu1, centres1 = read_ct(defaced / "CT")
    for a, b in zip(centres, centres1):
        np.testing.assert_array_equal(a, b)
    rs = pydicom.dcmread(shared_data / "onko_hn_eyes" / "RTSTRUCT.dcm")
    ptv = _ptv_mask(rs, centres)
    z, _, y = centres
    box = (z >= Z_INFERIOR)[:, None, None] & (y < Y_MID)[None]
    cut = box & ~ptv
    assert int((box & ptv).sum()) == 0  # truth: no PTV voxel in the box here
    assert int(((hu0 > -500) & cut).sum()) == 54517  # truth file: tissue in the box
    assert float(hu1[cut].max()) == -1000.0
    np.testing.assert_array_equal(stored1[~cut], stored0[~cut])
    np.testing.assert_array_equal(stored1[ptv], stored0[ptv])
    assert all(ds.ImageType[0] == "DERIVED" for ds in dss1)
    assert all(ds.RecognizableVisualFeatures == "NO" for ds in dss1)


def test_dose_zero_in_cut_identical_elsewhere(shared_data: Path, defaced: Path) -> None:
    ds0, d0, centres = read_dose(shared_data / "onko_hn_eyes" / "RTDOSE.dcm")
    ds1, d1, _ = read_dose(defaced / "RTDOSE_1.dcm")
    cut = (centres[..., 2] >= Z_INFERIOR) & (centres[..., 1] < Y_MID)
    assert d1.dtype == d0.dtype and ds1.BitsAllocated == ds0.BitsAllocated == 32
    assert ds1.DoseGridScaling == ds0.DoseGridScaling
    assert int(d1[cut].max()) == 0
    assert int((d0[cut] > 0).sum()) == 7917
    np.testing.assert_array_equal(d1[~cut], d0[~cut])


def test_structures_and_report(shared_data: Path, defaced: Path) -> None:
    report = json.loads((defaced / "rtdeface_report.json").read_text())
    assert report["landmarks"]["z_inferior_mm"] == Z_INFERIOR
    assert report["landmarks"]["y_mid_mm"] == pytest.approx(Y_MID, abs=1e-9)
    assert report["cut"]["preserved_rois"] == list(PTVS)
    changed = {r["name"] for r in report["rois"] if r["planes_changed"]}
    assert changed == {"Brain", "External -0.5cm", "External ROI_1", "Eye_L", "Eye_R"}
    rs0 = pydicom.dcmread(shared_data / "onko_hn_eyes" / "RTSTRUCT.dcm")
    rs1 = pydicom.dcmread(defaced / "RTSTRUCT.dcm")
    names0 = {int(r.ROINumber): r.ROIName for r in rs0.StructureSetROISequence}
    by_number1 = {int(r.ReferencedROINumber): r for r in rs1.ROIContourSequence}
    for rc0 in rs0.ROIContourSequence:
        number = int(rc0.ReferencedROINumber)
        rc1 = by_number1[number]
        if names0[number] in PTVS:  # PTV contours identical, point for point
            assert [list(i.ContourData) for i in rc1.ContourSequence] == [
                list(i.ContourData) for i in rc0.ContourSequence
            ]
        for item in rc1.ContourSequence:  # no contour area of any ROI left in the cut
            pts = np.array(item.ContourData, dtype=float).reshape(-1, 3)
            if pts[0, 2] >= Z_INFERIOR and names0[number] not in PTVS:
                poly = Polygon(pts[:, :2])
                assert (
                    poly.intersection(
                        Polygon([(-1e4, -1e4), (1e4, -1e4), (1e4, Y_MID), (-1e4, Y_MID)])
                    ).area
                    < 1e-6
                )
    body = next(r for r in report["rois"] if r["name"] == "External ROI_1")
    assert body["volume_before_ml"] == pytest.approx(10632.47, abs=0.01)
    assert body["volume_before_ml"] - body["volume_after_ml"] == pytest.approx(100.24, abs=0.05)


def test_no_eye_contours_is_a_one_line_error(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "deface",
            str(shared_data / "onko_hn"),
            "-o",
            str(out),
            "--eyes",
            "contours",
            "--random-key",
        ]
    )
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1
    err = errors[0]
    assert err.startswith("rtdeface: error: ")
    assert "no eye ROI found" in err and "'External ROI_1'" in err and "--eye-roi NAME" in err
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no partial output, no audit file


def test_no_eye_contours_found_in_image(shared_data: Path, tmp_path: Path) -> None:
    """Without eye ROIs the default (--eyes auto) finds the eyes in the CT (within 3 mm)."""
    out = tmp_path / "out"
    args = ["-q", "deface", str(shared_data / "onko_hn"), "-o", str(out), "--random-key"]
    assert main(args) == 0
    lm = json.loads((out / "rtdeface_report.json").read_text())["landmarks"]
    assert lm["source"] == "image"
    assert lm["confidence"] > 0.8
    assert abs(lm["z_inferior_mm"] - Z_INFERIOR) <= 3.0
    assert abs(lm["y_mid_mm"] - Y_MID) <= 3.0
    refs = check_folder_references(out)
    assert refs.ok, refs.problems
