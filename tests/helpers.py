"""Independent readers for tests: geometry from raw DICOM attributes with numpy only, so test
expectations never come from the code under test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset


def read_ct(folder: Path) -> tuple[list[Dataset], np.ndarray, np.ndarray, np.ndarray]:
    """CT slices of ``folder`` (any file names) sorted by position along the normal.

    Returns (datasets, stored (nk, ni, nj), hu (nk, ni, nj) float32, centres) where centres is
    (z (nk,), x (ni, nj), y (ni, nj)) in mm; the series must be axial without tilt.
    """
    dss = []
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            try:
                ds = pydicom.dcmread(p)
            except Exception:
                continue
            if ds.get("Modality") == "CT":
                dss.append(ds)
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    n = np.cross(iop[:3], iop[3:])
    assert abs(abs(n[2]) - 1) < 1e-6, "test reader handles axial series only"
    dss.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, dtype=float), n)))
    stored = np.stack([d.pixel_array for d in dss])
    slope = np.array([float(d.get("RescaleSlope", 1)) for d in dss], dtype=np.float32)
    inter = np.array([float(d.get("RescaleIntercept", 0)) for d in dss], dtype=np.float32)
    hu = stored.astype(np.float32) * slope[:, None, None] + inter[:, None, None]
    ps = np.array(dss[0].PixelSpacing, dtype=float)
    ipp = np.array(dss[0].ImagePositionPatient, dtype=float)
    i = np.arange(stored.shape[1])[:, None]
    j = np.arange(stored.shape[2])[None, :]
    x = ipp[0] + j * ps[1] * iop[0] + i * ps[0] * iop[3]
    y = ipp[1] + j * ps[1] * iop[1] + i * ps[0] * iop[4]
    z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
    return dss, stored, hu, (z, x, y)


def read_dose(path: Path) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """RTDOSE dataset, stored array (frames, rows, cols) and voxel centres (..., 3) mm."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    n = np.cross(iop[:3], iop[3:])
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    off = np.array(ds.GridFrameOffsetVector, dtype=float)
    if off[0] != 0:  # absolute z positions
        plane0 = ipp.copy()
        origins = np.array([[plane0[0], plane0[1], z] for z in off])
    else:
        origins = ipp + off[:, None] * n
    ps = np.array(ds.PixelSpacing, dtype=float)
    i = np.arange(ds.Rows)[:, None, None]
    j = np.arange(ds.Columns)[None, :, None]
    centres = origins[:, None, None, :] + (j * ps[1] * iop[:3] + i * ps[0] * iop[3:])[None]
    return ds, arr, centres


def assert_nothing_written(out: Path) -> None:
    """No output folder ``out`` and no partial folder of the atomic writer beside it."""
    assert not out.exists()
    assert not any(p.name.startswith(".rtdeface-partial-") for p in out.parent.iterdir())
