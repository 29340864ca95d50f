"""The fast paths give the same results as the general ones.

Raw sequence bytes (:mod:`rtdeface.rawseq`), de-identification of raw datasets (inert
sequences scanned, not parsed; outcomes memoised across slices; values encoded once),
vectorised DS formatting, even-odd areas by containment depth, the slab search for the eyes,
the forked eye search and the two-process writer.
"""

from __future__ import annotations

import copy
import filecmp
import math
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_sequence
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from shapely.geometry import Polygon

from rtdeface import forking, pipeline, rawseq, write
from rtdeface.deid import (
    DeidOptions,
    DeidSession,
    deidentify_datasets,
    is_inert,
    scan_raw_sequence,
)
from rtdeface.errors import OutputError
from rtdeface.geometry import Grid, affine_from_attributes
from rtdeface.landmarks import even_odd_area
from rtdeface.load import load_case, parse_structure_set
from rtdeface.phantom import write_phantom_case as write_case
from rtdeface.pipeline import DefaceOptions, ImageEyeSearch, deface_case, find_landmarks
from rtdeface.region import DefacingRegion, even_odd
from rtdeface.structures import COORD_DECIMALS, deface_structures, format_ds, snap_y
from rtdeface.write import build_outputs, write_atomic
from tests.helpers import assert_nothing_written
from tests.test_deid import KEY, make_case
from tests.test_structures import make_rtstruct

# ------------------------------------------------------------------------------ raw sequences


def _sequence(n_items: int = 3) -> DicomSequence:
    items = []
    for n in range(n_items):
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ref.ReferencedSOPInstanceUID = f"1.2.826.0.1.3680043.9.7777.{100 + n}"
        item = Dataset()
        item.ContourImageSequence = DicomSequence([ref])
        item.ContourGeometricType = "CLOSED_PLANAR"
        item.NumberOfContourPoints = 2
        item.ContourData = [f"{v}" for v in (1.5, -2.0, n, 3.25, 4.0, n)]
        items.append(item)
    return DicomSequence(items)


def _encoded(implicit: bool, little: bool, undefined: bool) -> bytes:
    ds = Dataset()
    ds.ContourSequence = _sequence()
    elem = ds["ContourSequence"]
    if undefined:
        for item in elem.value:
            item.is_undefined_length_sequence_item = True
            item.ContourImageSequence[0].is_undefined_length_sequence_item = True
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_sequence(fp, elem, ["iso8859"])
    return fp.getvalue()


ENCODINGS = [
    pytest.param(False, True, False, id="explicit-LE"),
    pytest.param(True, True, False, id="implicit-LE"),
    pytest.param(False, False, False, id="explicit-BE"),
    pytest.param(False, True, True, id="explicit-LE-undefined-items"),
    pytest.param(True, True, True, id="implicit-LE-undefined-items"),
]


def _walk(buf: bytes, codec: rawseq.Codec) -> Iterator[rawseq.RawElement]:
    """Every element of a sequence value at every depth, through rawseq.item_elements."""
    stack = [(0, len(buf))]
    while stack:
        s, e = stack.pop()
        for item in rawseq.items(buf, codec, s, e):
            for el in rawseq.item_elements(buf, codec, item):
                yield el
                if el.vr == "SQ":
                    stack.append((el.value_start, el.value_end))


def _walk_tags(buf: bytes, codec: rawseq.Codec) -> Iterator[tuple[int, str, int, int]]:
    """The same elements through the fast rawseq.item_tags."""
    stack = [(0, len(buf))]
    while stack:
        s, e = stack.pop()
        for item in rawseq.items(buf, codec, s, e):
            for element in rawseq.item_tags(buf, codec, item):
                yield element
                if element[1] == "SQ":
                    stack.append((element[2], element[3]))


