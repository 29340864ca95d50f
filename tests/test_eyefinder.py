"""Eye detection in the CT image (:mod:`rtdeface.eyefinder`).

Phantom cases are written in code (:mod:`rtdeface.phantom`); the real case is used only when
the shared test data is present (``@pytest.mark.realdata``, skipped cleanly otherwise).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from rtdeface.errors import LandmarkError
from rtdeface.eyefinder import find_eyes_in_image
from rtdeface.geometry import Grid
from rtdeface.landmarks import EyeLandmarks, landmarks_from_rois, select_eye_rois
from rtdeface.load import load_case
from rtdeface.phantom import EYE_CENTRES_MM, VARIANTS, PhantomTruth, write_phantom_case

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The shared real test data (internal only; never copied into the repository)."""

PHANTOM_TOL_MM = 2.0
"""Largest allowed landmark error (mm) on the phantom."""

REAL_TOL_MM = 3.0
"""Largest allowed landmark error (mm) against the image-derived eye contours of the real case."""

HuVolume = npt.NDArray[np.float32]


@pytest.fixture(scope="module")
def phantom_cases(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[HuVolume, Grid, PhantomTruth]]:
    """Lazily written phantom cases, one per variant, loaded as (hu, grid, truth)."""
    root = tmp_path_factory.mktemp("eyefinder_phantoms")
    cache: dict[str, tuple[HuVolume, Grid, PhantomTruth]] = {}

    class _Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, variant: str) -> tuple[HuVolume, Grid, PhantomTruth]:
            written = write_phantom_case(root / variant, variant)
            case = load_case(root / variant)
            cache[variant] = (case.ct.hu_volume(), case.ct.grid, written.truth)
            self[variant] = cache[variant]
            return cache[variant]

    return _Lazy()


def _keep_slices(hu: HuVolume, grid: Grid, keep: npt.NDArray[np.bool_]) -> tuple[HuVolume, Grid]:
    """Sub-volume of the contiguous slices selected by ``keep`` (shape (nk,)), with its grid."""
    ks = np.flatnonzero(keep)
    assert ks.size and np.all(np.diff(ks) == 1), "the kept slices must be contiguous"
    affine = grid.affine.copy()
    affine[:3, 3] = grid.to_patient([float(ks[0]), 0.0, 0.0])
    sub = np.ascontiguousarray(hu[ks[0] : ks[-1] + 1])
    return sub, Grid(affine, (int(sub.shape[0]), grid.shape[1], grid.shape[2]))


def _check_eyes(lm: EyeLandmarks) -> None:
    assert lm.source == "image"
    assert lm.confidence is not None and 0.0 <= lm.confidence <= 1.0
    left, right = lm.eyes
    assert (left.side, right.side) == ("left", "right")
    assert left.centre_mm[0] > right.centre_mm[0]  # patient left is +x


@pytest.mark.parametrize("variant", [pytest.param(v, id=v) for v in VARIANTS])
def test_phantom_eyes_found_in_every_variant(
    phantom_cases: dict[str, tuple[HuVolume, Grid, PhantomTruth]], variant: str
) -> None:
    hu, grid, truth = phantom_cases[variant]
    lm = find_eyes_in_image(hu, grid)
    _check_eyes(lm)
    assert lm.confidence is not None and lm.confidence >= 0.6
    assert abs(lm.z_inferior_mm - truth.z_inferior_eye_mm) <= PHANTOM_TOL_MM
    assert abs(lm.y_mid_mm - truth.y_mid_mm) <= PHANTOM_TOL_MM
    for eye, name in zip(lm.eyes, ("Eye_L", "Eye_R"), strict=True):
        assert np.allclose(eye.centre_mm, EYE_CENTRES_MM[name], atol=PHANTOM_TOL_MM)
        assert 4.0 < eye.volume_ml < 9.0  # a 12 mm sphere is 7.2 mL
    # the landmarks lie on CT slice planes
    assert grid.slice_index_at(lm.z_inferior_mm) is not None
    assert grid.slice_index_at(lm.z_central_mm) is not None


