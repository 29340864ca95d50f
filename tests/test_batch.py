"""Batch mode over a messy tree: discovery, failure isolation, resume, summary, Dask."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from rtdeface.batch import MANIFEST_NAME, SUMMARY_COLUMNS
from rtdeface.cli import main
from rtdeface.discover import discover_cases
from rtdeface.phantom import write_phantom_case

KEY = "batch-test-key-0123456789"
PHANTOM_ID, PHANTOM_NAME = "PH-0001", "PHANTOM"


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _flatten(src: Path, dst: Path, prefix: str) -> None:
    """Move every file of a phantom case into one flat folder (TPS 'everything in one')."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.rglob("*.dcm")):
        shutil.move(str(p), dst / f"{prefix}_{p.name}")
    shutil.rmtree(src)


def _rename_eyes(rtstruct: Path) -> None:
    ds = pydicom.dcmread(rtstruct)
    for roi in ds.StructureSetROISequence:
        roi.ROIName = {"Eye_L": "Sphere_A", "Eye_R": "Sphere_B"}.get(roi.ROIName, roi.ROIName)
    ds.save_as(rtstruct)


def build_messy_tree(root: Path) -> Path:
    """Folder per patient, nested export, flat folder, a case without eye-named ROIs, an
    orphan dose, a corrupt file and a text file."""
    inp = root / "in"
    write_phantom_case(inp / "DOE_JOHN", "hfs")
    write_phantom_case(inp / "export" / "2024" / "SMITH", "ffs")
    for variant in ("hfp", "rle"):
        write_phantom_case(root / "tmp" / variant, variant)
        _flatten(root / "tmp" / variant, inp / "flat", variant)
    noeyes = write_phantom_case(inp / "NOEYES", "slope")
    _rename_eyes(noeyes.rtstruct_path)
    orphan = write_phantom_case(root / "tmp" / "orphan", "dose_abs")
    (inp / "orphans").mkdir()
    shutil.copy(orphan.rtdose_path, inp / "orphans" / "RTDOSE.dcm")
    (inp / "corrupt.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 4)
    (inp / "README.txt").write_text("exported by the TPS\n")
    shutil.rmtree(root / "tmp")
    return inp


def read_summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "key.txt"
    path.write_text(KEY)
    return path


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory, key: Path) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("messy")
    inp = build_messy_tree(root)
    before = _tree_hashes(inp)
    out = root / "out"
    argv = ["-q", "deface", str(inp), "-o", str(out), "--deid-key-file", str(key)]
    code = main([*argv, "--eyes", "contours", "--jobs", "2"])
    assert code == 1
    return inp, out, before


def test_discovery_finds_cases_and_problems(messy: tuple[Path, Path, dict[str, str]]) -> None:
    inp, _, _ = messy
    tree = discover_cases(inp, jobs=2)
    folders = sorted(str(c.folder.relative_to(inp)) for c in tree.cases)
    assert folders == ["DOE_JOHN", "NOEYES", "export/2024/SMITH", "flat", "flat"]
    for c in tree.cases:
        assert c.counts() == {"CT": 92, "RTSTRUCT": 1, "RTDOSE": 1, "RTPLAN": 1, "OTHER": 0}
    kinds = sorted((p.kind, len(p.files)) for p in tree.problems)
    assert kinds == [("orphan", 1), ("unreadable", 1)]
    assert [p.name for p in tree.index.non_dicom] == ["README.txt"]