@pytest.mark.parametrize(("implicit", "little", "undefined"), ENCODINGS)
def test_raw_walk_finds_every_element_with_its_value(
    implicit: bool, little: bool, undefined: bool
) -> None:
    buf = _encoded(implicit, little, undefined)
    codec = rawseq.Codec(implicit, little)
    walked = [(e.tag, e.vr, buf[e.value_start : e.value_end]) for e in _walk(buf, codec)]
    fast = [(t, vr, buf[s:e]) for t, vr, s, e in _walk_tags(buf, codec)]
    assert sorted(fast) == sorted(walked)
    data = [v for t, _, v in walked if t == 0x30060050]
    assert [d.rstrip(b" ") for d in data] == [
        b"1.5\\-2.0\\0\\3.25\\4.0\\0",
        b"1.5\\-2.0\\1\\3.25\\4.0\\1",
        b"1.5\\-2.0\\2\\3.25\\4.0\\2",
    ]
    uids = sorted(v.rstrip(b"\x00") for t, _, v in walked if t == 0x00081155)
    assert uids == [f"1.2.826.0.1.3680043.9.7777.{100 + n}".encode() for n in range(3)]
    assert len(rawseq.items(buf, codec)) == 3


def test_raw_walk_rejects_truncated_bytes() -> None:
    buf = _encoded(False, True, False)
    with pytest.raises(rawseq.RawSequenceError):
        list(_walk(buf[:-7], rawseq.Codec(False, True)))
    with pytest.raises(rawseq.RawSequenceError):
        list(_walk_tags(buf[:-7], rawseq.Codec(False, True)))


@pytest.mark.parametrize(("implicit", "little", "undefined"), ENCODINGS)
def test_rebuilt_items_parse_back_with_pydicom(
    implicit: bool, little: bool, undefined: bool
) -> None:
    buf = _encoded(implicit, little, undefined)
    codec = rawseq.Codec(implicit, little)
    first, second, _third = rawseq.items(buf, codec)
    number = rawseq.encode_element(0x30060048, "IS", rawseq.pad(b"7", "IS"), codec)
    rebuilt = rawseq.rebuild_item(buf, codec, second, {0x30060048: number, 0x30060042: None})
    value = buf[first.start : first.end] + rebuilt
    ds = Dataset()
    ds.set_original_encoding(implicit, little)
    ds[0x30060040] = rawseq.raw_sequence_element(0x30060040, value, codec)
    items = ds.ContourSequence
    assert len(items) == 2
    assert items[0].ContourGeometricType == "CLOSED_PLANAR"
    assert "ContourGeometricType" not in items[1] and items[1].ContourNumber == 7
    assert [float(v) for v in items[1].ContourData] == [1.5, -2.0, 1.0, 3.25, 4.0, 1.0]
    ref = items[1].ContourImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == "1.2.826.0.1.3680043.9.7777.101"


# ------------------------------------------------------------------------------ inert elements


@pytest.mark.parametrize(
    ("tag", "vr", "inert"),
    [
        (0x30060050, "DS", True),  # ContourData
        (0x30060042, "CS", True),  # ContourGeometricType
        (0x00081155, "UI", True),  # ReferencedSOPInstanceUID (U: remapped)
        (0x30060016, "SQ", True),  # ContourImageSequence
        (0x00100010, "PN", False),  # PatientName
        (0x30060026, "LO", False),  # ROIName (label kept only when safe)
        (0x00081110, "SQ", False),  # ReferencedFrameOfReferenceSequence (X/Z in the table)
        (0x00090010, "LO", False),  # private creator
        (0x30060028, "ST", False),  # ROIDescription
    ],
)
def test_inert_elements(tag: int, vr: str, inert: bool) -> None:
    assert is_inert(tag, vr) is inert


