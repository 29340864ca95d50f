"""Contour clipping on exact shapes: areas, holes, preserved ROIs, open and point contours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from shapely.geometry import Polygon

from rtdeface.geometry import Grid, affine_from_attributes
from rtdeface.landmarks import closed_volume_ml
from rtdeface.load import contour_data_array, parse_structure_set
from rtdeface.region import DefacingRegion, RoiSections, select_preserved
from rtdeface.structures import deface_structures


def square(x0: float, y0: float, x1: float, y1: float, z: float) -> list[float]:
    return [x0, y0, z, x1, y0, z, x1, y1, z, x0, y1, z]


def make_rtstruct(rois: dict[str, tuple[str, list[tuple[str, list[float]]]]]) -> Dataset:
    """An RTSTRUCT dataset from {name: (type, [(geometric type, flat points), ...])}."""
    ds = Dataset()
    ds.StructureSetROISequence = Sequence()
    ds.ROIContourSequence = Sequence()
    ds.RTROIObservationsSequence = Sequence()
    for number, (name, (typ, contours)) in enumerate(rois.items(), start=1):
        ssr = Dataset()
        ssr.ROINumber = number
        ssr.ROIName = name
        ds.StructureSetROISequence.append(ssr)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = typ
        ds.RTROIObservationsSequence.append(obs)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = Sequence()
        for gtype, pts in contours:
            item = Dataset()
            ref = Dataset()
            ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            ref.ReferencedSOPInstanceUID = f"1.2.3.{int(pts[2] + 100)}"
            item.ContourImageSequence = Sequence([ref])
            item.ContourGeometricType = gtype
            item.NumberOfContourPoints = len(pts) // 3
            item.ContourData = [f"{v:g}" for v in pts]
            rc.ContourSequence.append(item)
        ds.ROIContourSequence.append(rc)
    return ds


@pytest.fixture
def structure_set():  # type: ignore[no-untyped-def]
    ds = make_rtstruct(
        {
            "BODY": (
                "EXTERNAL",
                [("CLOSED_PLANAR", square(-50, -50, 50, 50, z)) for z in (0, 2, 4)],
            ),
            "PTV_Face": ("PTV", [("CLOSED_PLANAR", square(-10, -30, 10, -10, 2))]),
            "Skull": (
                "ORGAN",
                [
                    ("CLOSED_PLANAR", square(-40, -40, 40, 40, 4)),
                    ("CLOSED_PLANAR", square(-20, -20, 20, 20, 4)),
                ],
            ),
            "Back_Ring": (
                "ORGAN",
                [
                    ("CLOSED_PLANAR", square(-40, 10, 40, 50, 4)),
                    ("CLOSED_PLANAR", square(-20, 20, 20, 40, 4)),
                ],
            ),
            "Nose": ("ORGAN", [("CLOSED_PLANAR", square(-5, -45, 5, -35, z)) for z in (2, 4)]),
            "Marker": ("MARKER", [("POINT", [0, -20, 4]), ("POINT", [0, 20, 4])]),
            "Line": ("CONTROL", [("OPEN_PLANAR", [0, -20, 4, 0, 20, 4])]),
        }
    )
    return parse_structure_set(ds, Path("RS.dcm"))


def _region(ss) -> DefacingRegion:  # type: ignore[no-untyped-def]
    kept = select_preserved(ss.rois)
    return DefacingRegion(2.0, 0.0, tuple(RoiSections.from_roi(r, 2.0) for r in kept))


def _polys(ds: Dataset, number: int) -> list[tuple[float, Polygon]]:
    rc = next(r for r in ds.ROIContourSequence if int(r.ReferencedROINumber) == number)
    out = []
    for item in rc.ContourSequence:
        pts = contour_data_array(item).reshape(-1, 3)
        assert int(item.NumberOfContourPoints) == len(pts)
        out.append((float(pts[0, 2]), Polygon(pts[:, :2]) if len(pts) >= 3 else Polygon()))
    return out


def test_body_loses_cut_but_keeps_ptv_inside(structure_set) -> None:  # type: ignore[no-untyped-def]
    result = deface_structures(structure_set, _region(structure_set), 2.0)
    body = _polys(result.dataset, 1)
    by_z: dict[float, list[float]] = {}
    for z, p in body:
        by_z.setdefault(z, []).append(p.area)
    assert by_z[0.0] == [10000.0]  # below the eye plane: untouched
    assert sorted(by_z[2.0]) == [400.0, 5000.0]  # posterior half + the PTV square
    assert by_z[4.0] == [5000.0]
    # the plane below the cut is the very same item, bit for bit
    src = structure_set.dataset.ROIContourSequence[0].ContourSequence[0]
    out = result.dataset.ROIContourSequence[0].ContourSequence[0]
    assert out.ContourData == src.ContourData
    change = result.changes[0]
    assert change.volume_before_ml == pytest.approx(3 * 10000 * 2 / 1000)
    assert change.volume_after_ml == pytest.approx((10000 + 5400 + 5000) * 2 / 1000)
    assert change.planes_changed == 2


def test_ptv_untouched_and_references_kept(structure_set) -> None:  # type: ignore[no-untyped-def]
    result = deface_structures(structure_set, _region(structure_set), 2.0)
    assert result.dataset.ROIContourSequence[1] == structure_set.dataset.ROIContourSequence[1]
    assert result.changes[1].preserved
    for rc in result.dataset.ROIContourSequence:
        for item in rc.ContourSequence:
            z = contour_data_array(item)[2]
            uid = item.ContourImageSequence[0].ReferencedSOPInstanceUID
            assert uid == f"1.2.3.{int(z + 100)}"


def test_hole_cut_open_and_hole_kept_elsewhere(structure_set) -> None:  # type: ignore[no-untyped-def]
    result = deface_structures(structure_set, _region(structure_set), 2.0)
    skull = _polys(result.dataset, 3)
    assert [p.area for _, p in skull] == [80 * 40 - 40 * 20]  # U shape, the hole opened
    back = _polys(result.dataset, 4)  # entirely posterior: unchanged, still outer + hole
    assert sorted(p.area for _, p in back) == [800.0, 3200.0]
    assert result.changes[3].planes_changed == 0


def test_roi_entirely_in_cut_removed_from_all_sequences(structure_set) -> None:  # type: ignore[no-untyped-def]
    result = deface_structures(structure_set, _region(structure_set), 2.0)
    assert result.removed_rois == ("Nose",)
    ds = result.dataset
    assert 5 not in [int(s.ROINumber) for s in ds.StructureSetROISequence]
    assert 5 not in [int(s.ReferencedROINumber) for s in ds.ROIContourSequence]
    assert 5 not in [int(s.ReferencedROINumber) for s in ds.RTROIObservationsSequence]
    # the input dataset is not modified
    assert len(structure_set.dataset.StructureSetROISequence) == 7


def test_point_and_open_contours(structure_set) -> None:  # type: ignore[no-untyped-def]
    result = deface_structures(structure_set, _region(structure_set), 2.0)
    ds = result.dataset
    marker = next(r for r in ds.ROIContourSequence if int(r.ReferencedROINumber) == 6)
    assert [list(contour_data_array(i)) for i in marker.ContourSequence] == [[0.0, 20.0, 4.0]]
    line = next(r for r in ds.ROIContourSequence if int(r.ReferencedROINumber) == 7)
    (item,) = line.ContourSequence
    assert item.ContourGeometricType == "OPEN_PLANAR"
    pts = contour_data_array(item).reshape(-1, 3)
    assert sorted(pts[:, 1].tolist()) == [0.0, 20.0]


def test_region_samples_exact_voxels(structure_set) -> None:  # type: ignore[no-untyped-def]
    region = _region(structure_set)
    # 1 mm voxels centred on integers + 0.5 (no centre on a boundary), z planes 0, 2, 4
    grid = Grid(
        affine_from_attributes([-49.5, -49.5, 0.0], [1, 0, 0, 0, 1, 0], [1, 1], 2.0), (3, 100, 100)
    )
    cut, kept = region.sample(grid)
    assert not cut[0].any()
    # plane z=2: all 100 x 50 anterior voxels minus the 20 x 20 PTV voxels
    assert cut[1].sum() == 100 * 50 - 20 * 20
    assert kept == 400
    assert cut[2].sum() == 100 * 50
    y = grid.plane_xy_mm()[1]
    assert not cut[2][y > 0].any()


def test_cut_points_judged_on_their_plane(structure_set) -> None:  # type: ignore[no-untyped-def]
    region = _region(structure_set)
    pts = np.array([[0, -20, 2.0], [0, -20, 4.0], [0, -20, 0.0], [0, 5, 4.0], [0, -0.001, 4.0]])
    assert region.contains_points(pts).tolist() == [False, True, False, False, True]


def test_volume_after_drops_a_plane_left_empty_from_the_spacing() -> None:
    # planes z -4, -2 (posterior, below the cut) and 4 (wholly in the cut): spacing before
    # is the median of (2, 6) = 4 mm; after, plane 4 is gone and the spacing is 2 mm
    ss = parse_structure_set(
        make_rtstruct(
            {
                "Brow": (
                    "ORGAN",
                    [
                        ("CLOSED_PLANAR", square(-5, 10, 5, 20, -4)),
                        ("CLOSED_PLANAR", square(-5, 10, 5, 20, -2)),
                        ("CLOSED_PLANAR", square(-5, -45, 5, -35, 4)),
                    ],
                )
            }
        ),
        Path("RS.dcm"),
    )
    result = deface_structures(ss, _region(ss), 2.0)
    (change,) = result.changes
    assert change.volume_before_ml == pytest.approx(3 * 100 * 4 / 1000, rel=1e-12)
    assert change.volume_after_ml == pytest.approx(2 * 100 * 2 / 1000, rel=1e-12)
    assert (change.planes_changed, change.contours_before, change.contours_after) == (1, 3, 2)


def test_volume_after_equals_the_written_contours_on_inexact_and_merging_planes() -> None:
    # z 2.4 and 4.8 are not exact in binary (written as "2.4"); contours at z 3.0 and 3.04
    # form one plane (z 3.02) whose cut moves the next contour (z 3.06) into it; a closed
    # contour of 2 points (a degenerate one) sits before the others
    def at(z: float, x0: float = -5) -> tuple[str, list[float]]:
        return ("CLOSED_PLANAR", square(x0, -40, x0 + 10, 20, z))

    ss = parse_structure_set(
        make_rtstruct(
            {
                "Odd": (
                    "ORGAN",
                    [
                        ("CLOSED_PLANAR", [0, 0, 2.4, 1, 1, 2.4]),
                        at(2.4),
                        at(3.0),
                        at(3.04, 20),
                        at(3.06, -30),
                        at(4.8),
                    ],
                )
            }
        ),
        Path("RS.dcm"),
    )
    result = deface_structures(ss, _region(ss), 2.0)
    (change,) = result.changes
    written = parse_structure_set(result.dataset, Path("out.dcm")).rois[0].contours
    assert change.planes_changed > 0
    assert change.volume_after_ml == closed_volume_ml(written, 2.0)
    assert change.volume_before_ml == closed_volume_ml(ss.rois[0].contours, 2.0)
