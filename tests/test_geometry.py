"""The affine builder, the Grid invariants and slice-position checks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtdeface.errors import GeometryError
from rtdeface.geometry import Grid, affine_from_attributes, check_regular_positions


def test_affine_follows_pixel_spacing_convention() -> None:
    # PixelSpacing = [row spacing (i), column spacing (j)]; j moves along IOP[0:3]
    a = affine_from_attributes([10.0, 20.0, 30.0], [1, 0, 0, 0, 1, 0], [0.5, 2.0], 3.0)
    g = Grid(a, (4, 5, 6))
    np.testing.assert_allclose(g.to_patient([0, 0, 0]), [10, 20, 30])
    np.testing.assert_allclose(g.to_patient([0, 0, 1]), [12, 20, 30])  # column: x by 2.0
    np.testing.assert_allclose(g.to_patient([0, 1, 0]), [10, 20.5, 30])  # row: y by 0.5
    np.testing.assert_allclose(g.to_patient([1, 0, 0]), [10, 20, 33])  # slice: normal * 3
    assert g.spacing_mm == (3.0, 0.5, 2.0)
    assert g.voxel_volume_ml == pytest.approx(0.003)


@pytest.mark.parametrize(
    ("iop", "normal_z"),
    [
        pytest.param([1, 0, 0, 0, 1, 0], 1.0, id="HFS"),
        pytest.param([-1, 0, 0, 0, -1, 0], 1.0, id="HFP"),
        pytest.param([-1, 0, 0, 0, 1, 0], -1.0, id="FFS"),
        pytest.param([1, 0, 0, 0, -1, 0], -1.0, id="FFP"),
        pytest.param([0, -1, 0, 1, 0, 0], 1.0, id="HFDL"),
        pytest.param([0, 1, 0, -1, 0, 0], 1.0, id="HFDR"),
        pytest.param([0, -1, 0, -1, 0, 0], -1.0, id="FFDR"),
    ],
)
def test_every_axial_orientation_is_a_valid_grid(iop: list[float], normal_z: float) -> None:
    g = Grid(affine_from_attributes([0, 0, 0], iop, [1.0, 1.0], 2.0), (3, 2, 2))
    assert g.affine[2, 0] == pytest.approx(2.0 * normal_z)
    np.testing.assert_allclose(g.slice_z_mm(), [0, 2 * normal_z, 4 * normal_z])


def test_oblique_grid_is_rejected() -> None:
    c, s = np.cos(0.3), np.sin(0.3)
    with pytest.raises(GeometryError, match="not along z"):
        Grid(affine_from_attributes([0, 0, 0], [1, 0, 0, 0, c, s], [1, 1], 2.0), (2, 2, 2))


def test_bad_orientation_is_rejected() -> None:
    with pytest.raises(GeometryError, match="orthonormal"):
        affine_from_attributes([0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 1], 2.0)


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = angles
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    ry = np.array([[np.cos(c), 0, np.sin(c)], [0, 1, 0], [-np.sin(c), 0, np.cos(c)]])
    return np.asarray(rz @ rx @ ry)


angles = st.tuples(*[st.floats(-np.pi, np.pi, allow_nan=False)] * 3)
spacings = st.floats(0.2, 5.0)


@settings(max_examples=200, deadline=None)
@given(angles, spacings, spacings, st.floats(-5.0, 5.0).filter(lambda v: abs(v) > 0.1))
def test_index_patient_round_trip_any_orthonormal_orientation(
    ang: tuple[float, float, float], row_sp: float, col_sp: float, step: float
) -> None:
    r = _rotation(ang)
    iop = np.concatenate([r[:, 0], r[:, 1]])
    a = affine_from_attributes([-100.0, 50.0, 7.5], iop, [row_sp, col_sp], step)
    kij = np.array([[0, 0, 0], [3, 7, 11], [2.5, -1.25, 100.0]])
    # round trip through the affine itself (no axial requirement for the affine)
    back = np.linalg.solve(a[:3, :3], (kij @ a[:3, :3].T + a[:3, 3] - a[:3, 3]).T).T
    np.testing.assert_allclose(back, kij, atol=1e-8)


@settings(max_examples=200, deadline=None)
@given(st.floats(-np.pi, np.pi), spacings, spacings, st.floats(0.5, 5.0), st.booleans())
def test_grid_round_trip_axial_in_plane_rotations(
    theta: float, row_sp: float, col_sp: float, step: float, flip: bool
) -> None:
    c, s = np.cos(theta), np.sin(theta)
    row = [c, s, 0.0]
    col = [-s, c, 0.0] if not flip else [s, -c, 0.0]
    g = Grid(affine_from_attributes([1.0, 2.0, 3.0], row + col, [row_sp, col_sp], step), (5, 6, 7))
    kij = np.array([[0, 0, 0], [4, 5, 6], [1.5, 2.25, 3.75]])
    np.testing.assert_allclose(g.to_index(g.to_patient(kij)), kij, atol=1e-9)
    x, y = g.plane_xy_mm()
    pts = g.to_patient(np.stack(np.meshgrid([2], range(6), range(7), indexing="ij"), -1))
    np.testing.assert_allclose(pts[0, :, :, 0], x, atol=1e-9)
    np.testing.assert_allclose(pts[0, :, :, 1], y, atol=1e-9)


def test_grid_rejects_bad_affines() -> None:
    a = np.eye(4)
    a[3] = [0, 0, 1, 1]
    with pytest.raises(GeometryError, match="last row"):
        Grid(a, (1, 1, 1))
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(GeometryError, match="orthogonal"):
        Grid(sheared, (1, 1, 1))


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        pytest.param([0.0, 2.0, 2.0, 4.0], "duplicate slice position 2.000", id="duplicate"),
        pytest.param([0.0, 2.0, 6.0, 8.0], "missing slice", id="missing"),
        pytest.param([0.0, 2.0, 4.5, 6.0, 8.0], "irregular slice spacing", id="irregular"),
    ],
)
def test_slice_position_errors(positions: list[float], message: str) -> None:
    with pytest.raises(GeometryError, match=message):
        check_regular_positions(np.asarray(positions), "CT series X")


def test_regular_positions_either_order() -> None:
    assert check_regular_positions(np.array([0.0, 2.5, 5.0]), "s") == pytest.approx(2.5)
    assert check_regular_positions(np.array([5.0, 2.5, 0.0]), "s") == pytest.approx(-2.5)
    # DS rounding within tolerance is accepted
    assert check_regular_positions(np.array([0.0, 2.0, 4.004, 6.0]), "s") == pytest.approx(2.0)