def test_a_private_element_inside_contour_items_is_not_inert() -> None:
    seq = _sequence(2)
    seq[1].private_block(0x0011, "ACME", create=True).add_new(0x01, "LO", "DOE^JOHN")
    ds = Dataset()
    ds.ContourSequence = seq
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = False, True
    write_sequence(fp, ds["ContourSequence"], ["iso8859"])
    assert scan_raw_sequence(fp.getvalue(), False, True).inert is False
    assert scan_raw_sequence(_encoded(False, True, False), False, True).inert is True


# ------------------------------------------------------------------------------ de-identification


def _flat(ds: Dataset, prefix: str = "") -> Iterator[tuple[str, str]]:
    for elem in ds:
        if elem.tag == 0x7FE00010:
            continue
        path = f"{prefix}{elem.tag}"
        if elem.VR == "SQ":
            for n, item in enumerate(elem.value):
                yield from _flat(item, f"{path}[{n}].")
        else:
            yield path, str(elem.value)


def _write_read(datasets: list[Dataset], folder: Path) -> list[Dataset]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n, ds in enumerate(datasets):
        path = folder / f"{n}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        out.append(pydicom.dcmread(path))
    return out


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_raw_datasets_deidentify_like_parsed_ones(tmp_path: Path, syntax: str) -> None:
    """Files read back (raw elements: memo, inert scans, raw values) = datasets in memory."""
    case = make_case()
    for ds in case:
        ds.file_meta.TransferSyntaxUID = syntax
    # more slices, so that memoised outcomes are replayed: empty elements (raw value None),
    # file meta UIDs, and StudyID/AccessionNumber of two studies (memoised per study)
    cts = [copy.deepcopy(case[0]) for _ in range(4)]
    for n, ct in enumerate(cts):
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.9.8{n}"
        ct.StudyID, ct.AccessionNumber = "S1", "A77"
        ct.ImageComments, ct.AcquisitionDate, ct.PositionReferenceIndicator = "", "", ""
        if n >= 2:
            ct.StudyInstanceUID = "1.2.826.0.1.3680043.9.99"
    case = [*cts, *case]
    raw = _write_read(case, tmp_path / "in")
    empty = None if syntax == ImplicitVRLittleEndian else b""  # as pydicom reads it raw
    assert raw[0].get_item(0x00204000, keep_deferred=True).value == empty
    parsed = copy.deepcopy(case)
    rec_raw = deidentify_datasets(raw, DeidOptions(key=KEY), ct_defaced=True)
    rec_parsed = deidentify_datasets(parsed, DeidOptions(key=KEY), ct_defaced=True)
    out_raw = _write_read(raw, tmp_path / "raw")
    out_parsed = _write_read(parsed, tmp_path / "parsed")
    for a, b in zip(out_raw, out_parsed, strict=True):
        assert dict(_flat(a)) == dict(_flat(b))
    ids = [(str(d.StudyID), str(d.AccessionNumber)) for d in out_raw[:4]]
    assert ids[0] == ids[1] != ids[2] == ids[3]  # keyed per study, never merged
    assert all(i[0].startswith("S") and i[0] != "S1" and i[1] != "A77" for i in ids)
    assert rec_raw.pseudonym == rec_parsed.pseudonym
    assert {k: v for k, v in rec_raw.action_counts.items() if k != "U"} == {
        k: v for k, v in rec_parsed.action_counts.items() if k != "U"
    }


def test_raw_structure_set_sequence_keeps_contours_and_maps_references(tmp_path: Path) -> None:
    """The ROIContourSequence stays raw through de-identification; its UIDs still resolve."""
    case_dir = tmp_path / "case"
    write_case(case_dir, "hfs")
    case = load_case(case_dir)
    defaced = deface_case(case, DefaceOptions(eye_check=False))
    outputs, _ = build_outputs(defaced, DeidOptions(key=KEY))
    ss = next(o.dataset for o in outputs if o.role == "RTSTRUCT")
    assert isinstance(ss.get_item("ROIContourSequence"), pydicom.dataelem.RawDataElement)
    cts = {str(o.dataset.SOPInstanceUID) for o in outputs if o.role == "CT"}
    refs = {
        str(ref.ReferencedSOPInstanceUID)
        for rc in ss.ROIContourSequence
        for item in rc.ContourSequence
        for ref in item.get("ContourImageSequence", [])
    }
    assert refs and refs <= cts
    before = {
        int(rc.ReferencedROINumber): len(rc.ContourSequence)
        for rc in defaced.structures.dataset.ROIContourSequence  # type: ignore[union-attr]
    }
    after = {int(rc.ReferencedROINumber): len(rc.ContourSequence) for rc in ss.ROIContourSequence}
    assert after == before


