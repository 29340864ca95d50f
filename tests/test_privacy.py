"""The privacy check: renderings of CT, BODY and dose before/after, face detection, verdict."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("dlib")
pytest.importorskip("face_recognition_models")

from rtdeface import privacy
from rtdeface.cli import main
from rtdeface.geometry import Grid
from rtdeface.load import load_case
from rtdeface.phantom import write_phantom_case
from rtdeface.qa import SKIN_HU, MaskSurface, View, frame_for_head, render_mask

if not privacy.privacy_available()[0]:  # pragma: no cover
    pytest.skip("privacy extra not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def detectors() -> privacy.FaceDetectors:
    return privacy.load_detectors()


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("privacy")
    orig = root / "orig"
    write_phantom_case(orig, "hfs")
    defaced = root / "defaced"
    assert main(["-q", "deface", str(orig), "-o", str(defaced), "--random-key"]) == 0
    return orig, defaced


@pytest.fixture(scope="module")
def phantom_report(
    phantom_pair: tuple[Path, Path], detectors: privacy.FaceDetectors, tmp_path_factory: Any
) -> privacy.PrivacyReport:
    orig, defaced = phantom_pair
    out = tmp_path_factory.mktemp("privacy_out")
    return privacy.check_privacy(load_case(orig), load_case(defaced), out, detectors)


def test_views_cover_front_yaw_and_pitch() -> None:
    yaws = {v.yaw_deg for v in privacy.VIEWS}
    pitches = {v.pitch_deg for v in privacy.VIEWS}
    assert {0.0, 35.0, -35.0} <= yaws and {15.0, -15.0} <= pitches


def test_view_basis_is_orthonormal_and_front_looks_posterior() -> None:
    for v in (*privacy.VIEWS, View("odd", 123.0, -40.0)):
        u, up, d = v.basis()
        m = np.stack([u, up, d])
        np.testing.assert_allclose(m @ m.T, np.eye(3), atol=1e-12)
    u, up, d = View("front", 0.0).basis()
    np.testing.assert_allclose(d, [0, 1, 0], atol=1e-12)  # anterior -> posterior
    np.testing.assert_allclose(u, [1, 0, 0], atol=1e-12)  # patient left on the right
    np.testing.assert_allclose(up, [0, 0, 1], atol=1e-12)


def test_render_sphere_depth_and_silhouette() -> None:
    """A sphere of radius 40 mm renders as a disc of that radius, brightest at its centre."""
    step = 2.0
    n = 61
    affine = np.array(
        [[0, 0, step, -60.0], [0, step, 0, -60.0], [step, 0, 0, -60.0], [0, 0, 0, 1.0]]
    )
    grid = Grid(affine, (n, n, n))
    kij = np.indices((n, n, n)).reshape(3, -1).T.astype(float)
    pts = grid.to_patient(kij)
    mask = (np.linalg.norm(pts, axis=1) < 40.0).reshape(n, n, n)
    surf = MaskSurface.from_mask(mask, grid)
    frame = frame_for_head(surf, pixel_mm=1.0)
    img = render_mask(surf, View("front", 0.0), frame)
    area_mm2 = np.isfinite(img).sum() * 1.0
    assert area_mm2 == pytest.approx(np.pi * 40.0**2, rel=0.06)
    assert np.nanargmax(img) != 0
    side = render_mask(surf, View("left35", 35.0, 20.0), frame)
    assert np.isfinite(side).sum() == pytest.approx(np.isfinite(img).sum(), rel=0.06)


def test_surfaces_of_phantom(phantom_pair: tuple[Path, Path]) -> None:
    case = load_case(phantom_pair[0])
    surfaces = privacy.surfaces_of(case)
    assert sorted(surfaces) == ["BODY", "CT", "dose 1"]
    assert privacy.body_roi(case) is not None
    # the phantom's BODY is the CT's body voxelised on the same lattice: the same voxels
    ct, body = surfaces["CT"].mask, surfaces["BODY"].mask
    assert np.count_nonzero(ct ^ body) <= 0.01 * np.count_nonzero(ct)


def test_phantom_face_found_before_and_gone_from_the_front_after(
    phantom_report: privacy.PrivacyReport,
) -> None:
    by = {(v.surface, v.view): v for s in phantom_report.surfaces for v in s.views}
    for surface in ("CT", "BODY"):
        front = by[(surface, "front")]
        mtcnn_o, hog_o = front.original
        mtcnn_d, _ = front.defaced
        assert mtcnn_o.detected and mtcnn_o.score is not None and mtcnn_o.score > 0.95
        assert hog_o.detected
        assert not mtcnn_d.detected
        assert front.distance is not None and front.distance > privacy.MATCH_DISTANCE
    for s in phantom_report.surfaces:
        assert s.surface in {"CT", "BODY", "dose 1"}
        assert s.same_face_distance is None or s.same_face_distance > privacy.MATCH_DISTANCE


def test_verdict_is_honest(phantom_report: privacy.PrivacyReport) -> None:
    """FAIL exactly when some defaced rendering still shows a face (or matches)."""
    views = [v for s in phantom_report.surfaces for v in s.views]
    still = [v for v in views if v.face_in_defaced or v.identity_match]
    assert (phantom_report.status == privacy.FAIL) == bool(still)
    text = privacy.verdict_text(phantom_report)
    if still:
        assert text.startswith("FAIL: face still detectable")
        for v in still:
            assert f"{v.surface}/{v.view}" in text
    d = phantom_report.to_dict()
    assert d["thresholds"]["mtcnn_confidence"] == privacy.MTCNN_THRESHOLD
    assert len(d["surfaces"]) == 3 and all(len(s["views"]) == 5 for s in d["surfaces"])
    for s in phantom_report.surfaces:
        assert Path(s.sheet).is_file()
        for v in s.views:
            assert all(Path(p).is_file() for p in v.images)


def test_cli_privacy_writes_outside_defaced_and_exit_code(
    phantom_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    orig, defaced = phantom_pair
    out = tmp_path / "priv"
    rc = main(["privacy", str(orig), str(defaced), "-o", str(out)])
    report = json.loads((out / "privacy.json").read_text())
    assert rc == (0 if report["status"] != "FAIL" else 1)
    assert "verdict:" in capsys.readouterr().out
    assert not any(p.name.endswith(".png") for p in defaced.rglob("*"))
    assert main(["privacy", str(orig), str(defaced), "-o", str(defaced / "x")]) == 2


def test_cli_privacy_without_extra_exits_2(
    phantom_pair: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(privacy.importlib.util, "find_spec", lambda name: None)
    orig, defaced = phantom_pair
    assert main(["privacy", str(orig), str(defaced)]) == 2
    assert "pip install 'rtdeface[privacy]'" in capsys.readouterr().err


INVESALIUS_DEB = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rtdeface-tests" / "invesalius"
)
"""Download folder of the Debian package (outside the repository: it is never committed)."""


def _invesalius_matrix() -> np.ndarray:
    """Cranium.inv3's matrix.dat from the Debian package (fetched at run time, never committed)."""
    INVESALIUS_DEB.mkdir(parents=True, exist_ok=True)
    debs = sorted(INVESALIUS_DEB.glob("invesalius-examples_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            pytest.skip("apt-get/dpkg-deb not available")
        cmd = ["apt-get", "download", "invesalius-examples"]
        r = subprocess.run(cmd, cwd=INVESALIUS_DEB, capture_output=True, timeout=120)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300)
            r = subprocess.run(cmd, cwd=INVESALIUS_DEB, capture_output=True, timeout=120)
        debs = sorted(INVESALIUS_DEB.glob("invesalius-examples_*.deb"))
        if r.returncode != 0 or not debs:
            pytest.skip("invesalius-examples could not be downloaded")
    data = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(debs[-1])], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as deb:
        member = next(m for m in deb.getmembers() if m.name.endswith("Cranium.inv3"))
        inv3 = deb.extractfile(member)
        assert inv3 is not None
        raw = gzip.decompress(inv3.read())
    with tarfile.open(fileobj=io.BytesIO(raw)) as inv:
        m = next(m for m in inv.getmembers() if m.name.endswith("matrix.dat"))
        f = inv.extractfile(m)
        assert f is not None
        return np.frombuffer(f.read(), dtype="<i2").reshape(108, 256, 256)