def test_scan_cut_below_the_eyes_raises(
    phantom_cases: dict[str, tuple[HuVolume, Grid, PhantomTruth]],
) -> None:
    hu, grid, truth = phantom_cases["hfs"]
    cut_hu, cut_grid = _keep_slices(hu, grid, grid.slice_z_mm() < truth.z_inferior_eye_mm - 5.0)
    with pytest.raises(LandmarkError, match=r"eyes not found in the CT image.*scan z") as info:
        find_eyes_in_image(cut_hu, cut_grid)
    message = str(info.value)
    assert "\n" not in message
    assert "--eye-roi" in message


def test_scan_cut_through_the_eyes_raises(
    phantom_cases: dict[str, tuple[HuVolume, Grid, PhantomTruth]],
) -> None:
    hu, grid, _ = phantom_cases["ffp"]  # slices stored superior to inferior
    centre_z = EYE_CENTRES_MM["Eye_L"][2]
    cut_hu, cut_grid = _keep_slices(hu, grid, grid.slice_z_mm() <= centre_z + 3.0)
    with pytest.raises(LandmarkError, match=r"(cut by the superior edge|eyes not found)"):
        find_eyes_in_image(cut_hu, cut_grid)


@pytest.mark.parametrize(
    "fill_hu", [pytest.param(-80.0, id="fat"), pytest.param(-1000.0, id="air")]
)
@pytest.mark.parametrize("eye", ["Eye_L", "Eye_R"])
def test_one_eye_blanked_raises(
    phantom_cases: dict[str, tuple[HuVolume, Grid, PhantomTruth]], eye: str, fill_hu: float
) -> None:
    hu, grid, _ = phantom_cases["hfdl"]
    x, y = grid.plane_xy_mm()
    z = grid.slice_z_mm()[:, None, None]
    cx, cy, cz = EYE_CENTRES_MM[eye]
    ball = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= 14.0**2
    blanked = np.where(ball, np.float32(fill_hu), hu).astype(np.float32)
    with pytest.raises(LandmarkError, match="eyes not found in the CT image") as info:
        find_eyes_in_image(blanked, grid)
    assert "--eye-roi" in str(info.value)


def test_shape_mismatch_raises(
    phantom_cases: dict[str, tuple[HuVolume, Grid, PhantomTruth]],
) -> None:
    hu, grid, _ = phantom_cases["hfs"]
    with pytest.raises(LandmarkError, match="does not match"):
        find_eyes_in_image(hu[1:], grid)


def _real_case(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "CT").is_dir():
        pytest.skip(f"shared real test data not available at {path}")
    return path


@pytest.mark.realdata
def test_real_eyes_agree_with_contoured_eyes() -> None:
    case = load_case(_real_case("onko_hn_eyes"))
    assert case.structure_set is not None
    rois, _ = select_eye_rois(case.structure_set, case.ct.grid)
    truth = landmarks_from_rois(rois, case.ct.grid.spacing_mm[0])
    lm = find_eyes_in_image(case.ct.hu_volume(), case.ct.grid)
    _check_eyes(lm)
    assert abs(lm.z_inferior_mm - truth.z_inferior_mm) <= REAL_TOL_MM
    assert abs(lm.y_mid_mm - truth.y_mid_mm) <= REAL_TOL_MM
    contoured = {e.side: e for e in truth.eyes}
    for eye in lm.eyes:
        assert np.linalg.norm(np.subtract(eye.centre_mm, contoured[eye.side].centre_mm)) <= 5.0


@pytest.mark.realdata
def test_real_eyes_same_from_rle_copy() -> None:
    plain = load_case(_real_case("onko_hn_eyes"))
    rle = load_case(_real_case("onko_hn"))
    a = find_eyes_in_image(plain.ct.hu_volume(), plain.ct.grid)
    b = find_eyes_in_image(rle.ct.hu_volume(), rle.ct.grid)
    assert a.z_inferior_mm == pytest.approx(b.z_inferior_mm)
    assert a.y_mid_mm == pytest.approx(b.y_mid_mm)
