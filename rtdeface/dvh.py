"""ROI voxelisation and cumulative dose-volume histograms (DVHs), for validation.

Voxelisation
------------
An ROI is voxelised on a grid at the grid's *own* voxel centres (never resampled from another
grid): on the slice at z, the ROI's cross-section is :meth:`rtdeface.region.RoiSections.at`
(its nearest contour plane within half its plane spacing, even-odd composition of the plane's
closed contours), and a voxel belongs to the ROI when its centre intersects that section
(:func:`shapely.intersects_xy`: boundary points count, as for the preserved set P). Work is
vectorised per slice over the voxel centres inside the section's bounding box.

DVH
---
:func:`cumulative_dvh` gives, for dose levels ``0, w, 2w, ...`` (bin width ``w`` =
:data:`DVH_BIN_GY`), the volume (mL) of ROI voxels whose dose is at least that level: every
voxel counts with the dose at its centre and the full voxel volume (no partial-volume weights,
no interpolation). ``D_x`` (the minimum dose to the hottest ``x`` % of the volume) is read from
the voxel doses sorted in decreasing order: the dose of the voxel at rank ``ceil(x/100 * n)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import shapely
from pydicom.dataset import Dataset

from rtdeface.geometry import Grid
from rtdeface.load import DoseGrid
from rtdeface.region import RoiSections

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

DVH_BIN_GY = 0.01
"""Width (Gy) of the cumulative DVH dose bins."""


@dataclass(frozen=True, eq=False)
class RoiMask:
    """A voxelised ROI stored slice by slice (only slices the ROI reaches).

    Attributes
    ----------
    shape : tuple of 3 int
        Shape ``(nk, ni, nj)`` of the grid it was voxelised on.
    slices : dict of int to numpy.ndarray of bool, each shape (ni, nj)
        Slice index k -> in-plane mask; slices not present are empty.
    """

    shape: tuple[int, int, int]
    slices: Mapping[int, BoolArray] = field(default_factory=dict)

    def count(self) -> int:
        """Number of voxels in the ROI."""
        return int(sum(int(np.count_nonzero(m)) for m in self.slices.values()))

    def overlap(self, other: RoiMask) -> int:
        """Number of voxels in both masks (same grid)."""
        return int(
            sum(
                int(np.count_nonzero(m & other.slices[k]))
                for k, m in self.slices.items()
                if k in other.slices
            )
        )

    def within(self, mask: BoolArray) -> int:
        """Number of ROI voxels where the dense ``mask`` (shape :attr:`shape`) is True."""
        return int(sum(int(np.count_nonzero(m & mask[k])) for k, m in self.slices.items()))

    def dense(self) -> BoolArray:
        """The mask as a dense array of shape :attr:`shape`."""
        out = np.zeros(self.shape, dtype=bool)
        for k, m in self.slices.items():
            out[k] = m
        return out


def voxelise(sections: RoiSections, grid: Grid) -> RoiMask:
    """Voxel centres of ``grid`` inside the ROI (see the module docstring)."""
    z = grid.slice_z_mm()
    x, y = grid.plane_xy_mm()
    xf, yf = x.ravel(), y.ravel()
    out: dict[int, BoolArray] = {}
    for k in range(grid.shape[0]):
        geom = sections.at(float(z[k]))
        if geom is None:
            continue
        xmin, ymin, xmax, ymax = geom.bounds
        near = np.flatnonzero((xf >= xmin) & (xf <= xmax) & (yf >= ymin) & (yf <= ymax))
        if near.size == 0:
            continue
        hit = shapely.intersects_xy(geom, xf[near], yf[near])
        if not hit.any():
            continue
        plane = np.zeros(xf.size, dtype=bool)
        plane[near[hit]] = True
        out[k] = plane.reshape(x.shape)
    return RoiMask(grid.shape, out)


def dose_gy(dose: DoseGrid) -> FloatArray:
    """Dose (Gy) of a grid, shape ``dose.grid.shape``: stored values x DoseGridScaling."""
    return np.asarray(dose.stored(), dtype=np.float64) * dose.scaling


@dataclass(frozen=True, eq=False)
class Dvh:
    """A cumulative DVH and its summary metrics.

    Attributes
    ----------
    voxels : int
        Number of dose-grid voxels in the ROI.
    volume_ml : float
        ROI volume on the dose grid (voxels x voxel volume), mL.
    dose_levels_gy : numpy.ndarray, shape (m,)
        ``0, w, 2w, ...`` with ``w`` = :data:`DVH_BIN_GY`, up to the first level above Dmax.
    volume_at_least_ml : numpy.ndarray, shape (m,)
        Volume (mL) receiving at least each dose level.
    d_mean_gy, d_max_gy, d_min_gy, d95_gy, d2_gy : float
        Mean, maximum, minimum, D95% and D2% (Gy); NaN for an empty ROI.
    """

    voxels: int
    volume_ml: float
    dose_levels_gy: FloatArray
    volume_at_least_ml: FloatArray
    d_mean_gy: float
    d_max_gy: float
    d_min_gy: float
    d95_gy: float
    d2_gy: float

    def same_as(self, other: Dvh) -> bool:
        """Bin-for-bin identical curves (same voxel count and volumes at every level)."""
        return (
            self.voxels == other.voxels
            and self.dose_levels_gy.shape == other.dose_levels_gy.shape
            and bool(np.array_equal(self.volume_at_least_ml, other.volume_at_least_ml))
        )

    def volume_at(self, dose_gy_levels: FloatArray) -> FloatArray:
        """Volume (mL) receiving at least each given dose (step lookup, no interpolation)."""
        idx = np.floor(np.asarray(dose_gy_levels, dtype=np.float64) / DVH_BIN_GY + 1e-9)
        idx = idx.astype(np.int64)
        out = np.zeros(idx.shape, dtype=np.float64)
        ok = (idx >= 0) & (idx < self.volume_at_least_ml.size)
        out[ok] = self.volume_at_least_ml[idx[ok]]
        out[idx < 0] = self.volume_ml
        return out

    def metrics(self) -> dict[str, float]:
        """Summary numbers for JSON."""
        return {
            "volume_ml": round(self.volume_ml, 4),
            "d_mean_gy": _r(self.d_mean_gy),
            "d_max_gy": _r(self.d_max_gy),
            "d_min_gy": _r(self.d_min_gy),
            "d95_gy": _r(self.d95_gy),
            "d2_gy": _r(self.d2_gy),
        }


def _r(v: float) -> float:
    return v if math.isnan(v) else round(v, 4)


def d_at_percent(sorted_desc_gy: FloatArray, percent: float) -> float:
    """Minimum dose (Gy) to the hottest ``percent`` % of the voxels (NaN when empty)."""
    n = sorted_desc_gy.size
    if n == 0:
        return float("nan")
    rank = max(1, math.ceil(percent / 100.0 * n))
    return float(sorted_desc_gy[min(rank, n) - 1])


def cumulative_dvh(dose: FloatArray, mask: RoiMask, voxel_volume_ml: float) -> Dvh:
    """Cumulative DVH of the ROI ``mask`` in the dose array ``dose`` (Gy, same grid).

    Parameters
    ----------
    dose : numpy.ndarray, shape mask.shape
        Dose (Gy) at the grid's voxel centres.
    mask : RoiMask
        The ROI voxelised on the same grid.
    voxel_volume_ml : float
        Volume (mL) of one voxel of the grid.
    """
    parts = [dose[k][m] for k, m in mask.slices.items()]
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)
    n = values.size
    if n == 0:
        empty = np.zeros(1, dtype=np.float64)
        nan = float("nan")
        return Dvh(0, 0.0, empty, empty, nan, nan, nan, nan, nan)
    bins = np.floor(values / DVH_BIN_GY + 1e-9).astype(np.int64)
    bins = np.clip(bins, 0, None)
    counts = np.bincount(bins)
    at_least = np.cumsum(counts[::-1])[::-1].astype(np.float64) * voxel_volume_ml
    levels = np.arange(at_least.size, dtype=np.float64) * DVH_BIN_GY
    desc = np.sort(values)[::-1]
    return Dvh(
        voxels=n,
        volume_ml=n * voxel_volume_ml,
        dose_levels_gy=levels,
        volume_at_least_ml=at_least,
        d_mean_gy=float(values.mean()),
        d_max_gy=float(desc[0]),
        d_min_gy=float(desc[-1]),
        d95_gy=d_at_percent(desc, 95.0),
        d2_gy=d_at_percent(desc, 2.0),
    )


def compare_with_dvh_sequence(
    dataset: Dataset, dvhs_by_roi_number: Mapping[int, Dvh]
) -> list[dict[str, Any]]:
    """Cross-check our DVHs against the DVHSequence an RTDOSE carries.

    For every CUMULATIVE item in Gy whose single referenced ROI we computed, report the volume,
    the mean and maximum dose (ours vs the stored DVHMeanDose / DVHMaximumDose) and the largest
    difference between the two curves at the stored bins' lower dose edges, in % of our volume
    (stored volumes in PERCENT are converted with our volume). Other items are listed as not
    compared, with the reason.

    Returns
    -------
    list of dict
        One entry per DVHSequence item.
    """
    out: list[dict[str, Any]] = []
    for n, item in enumerate(dataset.get("DVHSequence", []) or [], start=1):
        refs = [int(r.ReferencedROINumber) for r in item.get("DVHReferencedROISequence", []) or []]
        entry: dict[str, Any] = {"item": n, "roi_numbers": refs}
        dvh_type = str(item.get("DVHType", ""))
        units = str(item.get("DoseUnits", ""))
        if len(refs) != 1 or refs[0] not in dvhs_by_roi_number:
            entry["compared"] = False
            entry["reason"] = "references no single ROI with a computed DVH"
            out.append(entry)
            continue
        if dvh_type != "CUMULATIVE" or units != "GY":
            entry["compared"] = False
            entry["reason"] = f"DVHType {dvh_type or '?'} / DoseUnits {units or '?'} not compared"
            out.append(entry)
            continue
        ours = dvhs_by_roi_number[refs[0]]
        data = np.asarray([float(v) for v in item.get("DVHData", [])], dtype=np.float64)
        scaling = float(item.get("DVHDoseScaling", 1.0) or 1.0)
        widths = data[0::2] * scaling
        volumes = data[1::2]
        lower = np.cumsum(widths) - widths
        if str(item.get("DVHVolumeUnits", "CM3")) == "PERCENT":
            volumes = volumes / 100.0 * ours.volume_ml
        theirs_volume = float(volumes[0]) if volumes.size else float("nan")
        diff = ours.volume_at(lower) - volumes
        entry.update(
            compared=True,
            volume_ml={"ours": round(ours.volume_ml, 4), "stored": round(theirs_volume, 4)},
            d_mean_gy={"ours": _r(ours.d_mean_gy), "stored": _opt(item, "DVHMeanDose")},
            d_max_gy={"ours": _r(ours.d_max_gy), "stored": _opt(item, "DVHMaximumDose")},
            max_curve_difference_percent=round(
                float(np.max(np.abs(diff))) / ours.volume_ml * 100.0, 3
            )
            if ours.volume_ml > 0 and diff.size
            else None,
        )
        out.append(entry)
    return out


def _opt(item: Dataset, keyword: str) -> float | None:
    v = item.get(keyword)
    return None if v is None or v == "" else round(float(v), 4)


__all__ = [
    "DVH_BIN_GY",
    "Dvh",
    "RoiMask",
    "compare_with_dvh_sequence",
    "cumulative_dvh",
    "d_at_percent",
    "dose_gy",
    "voxelise",
]