def test_every_good_case_done_problems_listed(messy: tuple[Path, Path, dict[str, str]]) -> None:
    inp, out, before = messy
    rows = read_summary(out)
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    status = sorted(r["status"] for r in rows)
    assert status == ["done"] * 4 + ["failed", "orphan", "unreadable"]
    failed = next(r for r in rows if r["status"] == "failed")
    assert failed["reason"].startswith("LandmarkError:")
    assert "Sphere_A" in failed["reason"]  # the names seen, so the user can pass --eye-roi
    for r in rows:
        if r["status"] == "done":
            case = out / r["case"]
            assert r["case"].startswith(r["pseudonym"] + "_")
            assert sorted(p.name for p in case.iterdir()) == [
                "CT",
                "RTDOSE_1.dcm",
                "RTPLAN_1.dcm",
                "RTSTRUCT.dcm",
                "rtdeface_report.json",
            ]
            assert len(list((case / "CT").iterdir())) == 92
            assert r["eyes_source"] == "contours" and r["eye_rois"] == "Eye_L;Eye_R"
            assert float(r["z_inferior_mm"]) == 10.0 and float(r["y_mid_mm"]) == -66.0
            assert float(r["preserved_in_region_ml"]) > 0
            assert int(r["ct_voxels_changed"]) > 0 and int(r["dose_voxels_zeroed"]) > 0
            assert "Lens_L" in r["rois_removed"]
    assert _tree_hashes(inp) == before  # inputs never modified
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == len(rows) and summary["counts"]["done"] == 4


def test_no_phi_in_output_root(messy: tuple[Path, Path, dict[str, str]]) -> None:
    inp, out, _ = messy
    ct_uid = str(pydicom.dcmread(next((inp / "DOE_JOHN" / "CT").iterdir())).SeriesInstanceUID)
    for name in ("summary.csv", "summary.json", MANIFEST_NAME, "rtdeface.log"):
        text = (out / name).read_text()
        for phi in (str(inp), "DOE_JOHN", "SMITH", PHANTOM_ID, PHANTOM_NAME, ct_uid):
            assert phi not in text, (name, phi)
    for p in out.rglob("*"):
        assert "DOE" not in p.name and "SMITH" not in p.name
    audit = out.with_name(out.name + ".audit.json")
    assert audit.stat().st_mode & 0o777 == 0o600
    assert PHANTOM_ID in audit.read_text()
    cases = out.with_name(out.name + ".audit-cases.json")
    assert cases.stat().st_mode & 0o777 == 0o600 and "DOE_JOHN" in cases.read_text()


def test_rerun_reuses_completed_cases(messy: tuple[Path, Path, dict[str, str]], key: Path) -> None:
    inp, out, _ = messy
    done = {r["case"] for r in read_summary(out) if r["status"] == "done"}
    mtimes = {c: (out / c / "RTSTRUCT.dcm").stat().st_mtime_ns for c in done}
    argv = ["-q", "deface", str(inp), "-o", str(out), "--deid-key-file", str(key)]
    code = main([*argv, "--eyes", "contours", "--jobs", "2"])
    assert code == 1
    rows = read_summary(out)
    assert {r["case"] for r in rows if r["reused"] == "True"} == done
    assert {c: (out / c / "RTSTRUCT.dcm").stat().st_mtime_ns for c in done} == mtimes
    assert sum(r["status"] == "failed" for r in rows) == 1  # the failed case was tried again


