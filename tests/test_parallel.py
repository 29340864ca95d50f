"""Work moved beside the main process (forked children) and the fast paths it needs: the
same results as in one process, errors raised where the caller sees them, no process left.

Forking is forced with ``monkeypatch.setattr(forking, "can_fork", lambda: True)``: pytest may
run threads, which :func:`rtdeface.forking.can_fork` refuses by default.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from scipy import ndimage as ndi

from rtdeface import forking, pipeline, write
from rtdeface.cli import main
from rtdeface.ct import deface_ct
from rtdeface.deid import (
    DeidOptions,
    DeidSession,
    SequenceScans,
    SessionJob,
    deidentify_datasets,
    scan_raw_sequence,
)
from rtdeface.discover import peek, peek_floats, peek_str, peek_uint
from rtdeface.errors import InputError, OutputError
from rtdeface.eyefinder import MedianClasses, neighbour_count
from rtdeface.load import copy_dataset, load_case
from rtdeface.phantom import write_phantom_case as write_case
from rtdeface.pipeline import DefaceOptions, StructuresJob, deface_case
from rtdeface.uids import tag_keyword
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
    serial_tree = _tree(tmp_path / "serial")
    assert serial_tree == _tree(tmp_path / "forked") and len(serial_tree) > 10
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
def test_median_classes_equal_thresholds_of_scipys_median(size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(4, 12, size=3))
    a = rng.normal(0, 300, size=shape).astype(np.float32).round()
    median = ndi.median_filter(a, size=size, mode="nearest")
    classes = MedianClasses(a, size)
    # thresholds at sample values (ties) and between them
    for t in [*np.unique(a)[:: max(1, a.size // 40)].tolist(), -0.5, 0.5, 99.5]:
        np.testing.assert_array_equal(classes.below(t), median < t)
        np.testing.assert_array_equal(classes.above(t), median > t)


def test_neighbour_count_of_one_voxel_and_of_an_edge() -> None:
    mask = np.zeros((4, 5, 6), dtype=bool)
    mask[2, 2, 2] = True
    count = neighbour_count(mask, 3)
    assert count.dtype == np.uint16 and count.shape == mask.shape
    np.testing.assert_array_equal(
        np.argwhere(count == 1),
        np.argwhere(np.pad(np.ones((3, 3, 3), bool), [(1, 0), (1, 1), (1, 2)])),
    )
    assert int(count.sum()) == 27
    edge = np.zeros((3, 3, 3), dtype=bool)
    edge[0, 0, 0] = True  # repeated outside: the corner voxel counts 8 times for itself
    assert int(neighbour_count(edge, 3)[0, 0, 0]) == 8
    assert int(neighbour_count(edge, 3)[1, 1, 1]) == 1
    assert int(neighbour_count(edge, 3)[2, 2, 2]) == 0


def test_hu_slab_equals_the_slices(tmp_path: Path) -> None:
    write_case(tmp_path / "case", "slope")
    case = load_case(tmp_path / "case")
    slab = case.ct.hu_slab(2, 9)
    assert slab.dtype == np.float32 and slab.shape == (7, *case.ct.grid.shape[1:])
    np.testing.assert_array_equal(slab, np.stack([case.ct.hu_slice(k) for k in range(2, 9)]))


# ------------------------------------------------------------------------------ session job


def _phantom_objects(case_dir: Path) -> list[Dataset]:
    """The input objects of a loaded phantom case, in build_outputs' order."""
    case = load_case(case_dir)
    assert case.structure_set is not None
    return [
        *case.ct.datasets,
        case.structure_set.dataset,
        *(d.dataset for d in case.doses),
        *(plan for _, plan in case.plans),
    ]


def _written(tmp_path: Path, name: str, datasets: list[Dataset]) -> list[bytes]:
    out = []
    for n, ds in enumerate(datasets):
        path = tmp_path / f"{name}{n}.dcm"
        write.write_dicom(path, ds)
        out.append(path.read_bytes())
    return out


def test_a_session_built_in_a_child_equals_one_built_here(tmp_path: Path, forks: None) -> None:
    write_case(tmp_path / "case", "hfs")
    objects = _phantom_objects(tmp_path / "case")
    job = SessionJob(objects, DeidOptions(key=KEY), ct_defaced=True)
    assert job.forked
    forked = job.session(objects)
    assert not job.forked and multiprocessing.active_children() == []
    here = DeidSession(objects, DeidOptions(key=KEY), ct_defaced=True)
    a, b = copy.deepcopy(objects), copy.deepcopy(objects)
    forked.process(a)
    here.process(b)
    assert forked.record() == here.record()
    assert forked.record().n_objects == len(objects) and here.record().identity_tokens
    assert _written(tmp_path, "a", a) == _written(tmp_path, "b", b)


