"""Work moved beside the main process (forked children) and the fast paths it needs: the
same results as in one process, errors raised where the caller sees them, no process left.

Forking is forced with ``monkeypatch.setattr(forking, "can_fork", lambda: True)``: pytest may
run threads, which :func:`rtdeface.forking.can_fork` refuses by default.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from rtdeface import forking, pipeline
from rtdeface.deid import (
    DeidOptions,
    DeidSession,
    SequenceScans,
    deidentify_datasets,
    scan_raw_sequence,
)
from rtdeface.discover import peek, peek_floats, peek_str
from rtdeface.errors import InputError
from rtdeface.eyefinder import median_filter
from rtdeface.load import load_case
from rtdeface.phantom import write_phantom_case as write_case
from rtdeface.pipeline import DefaceOptions, StructuresJob, deface_case
from rtdeface.write import build_outputs, write_atomic
from tests.test_deid import KEY, make_case


@pytest.fixture
def forks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forking, "can_fork", lambda: True)


def _square(x: int) -> int:
    return x * x


def _fail(message: str) -> None:
    raise InputError(message)


def _unpicklable() -> object:
    return lambda: 42


class _TwoArgError(InputError):
    """Pickles, but cannot be unpickled (its __init__ needs two arguments)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a} {b}")


def _fail_two(a: str, b: str) -> None:
    raise _TwoArgError(a, b)


# ------------------------------------------------------------------------------ Deferred


def test_deferred_returns_the_childs_value(forks: None) -> None:
    call = forking.Deferred.start(_square, 7)
    assert call.forked and call.pid is not None
    assert call.result() == 49
    assert not call.forked and multiprocessing.active_children() == []


def test_deferred_raises_the_childs_error_here(forks: None) -> None:
    call = forking.Deferred.start(_fail, "RTSTRUCT x.dcm: corrupt")
    assert call.forked
    with pytest.raises(InputError, match=r"^RTSTRUCT x\.dcm: corrupt$"):
        call.result()
    assert multiprocessing.active_children() == []


def test_deferred_repeats_the_call_when_the_answer_cannot_be_pickled(forks: None) -> None:
    call = forking.Deferred.start(_unpicklable)
    assert call.forked
    value = call.result()
    assert callable(value) and value() == 42  # made here, after the child's answer failed
    assert multiprocessing.active_children() == []


def test_deferred_repeats_the_call_when_the_answer_cannot_be_unpickled(forks: None) -> None:
    call = forking.Deferred.start(_fail_two, "ROI 3:", "corrupt")
    assert call.forked
    with pytest.raises(_TwoArgError, match=r"^ROI 3: corrupt$"):  # raised by the repeated call
        call.result()
    assert multiprocessing.active_children() == []


def test_deferred_without_forking_calls_here() -> None:
    call = forking.Deferred.start(_square, 5, parallel=False)
    assert not call.forked and call.pid is None
    assert call.result() == 25


def test_an_abandoned_deferred_stops_its_child(forks: None) -> None:
    call = forking.Deferred.start(time.sleep, 60)
    pid = call.pid
    assert [p.pid for p in multiprocessing.active_children()] == [pid]
    del call
    gc.collect()
    assert multiprocessing.active_children() == []


def test_a_cancelled_deferred_leaves_no_process(forks: None) -> None:
    call = forking.Deferred.start(time.sleep, 60, nice=5)
    assert call.forked
    call.cancel()
    assert not call.forked and multiprocessing.active_children() == []


# ------------------------------------------------------------------------------ structures


def test_structures_clipped_in_a_child_equal_the_inline_ones(tmp_path: Path, forks: None) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    options = DefaceOptions(eye_check=False)
    serial = deface_case(case, options)
    pending = deface_case(case, options, defer=True, parallel=True)
    job = pending.structures_work
    assert isinstance(job, StructuresJob) and job.forked
    assert serial.structures is not None and pending.structures is not None
    assert pending.structures.changes == serial.structures.changes
    assert "structures_wait" in pending.timings_s and pending.timings_s["structures"] > 0
    a, _ = build_outputs(serial, DeidOptions(key=KEY))
    b, _ = build_outputs(pending, DeidOptions(key=KEY))
    write_atomic(a, tmp_path / "serial")
    write_atomic(b, tmp_path / "forked")
    names = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*"))
    assert names == sorted(
        p.relative_to(tmp_path / "forked") for p in (tmp_path / "forked").rglob("*")
    )
    for name in names:
        if (tmp_path / "serial" / name).is_file():
            assert (tmp_path / "serial" / name).read_bytes() == (
                tmp_path / "forked" / name
            ).read_bytes(), name
    assert multiprocessing.active_children() == []


