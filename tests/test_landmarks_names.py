"""Eye-name patterns, sides and preservation rules on real clinical ROI names."""

from __future__ import annotations

import pytest

from rtdeface.landmarks import is_eye_name, side_from_name
from rtdeface.load import Roi
from rtdeface.region import is_ptv


@pytest.mark.parametrize(
    ("name", "side"),
    [
        ("Eye_L", "left"),
        ("Eye_R", "right"),
        ("Eye_Lt", "left"),
        ("Eye_Rt", "right"),
        ("Globe_R", "right"),
        ("Globe_L", "left"),
        ("Bulbus oculi dx", "right"),
        ("Bulbus oculi sin", "left"),
        ("Orbit_L", "left"),
        ("Orbit Right", "right"),
        ("EyeLeft", "left"),
        ("RightEye", "right"),
        ("L Eye", "left"),
        ("Eyes", "unknown"),
        ("Auge links", "left"),
    ],
)
def test_eye_names_caught(name: str, side: str) -> None:
    assert is_eye_name(name)
    assert side_from_name(name) == side


@pytest.mark.parametrize(
    "name",
    [
        "Eye_L_PRV",
        "PRV_Eye_R",
        "Lens_L",
        "Lens R",
        "OpticNerve_L",
        "Optic_Nrv_R",
        "Lacrimal_L",
        "Ring_Eye",
        "Eye_Avoid",
        "z_Eye_L",
        "zEye_R",
        "~Eye_R",
        "Eye_L+3mm",
        "Eye_R_3mm",
        "Brainstem",
        "Parotid_L",
        "Eye_L_opt",
        "x_Eye",
    ],
)
def test_helpers_excluded(name: str) -> None:
    assert not is_eye_name(name)


def _roi(name: str, typ: str = "") -> Roi:
    return Roi(number=1, name=name, interpreted_type=typ, contours=())


@pytest.mark.parametrize(
    ("name", "typ", "expected"),
    [
        ("PTV_70cf", "PTV", True),
        ("SPTV 56", "PTV", True),
        ("PTV_60", "", True),
        ("PTVnodes", "ORGAN", True),
        ("CTV_60", "CTV", False),
        ("Target", "PTV", True),
        ("Ring 70", "AVOIDANCE", False),
        ("PTV_Ring", "CONTROL", False),
        ("nonPTV", "CONTROL", False),
        ("PTV-Cord", "PTV", False),
        ("PTV70-PTV56", "PTV", False),
        ("z_PTV_opt", "PTV", False),
        ("~PTV", "PTV", False),
        ("PTV_opt", "CONTROL", False),
        ("Brainstem", "ORGAN", False),
        ("PTV-70", "PTV", True),
    ],
)
def test_ptv_rule(name: str, typ: str, expected: bool) -> None:
    assert is_ptv(_roi(name, typ)) is expected