def test_a_session_job_asked_for_other_objects_builds_their_session_here(
    forks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = make_case()
    job = SessionJob(objects, DeidOptions(key=KEY), ct_defaced=True)
    others = copy.deepcopy(objects)  # equal values, other objects: not what the child saw
    others[0].PatientName = "Zyxwvu^Qwerty"
    session = job.session(others)
    assert multiprocessing.active_children() == []  # the child was stopped
    assert "zyxwvu" in session.record().identity_tokens
    assert (
        "other"
        not in DeidSession(objects, DeidOptions(key=KEY), ct_defaced=True).record().identity_tokens
    )


def test_a_session_jobs_error_is_raised_when_the_session_is_asked_for(forks: None) -> None:
    objects = make_case()
    objects[1].PatientID = "SOMEONE-ELSE"
    job = SessionJob(objects, DeidOptions(key=KEY), ct_defaced=True)
    with pytest.raises(InputError, match="different PatientIDs"):
        job.session(objects)
    cancelled = SessionJob(objects, DeidOptions(key=KEY), ct_defaced=True)
    cancelled.cancel()
    assert not cancelled.forked and multiprocessing.active_children() == []


def test_the_cli_uses_the_context_built_beside_the_load(
    tmp_path: Path, forks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single-case run builds the de-identification context in a child (not here) and
    writes the same bytes as a run in one process."""
    write_case(tmp_path / "case", "hfs")
    monkeypatch.setenv("RTDEFACE_KEY", "parallel-test-key-0123456789")
    args = ["-q", "deface", str(tmp_path / "case"), "--no-eye-check"]
    built_here: list[int] = []
    original_init = DeidSession.__init__

    def counting_init(self: DeidSession, *a: object, **k: object) -> None:
        built_here.append(os.getpid())
        original_init(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(DeidSession, "__init__", counting_init)
    assert main([*args, "-o", str(tmp_path / "forked")]) == 0
    assert os.getpid() not in built_here  # built in the child only
    monkeypatch.setattr(forking, "can_fork", lambda: False)
    assert main([*args, "-o", str(tmp_path / "serial")]) == 0
    assert built_here == [os.getpid()]
    serial_files = _tree(tmp_path / "serial", "*.dcm")  # the reports differ in their timings
    assert len(serial_files) == len(list((tmp_path / "case").rglob("*.dcm")))
    assert serial_files == _tree(tmp_path / "forked", "*.dcm")
    assert multiprocessing.active_children() == []


# ------------------------------------------------------------------------------ case writer


def _outputs(case_dir: Path) -> list[write.OutputObject]:
    outputs, _ = build_outputs(deface_case(load_case(case_dir), DefaceOptions(eye_check=False)))
    return outputs


def _tree(root: Path, pattern: str = "*") -> dict[str, bytes | None]:
    """Every path below ``root`` matching ``pattern``: its bytes (None for a folder)."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
        for p in sorted(root.rglob(pattern))
    }


def test_a_case_written_in_steps_equals_one_written_at_once(tmp_path: Path, forks: None) -> None:
    write_case(tmp_path / "case", "hfs")
    outputs = _outputs(tmp_path / "case")
    write_atomic(outputs, tmp_path / "once")
    ct = [o for o in outputs if o.role == "CT"]
    with write.CaseWriter(tmp_path / "steps") as writer:
        writer.write(ct, background=True)
        assert len(multiprocessing.active_children()) == 1
        writer.write([o for o in outputs if o.role != "CT"])
        assert not (tmp_path / "steps").exists()  # nothing in place before the commit
        assert writer.commit({"extra.json": b"{}"}) == (tmp_path / "steps").absolute()
    once, steps = _tree(tmp_path / "once"), _tree(tmp_path / "steps")
    assert steps.pop("extra.json") == b"{}"
    assert steps == once and sum(v is not None for v in once.values()) == len(outputs)
    assert multiprocessing.active_children() == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".rtdeface-partial")] == []
    with pytest.raises(OutputError, match="already committed"):
        writer.write(ct)