# ------------------------------------------------------------------------------ numbers


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.floats(min_value=-1e5, max_value=1e5, allow_nan=False) | st.sampled_from([0.0, -0.0]),
        min_size=1,
        max_size=30,
    )
)
def test_vectorised_ds_strings_equal_the_scalar_ones(values: list[float]) -> None:
    assert format_ds(np.asarray(values)) == [_fmt(v) for v in values]


def _fmt(v: float) -> str:
    """The scalar DS string (the formula rtdeface 0.1 wrote contours with)."""
    s = f"{v:.{COORD_DECIMALS}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def test_y_on_the_cut_line_is_written_posterior_of_it() -> None:
    # within 2e-6 mm of the line: moved to the line rounded up to 6 decimals (1.000001)
    ys = np.array([1.0000004, 1.000001, 0.9999990, 1.000003, 5.0])
    assert snap_y(ys, 1.0000004).tolist() == [1.000001, 1.000001, 1.000001, 1.000003, 5.0]


def _ring(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return Polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


@pytest.mark.parametrize(
    ("polygons", "area"),
    [
        pytest.param([_ring(0, 0, 10, 10), _ring(2, 2, 4, 4)], 96.0, id="hole"),
        pytest.param(
            [_ring(0, 0, 10, 10), _ring(2, 2, 8, 8), _ring(4, 4, 6, 6)], 68.0, id="island-in-hole"
        ),
        pytest.param([_ring(0, 0, 2, 2), _ring(5, 5, 6, 6)], 5.0, id="apart"),
        pytest.param([_ring(0, 0, 4, 4), _ring(2, 2, 6, 6)], 24.0, id="crossing"),
        pytest.param([_ring(0, 0, 4, 4), _ring(4, 0, 8, 4)], 32.0, id="touching"),
        pytest.param([_ring(0, 0, 4, 4), _ring(0, 0, 4, 4)], 0.0, id="cancelling"),
        pytest.param([_ring(0, 0, 4, 4), _ring(0, 0, 2, 2)], 12.0, id="hole-on-edge"),
    ],
)
def test_even_odd_area_by_depth(polygons: list[Polygon], area: float) -> None:
    assert math.isclose(even_odd_area(polygons), area, abs_tol=1e-9)
    assert math.isclose(even_odd_area(polygons), even_odd(polygons).area, abs_tol=1e-9)


# ------------------------------------------------------------------------------ eyes


def test_slab_grid_maps_indices_like_the_whole_grid() -> None:
    affine = affine_from_attributes([-100.0, 50.0, -30.0], [1, 0, 0, 0, 1, 0], [0.8, 0.9], 2.5)
    grid = Grid(affine, (40, 64, 70))
    slab = grid.slab(10, 25)
    assert slab.shape == (15, 64, 70)
    kij = np.array([[0, 3, 4], [14, 63, 69]], dtype=float)
    np.testing.assert_allclose(slab.to_patient(kij), grid.to_patient(kij + np.array([10, 0, 0])))
    with pytest.raises(Exception, match="outside"):
        grid.slab(30, 41)


def test_forked_eye_search_equals_the_inline_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    contoured = find_landmarks(case, DefaceOptions(eye_check=False))
    monkeypatch.setattr(forking, "can_fork", lambda: True)  # even with pytest's threads
    forked = ImageEyeSearch.start(case, contoured)
    assert forked.forked  # a child ran
    image_forked, error_forked = forked.result()
    image_inline, error_inline = ImageEyeSearch.start(case, contoured, parallel=False).result()
    assert error_forked == error_inline == ""
    assert image_forked is not None and image_inline is not None
    assert image_forked.z_inferior_mm == image_inline.z_inferior_mm
    assert image_forked.y_mid_mm == image_inline.y_mid_mm
    assert image_forked.confidence == image_inline.confidence
    synchronous = deface_case(case)
    pending = deface_case(case, defer=True, parallel=True)
    assert isinstance(pending.structures_work, pipeline.StructuresJob)
    assert pending.structures_work.forked and pending.eye_search is not None
    deferred = pipeline.complete_eye_check(pending)
    check = synchronous.landmarks.cross_check
    assert check == deferred.landmarks.cross_check and check is not None and check.agree
    assert synchronous.structures is not None and deferred.structures is not None
    assert synchronous.structures.changes == deferred.structures.changes
    write.write_dicom(tmp_path / "a.dcm", synchronous.structures.dataset)
    write.write_dicom(tmp_path / "b.dcm", deferred.structures.dataset)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()
    assert multiprocessing.active_children() == []


def test_a_cancelled_eye_search_leaves_no_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    contoured = find_landmarks(case, DefaceOptions(eye_check=False))
    monkeypatch.setattr(forking, "can_fork", lambda: True)
    monkeypatch.setattr(pipeline, "find_eyes_near", lambda *a: time.sleep(60))
    search = ImageEyeSearch.start(case, contoured)
    assert search.pid is not None
    assert [p.pid for p in multiprocessing.active_children()] == [search.pid]
    search.cancel()
    assert multiprocessing.active_children() == []


def test_a_failing_defacing_step_stops_the_eye_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    monkeypatch.setattr(forking, "can_fork", lambda: True)
    monkeypatch.setattr(pipeline, "find_eyes_near", lambda *a: time.sleep(60))

    def broken(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(pipeline, "deface_dose", broken)
    with pytest.raises(OSError, match="disk gone"):
        deface_case(case, parallel=True)
    assert multiprocessing.active_children() == []


# ------------------------------------------------------------------------------ writing


def test_two_process_writer_writes_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    outputs, _ = build_outputs(deface_case(case, DefaceOptions(eye_check=False)), None)
    assert len(outputs) >= write.PARALLEL_WRITE_MIN_OBJECTS
    write_atomic(outputs, tmp_path / "serial")
    monkeypatch.setattr(forking, "can_fork", lambda: True)  # even with pytest's threads
    started: list[object] = []
    real_start = forking.Child.start

    def spy(*args: object) -> object:
        started.append(real_start(*args))  # type: ignore[arg-type]
        return started[-1]

    monkeypatch.setattr(forking.Child, "start", staticmethod(spy))
    write_atomic(outputs, tmp_path / "parallel", parallel=True)
    assert len(started) == 1 and started[0] is not None  # a child wrote part of the CT
    names = sorted(
        str(p.relative_to(tmp_path / "serial")) for p in (tmp_path / "serial").rglob("*")
    )
    assert names == sorted(
        str(p.relative_to(tmp_path / "parallel")) for p in (tmp_path / "parallel").rglob("*")
    )
    files = [n for n in names if n.endswith(".dcm")]
    match, mismatch, errors = filecmp.cmpfiles(
        tmp_path / "serial", tmp_path / "parallel", files, shallow=False
    )
    assert not mismatch and not errors and len(match) == len(files)


def test_a_failing_writer_child_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    outputs, _ = build_outputs(deface_case(case, DefaceOptions(eye_check=False)), None)
    parent, real = os.getpid(), write.write_dicom

    def failing(path: Path, ds: Dataset) -> None:
        if os.getpid() != parent:  # the child's first slice
            raise OSError(28, "No space left on device")
        time.sleep(0.02)  # a slow parent: the child surely takes a slice
        real(path, ds)

    monkeypatch.setattr(write, "write_dicom", failing)
    monkeypatch.setattr(forking, "can_fork", lambda: True)  # even with pytest's threads
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left"):
        write_atomic(outputs, out, parallel=True)
    assert_nothing_written(out)


@pytest.mark.parametrize("variant", ["hfs", "rle", "unsigned", "dose_desc"])
@pytest.mark.parametrize("deid", [False, True])
def test_write_dicom_writes_the_bytes_of_pydicom(tmp_path: Path, variant: str, deid: bool) -> None:
    """Inputs as read and outputs as built (raw, parsed, compressed) give pydicom's bytes."""
    write_case(tmp_path / "case", variant)
    case = load_case(tmp_path / "case")
    defaced = deface_case(case, DefaceOptions(eye_check=False))
    outputs, _ = build_outputs(defaced, DeidOptions(key=KEY) if deid else None)
    datasets = [o.dataset for o in outputs]
    datasets += [case.ct.datasets[0], case.structure_set.dataset]  # type: ignore[union-attr]
    datasets += [d.dataset for d in case.doses]
    for n, ds in enumerate(datasets):
        ours, theirs = tmp_path / f"{n}.ours.dcm", tmp_path / f"{n}.pydicom.dcm"
        write.write_dicom(ours, ds)
        pydicom.dcmwrite(theirs, ds, enforce_file_format=True)
        assert ours.read_bytes() == theirs.read_bytes(), n


def test_write_dicom_leaves_other_datasets_to_pydicom(tmp_path: Path) -> None:
    ds = make_case()[0]  # built in memory: no original encoding, so pydicom writes it
    write.write_dicom(tmp_path / "a.dcm", ds)
    pydicom.dcmwrite(tmp_path / "b.dcm", ds, enforce_file_format=True)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()


def test_a_failing_parent_half_stops_the_writer_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    outputs, _ = build_outputs(deface_case(case, DefaceOptions(eye_check=False)), None)
    ct = [o for o in outputs if o.role == "CT"]
    real = write.write_dicom

    def slow_or_failing(path: Path, ds: Dataset) -> None:
        if ds is ct[0].dataset:
            time.sleep(60)  # the child's first slice: still running when the parent fails
        if ds is ct[-1].dataset:  # the first slice this process takes (from the last)
            raise OSError(5, "Input/output error")
        real(path, ds)

    monkeypatch.setattr(forking, "can_fork", lambda: True)
    monkeypatch.setattr(write, "write_dicom", slow_or_failing)
    with pytest.raises(OSError, match="Input/output"):
        write_atomic(outputs, tmp_path / "out", parallel=True)
    assert multiprocessing.active_children() == []
    assert_nothing_written(tmp_path / "out")


def test_a_contour_too_long_for_a_short_length_is_written_as_un() -> None:
    """ContourData over 64 KB in explicit VR: UN with a 4-byte length, as pydicom writes it."""
    angles = np.linspace(0.0, 2.0 * np.pi, 7000, endpoint=False)
    ring = np.stack([60 * np.cos(angles), 60 * np.sin(angles), np.full_like(angles, 4.0)], 1)
    ds = make_rtstruct({"BODY": ("EXTERNAL", [("CLOSED_PLANAR", ring.ravel().tolist())])})
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_original_encoding(False, True)
    ss = parse_structure_set(ds, Path("RS.dcm"))
    out = deface_structures(ss, DefacingRegion(0.0, 0.0, ()), 2.0).dataset
    (item,) = out.ROIContourSequence[0].ContourSequence
    pts = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
    assert len(pts) * 3 * 8 > 0xFFFF and int(item.NumberOfContourPoints) == len(pts)
    assert pts[:, 1].min() >= 0.0 and math.isclose(pts[:, 1].max(), 60.0, abs_tol=1e-6)
    area = Polygon(pts[:, :2]).area
    assert math.isclose(area, Polygon(ring[:, :2]).area / 2, rel_tol=1e-3)


def test_file_meta_of_a_dataset_built_in_memory_survives_copy() -> None:
    from rtdeface.load import copy_dataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PatientName = "A^B"
    ds.ImagePositionPatient = [1.0, 2.0, 3.0]
    new = copy_dataset(ds)
    new.PatientName = "C^D"
    new.ImagePositionPatient = [0.0, 0.0, 0.0]
    new.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert ds.PatientName == "A^B" and list(ds.ImagePositionPatient) == [1.0, 2.0, 3.0]
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian


def _ct_blob(
    i: int, *, charset: str = "ISO_IR 100", accession: str = "", un_series: bool = False
) -> bytes:
    """One small CT header as file bytes (explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.22222222222{i:04d}"
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.Modality = "P123", "Doe^John", "CT"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1111111111111"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3333333333333"
    ds.ReferencedSOPInstanceUIDInFile = "1.2.826.0.1.3680043.8.498.4444444444444444444444"
    item = Dataset()
    item.StudyInstanceUID, item.AccessionNumber = ds.StudyInstanceUID, accession
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([item])
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if un_series:  # the same SeriesInstanceUID stored as UN (4-byte length)
        at = data.index(b"\x20\x00\x0e\x00UI")
        length = int.from_bytes(data[at + 6 : at + 8], "little")
        data = (
            data[:at]
            + b"\x20\x00\x0e\x00UN\x00\x00"
            + length.to_bytes(4, "little")
            + data[at + 8 :]
        )
    return data


def _deidentified(blobs: list[bytes], *, memo: bool = True, **read: object) -> list[Dataset]:
    datasets = [pydicom.dcmread(DicomBytesIO(b), **read) for b in blobs]  # type: ignore[arg-type]
    session = DeidSession(datasets, DeidOptions(key=KEY), ct_defaced=False)
    if not memo:
        session._ctx.memo = None  # the policy alone, element by element
    session.process(datasets)
    return datasets


def test_memoised_outcomes_remap_uids_as_the_policy_does() -> None:
    # a UID stored as UN on later slices, and a UID whose value a caller's read deferred
    blobs = [_ct_blob(0)] + [_ct_blob(i, un_series=True) for i in range(1, 4)]
    for read in ({}, {"defer_size": 40}):
        out = _deidentified(blobs, **read)
        series = {str(d[0x0020000E].value) for d in out}
        refs = {str(d.ReferencedSOPInstanceUIDInFile) for d in out}
        assert len(series) == 1 and "1.2.826.0.1.3680043.8.498.3333333333333" not in series
        assert len(refs) == 1 and not refs.pop().startswith("1.2.826.0.1.3680043.8.498.4444")
        policy = _deidentified(blobs, memo=False, **read)
        assert [str(d[0x0020000E].value) for d in out] == [str(d[0x0020000E].value) for d in policy]


def test_memoised_nested_text_follows_each_objects_character_set() -> None:
    text = "ÄÖ".encode()  # the same bytes: "ÄÖ" in UTF-8, four other letters in Latin-1
    blobs = [
        _ct_blob(0, charset="ISO_IR 192", accession=text.decode("utf-8")),
        _ct_blob(1, charset="ISO_IR 100", accession=text.decode("latin-1")),
    ]
    got = [
        str(d.ReferencedFrameOfReferenceSequence[0].AccessionNumber) for d in _deidentified(blobs)
    ]
    policy = [
        str(d.ReferencedFrameOfReferenceSequence[0].AccessionNumber)
        for d in _deidentified(blobs, memo=False)
    ]
    assert got == policy and got[0] != got[1]
