"""Deface the CT: voxels whose centres lie in the cut become air, written through the
series' own RescaleSlope/Intercept, PixelRepresentation and BitsStored.

Only slices that intersect the cut are decoded and re-encoded; every other voxel (and every
other slice's pixel data) stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from rtdeface.discover import peek_uint
from rtdeface.load import CtSeries, rescale_of

AIR_HU = -1000.0
"""Value (HU) written into removed voxels."""


def representable_range(ds: Dataset) -> tuple[int, int]:
    """Smallest and largest stored value allowed by PixelRepresentation and BitsStored."""
    stored, allocated = peek_uint(ds, "BitsStored"), peek_uint(ds, "BitsAllocated")
    bits = stored if stored is not None else allocated if allocated is not None else 16
    if peek_uint(ds, "PixelRepresentation") == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def stored_value_for_hu(ds: Dataset, hu: float) -> int:
    """Stored value that represents ``hu`` through the slice's modality LUT, clipped."""
    slope, intercept = rescale_of(ds)
    lo, hi = representable_range(ds)
    return int(np.clip(np.round((hu - intercept) / slope), lo, hi))


@dataclass(frozen=True)
class CtResult:
    """Defaced CT slices.

    Attributes
    ----------
    slices : dict of int to numpy.ndarray
        New stored pixel arrays (shape (ni, nj), original dtype) for the slices that changed,
        by slice index k.
    voxels_in_cut : int
        Voxel centres in the cut (whether or not they were already air).
    voxels_changed : int
        Voxels whose stored value changed.
    air_stored_value : int
        The stored value written (for the first changed slice's rescale).
    """

    slices: dict[int, npt.NDArray[np.integer]]
    voxels_in_cut: int
    voxels_changed: int
    air_stored_value: int | None


def deface_ct(
    ct: CtSeries, cut: npt.NDArray[np.bool_], slices: Iterable[int] | None = None
) -> CtResult:
    """Set every voxel of ``ct`` whose centre is in ``cut`` (shape ct.grid.shape) to air.

    ``slices``: the only slices ``cut`` can mark (e.g.
    :meth:`rtdeface.region.DefacingRegion.slices_in_region`); the others are not read, so the
    untouched pages of a large zeroed mask stay unmapped [default: every slice].
    """
    out: dict[int, npt.NDArray[np.integer]] = {}
    changed = 0
    in_cut = 0
    air_first: int | None = None
    for k in range(len(cut)) if slices is None else (int(v) for v in slices):
        mask = cut[k]
        n_cut = int(np.count_nonzero(mask))
        if n_cut == 0:
            continue
        in_cut += n_cut
        ds = ct.datasets[k]
        air = stored_value_for_hu(ds, AIR_HU)
        air_first = air if air_first is None else air_first
        stored = ct.stored_slice(k, writable=True)  # this function's own array
        n = int(np.count_nonzero(stored[mask] != air))
        if n == 0:
            continue
        stored[mask] = air
        out[k] = stored
        changed += n
    return CtResult(out, in_cut, changed, air_first)
