"""Tests of the synthetic phantom itself (rtdeface.phantom and scripts/make_phantom.py).

Geometry is recomputed here from the DICOM attributes with plain numpy, independently of
rtdeface.geometry, so the phantom can serve as ground truth for the rest of the package.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
import shapely
from pydicom.dataset import Dataset
from shapely.geometry import Polygon

from rtdeface.phantom import (
    BOXES_MM,
    EYE_CENTRES_MM,
    EYE_RADIUS_MM,
    ROI_SPECS,
    SAME_CT_LATTICE_VARIANTS,
    VARIANTS,
    PhantomCase,
    body_mask,
    contour_rings,
    phantom_dose_gy,
    phantom_hu,
    roi_polygons,
    write_phantom_case,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhantomCase]:
    root = tmp_path_factory.mktemp("phantom")
    return {name: write_phantom_case(root / name, name) for name in VARIANTS}


def _ct(case: PhantomCase) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted((case.out_dir / "CT").iterdir())]


def _ct_points_and_hu(slices: list[Dataset]) -> np.ndarray:
    """Rows (x, y, z, HU) for every CT voxel, from IPP/IOP/PixelSpacing."""
    rows = []
    for ds in slices:
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        i, j = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
        pts = ipp + (i * row_spacing)[..., None] * iop[3:] + (j * col_spacing)[..., None] * iop[:3]
        hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        rows.append(np.column_stack([pts.reshape(-1, 3), hu.reshape(-1)]))
    return np.concatenate(rows)


def _dose_points(ds: Dataset) -> np.ndarray:
    """Patient points of every dose voxel, shape (frames, rows, cols, 3)."""
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    offsets = np.array(ds.GridFrameOffsetVector, dtype=float)
    if offsets[0] != 0.0:  # absolute z (only defined for IOP [1,0,0,0,1,0])
        assert np.allclose(iop, [1, 0, 0, 0, 1, 0])
        assert offsets[0] == ipp[2]
        offsets = offsets - ipp[2]
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    i, j = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
    plane = ipp + (i * row_spacing)[..., None] * iop[3:] + (j * col_spacing)[..., None] * iop[:3]
    return np.asarray(plane[None] + offsets[:, None, None, None] * normal)


def _contours_by_roi(rs: Dataset) -> dict[str, dict[float, list[tuple[str, np.ndarray]]]]:
    names = {item.ROINumber: item.ROIName for item in rs.StructureSetROISequence}
    out: dict[str, dict[float, list[tuple[str, np.ndarray]]]] = {}
    for rc in rs.ROIContourSequence:
        planes: dict[float, list[tuple[str, np.ndarray]]] = defaultdict(list)
        for c in rc.ContourSequence:
            pts = np.array(c.ContourData, dtype=float).reshape(-1, 3)
            assert int(c.NumberOfContourPoints) == len(pts)
            planes[float(pts[0, 2])].append((c.ContourGeometricType, pts))
        out[names[rc.ReferencedROINumber]] = dict(planes)
    return out


# ----------------------------------------------------------------- files and references


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_reads_back_with_consistent_references(
    cases: dict[str, PhantomCase], name: str
) -> None:
    case = cases[name]
    slices = _ct(case)
    assert len(slices) == len(case.ct_paths) == case.ct_shape[0]
    rs = pydicom.dcmread(case.rtstruct_path)
    plan = pydicom.dcmread(case.rtplan_path)
    dose = pydicom.dcmread(case.rtdose_path)
    everything = [*slices, rs, plan, dose]
    assert len({ds.StudyInstanceUID for ds in everything}) == 1
    assert len({ds.FrameOfReferenceUID for ds in everything}) == 1
    assert len({ds.SeriesInstanceUID for ds in everything}) == 4
    assert {ds.Modality for ds in everything} == {"CT", "RTSTRUCT", "RTPLAN", "RTDOSE"}
    for ds in everything:
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.PatientName == "PHANTOM^HEAD" and ds.PatientID == "PH-0001"
    for ds in slices:
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns) == case.ct_shape[1:]
        assert ds.PatientPosition == case.variant.patient_position
    expected_ts = pydicom.uid.RLELossless if name == "rle" else pydicom.uid.ExplicitVRLittleEndian
    assert {ds.file_meta.TransferSyntaxUID for ds in slices} == {expected_ts}

    # RTSTRUCT -> CT series and every slice; each contour -> the slice on its plane.
    z_to_uid = {float(ds.ImagePositionPatient[2]): ds.SOPInstanceUID for ds in slices}
    (frame,) = rs.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == slices[0].FrameOfReferenceUID
    (study,) = frame.RTReferencedStudySequence
    (series,) = study.RTReferencedSeriesSequence
    assert series.SeriesInstanceUID == slices[0].SeriesInstanceUID
    listed = {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence}
    assert listed == set(z_to_uid.values())
    for rc in rs.ROIContourSequence:
        for c in rc.ContourSequence:
            (img,) = c.ContourImageSequence
            assert img.ReferencedSOPInstanceUID == z_to_uid[float(c.ContourData[2])]
    # RTPLAN -> RTSTRUCT; RTDOSE -> RTPLAN and RTSTRUCT.
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert dose.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert len(plan.BeamSequence) == 2
    assert plan.PatientSetupSequence[0].PatientPosition == case.variant.patient_position
    assert dose.pixel_array.dtype == np.uint32
    assert ("DVHSequence" in dose) == (name == "hfs")


def test_rebuilding_gives_identical_files(cases: dict[str, PhantomCase], tmp_path: Path) -> None:
    again = write_phantom_case(tmp_path / "again", "reversed")
    first = cases["reversed"]
    assert [p.name for p in again.ct_paths] == [p.name for p in first.ct_paths]
    for a, b in [
        (again.rtstruct_path, first.rtstruct_path),
        (again.rtdose_path, first.rtdose_path),
        (again.rtplan_path, first.rtplan_path),
        *zip(again.ct_paths, first.ct_paths, strict=True),
    ]:
        assert a.read_bytes() == b.read_bytes()


def test_reversed_defeats_instance_number_and_file_name_order(
    cases: dict[str, PhantomCase],
) -> None:
    slices = [pydicom.dcmread(p) for p in cases["reversed"].ct_paths]
    z_in_write_order = [float(ds.ImagePositionPatient[2]) for ds in slices]
    assert z_in_write_order == sorted(z_in_write_order, reverse=True)
    by_number = sorted(slices, key=lambda ds: int(ds.InstanceNumber))
    z_by_number = np.diff([float(ds.ImagePositionPatient[2]) for ds in by_number])
    assert np.any(z_by_number > 0) and np.any(z_by_number < 0)
    z_by_name = np.diff([float(ds.ImagePositionPatient[2]) for ds in _ct(cases["reversed"])])
    assert np.any(z_by_name > 0) and np.any(z_by_name < 0)


def test_unsigned_stores_air_as_24(cases: dict[str, PhantomCase]) -> None:
    ds = pydicom.dcmread(cases["unsigned"].ct_paths[0])
    assert ds.PixelRepresentation == 0 and ds.BitsStored == 12
    assert ds.pixel_array[0, 0] == 24 and ds.pixel_array.max() <= 4095


# ----------------------------------------------------------------- CT lattice and HU


def _baseline_volume(slices: list[Dataset]) -> np.ndarray:
    """HU scattered into the baseline lattice (z, y, x); every lattice point exactly once.

    Fails when a voxel centre is not a baseline lattice point (x, y odd integers in -127..127,
    z = -120 + 2.5 k) or when a lattice point is missed or hit twice.
    """
    volume = np.full((92, 128, 128), np.nan)
    for ds in slices:
        table = _ct_points_and_hu([ds])
        x, y, z, hu = table.T
        jx, iy, kz = (x + 127.0) / 2.0, (y + 127.0) / 2.0, (z + 120.0) / 2.5
        for idx, n in ((jx, 128), (iy, 128), (kz, 92)):
            assert np.array_equal(idx, np.round(idx)) and idx.min() >= 0 and idx.max() < n
        k, i, j = kz.astype(int), iy.astype(int), jx.astype(int)
        assert np.all(np.isnan(volume[k, i, j]))
        volume[k, i, j] = hu
    assert not np.any(np.isnan(volume))
    return volume


def test_ct_lattice_and_hu_identical_across_storage_variants(
    cases: dict[str, PhantomCase],
) -> None:
    reference = _baseline_volume(_ct(cases["hfs"]))
    z, y, x = np.meshgrid(
        -120.0 + 2.5 * np.arange(92),
        np.arange(-127.0, 128.0, 2.0),
        np.arange(-127.0, 128.0, 2.0),
        indexing="ij",
    )
    assert np.array_equal(reference, np.round(phantom_hu(x, y, z)))
    assert reference.min() == -1000.0 and reference.max() == 800.0
    for name in SAME_CT_LATTICE_VARIANTS:
        assert np.array_equal(_baseline_volume(_ct(cases[name])), reference), name


def test_aniso_lattice(cases: dict[str, PhantomCase]) -> None:
    slices = _ct(cases["aniso"])
    ds = slices[0]
    assert (ds.Rows, ds.Columns) == (190, 220)
    assert [float(v) for v in ds.PixelSpacing] == [1.1, 0.8]
    assert np.allclose(np.diff(sorted(float(s.ImagePositionPatient[2]) for s in slices)), 3.0)
    table = _ct_points_and_hu(slices)
    assert np.array_equal(table[:, 3], np.round(phantom_hu(*table[:, :3].T)))


def test_ct_affine_matches_files(cases: dict[str, PhantomCase]) -> None:
    for name in ("hfs", "ffs", "hfdl", "ffdr", "aniso"):
        case = cases[name]
        slices = _ct(case)
        a = case.ct_affine
        for ds in slices:
            ipp = np.array(ds.ImagePositionPatient, dtype=float)
            k = float((ipp - a[:3, 3]) @ a[:3, 0] / (a[:3, 0] @ a[:3, 0]))
            assert np.isclose(k, round(k)) and 0 <= round(k) < case.ct_shape[0]
            assert np.allclose(a[:3, :3] @ [round(k), 0, 0] + a[:3, 3], ipp)


# ----------------------------------------------------------------- contours


@pytest.mark.parametrize("name", ["hfs", "hfdl", "aniso"])
def test_written_contours_equal_roi_polygons(cases: dict[str, PhantomCase], name: str) -> None:
    rs = pydicom.dcmread(cases[name].rtstruct_path)
    written = _contours_by_roi(rs)
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rs.RTROIObservationsSequence}
    numbers = {item.ROIName: item.ROINumber for item in rs.StructureSetROISequence}
    assert set(written) == {spec.name for spec in ROI_SPECS}
    for spec in ROI_SPECS:
        assert types[numbers[spec.name]] == spec.interpreted_type
        expected = roi_polygons(spec.name, name)
        assert expected, spec.name
        assert sorted(written[spec.name]) == sorted(expected), spec.name
        for z, geoms in expected.items():
            rings = [r for g in geoms for r in contour_rings(g, z)]
            got = written[spec.name][z]
            assert [t for t, _ in got] == [spec.geometric_type] * len(rings)
            for (_, pts), ring in zip(got, rings, strict=True):
                assert np.array_equal(pts, ring), (spec.name, z)


def test_special_rois() -> None:
    skull = roi_polygons("Bone_Skull")
    assert all(len(g) == 1 and len(g[0].interiors) == 1 for g in skull.values())
    assert {z: [g.coords[0] for g in gs] for z, gs in roi_polygons("Marker").items()} == {
        25.0: [(0.0, -84.0, 25.0)]
    }
    (line_z,) = roi_polygons("Mask_Line")
    assert line_z == 40.0 > 21.0 + EYE_RADIUS_MM
    # PTV_Face: planes 2.5 .. 30 (its z range is 1.25 .. 31.25, half-way between slices).
    face = roi_polygons("PTV_Face")
    assert sorted(face) == [2.5 * k for k in range(1, 13)]
    assert face[10.0][0].bounds == (-16.0, -100.0, 16.0, -56.0)
    neck = roi_polygons("PTV_Neck")
    assert min(neck) == -100.0 and max(neck) == -62.5


def test_box_boundaries_avoid_every_voxel_centre(cases: dict[str, PhantomCase]) -> None:
    for name in ("hfs", "aniso"):
        pts = _ct_points_and_hu(_ct(cases[name]))[:, :3]
        dose = _dose_points(pydicom.dcmread(cases[name].rtdose_path)).reshape(-1, 3)
        for grid in (pts, dose):
            values = [np.unique(grid[:, axis]) for axis in range(3)]
            for (x0, x1), (y0, y1), (z0, z1) in BOXES_MM.values():
                for lo_hi, axis in (((x0, x1), 0), ((y0, y1), 1), ((z0, z1), 2)):
                    for bound in lo_hi:
                        assert np.min(np.abs(values[axis] - bound)) > 0.01


def test_body_contour_matches_body_mask(cases: dict[str, PhantomCase]) -> None:
    table = _ct_points_and_hu(_ct(cases["hfs"]))
    body = roi_polygons("BODY")
    for z in (-100.0, -30.0, 0.0, 20.0, 60.0):
        sel = table[:, 2] == z
        x, y = table[sel, 0], table[sel, 1]
        shape = shapely.union_all(body[z])
        inside = shapely.contains_xy(shape, x, y)
        assert np.array_equal(inside, body_mask(x, y, z))
        assert np.all(table[sel, 3][~inside] == -1000.0)
    assert shapely.contains_xy(shapely.union_all(body[20.0]), 0.0, -84.0)


# ----------------------------------------------------------------- dose


@pytest.mark.parametrize("name", ["hfs", "ffs", "hfdl", "dose_desc", "dose_abs", "dose_partial"])
def test_dose_grid_values(cases: dict[str, PhantomCase], name: str) -> None:
    ds = pydicom.dcmread(cases[name].rtdose_path)
    pts = _dose_points(ds)
    gy = ds.pixel_array.astype(float) * float(ds.DoseGridScaling)
    assert gy.shape == pts.shape[:3]
    expected = phantom_dose_gy(pts[..., 0], pts[..., 1], pts[..., 2])
    assert np.allclose(gy, expected, atol=1e-5)
    inside = body_mask(pts[..., 0], pts[..., 1], pts[..., 2])
    assert np.all(gy[~inside] == 0.0) and np.all(gy[inside] >= 1.0)
    assert np.isclose(gy.max(), 60.0)
    z = pts[:, 0, 0, 2]
    if name == "dose_desc":
        assert np.all(np.diff(z) == -3.0) and ds.GridFrameOffsetVector[1] == -3.0
    if name == "dose_abs":
        assert ds.GridFrameOffsetVector[0] == ds.ImagePositionPatient[2] == -119.0
    if name == "dose_partial":
        assert z.max() < 10.0  # no frame at or above the inferior eye plane
        assert pts[..., 0].min() < -128.0 and pts[..., 0].max() > 128.0
    # The dose lattice is offset from the CT lattice (x half-integers, CT x odd integers).
    assert np.all(np.isclose(np.abs(pts[..., 0]) % 1.0, 0.5))


# ----------------------------------------------------------------- truth


@pytest.mark.parametrize(
    ("name", "z_inferior", "z_central"),
    [
        # Eye centres z = 21, radius 12: baseline planes -120 + 2.5 k strictly inside
        # (9, 33) are 10 .. 32.5, mean 21.25, equidistant from 20 and 22.5 -> lower, 20.
        ("hfs", 10.0, 20.0),
        ("ffdr", 10.0, 20.0),
        # aniso planes -119.5 + 3 k inside (9, 33): 9.5 .. 30.5, mean 20 -> 18.5 (tie).
        ("aniso", 9.5, 18.5),
    ],
)
def test_truth_landmarks(
    cases: dict[str, PhantomCase], name: str, z_inferior: float, z_central: float
) -> None:
    truth = cases[name].truth
    assert truth.z_inferior_eye_mm == z_inferior
    assert truth.z_central_eye_plane_mm == z_central
    # Vertices at 90 / 270 deg give y = -66 -/+ r on every plane: the midpoint is -66.
    assert truth.y_mid_mm == pytest.approx(-66.0, abs=1e-9)
    assert truth.eye_radius_mm == EYE_RADIUS_MM == 12.0
    assert truth.eye_centres_mm == EYE_CENTRES_MM
    assert EYE_CENTRES_MM["Eye_L"][0] > 0 > EYE_CENTRES_MM["Eye_R"][0]
    # Recompute from the file: inferior-most eye contour point.
    written = _contours_by_roi(pydicom.dcmread(cases[name].rtstruct_path))
    eye_z = [z for eye in ("Eye_L", "Eye_R") for z in written[eye]]
    assert min(eye_z) == z_inferior
    ys = np.concatenate([p[:, 1] for eye in ("Eye_L", "Eye_R") for _, p in written[eye][z_central]])
    assert (ys.min() + ys.max()) / 2 == truth.y_mid_mm
    # PTV_Face overlaps the removal region: z >= inferior eye plane and y < y_mid.
    face = roi_polygons("PTV_Face", name)
    overlap = [
        z
        for z, gs in face.items()
        if z >= z_inferior and any(isinstance(g, Polygon) and g.bounds[1] < -66.0 for g in gs)
    ]
    assert overlap
    # PTV_Neck lies well below the eyes.
    assert max(roi_polygons("PTV_Neck", name)) < z_inferior - 50.0


def test_hu_at_landmarks() -> None:
    x, y, z = EYE_CENTRES_MM["Eye_L"]
    assert phantom_hu(x, y, z) == 10.0  # vitreous
    assert phantom_hu(x, y + 14.0, z) == -80.0  # orbital fat behind the eye
    assert phantom_hu(x, y + 18.5, z) == 800.0  # orbital bone
    assert phantom_hu(x, -73.0, z) == 70.0  # lens
    assert phantom_hu(0.0, 0.0, 50.0) == 30.0  # brain
    assert phantom_hu(0.0, 0.0, 200.0) == -1000.0  # air
    assert phantom_dose_gy(0.0, -60.0, 20.0) == 60.0  # inside PTV_Face
    assert phantom_dose_gy(0.0, 0.0, -80.0) == 60.0  # inside PTV_Neck
    assert phantom_dose_gy(0.0, 0.0, 200.0) == 0.0


# ----------------------------------------------------------------- CLI


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_phantom", REPO / "scripts/make_phantom.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_one_variant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = _load_script()
    assert script.main([str(tmp_path / "case"), "--variant", "ffp"]) == 0
    assert (tmp_path / "case" / "RTSTRUCT.dcm").is_file()
    assert len(list((tmp_path / "case" / "CT").iterdir())) == 92
    assert (
        pydicom.dcmread(tmp_path / "case" / "RTPLAN.dcm").PatientSetupSequence[0].PatientPosition
        == "FFP"
    )
    assert "ffp" in capsys.readouterr().out
    assert script.main([str(tmp_path / "x"), "--variant", "nope"]) == 2
