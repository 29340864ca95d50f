"""The command line, driven through ``rtdeface.cli.main([...])`` on the 'hfs' phantom."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtdeface import __version__
from rtdeface.cli import main
from rtdeface.phantom import BOXES_MM, compute_truth, write_phantom_case
from tests.helpers import read_ct

N_CT = 92
"""CT slices of the 'hfs' phantom."""

TRUTH = compute_truth("hfs")


class Run:
    """The phantom case, its keys and the outputs made once per module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.case = root / "hfs"
        self.key_a = root / "key_a.txt"
        self.key_b = root / "key_b.txt"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    r = Run(tmp_path_factory.mktemp("cli"))
    write_phantom_case(r.case, "hfs")
    r.key_a.write_text("cli-test-key-A-0123456789abcdef")
    r.key_b.write_text("cli-test-key-B-0123456789abcdef")
    return r


def deface(run: Run, out: Path, key: Path, *extra: str) -> None:
    argv = ["-q", "deface", str(run.case), "-o", str(out), "--deid-key-file", str(key), *extra]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def out_a(run: Run) -> Path:
    out = run.root / "out_a"
    deface(run, out, run.key_a)
    return out


def dicom_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.dcm"))


def report(out: Path) -> dict[str, object]:
    data = json.loads((out / "rtdeface_report.json").read_text())
    assert isinstance(data, dict)
    return data


# ------------------------------------------------------------------------------ usage


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"rtdeface {__version__}"


