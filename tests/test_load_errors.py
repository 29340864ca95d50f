"""Bad input through the command line: every refusal is one clear line, a non-zero exit, no
output (not even a partial one) and untouched inputs.

Each case starts from the 'hfs' phantom (written once per module, copied per test) and breaks
one thing with pydicom.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from rtdeface.cli import main
from rtdeface.errors import InputError
from rtdeface.load import load_case

SLICE_MM = 2.5
"""CT slice spacing of the 'hfs' phantom (mm)."""


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rtdeface.phantom import write_phantom_case

    root = tmp_path_factory.mktemp("phantom")
    write_phantom_case(root / "hfs", "hfs")
    (root / "key.txt").write_text("load-errors-test-key-0123456789")
    return root


@pytest.fixture
def key(phantom: Path) -> Path:
    return phantom / "key.txt"


@pytest.fixture
def case(phantom: Path, tmp_path: Path) -> Path:
    """A fresh copy of the phantom case, alone in ``tmp_path``."""
    return Path(shutil.copytree(phantom / "hfs", tmp_path / "case"))


# ------------------------------------------------------------------------------- helpers


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def listing(folder: Path) -> set[str]:
    """Every entry (hidden ones too) directly in ``folder``."""
    return {p.name for p in folder.iterdir()}


def ct_files(case: Path) -> list[Path]:
    """CT slice files of ``case`` sorted by z (inferior first)."""
    files = sorted((case / "CT").glob("*.dcm"))
    return sorted(
        files,
        key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]),
    )


def edit(path: Path, change: Callable[[Dataset], None]) -> None:
    """Read ``path``, apply ``change`` and write it back in place (test set-up only)."""
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def new_sop_uid(ds: Dataset) -> None:
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid


def deface_args(case: Path, key: Path, *extra: str) -> list[str]:
    return [
        "deface",
        str(case),
        "-o",
        str(case.parent / "out"),
        "--deid-key-file",
        str(key),
        *extra,
    ]


def assert_refused(
    argv: list[str],
    case: Path,
    capsys: pytest.CaptureFixture[str],
    *patterns: str,
    code: int = 1,
) -> str:
    """Run ``main(argv)`` and check it refuses cleanly; return the error line.

    Checks: exit ``code``; stderr is exactly one line starting ``rtdeface: error:`` that
    matches every regular expression in ``patterns`` (case-insensitive); nothing new beside
    the case (no output, no ``.rtdeface-partial-*``, no audit file); every input byte intact.
    """
    parent = case.parent
    before_hashes = hashes(case)
    before_listing = listing(parent)
    got = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert got == code, captured.err
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("rtdeface: error: "), line
    for pattern in patterns:
        assert re.search(pattern, line, re.IGNORECASE), (pattern, line)
    assert listing(parent) == before_listing, sorted(listing(parent) ^ before_listing)
    assert not list(parent.glob(".rtdeface-partial-*"))
    assert hashes(case) == before_hashes
    return line


# ------------------------------------------------------------------------ CT series geometry


def test_missing_slice(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = ct_files(case)
    series = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    files[len(files) // 2].unlink()
    assert_refused(
        deface_args(case, key), case, capsys, "missing slice", re.escape(series), "re-export"
    )


def test_duplicate_slice(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = ct_files(case)[40]
    dup = src.with_name("CT_dup.dcm")
    shutil.copyfile(src, dup)
    edit(dup, new_sop_uid)
    assert_refused(deface_args(case, key), case, capsys, "duplicate slice position", "remove")


def test_irregular_spacing(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def shift(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z + 0.4 * SLICE_MM, 6)]

    edit(ct_files(case)[30], shift)
    assert_refused(deface_args(case, key), case, capsys, "irregular slice spacing", "re-export")


def test_gantry_tilt_attribute(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def tilt(ds: Dataset) -> None:
        ds.GantryDetectorTilt = 15

    for p in ct_files(case):
        edit(p, tilt)
    line = assert_refused(
        deface_args(case, key), case, capsys, r"gantry.?tilt|tilted.gantry", "resample"
    )
    assert "15" in line and ".dcm" in line


def test_gantry_tilt_sheared_stack(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for k, p in enumerate(ct_files(case)):

        def shear(ds: Dataset, k: int = k) -> None:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [round(x + 0.5 * k, 6), y, z]

        edit(p, shear)
    series = pydicom.dcmread(ct_files(case)[0], stop_before_pixels=True).SeriesInstanceUID
    assert_refused(
        deface_args(case, key), case, capsys, "gantry tilt", re.escape(series), "resample"
    )


def test_oblique_series(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All slices rotated 20 degrees about x, consistently, positions along the new normal."""
    a = math.radians(20.0)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, math.cos(a), math.sin(a)])
    normal = np.cross(row, col)
    files = ct_files(case)
    origin = np.array([float(v) for v in pydicom.dcmread(files[0]).ImagePositionPatient])
    for k, p in enumerate(files):

        def rotate(ds: Dataset, k: int = k) -> None:
            ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row, *col)]
            ds.ImagePositionPatient = [round(float(v), 6) for v in origin + k * SLICE_MM * normal]

        edit(p, rotate)
    series = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert_refused(
        deface_args(case, key),
        case,
        capsys,
        r"not along z|oblique",
        re.escape(series),
        "reformat",
    )