@pytest.mark.realdata
def test_invesalius_head_face_detected_then_removed(detectors: privacy.FaceDetectors) -> None:
    vol = _invesalius_matrix()
    # z, y, x with y toward the face: y index increasing = anterior = patient y decreasing
    affine = np.array([[0, 0, 0.957, 0], [0, -0.957, 0, 0], [1.5, 0, 0, 0], [0, 0, 0, 1.0]])
    grid = Grid(affine, vol.shape)
    skin = vol > SKIN_HU
    surf = MaskSurface.from_mask(skin, grid)
    frame = frame_for_head(surf)
    front = privacy.to_rgb(render_mask(surf, View("front", 0.0), frame))
    mtcnn, hog = detectors.detect(front)
    assert mtcnn.detected and hog.detected
    # remove everything anterior to the head's A-P middle: no face can remain
    ys = grid.to_patient(np.stack([np.zeros(256), np.arange(256.0), np.zeros(256)], axis=1))[:, 1]
    cut = skin.copy()
    cut[:, ys < np.median(ys[skin.any(axis=(0, 2))]), :] = False
    gone = MaskSurface.from_mask(cut, grid)
    after = privacy.to_rgb(render_mask(gone, View("front", 0.0), frame))
    assert not any(d.detected for d in detectors.detect(after))


def test_validate_privacy_flag_adds_a_check(
    phantom_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    orig, defaced = phantom_pair
    qa = tmp_path / "qa"
    rc = main(
        ["-q", "validate", str(orig), str(defaced), "--privacy", "--qa", str(qa), "--no-images"]
    )
    checks = {c["name"]: c for c in json.loads((qa / "validation.json").read_text())["checks"]}
    status = checks["privacy.face"]["status"]
    assert status in {"PASS", "FAIL", "INFO"}
    assert (qa / "privacy" / "privacy.json").is_file()
    assert rc == (1 if status == "FAIL" else rc)