def test_inspect_tree(
    messy: tuple[Path, Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    inp, _, _ = messy
    assert main(["inspect", str(inp)]) == 1
    text = capsys.readouterr().out
    assert "5 case(s)" in text and "orphan RTDOSE" in text and "corrupt.dcm" in text


# ---------------------------------------------------------------- resume and Dask


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, key: Path) -> tuple[Path, Path]:
    """Three good cases and the output of one uninterrupted run."""
    root = tmp_path_factory.mktemp("small")
    inp = root / "in"
    for variant in ("hfs", "hfp", "dose_desc"):
        write_phantom_case(inp / variant, variant)
    ref = root / "ref"
    assert (
        main(["-q", "deface", str(inp), "-o", str(ref), "--deid-key-file", str(key), "-j", "2"])
        == 0
    )
    return inp, ref


def assert_same_outputs(a: Path, b: Path) -> None:
    """Byte-identical DICOM, reports equal but for timings, same summary but for timings."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.suffix == ".dcm":
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
        elif rel.name == "rtdeface_report.json":
            ra, rb = (json.loads((x / rel).read_text()) for x in (a, b))
            ra.pop("timings_s"), rb.pop("timings_s")
            assert ra == rb, rel
    ta = [{k: v for k, v in r.items() if not k.startswith("time_")} for r in read_summary(a)]
    tb = [{k: v for k, v in r.items() if not k.startswith("time_")} for r in read_summary(b)]
    for r in ta + tb:
        r.pop("reused")
    assert ta == tb


def test_sigkill_mid_batch_then_resume(small: tuple[Path, Path], key: Path, tmp_path: Path) -> None:
    inp, ref = small
    out = tmp_path / "out"
    before = _tree_hashes(inp)
    cmd = [sys.executable, "-m", "rtdeface.cli", "-q", "deface", str(inp), "-o", str(out)]
    proc = subprocess.Popen([*cmd, "--deid-key-file", str(key), "-j", "1"], start_new_session=True)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            manifest = out / MANIFEST_NAME
            if manifest.is_file() and json.loads(manifest.read_text())["cases"]:
                break
            assert proc.poll() is None, "the batch ended before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    visible = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert 1 <= len(visible) < 3
    for case in visible:  # no half-written case is visible
        assert (case / "rtdeface_report.json").is_file()
    assert (
        main(["-q", "deface", str(inp), "-o", str(out), "--deid-key-file", str(key), "-j", "2"])
        == 0
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".rtdeface-partial")]
    assert sum(r["reused"] == "True" for r in read_summary(out)) >= 1
    (out / ".rtdeface.lock").unlink()
    (ref / ".rtdeface.lock").unlink(missing_ok=True)
    for name in ("rtdeface.log", MANIFEST_NAME):
        (out / name).unlink()
    shutil.copytree(
        ref,
        tmp_path / "ref",
        ignore=shutil.ignore_patterns("rtdeface.log", MANIFEST_NAME, ".rtdeface.lock"),
    )
    assert_same_outputs(tmp_path / "ref", out)
    assert _tree_hashes(inp) == before


def test_dask_local_cluster_same_outputs(
    small: tuple[Path, Path], key: Path, tmp_path: Path
) -> None:
    distributed = pytest.importorskip("distributed")
    inp, ref = small
    out = tmp_path / "out"
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
    ) as cluster:
        argv = ["-q", "deface", str(inp), "-o", str(out), "--deid-key-file", str(key)]
        assert main([*argv, "--scheduler", cluster.scheduler_address]) == 0
    keep = shutil.ignore_patterns("rtdeface.log", MANIFEST_NAME, ".rtdeface.lock")
    shutil.copytree(ref, tmp_path / "ref", ignore=keep)
    shutil.copytree(out, tmp_path / "dask", ignore=keep)
    assert_same_outputs(tmp_path / "ref", tmp_path / "dask")


@pytest.mark.realdata
def test_real_case_in_a_tree(shared_data: Path, key: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    shutil.copytree(shared_data / "onko_hn_eyes", inp / "real")
    write_phantom_case(inp / "phantom", "hfs")
    orphan = write_phantom_case(tmp_path / "o", "dose_abs")
    shutil.copy(orphan.rtdose_path, inp / "orphan_dose.dcm")
    out = tmp_path / "out"
    argv = ["-q", "deface", str(inp), "-o", str(out), "--deid-key-file", str(key), "-j", "2"]
    assert main(argv) == 1
    rows = read_summary(out)
    assert sorted(r["status"] for r in rows) == ["done", "done", "orphan"]
    real = next(r for r in rows if r["ct_slices"] == "186")
    assert real["eyes_source"] == "contours"
    assert float(real["z_inferior_mm"]) == pytest.approx(-628.0)
    assert float(real["preserved_in_region_ml"]) >= 0  # this case's PTVs lie below the eyes
    assert int(real["ct_voxels_changed"]) > 0
    assert len(list((out / real["case"] / "CT").iterdir())) == 186
