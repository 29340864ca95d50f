"""Deferred CT pixel data: single-case runs read CT slices without their pixel data, read the
pixels of the slices they change, and copy the rest from the input files into the outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from rtdeface import forking, write
from rtdeface.cli import main
from rtdeface.deid import DeidOptions
from rtdeface.discover import (
    DEFER_PIXELS_MIN_BYTES,
    KEEP_DATASETS_MAX_BYTES,
    assemble_single_case,
    deferred_pixel_data,
    index_tree,
    read_dicom,
)
from rtdeface.errors import InputError
from rtdeface.load import Case, DoseGrid, copy_dataset, load_case, load_case_files, native_pixels
from rtdeface.phantom import write_phantom_case as write_case
from rtdeface.pipeline import DefaceOptions, deface_case
from rtdeface.write import build_outputs, write_atomic
from tests.helpers import assert_nothing_written
from tests.test_deid import KEY


def _case_files(case_dir: Path) -> tuple[list[Path], Path, Path]:
    ct = sorted((case_dir / "CT").glob("*.dcm"))
    return ct, case_dir / "RTSTRUCT.dcm", case_dir / "RTDOSE.dcm"


def _elements(ds: pydicom.Dataset) -> dict[int, tuple[object, ...]]:
    """Every element as stored (raw fields, or the parsed value), deferred values as None."""
    out: dict[int, tuple[object, ...]] = {}
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement):
            out[int(tag)] = (elem.VR, elem.length, elem.value, elem.value_tell)
        else:
            out[int(tag)] = (elem.VR, elem.value)
    return out


@pytest.mark.parametrize("variant", ["hfs", "unsigned", "ffp"])
def test_a_deferred_read_holds_every_element_of_a_full_read(tmp_path: Path, variant: str) -> None:
    write_case(tmp_path, variant)
    ct, rtstruct, rtdose = _case_files(tmp_path)
    for path in ct[:3]:
        full = read_dicom(path, header_only=False)
        lazy = read_dicom(path, header_only=False, defer_pixels=True)
        assert full is not None and lazy is not None
        pixels = full.get_item(0x7FE00010)
        deferred = deferred_pixel_data(lazy)
        assert deferred is not None and deferred.value is None
        assert deferred.length == len(pixels.value) == path.stat().st_size - deferred.value_tell
        expected = _elements(full)
        got = _elements(lazy)
        assert got.pop(0x7FE00010) == (pixels.VR, pixels.length, None, pixels.value_tell)
        expected.pop(0x7FE00010)
        assert got == expected
        assert lazy.PixelData == pixels.value  # pydicom still reads it on demand
    for path in (rtstruct, rtdose):  # other objects are read whole
        lazy = read_dicom(path, header_only=False, defer_pixels=True)
        assert lazy is not None and deferred_pixel_data(lazy) is None
        assert _elements(lazy) == _elements(read_dicom(path, header_only=False))  # type: ignore[arg-type]


def test_compressed_small_and_trailed_pixel_data_are_read_whole(tmp_path: Path) -> None:
    write_case(tmp_path / "rle", "rle")
    rle = _case_files(tmp_path / "rle")[0][0]
    lazy = read_dicom(rle, header_only=False, defer_pixels=True)
    assert lazy is not None and deferred_pixel_data(lazy) is None
    assert lazy.get_item(0x7FE00010).value == read_dicom(rle, header_only=False).PixelData  # type: ignore[union-attr]

    write_case(tmp_path / "hfs", "hfs")
    src = _case_files(tmp_path / "hfs")[0][0]
    ds = pydicom.dcmread(src)
    ds.DataSetTrailingPadding = b"\x00" * 8  # (FFFC,FFFC) after the pixel data
    trailed = tmp_path / "trailed.dcm"
    ds.save_as(trailed, enforce_file_format=True)
    lazy = read_dicom(trailed, header_only=False, defer_pixels=True)
    assert lazy is not None and deferred_pixel_data(lazy) is None
    assert lazy.get_item(0xFFFCFFFC).value == b"\x00" * 8
    assert lazy.get_item(0x7FE00010).value == ds.PixelData

    signed = pydicom.dcmread(src)  # sign extension needed: pydicom decodes it, read whole
    signed.PixelRepresentation, signed.BitsStored, signed.HighBit = 1, 12, 11
    signed_path = tmp_path / "signed12.dcm"
    signed.save_as(signed_path, enforce_file_format=True)
    lazy = read_dicom(signed_path, header_only=False, defer_pixels=True)
    assert lazy is not None and deferred_pixel_data(lazy) is None
    assert lazy.get_item(0x7FE00010).value == signed.PixelData

    small = pydicom.dcmread(src)
    small.Rows, small.Columns = 8, 8
    small.PixelData = b"\x01\x00" * 64  # 128 bytes: read with the header
    assert 128 < DEFER_PIXELS_MIN_BYTES
    small_path = tmp_path / "small.dcm"
    small.save_as(small_path, enforce_file_format=True)
    lazy = read_dicom(small_path, header_only=False, defer_pixels=True)
    assert lazy is not None and deferred_pixel_data(lazy) is None
    assert lazy.get_item(0x7FE00010).value == small.PixelData


def test_a_truncated_slice_is_still_reported(tmp_path: Path) -> None:
    write_case(tmp_path, "hfs")
    path = _case_files(tmp_path)[0][0]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated"):
        read_dicom(path, header_only=False, defer_pixels=True)


def _deferred_case(case_dir: Path) -> Case:
    """The case loaded as a single-case run loads it (one read of each file, kept)."""
    tree = index_tree(case_dir, keep_datasets_bytes=KEEP_DATASETS_MAX_BYTES)
    return load_case_files(assemble_single_case(tree.records, case_dir), datasets=tree.datasets)


@pytest.mark.parametrize("variant", ["hfs", "unsigned", "reversed", "slope"])
def test_deferred_slices_give_the_same_pixels_and_files(tmp_path: Path, variant: str) -> None:
    write_case(tmp_path / "case", variant)
    full = load_case(tmp_path / "case")
    lazy = _deferred_case(tmp_path / "case")
    assert all(deferred_pixel_data(ds) is not None for ds in lazy.ct.datasets)
    for k in range(len(full.ct.datasets)):
        expected = full.ct.stored_slice(k)
        got = lazy.ct.stored_slice(k)
        writable = lazy.ct.stored_slice(k, writable=True)
        assert got.dtype == expected.dtype and np.array_equal(got, expected)
        assert not got.flags.writeable and writable.flags.writeable
        assert np.array_equal(writable, expected)
    assert all(deferred_pixel_data(ds) is not None for ds in lazy.ct.datasets)  # none kept
    for deid in (None, DeidOptions(key=KEY)):
        outs = []
        for case, name in ((full, "full"), (lazy, "lazy")):
            outputs, _ = build_outputs(deface_case(case, DefaceOptions(eye_check=False)), deid)
            write_atomic(outputs, tmp_path / f"{name}{deid is not None}", parallel=True)
            outs.append(tmp_path / f"{name}{deid is not None}")
        files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.dcm"))
        assert len(files) == len(full.ct.datasets) + 3
        for rel in files:
            assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel


def test_write_dicom_copies_deferred_pixels_as_pydicom_writes_them(tmp_path: Path) -> None:
    write_case(tmp_path / "case", "hfs")
    path = _case_files(tmp_path / "case")[0][5]
    lazy = read_dicom(path, header_only=False, defer_pixels=True)
    assert lazy is not None
    copy = copy_dataset(lazy)  # an output copy still knows its source
    assert deferred_pixel_data(copy) is not None
    write.write_dicom(tmp_path / "ours.dcm", copy)
    pydicom.dcmwrite(
        tmp_path / "theirs.dcm", read_dicom(path, header_only=False), enforce_file_format=True
    )  # type: ignore[arg-type]
    assert (tmp_path / "ours.dcm").read_bytes() == (tmp_path / "theirs.dcm").read_bytes()
    assert deferred_pixel_data(copy) is not None  # copied from the file, not read into it
    # a syntax write_dicom leaves to pydicom: pydicom reads the deferred value from the file
    other = copy_dataset(lazy)
    other.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    write.write_dicom(tmp_path / "implicit.dcm", other)
    assert pydicom.dcmread(tmp_path / "implicit.dcm").PixelData == pydicom.dcmread(path).PixelData


@pytest.mark.parametrize("which", [0, -1])  # written by the writer child / by the parent
def test_a_slice_changed_after_reading_stops_the_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: int
) -> None:
    write_case(tmp_path / "case", "hfs")
    lazy = _deferred_case(tmp_path / "case")
    outputs, _ = build_outputs(deface_case(lazy, DefaceOptions(eye_check=False)), None)
    unchanged = [o for o in outputs if o.role == "CT" and deferred_pixel_data(o.dataset)]
    assert len(unchanged) > 2  # slices below the cut are copied from their files
    source = Path(unchanged[which].dataset.filename)
    data = source.read_bytes()
    source.write_bytes(data[:-2] + b"\x07\x00")  # same size, new content and time
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    monkeypatch.setattr(forking, "can_fork", lambda: True)  # even with pytest's threads
    out = tmp_path / "out"
    with pytest.raises(InputError, match="changed while rtdeface was reading it"):
        write_atomic(outputs, out, parallel=True)
    assert_nothing_written(out)
    with pytest.raises(InputError, match="changed while rtdeface was reading it"):
        lazy.ct.stored_slice(lazy.ct.paths.index(source))
    source.unlink()  # gone: a one-line input error as well
    with pytest.raises(InputError, match="cannot read it again"):
        write_atomic(outputs, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("kernel", ["nothing", "error"])
def test_pixels_are_copied_by_hand_where_the_kernel_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    write_case(tmp_path / "case", "hfs")
    path = _case_files(tmp_path / "case")[0][5]
    lazy = read_dicom(path, header_only=False, defer_pixels=True)
    assert lazy is not None and deferred_pixel_data(lazy) is not None

    def copy_file_range(*args: object) -> int:
        if kernel == "error":
            raise OSError(18, "Invalid cross-device link")
        return 0

    monkeypatch.setattr(os, "copy_file_range", copy_file_range, raising=False)
    write.write_dicom(tmp_path / "ours.dcm", copy_dataset(lazy))
    full = read_dicom(path, header_only=False)
    pydicom.dcmwrite(tmp_path / "theirs.dcm", full, enforce_file_format=True)  # type: ignore[arg-type]
    assert (tmp_path / "ours.dcm").read_bytes() == (tmp_path / "theirs.dcm").read_bytes()


def test_the_cli_writes_the_pixels_of_a_full_read(tmp_path: Path) -> None:
    write_case(tmp_path / "case", "hfs")
    cli = ["-q", "deface", str(tmp_path / "case"), "-o", str(tmp_path / "cli"), "--random-key"]
    assert main(cli) == 0
    full = load_case(tmp_path / "case")
    outputs, _ = build_outputs(deface_case(full, DefaceOptions()), DeidOptions(key=KEY))
    ct = [o for o in outputs if o.role == "CT"]
    changed = 0
    for obj in ct:  # pixel data do not depend on the key
        written = pydicom.dcmread(tmp_path / "cli" / obj.relpath)
        assert written.PixelData == obj.dataset.PixelData, obj.relpath
        changed += written.PixelData != pydicom.dcmread(full.ct.paths[ct.index(obj)]).PixelData
    assert len(ct) == len(full.ct.datasets) and 0 < changed < len(ct)


def test_dose_pixels_are_viewed_like_pydicom_decodes_them(tmp_path: Path) -> None:
    for variant in ("hfs", "dose_desc"):
        write_case(tmp_path / variant, variant)
        dose = load_case(tmp_path / variant).doses[0]
        native = native_pixels(dose.dataset, dose.path)
        assert native is not None and not native.flags.writeable
        expected = dose.dataset.pixel_array.reshape(dose.grid.shape)
        assert dose.stored().dtype == expected.dtype
        assert np.array_equal(dose.stored(), expected)
    # unused high bits: pydicom masks them, so such doses are decoded by pydicom
    ds = dose.dataset
    ds.BitsStored = ds.BitsAllocated - 4
    ds.HighBit = ds.BitsStored - 1
    masked = DoseGrid(dose.grid, ds, dose.path).stored()
    assert np.array_equal(masked, ds.pixel_array.reshape(dose.grid.shape))


def test_a_replacement_that_keeps_size_and_time_is_noticed(tmp_path: Path) -> None:
    write_case(tmp_path / "case", "hfs")
    lazy = _deferred_case(tmp_path / "case")
    path = lazy.ct.paths[0]
    before = path.stat()
    new = path.with_suffix(".new")
    new.write_bytes(path.read_bytes()[:-2] + b"\x07\x00")
    os.utime(new, ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p or rsync -t
    os.replace(new, path)
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(InputError, match="changed while rtdeface was reading it"):
        lazy.ct.stored_slice(0)


@pytest.mark.parametrize("layout", ["odd_implicit", "odd_explicit", "un_explicit"])
def test_odd_and_un_labelled_pixel_data_are_written_as_pydicom_writes_them(
    tmp_path: Path, layout: str
) -> None:
    write_case(tmp_path / "case", "hfs")
    ds = pydicom.dcmread(_case_files(tmp_path / "case")[0][3])
    implicit = layout == "odd_implicit"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    if layout.startswith("odd"):  # 8-bit pixels, an odd count: stored with or without a pad
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.Rows = ds.Columns = 181
        ds.PixelData = bytes(range(256)) * 127 + b"\x05" * (181 * 181 - 256 * 127)
        ds["PixelData"].VR = "OB"
    else:
        ds["PixelData"].VR = "UN"
    path = tmp_path / "in.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True, implicit_vr=implicit)
    if layout == "odd_explicit":  # an odd length as some writers store it (no pad byte)
        data = bytearray(path.read_bytes())
        at = data.rfind(b"\xe0\x7f\x10\x00OB")
        data[at + 8 : at + 12] = (181 * 181).to_bytes(4, "little")
        path.write_bytes(bytes(data[:-1]))
    for defer in (False, True):
        read = read_dicom(path, header_only=False, defer_pixels=defer)
        assert read is not None
        write.write_dicom(tmp_path / "ours.dcm", copy_dataset(read))
        full = read_dicom(path, header_only=False)
        pydicom.dcmwrite(tmp_path / "theirs.dcm", full, enforce_file_format=True)  # type: ignore[arg-type]
        assert (tmp_path / "ours.dcm").read_bytes() == (tmp_path / "theirs.dcm").read_bytes()
