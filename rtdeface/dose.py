"""Deface every dose grid at its own voxel centres; keep dtype, scaling and geometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from rtdeface.load import DoseGrid
from rtdeface.region import DefacingRegion


@dataclass(frozen=True)
class DoseResult:
    """One defaced dose grid.

    Attributes
    ----------
    stored : numpy.ndarray or None
        New stored values, shape (nk, ni, nj), the header's dtype; None when nothing changed.
    voxels_in_cut : int
        Dose voxel centres in the cut.
    voxels_zeroed : int
        Voxels that held a non-zero dose and were set to 0.
    max_dose_removed_gy : float
        Largest dose (Gy) removed.
    preserved_in_region : int
        Dose voxel centres in R kept because they lie in P.
    had_dvh : bool
        The input carried a DVHSequence (it is dropped from the output: it would be stale).
    """

    stored: npt.NDArray[np.integer] | None
    voxels_in_cut: int
    voxels_zeroed: int
    max_dose_removed_gy: float
    preserved_in_region: int
    had_dvh: bool


def deface_dose(dose: DoseGrid, region: DefacingRegion) -> DoseResult:
    """Zero the stored dose at every voxel centre of ``dose`` that lies in the cut."""
    cut, kept = region.sample(dose.grid)
    had_dvh = "DVHSequence" in dose.dataset
    n_cut = int(np.count_nonzero(cut))
    if n_cut == 0:
        return DoseResult(None, 0, 0, 0.0, kept, had_dvh)
    stored = dose.stored()
    removed = stored[cut]
    nz = int(np.count_nonzero(removed))
    if nz == 0:
        return DoseResult(None, n_cut, 0, 0.0, kept, had_dvh)
    new = stored.copy()
    new[cut] = 0
    return DoseResult(new, n_cut, nz, float(removed.max()) * dose.scaling, kept, had_dvh)