# ------------------------------------------------------------------- frames of reference


def test_rtdose_other_frame_of_reference(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def other_for(ds: Dataset) -> None:
        ds.FrameOfReferenceUID = generate_uid()

    edit(case / "RTDOSE.dcm", other_for)
    assert_refused(
        deface_args(case, key), case, capsys, "RTDOSE.dcm", "frame of reference", "remove"
    )


@pytest.mark.parametrize("roi_refs_too", [False, True], ids=["sequence", "sequence+rois"])
def test_rtstruct_other_frame_of_reference(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str], roi_refs_too: bool
) -> None:
    uid = generate_uid()

    def other_for(ds: Dataset) -> None:
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = uid
        if roi_refs_too:
            for item in ds.StructureSetROISequence:
                item.ReferencedFrameOfReferenceUID = uid

    edit(case / "RTSTRUCT.dcm", other_for)
    assert_refused(
        deface_args(case, key), case, capsys, "RTSTRUCT.dcm", "frame of reference", re.escape(uid)
    )


# ----------------------------------------------------------------------- unreadable files


def test_truncated_ct_file(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = ct_files(case)[45]
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert_refused(deface_args(case, key), case, capsys, "unreadable DICOM file", re.escape(p.name))


def test_dicm_preamble_then_garbage(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(1234)
    p = case / "garbage.dcm"
    p.write_bytes(b"\0" * 128 + b"DICM" + bytes(rng.randrange(256) for _ in range(4000)))
    assert_refused(
        deface_args(case, key), case, capsys, "unreadable DICOM file", "garbage.dcm", "remove"
    )


def test_non_dicom_files_are_ignored(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(99)
    (case / "notes.txt").write_text("exported from the TPS on Monday\n")
    (case / "blob.bin").write_bytes(bytes(rng.randrange(256) for _ in range(5000)))
    before = hashes(case)
    assert main(["-q", *deface_args(case, key), "--no-eye-check"]) == 0, capsys.readouterr().err
    out = case.parent / "out"
    assert len(list((out / "CT").iterdir())) == 92
    assert not {"notes.txt", "blob.bin"} & {p.name for p in out.rglob("*")}
    assert hashes(case) == before


def test_two_ct_series_in_one_folder(case: Path) -> None:
    """One case folder holds one CT series; ``load_case`` names both series it found.

    (The command line now treats such a folder as a batch of two cases, so the single-case
    refusal is checked where it lives, in :func:`rtdeface.load.load_case`.)
    """
    first = pydicom.dcmread(ct_files(case)[0], stop_before_pixels=True).SeriesInstanceUID
    second = generate_uid()
    for p in ct_files(case):

        def other_series(ds: Dataset) -> None:
            ds.SeriesInstanceUID = second
            new_sop_uid(ds)

        ds = pydicom.dcmread(p)
        other_series(ds)
        ds.save_as(p.with_name(f"S2_{p.name}"))
    before = hashes(case)
    with pytest.raises(InputError) as info:
        load_case(case)
    message = str(info.value)
    assert "\n" not in message
    assert first in message and second in message
    assert "one case per folder" in message
    assert hashes(case) == before


# ----------------------------------------------------------------------------- eye ROIs


def rename_eyes(case: Path) -> None:
    def rename(ds: Dataset) -> None:
        for item in ds.StructureSetROISequence:
            if item.ROIName in ("Eye_L", "Eye_R"):
                item.ROIName = {"Eye_L": "Struct_A", "Eye_R": "Struct_B"}[item.ROIName]

    edit(case / "RTSTRUCT.dcm", rename)


def test_no_eye_roi_lists_names(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rename_eyes(case)
    line = assert_refused(
        deface_args(case, key, "--eyes", "contours"),
        case,
        capsys,
        "no eye ROI",
        "RTSTRUCT.dcm",
        "--eye-roi",
    )
    for name in ("Struct_A", "Struct_B", "BODY", "PTV_Face"):
        assert name in line


def test_eye_roi_not_found(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = assert_refused(
        deface_args(case, key, "--eye-roi", "NOPE"), case, capsys, "NOPE", "not found"
    )
    assert "Eye_L" in line  # the names seen


@pytest.mark.parametrize("renamed", [False, True], ids=["Eye_L/Eye_R", "renamed"])
def test_eye_roi_named_explicitly(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str], renamed: bool
) -> None:
    names = ("Struct_A", "Struct_B") if renamed else ("Eye_L", "Eye_R")
    if renamed:
        rename_eyes(case)
    argv = deface_args(
        case, key, "--eyes", "contours", "--eye-roi", names[0], "--eye-roi", names[1]
    )
    assert main(["-q", *argv]) == 0, capsys.readouterr().err
    report = json.loads((case.parent / "out" / "rtdeface_report.json").read_text())
    assert sorted(report["landmarks"]["eye_rois"]) == sorted(names)
    assert report["landmarks"]["z_inferior_mm"] == 10.0
    assert report["landmarks"]["y_mid_mm"] == pytest.approx(-66.0, abs=1e-9)


# ------------------------------------------------------------------ corrupt RT objects


def test_contour_data_not_multiple_of_3(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def corrupt(ds: Dataset) -> None:
        item = ds.ROIContourSequence[0].ContourSequence[0]
        item.ContourData = list(item.ContourData)[:-1]

    edit(case / "RTSTRUCT.dcm", corrupt)
    assert_refused(deface_args(case, key), case, capsys, "RTSTRUCT.dcm", "corrupt", "multiple of 3")


def test_absolute_frame_offsets_contradict_ipp(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def absolute_offsets(ds: Dataset) -> None:
        z0 = float(ds.ImagePositionPatient[2])
        n = len(ds.GridFrameOffsetVector)
        ds.GridFrameOffsetVector = [z0 + 10.0 + 3.0 * k for k in range(n)]

    edit(case / "RTDOSE.dcm", absolute_offsets)
    assert_refused(deface_args(case, key), case, capsys, "RTDOSE.dcm", "GridFrameOffsetVector")


# ------------------------------------------------------------------------------- output


def test_output_not_empty(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = case.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    before_listing = listing(case.parent)
    before = hashes(case)
    assert main([*deface_args(case, key), "--no-eye-check"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("rtdeface: error: ") and str(out) in last and "not empty" in last
    assert listing(out) == {"keep.txt"}
    assert (out / "keep.txt").read_text() == "previous run"
    assert listing(case.parent) == before_listing  # no partial folder, no audit file
    assert hashes(case) == before


def test_output_not_empty_refused_before_work(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = case.parent / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    assert_refused(deface_args(case, key), case, capsys, re.escape(str(out)), "not empty")


@pytest.mark.parametrize("inside", ["defaced", "."], ids=["subfolder", "itself"])
def test_output_inside_input(
    case: Path, key: Path, capsys: pytest.CaptureFixture[str], inside: str
) -> None:
    out = case / inside
    argv = ["deface", str(case), "-o", str(out), "--deid-key-file", str(key)]
    assert_refused(argv, case, capsys, "inside the input", code=2)
    assert not (case / "defaced").exists()


# ----------------------------------------------------------------------- de-identification


def test_no_key_is_a_usage_error(
    case: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RTDEFACE_KEY", raising=False)
    argv = ["deface", str(case), "-o", str(case.parent / "out")]
    assert_refused(
        argv, case, capsys, "no de-identification key", "--deid-key-file", "--random-key", code=2
    )


def test_no_deid_runs_without_key(
    case: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RTDEFACE_KEY", raising=False)
    before = hashes(case)
    out = case.parent / "out"
    assert main(["deface", str(case), "-o", str(out), "--no-deid", "--no-eye-check"]) == 0
    captured = capsys.readouterr()
    assert "--no-deid" in captured.err and "NOT de-identified" in captured.out
    report = json.loads((out / "rtdeface_report.json").read_text())
    assert report["deidentification"]["applied"] is False
    assert not (case.parent / "out.audit.json").exists()
    assert hashes(case) == before


def test_what_if_writes_nothing(case: Path, key: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before_listing = listing(case.parent)
    before = hashes(case)
    assert main([*deface_args(case, key), "--what-if"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "nothing written" in lines[0]
    assert lines[1].split()[:4] == ["object", "action", "attribute", "n"]
    body = [ln.split() for ln in lines[2:]]
    assert {row[0] for row in body} >= {"CT", "RTSTRUCT", "RTDOSE", "RTPLAN"}
    assert any(row[0] == "CT" and row[2] == "PatientName" for row in body)
    assert listing(case.parent) == before_listing
    assert hashes(case) == before


def test_what_if_with_no_deid_is_a_usage_error(
    case: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deface", str(case), "-o", str(case.parent / "out"), "--no-deid", "--what-if"]
    got = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert got == 2
    # the --no-deid warning is logged first; the error is the last line
    assert err[-1].startswith("rtdeface: error: --what-if")
    assert not (case.parent / "out").exists()