def test_a_failing_clip_in_the_child_fails_the_case_and_stops_the_others(
    tmp_path: Path, forks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    monkeypatch.setattr(pipeline, "find_eyes_near", lambda *a: time.sleep(60))

    def broken(*args: object) -> None:
        raise InputError("RTSTRUCT: ROI 3 contour 0: ContourData is not numeric")

    monkeypatch.setattr(pipeline, "clip_structures", broken)
    with pytest.raises(InputError, match="ContourData is not numeric"):
        deface_case(case, parallel=True)
    assert multiprocessing.active_children() == []


# ------------------------------------------------------------------------------ de-identification


def test_a_session_in_parts_equals_one_pass(tmp_path: Path) -> None:
    case = make_case()
    cts = [copy.deepcopy(case[0]) for _ in range(3)]
    for n, ct in enumerate(cts):
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.9.7{n}"
    case = [*cts, *case]
    one = copy.deepcopy(case)
    record_one = deidentify_datasets(one, DeidOptions(key=KEY), ct_defaced=True)
    parts = copy.deepcopy(case)
    session = DeidSession(case, DeidOptions(key=KEY), ct_defaced=True)  # context: the originals
    session.process(parts[:2])
    session.process(parts[2:])
    assert session.record() == record_one
    for n, (a, b) in enumerate(zip(one, parts, strict=True)):
        pa, pb = tmp_path / f"a{n}.dcm", tmp_path / f"b{n}.dcm"
        pydicom.dcmwrite(pa, a, enforce_file_format=True)
        pydicom.dcmwrite(pb, b, enforce_file_format=True)
        assert pa.read_bytes() == pb.read_bytes()


def test_identity_words_of_items_the_cut_removes_still_count(tmp_path: Path) -> None:
    """The context comes from the inputs: a name only in a removed ROI's observation item
    still makes a label that mentions it unsafe (README, Clean Descriptors)."""
    case_dir = tmp_path / "case"
    write_case(case_dir, "hfs")
    rs_path = next(case_dir.rglob("RTSTRUCT*.dcm"))
    rs = pydicom.dcmread(rs_path)
    removed = 4  # Lens_L: inside the cut, no contour left after defacing
    kept = 30
    names = {int(r.ROINumber): str(r.ROIName) for r in rs.StructureSetROISequence}
    assert names[removed] == "Lens_L"
    for obs in rs.RTROIObservationsSequence:
        if int(obs.ReferencedROINumber) == removed:
            obs.ROIInterpreter = "Kowalczyk^Anna"
    for roi in rs.StructureSetROISequence:
        if int(roi.ROINumber) == kept:
            roi.ROIName = "Marker_Kowalczyk"
    rs.save_as(rs_path, enforce_file_format=True)
    defaced = deface_case(load_case(case_dir), DefaceOptions(eye_check=False))
    assert defaced.structures is not None and removed in {
        c.number for c in defaced.structures.changes if c.removed
    }
    outputs, _ = build_outputs(defaced, DeidOptions(key=KEY))
    ss = next(o.dataset for o in outputs if o.role == "RTSTRUCT")
    written = {int(r.ROINumber): str(r.ROIName) for r in ss.StructureSetROISequence}
    assert removed not in written
    assert written[kept] == f"ROI_{kept}"


def test_cached_item_scans_equal_fresh_scans_of_a_rebuilt_sequence(tmp_path: Path) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    assert case.structure_set is not None
    defaced = deface_case(case, DefaceOptions(eye_check=False))
    assert defaced.structures is not None
    before = case.structure_set.dataset.get_item("ROIContourSequence")
    after = defaced.structures.dataset.get_item("ROIContourSequence")
    assert before.value != after.value  # the cut changed some contours
    scans = SequenceScans()
    first = scans.scan(before)
    second = scans.scan(after)  # unchanged items come from the first scan's cache
    fresh = scan_raw_sequence(after.value, after.is_implicit_VR, after.is_little_endian)
    assert first.inert and second.inert
    assert second == fresh
    parsed = copy.deepcopy(defaced.structures.dataset).ROIContourSequence
    refs = {
        str(getattr(ref, keyword))
        for rc in parsed
        for item in rc.ContourSequence
        for ref in item.get("ContourImageSequence", [])
        for keyword in ("ReferencedSOPInstanceUID", "ReferencedSOPClassUID")
    }
    assert second.uids == refs and len(refs) > 10
    assert second.class_uids == {str(case.ct.datasets[0].SOPClassUID)}
    spans = [after.value[a:b].rstrip(b"\x00").decode() for a, b in second.ui_spans]
    assert set(spans) == second.uids


# ------------------------------------------------------------------------------ fast reads


def test_peek_text_and_numbers_equal_the_pydicom_values(tmp_path: Path) -> None:
    write_case(tmp_path / "case", "unsigned")
    case = load_case(tmp_path / "case")
    ds = pydicom.dcmread(case.ct.paths[3])  # read through peek: stays raw
    ref = pydicom.dcmread(case.ct.paths[3])  # read through pydicom
    for keyword in ("SOPInstanceUID", "Modality", "FrameOfReferenceUID", "PatientID", "Rows"):
        assert peek_str(ds, keyword) == str(ref.get(keyword)).strip()
    assert peek_str(ds, "ImageType") == str(ref.ImageType)  # multi-valued: pydicom's text
    assert "AcquisitionComments" not in ds and peek_str(ds, "AcquisitionComments") == ""
    assert peek_str(ds, "InstitutionAddress") == str(ref.InstitutionAddress)  # ST: via pydicom
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        assert peek_floats(ds, keyword) == [float(v) for v in ref.get(keyword)]
    assert peek_floats(ds, "Rows") is None  # binary VR: not read as text
    assert peek_floats(ds, "AcquisitionComments") is None
    assert isinstance(ds.get_item("ImagePositionPatient"), pydicom.dataelem.RawDataElement)
    assert isinstance(ds.get_item("SOPInstanceUID"), pydicom.dataelem.RawDataElement)
    assert peek(ds, "Modality") == "CT"


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("Modality", b"CT\t"),
        ("Modality", b"C\xe9"),
        ("Modality", b"CT\x00"),
        ("Modality", b" CT "),
        ("Modality", b"CT\\MR"),
        ("SOPInstanceUID", b"\x001.2.3"),
        ("SOPInstanceUID", b"1.2.3\x00"),
        ("SOPInstanceUID", b"1.2.3 "),
        ("SOPInstanceUID", b""),
    ],
)
def test_peek_str_of_odd_values_equals_pydicoms(keyword: str, value: bytes) -> None:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    vr = pydicom.datadict.dictionary_VR(tag)
    raw = pydicom.dataelem.RawDataElement(
        pydicom.tag.Tag(tag), vr, len(value), value, 0, False, True
    )
    ds = Dataset()
    ds[tag] = raw
    ref = Dataset()
    ref[tag] = raw
    expected = str(ref.get(keyword) if ref.get(keyword) is not None else "").strip()
    assert peek_str(ds, keyword) == expected


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_median_filter_equals_scipys(size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(4, 12, size=3))
    a = rng.normal(0, 300, size=shape).astype(np.float32).round()
    np.testing.assert_array_equal(
        median_filter(a, size), ndi.median_filter(a, size=size, mode="nearest")
    )


def test_hu_slab_equals_the_slices(tmp_path: Path) -> None:
    write_case(tmp_path / "case", "slope")
    case = load_case(tmp_path / "case")
    slab = case.ct.hu_slab(2, 9)
    assert slab.dtype == np.float32 and slab.shape == (7, *case.ct.grid.shape[1:])
    np.testing.assert_array_equal(slab, np.stack([case.ct.hu_slice(k) for k in range(2, 9)]))