def test_a_failing_step_leaves_nothing(tmp_path: Path, forks: None) -> None:
    write_case(tmp_path / "case", "hfs")
    outputs = _outputs(tmp_path / "case")
    with pytest.raises(RuntimeError, match="report failed"):
        with write.CaseWriter(tmp_path / "out") as writer:
            writer.write(outputs, background=True)
            raise RuntimeError("report failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]
    assert multiprocessing.active_children() == []


def test_a_failing_background_writer_fails_the_commit(
    tmp_path: Path, forks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_case(tmp_path / "case", "hfs")
    outputs = _outputs(tmp_path / "case")

    parent, real = os.getpid(), write.write_dicom

    def full_disk(path: Path, ds: Dataset) -> None:
        if os.getpid() != parent:
            raise OSError(28, "No space left on device")
        time.sleep(0.05)  # the child fails first, while this process takes slices too
        real(path, ds)

    monkeypatch.setattr(write, "write_dicom", full_disk)  # the forked child inherits it
    writer = write.CaseWriter(tmp_path / "out")
    writer.write([o for o in outputs if o.role == "CT"], background=True)
    with pytest.raises(OutputError, match="No space left on device"):
        writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]
    assert multiprocessing.active_children() == []


def test_large_values_are_written_as_pydicom_writes_them(tmp_path: Path) -> None:
    """Values of LARGE_VALUE_BYTES or more go to the file from their own bytes."""
    write_case(tmp_path / "case", "hfs")
    src = load_case(tmp_path / "case").ct.paths[0]
    ds = pydicom.dcmread(src)
    big = np.arange(300 * 300, dtype=np.uint16).reshape(300, 300) % 4096
    ds.Rows, ds.Columns = 300, 300
    raw = pydicom.dcmread(src)
    raw.Rows, raw.Columns = 300, 300
    raw[0x7FE00010] = raw.get_item(0x7FE00010)._replace(
        value=big.tobytes(), length=big.nbytes
    )  # still raw: the fast path
    assert big.nbytes >= write.LARGE_VALUE_BYTES
    ds.PixelData = big.tobytes()
    pydicom.dcmwrite(tmp_path / "ref.dcm", ds, enforce_file_format=True)
    write.write_dicom(tmp_path / "fast.dcm", raw)
    assert (tmp_path / "fast.dcm").read_bytes() == (tmp_path / "ref.dcm").read_bytes()
    assert np.array_equal(pydicom.dcmread(tmp_path / "fast.dcm").pixel_array, big)


# ------------------------------------------------------------------------------ scans, reads


def test_the_structures_job_scans_the_sequence_it_writes(tmp_path: Path, forks: None) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    pending = deface_case(case, DefaceOptions(eye_check=False), defer=True, parallel=True)
    job = pending.structures_work
    assert isinstance(job, StructuresJob) and job.forked and job.scanned is None
    assert pending.structures is not None and job.scanned is not None
    value, implicit, little, scan = job.scanned
    elem = pending.structures.dataset.get_item("ROIContourSequence")
    assert value == elem.value and (implicit, little) == (
        elem.is_implicit_VR,
        elem.is_little_endian,
    )
    assert scan == scan_raw_sequence(elem.value, elem.is_implicit_VR, elem.is_little_endian)
    assert scan.inert and len(scan.uids) > 10


def test_peek_uint_and_cached_keywords_equal_pydicoms(tmp_path: Path) -> None:
    write_case(tmp_path / "case", "unsigned")
    path = load_case(tmp_path / "case").ct.paths[2]
    ds, ref = pydicom.dcmread(path), pydicom.dcmread(path)
    for keyword in ("Rows", "Columns", "BitsAllocated", "PixelRepresentation"):
        assert peek_uint(ds, keyword) == int(ref.get(keyword))
        assert isinstance(ds.get_item(keyword), RawDataElement)  # still raw
    assert peek_uint(ds, "NumberOfFrames") is None  # absent
    parsed = copy.deepcopy(ref)
    parsed.Rows = 77  # a parsed element goes through pydicom
    assert peek_uint(parsed, "Rows") == 77
    for tag in (0x00100010, 0x00080018, 0x30060050, 0x00091001, 0x7FE00010):
        assert tag_keyword(tag) == keyword_for_tag(tag)


def test_sampling_marks_only_the_slices_in_the_region(tmp_path: Path) -> None:
    write_case(tmp_path / "case", "hfs")
    case = load_case(tmp_path / "case")
    defaced = deface_case(case, DefaceOptions(eye_check=False))
    cut, _ = defaced.region.sample(case.ct.grid)
    slices = defaced.region.slices_in_region(case.ct.grid)
    marked = np.flatnonzero(cut.any(axis=(1, 2)))
    assert 0 < len(marked) <= len(slices) < case.ct.grid.shape[0]
    assert set(marked) <= set(slices.tolist())
    z = case.ct.grid.slice_z_mm()
    assert np.all(z[slices] >= defaced.region.z_inferior_mm - 1e-6)
    every = deface_ct(case.ct, cut)
    some = deface_ct(case.ct, cut, slices)
    assert (every.voxels_in_cut, every.voxels_changed) == (some.voxels_in_cut, some.voxels_changed)
    assert every.voxels_in_cut == int(np.count_nonzero(cut))
    assert every.slices.keys() == some.slices.keys()
    assert all(np.array_equal(every.slices[k], some.slices[k]) for k in every.slices)


def test_the_writer_child_and_this_process_share_the_ct_slices(
    tmp_path: Path, forks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child writes from the first slice, this process from the last, each slice once."""
    write_case(tmp_path / "case", "hfs")
    outputs = _outputs(tmp_path / "case")
    ct = [o for o in outputs if o.role == "CT"]
    log = tmp_path / "who.txt"
    real = write.write_dicom
    parent = os.getpid()

    def logged(path: Path, ds: Dataset) -> None:
        if os.getpid() != parent:
            time.sleep(0.01)  # a slow child: this process must take part of the CT
        real(path, ds)
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {path.name}\n")

    monkeypatch.setattr(write, "write_dicom", logged)
    write_atomic(outputs, tmp_path / "out", parallel=True)
    lines = [line.split() for line in log.read_text().splitlines()]
    by = {name: int(pid) for pid, name in lines}
    assert len(lines) == len(by) == len(outputs)  # each object written once
    order = [by[Path(o.relpath).name] for o in ct]
    child_part = [pid for pid in order if pid != parent]
    assert 0 < len(child_part) < len(ct) and len(set(child_part)) == 1
    assert order == child_part + [parent] * (len(ct) - len(child_part))  # prefix, suffix
    assert all(by[Path(o.relpath).name] == parent for o in outputs if o.role != "CT")
    files = {name for name, data in _tree(tmp_path / "out").items() if data is not None}
    assert files == {o.relpath for o in outputs}
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("implicit", [False, True])
def test_empty_text_elements_are_written_as_pydicom_writes_them(
    tmp_path: Path, implicit: bool
) -> None:
    """Empty elements that were parsed (as pydicom leaves some of a real CT after reading)
    are written with a bare header."""
    write_case(tmp_path / "case", "hfs")
    ds = pydicom.dcmread(load_case(tmp_path / "case").ct.paths[0])
    for keyword in ("AccessionNumber", "ImageComments", "AcquisitionDate", "TimezoneOffsetFromUTC"):
        setattr(ds, keyword, "")
    ds.add_new(0x0040A160, "UT", "")  # TextValue: a long-length text VR
    ds.add_new(0x0008103E, "LO", None)  # SeriesDescription with no value
    if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    pydicom.dcmwrite(tmp_path / "in.dcm", ds, enforce_file_format=True, implicit_vr=implicit)
    read = pydicom.dcmread(tmp_path / "in.dcm")
    empty = ("AccessionNumber", "ImageComments", "AcquisitionDate", "TimezoneOffsetFromUTC")
    assert [read[k].value for k in (*empty, "TextValue")] == [""] * 5  # parsed now
    assert read["SeriesDescription"].value in ("", None)
    assert not isinstance(read.get_item("AccessionNumber"), RawDataElement)
    write.write_dicom(tmp_path / "ours.dcm", read)
    pydicom.dcmwrite(tmp_path / "pydicom.dcm", read, enforce_file_format=True)
    assert (tmp_path / "ours.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()


def _undefined_length_case(path: Path) -> None:
    """A CT header whose defined-length sequence item holds an undefined-length sequence."""
    ds = make_case()[0]
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "G-A101", "SRT", "Left"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D1100", "SRT", "Head"
    item.AnatomicRegionModifierSequence = pydicom.sequence.Sequence([inner])
    item["AnatomicRegionModifierSequence"].is_undefined_length = True
    ds.AnatomicRegionSequence = pydicom.sequence.Sequence([item])
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _deidentified_bytes(folder: Path, monkeypatch: pytest.MonkeyPatch, fork: bool) -> bytes:
    """The written bytes of that case, de-identified with a context built in a child
    (``fork``) or in this process."""
    monkeypatch.setattr(forking, "can_fork", lambda: fork)
    _undefined_length_case(folder / "in.dcm")
    objects = [pydicom.dcmread(folder / "in.dcm")]
    job = SessionJob(objects, DeidOptions(key=KEY), ct_defaced=True)
    assert job.forked == fork
    session = job.session(objects)
    out = copy_dataset(objects[0])
    session.process([out])
    write.write_dicom(folder / "out.dcm", out)
    return (folder / "out.dcm").read_bytes()


def test_sequence_lengths_are_kept_whether_or_not_the_context_parsed_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the context in this process parses the inputs' sequences before they are
    copied; built in a child it does not: the output keeps the input's undefined length (the
    sequence delimiter) either way, byte for byte."""
    written = []
    for fork in (True, False):
        (tmp_path / str(fork)).mkdir()
        written.append(_deidentified_bytes(tmp_path / str(fork), monkeypatch, fork))
        assert written[-1].count(b"\xfe\xff\xdd\xe0") == 1  # the one sequence delimiter
        back = pydicom.dcmread(tmp_path / str(fork) / "out.dcm")
        inner = back.AnatomicRegionSequence[0]["AnatomicRegionModifierSequence"]
        assert inner.is_undefined_length and inner.value[0].CodeMeaning == "Left"
    assert written[0] == written[1]


def test_odd_length_8_bit_pixel_data_is_padded(tmp_path: Path) -> None:
    ds = make_case()[0]
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 3, 8, 8, 7
    ds.PixelRepresentation, ds.SamplesPerPixel = 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(range(9)) + b"\x00"
    pydicom.dcmwrite(tmp_path / "in.dcm", ds, enforce_file_format=True)
    read = pydicom.dcmread(tmp_path / "in.dcm")
    assert isinstance(read.get_item("PixelData"), RawDataElement)
    new = np.arange(10, 19, dtype=np.uint8).reshape(3, 3)
    write._set_pixels(read, new)
    write.write_dicom(tmp_path / "ours.dcm", read)
    back = pydicom.dcmread(tmp_path / "ours.dcm")
    assert len(back.PixelData) == 10 and np.array_equal(back.pixel_array, new)
    pydicom.dcmwrite(tmp_path / "pydicom.dcm", read, enforce_file_format=True)
    assert (tmp_path / "ours.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()


@pytest.mark.parametrize(
    "ts", [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian]
)
def test_large_new_pixel_data_gives_pydicoms_bytes(tmp_path: Path, ts: str) -> None:
    ds = make_case()[0]
    ds.Rows, ds.Columns = 256, 200  # 100 KiB of pixels: a large value, passed to the file as is
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.zeros((256, 200), dtype="<i2").tobytes()
    ds.file_meta.TransferSyntaxUID = ts
    pydicom.dcmwrite(tmp_path / "in.dcm", ds, enforce_file_format=True)
    read = pydicom.dcmread(tmp_path / "in.dcm")
    new = np.arange(-25600, 25600, dtype="<i2").reshape(256, 200)
    write._set_pixels(read, new)
    elem = read.get_item("PixelData")
    assert isinstance(elem, RawDataElement) and elem.length == new.nbytes == 102400
    assert isinstance(elem.value, bytes)  # output datasets stay picklable
    write.write_dicom(tmp_path / "ours.dcm", read)
    pydicom.dcmwrite(tmp_path / "pydicom.dcm", read, enforce_file_format=True)
    assert (tmp_path / "ours.dcm").read_bytes() == (tmp_path / "pydicom.dcm").read_bytes()
    back = pydicom.dcmread(tmp_path / "ours.dcm")
    np.testing.assert_array_equal(back.pixel_array, new)


def _set_and_count(mask: np.ndarray) -> int:
    mask[:] = True
    return int(mask.sum())


def test_a_zeroed_mask_is_private_to_each_process(forks: None) -> None:
    from rtdeface.region import FRESH_MEMORY_BYTES, zeroed_mask

    mask = zeroed_mask((4, 512, 1024))
    assert mask.nbytes >= FRESH_MEMORY_BYTES and mask.flags.writeable and not mask.any()
    call = forking.Deferred.start(_set_and_count, mask)
    assert call.forked and call.result() == mask.size  # the child wrote all of its copy
    assert not mask.any()  # and this process's mask is untouched
    small = zeroed_mask((3, 4))
    assert small.shape == (3, 4) and not small.any()
