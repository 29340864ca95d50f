"""Regression tests for defects found in review: privacy holes, raw exceptions, UID
collisions. Each test states the scenario it guards."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from shapely.geometry import Polygon, box

from rtdeface.cli import main
from rtdeface.errors import InputError
from rtdeface.load import contour_data_array, load_case, parse_structure_set
from rtdeface.phantom import write_phantom_case
from rtdeface.pipeline import DefaceOptions, deface_case
from rtdeface.region import DefacingRegion, RoiSections, select_preserved
from rtdeface.structures import deface_structures
from rtdeface.uids import SameLengthTable, UidMapper
from rtdeface.validate import check_folder_references
from rtdeface.write import build_outputs, derived_image_type
from tests.test_structures import make_rtstruct, square

CUT = box(-1e4, -1e4, 1e4, 0.0)  # the region of the unit cases: z >= 2, y < 0


def _region(ss) -> DefacingRegion:  # type: ignore[no-untyped-def]
    kept = select_preserved(ss.rois)
    return DefacingRegion(2.0, 0.0, tuple(RoiSections.from_roi(r, 2.0) for r in kept))


def _points_in_cut(ds: pydicom.Dataset, number: int) -> int:
    rc = next(r for r in ds.ROIContourSequence if int(r.ReferencedROINumber) == number)
    n = 0
    for item in rc.get("ContourSequence", []):
        pts = contour_data_array(item).reshape(-1, 3)
        n += int(np.sum((pts[:, 2] >= 2.0) & (pts[:, 1] < 0.0)))
    return n


def test_duplicated_contour_on_a_plane_cannot_survive() -> None:
    body = square(-50, -50, 50, 50, 4)
    below = square(-50, -50, 50, 50, 0)
    contours = [("CLOSED_PLANAR", below), ("CLOSED_PLANAR", body), ("CLOSED_PLANAR", body)]
    ds = make_rtstruct({"BODY": ("EXTERNAL", contours)})
    ss = parse_structure_set(ds, Path("RS.dcm"))
    out = deface_structures(ss, _region(ss), 2.0).dataset
    assert _points_in_cut(out, 1) == 0
    # two identical contours cancel (even-odd): only the plane below the cut is left
    (item,) = out.ROIContourSequence[0].ContourSequence
    assert contour_data_array(item).reshape(-1, 3)[0, 2] == 0.0


def test_degenerate_closed_contours_in_the_cut_are_dropped() -> None:
    ds = make_rtstruct(
        {
            "RefPt": (
                "MARKER",
                [("CLOSED_PLANAR", [0, -20, 4]), ("CLOSED_PLANAR", [0, -20, 4, 5, -25, 4])],
            ),
            "Back": ("ORGAN", [("CLOSED_PLANAR", square(-5, 10, 5, 20, 4))]),
        }
    )
    ss = parse_structure_set(ds, Path("RS.dcm"))
    result = deface_structures(ss, _region(ss), 2.0)
    assert result.removed_rois == ("RefPt",)
    assert result.changes[1].planes_changed == 0


def test_preservation_is_by_roi_number_not_name() -> None:
    ds = make_rtstruct(
        {
            "External": ("EXTERNAL", [("CLOSED_PLANAR", square(-50, -50, 50, 50, 4))]),
            "PTV": ("PTV", [("CLOSED_PLANAR", square(-10, -30, 10, -10, 4))]),
        }
    )
    ds.StructureSetROISequence[1].ROIName = "External"  # same name as the body
    ss = parse_structure_set(ds, Path("RS.dcm"))
    out = deface_structures(ss, _region(ss), 2.0).dataset
    rc = out.ROIContourSequence[0]
    area = sum(
        Polygon(contour_data_array(i).reshape(-1, 3)[:, :2]).area for i in rc.ContourSequence
    )
    assert area == pytest.approx(100 * 50 + 20 * 20)  # posterior half + the PTV square


def test_closedplanar_xor_is_read_as_closed() -> None:
    ds = make_rtstruct({"PTV_X": ("PTV", [("CLOSED_PLANAR", square(-10, -30, 10, -10, 4))])})
    ds.ROIContourSequence[0].ContourSequence[0].ContourGeometricType = "CLOSEDPLANAR_XOR"
    ss = parse_structure_set(ds, Path("RS.dcm"))
    assert [r.name for r in select_preserved(ss.rois)] == ["PTV_X"]


def test_open_contour_end_on_the_cut_line_is_snapped_posterior() -> None:
    y_mid = -0.1234567
    ds = make_rtstruct({"Line": ("CONTROL", [("OPEN_PLANAR", [0, -20, 4, 0, 20, 4])])})
    ss = parse_structure_set(ds, Path("RS.dcm"))
    out = deface_structures(ss, DefacingRegion(2.0, y_mid, ()), 2.0).dataset
    pts = contour_data_array(out.ROIContourSequence[0].ContourSequence[0]).reshape(-1, 3)
    assert pts[:, 1].min() >= y_mid


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(
            lambda ds: ds.ROIContourSequence.append(copy.deepcopy(ds.ROIContourSequence[0])),
            "two ROIContourSequence items",
            id="duplicate-referenced-roi-number",
        ),
        pytest.param(
            lambda ds: setattr(ds.ROIContourSequence[0], "ReferencedROINumber", 99),
            "not in StructureSetROISequence",
            id="orphan-roi-contour",
        ),
        pytest.param(
            lambda ds: delattr(ds.ROIContourSequence[0], "ReferencedROINumber"),
            "no valid ReferencedROINumber",
            id="missing-referenced-roi-number",
        ),
        pytest.param(
            lambda ds: delattr(ds.StructureSetROISequence[0], "ROINumber"),
            "no valid ROINumber",
            id="missing-roi-number",
        ),
        pytest.param(
            lambda ds: setattr(
                ds.ROIContourSequence[0].ContourSequence[0], "ContourGeometricType", "CURVE"
            ),
            "unknown ContourGeometricType",
            id="unknown-geometric-type",
        ),
    ],
)
def test_corrupt_structure_sets_are_input_errors(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    ds = make_rtstruct({"BODY": ("EXTERNAL", [("CLOSED_PLANAR", square(-5, -5, 5, 5, 4))])})
    mutate(ds)
    with pytest.raises(InputError, match=message):
        parse_structure_set(ds, Path("RS.dcm"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("reg") / "case"
    write_phantom_case(path, "hfs")
    return path


@pytest.mark.parametrize(
    ("keyword", "message"),
    [("Rows", "Rows, Columns or BitsAllocated"), ("PixelData", "no PixelData")],
)
def test_incomplete_ct_slice_is_an_input_error(
    phantom: Path, tmp_path: Path, keyword: str, message: str
) -> None:
    case = tmp_path / "case"
    import shutil

    shutil.copytree(phantom, case)
    victim = sorted((case / "CT").glob("*.dcm"))[40]
    ds = pydicom.dcmread(victim)
    delattr(ds, keyword)
    ds.save_as(victim)
    with pytest.raises(InputError, match=message):
        load_case(case)


def test_dose_frames_longer_than_pixel_data_is_an_input_error(
    phantom: Path, tmp_path: Path
) -> None:
    import shutil

    case = tmp_path / "case"
    shutil.copytree(phantom, case)
    ds = pydicom.dcmread(case / "RTDOSE.dcm")
    ds.NumberOfFrames = int(ds.NumberOfFrames) + 1
    ds.GridFrameOffsetVector = [*ds.GridFrameOffsetVector, float(ds.GridFrameOffsetVector[-1]) + 3]
    ds.save_as(case / "RTDOSE.dcm")
    with pytest.raises(InputError, match="truncated or NumberOfFrames is wrong"):
        load_case(case)


def test_build_outputs_twice_gives_the_same_result(phantom: Path) -> None:
    defaced = deface_case(load_case(phantom), DefaceOptions(eye_check=False))
    first, _ = build_outputs(defaced)
    second, _ = build_outputs(defaced)
    for a, b in zip(first, second):
        assert a.dataset.SOPInstanceUID == b.dataset.SOPInstanceUID
    rs = next(o.dataset for o in second if o.role == "RTSTRUCT")
    assert rs.SOPInstanceUID != defaced.case.structure_set.dataset.SOPInstanceUID  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ORIGINAL", ["DERIVED", "PRIMARY"]),
        (["ORIGINAL", "PRIMARY", "AXIAL"], ["DERIVED", "PRIMARY", "AXIAL"]),
        (None, ["DERIVED", "PRIMARY"]),
        ("", ["DERIVED", "PRIMARY"]),
    ],
)
def test_derived_image_type(value: object, expected: list[str]) -> None:
    assert derived_image_type(value) == expected


def test_short_uids_never_collide_and_references_resolve(phantom: Path, tmp_path: Path) -> None:
    """CT SOPInstanceUIDs like 1.2.3.N cannot get a same-length mapping: they fall back."""
    import shutil

    case = tmp_path / "case"
    shutil.copytree(phantom, case)
    mapping: dict[str, str] = {}
    for n, path in enumerate(sorted((case / "CT").glob("*.dcm")), start=1):
        ds = pydicom.dcmread(path)
        mapping[ds.SOPInstanceUID] = f"1.2.3.{n}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.3.{n}"
        ds.save_as(path)
    rs = pydicom.dcmread(case / "RTSTRUCT.dcm")
    for ds in [rs]:
        for elem in ds.iterall():
            if elem.keyword == "ReferencedSOPInstanceUID" and elem.value in mapping:
                elem.value = mapping[elem.value]
    rs.save_as(case / "RTSTRUCT.dcm")
    out = tmp_path / "out"
    assert main(["-q", "deface", str(case), "-o", str(out), "--no-deid", "--no-eye-check"]) == 0
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in out.rglob("*.dcm")]
    assert len(uids) == len(set(uids)) == 95
    refs = check_folder_references(out)
    assert refs.ok, refs.problems


def test_same_length_table_is_injective_and_valid() -> None:
    mapper = UidMapper(b"key")
    uids = [f"1.2.826.0.1.3680043.8.498.{n:030d}" for n in range(1, 300)]
    table = SameLengthTable.build(mapper, uids)
    values = list(table.table.values())
    assert len(values) == len(set(values)) == len(uids)
    for old, new in table.table.items():
        assert len(old) == len(new) <= 64
        arcs = new.decode().split(".")
        assert arcs[:2] == ["2", "25"] and int(arcs[2]) < 2**128
        assert all(a == "0" or not a.startswith("0") for a in arcs)