def test_no_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "rtdeface: error: a command is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        ["frobnicate"],
        ["deface", "CASE"],  # no -o
        ["deface", "CASE", "-o", "OUT", "--eyes", "nose"],
        ["deface", "CASE", "-o", "OUT", "--keep-margin", "two"],
        ["inspect", "CASE", "--bogus"],
    ],
    ids=["option", "command", "no-output", "bad-choice", "bad-number", "inspect-option"],
)
def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    argv = [str(tmp_path / a) if a in ("CASE", "OUT") else a for a in argv]
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_keep_private_is_usage_error(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "deface",
        str(run.case),
        "-o",
        str(tmp_path / "out"),
        "--deid-key-file",
        str(run.key_a),
        "--keep-private",
        "zz,1010",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rtdeface: error: --keep-private")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- inspect


def test_inspect_table(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(run.case)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"CT: {N_CT} slices 128x128, spacing [2.5, 2.0, 2.0] mm")
    assert "HFS" in lines[0]
    rois = {ln.split()[2]: ln for ln in lines if ln.lstrip().startswith("ROI ")}
    assert len(rois) == 16
    preserved = {name for name, ln in rois.items() if "preserved" in ln.split()[3:]}
    assert preserved == {"PTV_Face", "PTV_Neck"}
    assert {name for name, ln in rois.items() if "eye-name" in ln} == {"Eye_L", "Eye_R"}
    assert lines[-1] == ("landmarks (contours: Eye_L, Eye_R): z >= 10.00 mm and y < -66.00 mm")


def test_inspect_json(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(run.case), "--json", "--keep", "brainstem"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ct"]["slices"] == N_CT
    assert info["plans"] == 1 and len(info["doses"]) == 1
    lm = info["landmarks"]
    assert lm["source"] == "contours"
    assert sorted(lm["eyes"]) == ["Eye_L", "Eye_R"]
    assert lm["z_inferior_mm"] == TRUTH.z_inferior_eye_mm == 10.0
    assert lm["y_mid_mm"] == pytest.approx(TRUTH.y_mid_mm, abs=1e-9)
    assert lm["cut"] == "z >= 10.00 mm and y < -66.00 mm"
    preserved = {r["name"] for r in info["rois"] if r["preserved"]}
    assert preserved == {"PTV_Face", "PTV_Neck", "Brainstem"}


def test_inspect_writes_nothing(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in run.case.rglob("*"))
    assert main(["inspect", str(run.case), "--json"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in run.case.rglob("*")) == before


# ----------------------------------------------------------------------------- deface


def test_deface_layout_and_audit(run: Run, out_a: Path) -> None:
    files = sorted(str(p.relative_to(out_a)) for p in out_a.rglob("*") if p.is_file())
    ct = [f for f in files if f.startswith("CT/")]
    assert len(ct) == N_CT
    assert ct == [f"CT/CT_{k:04d}.dcm" for k in range(1, N_CT + 1)]
    assert sorted(set(files) - set(ct)) == [
        "RTDOSE_1.dcm",
        "RTPLAN_1.dcm",
        "RTSTRUCT.dcm",
        "rtdeface_report.json",
    ]
    audit = out_a.with_name(out_a.name + ".audit.json")
    assert audit.is_file()
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    assert not [p for p in out_a.rglob("*") if "audit" in p.name]
    record = json.loads(audit.read_text())["cases"]
    assert len(record) == 1
    # the audit holds the original ID; the output does not
    assert "PH-0001" in audit.read_text()
    for p in out_a.rglob("*"):
        if p.is_file():
            assert b"PH-0001" not in p.read_bytes(), p
    assert report(out_a)["deidentification"]["applied"] is True  # type: ignore[index]


def test_custom_audit_path(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    inside = [
        "-q",
        "deface",
        str(run.case),
        "-o",
        str(out),
        "--deid-key-file",
        str(run.key_a),
        "--audit",
        str(out / "audit.json"),
    ]
    assert main(inside) == 2
    assert "inside the output" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_same_key_is_byte_identical(run: Run, out_a: Path) -> None:
    out_a2 = run.root / "out_a2"
    deface(run, out_a2, run.key_a, "--audit", str(run.root / "a2.audit.json"))
    names = dicom_files(out_a)
    assert names == dicom_files(out_a2) and len(names) == N_CT + 3
    for name in names:
        assert (out_a / name).read_bytes() == (out_a2 / name).read_bytes(), name


def test_other_key_gives_other_uids(run: Run, out_a: Path) -> None:
    out_b = run.root / "out_b"
    deface(run, out_b, run.key_b, "--no-eye-check")
    names = dicom_files(out_a)
    assert names == dicom_files(out_b)
    uids = {}
    for out in (out_a, out_b):
        dss = [pydicom.dcmread(out / n, stop_before_pixels=True) for n in names]
        uids[out] = (
            {str(ds.SOPInstanceUID) for ds in dss},
            {str(ds.StudyInstanceUID) for ds in dss},
            {str(ds.PatientID) for ds in dss},
        )
    for a, b in zip(uids[out_a], uids[out_b]):
        assert not a & b
    assert len(uids[out_a][0]) == len(names)


def test_keep_with_margin(run: Run) -> None:
    out = run.root / "out_keep"
    deface(run, out, run.key_a, "--keep", "Brainstem", "--keep-margin", "2", "--no-eye-check")
    cut = report(out)["cut"]
    assert isinstance(cut, dict)
    assert sorted(cut["preserved_rois"]) == ["Brainstem", "PTV_Face", "PTV_Neck"]
    assert cut["keep_margin_mm"] == 2.0


def test_no_ptv_cuts_the_ptv(run: Run, out_a: Path) -> None:
    out = run.root / "out_noptv"
    deface(run, out, run.key_a, "--no-ptv", "--no-eye-check")
    rep = report(out)
    assert rep["cut"]["preserved_rois"] == []  # type: ignore[index]
    assert rep["ct"]["preserved_voxels_in_region"] == 0  # type: ignore[index]
    assert report(out_a)["ct"]["preserved_voxels_in_region"] == 16 * 17 * 9  # type: ignore[index]
    ptv = {r["name"]: r for r in rep["rois"]}["PTV_Face"]  # type: ignore[index, union-attr]
    assert ptv["volume_after_ml"] < ptv["volume_before_ml"]
    # every CT voxel of PTV_Face inside the removal region is now air
    _, _, hu, (z, x, y) = read_ct(out / "CT")
    (x0, x1), (y0, y1), (z0, z1) = BOXES_MM["PTV_Face"]
    zz = z[:, None, None]
    in_ptv = (x > x0) & (x < x1) & (y > y0) & (y < y1) & (zz > z0) & (zz < z1)
    in_region = (zz >= TRUTH.z_inferior_eye_mm) & (y < TRUTH.y_mid_mm)
    sel = np.broadcast_to(in_ptv & in_region, hu.shape)
    assert int(sel.sum()) == 16 * 17 * 9
    assert np.all(hu[sel] == -1000.0)
    # with PTVs preserved (default) the same voxels keep their values, much of it tissue
    _, _, hu0, _ = read_ct(run.case / "CT")
    _, _, hu_a, _ = read_ct(out_a / "CT")
    np.testing.assert_array_equal(hu_a[sel], hu0[sel])
    assert int((hu0[sel] > -1000.0).sum()) > sel.sum() // 2
