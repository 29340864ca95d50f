"""A synthetic head-and-neck radiotherapy case, written in every way real scanners store it.

The anatomy is defined analytically in DICOM patient coordinates (LPS, mm: +x patient left,
+y posterior, +z superior; the face is at negative y). :func:`write_phantom_case` writes it as
real DICOM files (CT series, RTSTRUCT, RTDOSE, RTPLAN; one study, one frame of reference, all
cross-references resolving) for one storage :class:`Variant` from :data:`VARIANTS`.

Every variant except ``aniso`` samples the *same* CT lattice of voxel centres (the baseline
``hfs`` lattice), only indexed differently (orientation, slice order, instance numbers, file
names) or encoded differently (signedness, rescale, transfer syntax), so any correct loader
must see identical Hounsfield units at identical patient points.

Analytic truth
--------------
* :func:`phantom_hu` and :func:`phantom_dose_gy` give HU and dose at any patient points.
* :func:`roi_polygons` gives the exact geometry written for each ROI on each CT plane.
* :class:`PhantomTruth` (returned by :func:`write_phantom_case`) gives the eye landmarks
  computed from the written eye contours with the published definitions.

Exactness
---------
Box-shaped ROIs have x and y boundaries on even millimetres and z boundaries half-way
between slice planes, so no voxel centre of the baseline CT (odd millimetres in x and y,
slices at ``-120 + 2.5 k``), the ``aniso`` CT or any dose grid lies on a boundary. The body
is the analytic head shape *voxelised on the baseline CT lattice*: a point belongs to the body
when its nearest baseline CT voxel centre does, so the BODY contour (the union of baseline
pixel squares) agrees exactly with the CT and with the zero-dose region. Contour coordinates
are rounded to :data:`CONTOUR_DECIMALS` decimals before writing, so the values in the file
equal the values returned by :func:`roi_polygons` exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import shapely
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    RLELossless,
)
from shapely.geometry import LineString, Point, Polygon
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from rtdeface.geometry import affine_from_attributes

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"

CONTOUR_DECIMALS = 6
"""Contour coordinates (mm) are rounded to this many decimals before they are written."""

EYE_RADIUS_MM = 12.0
"""Radius (mm) of each vitreous sphere (and of the Eye_L / Eye_R ROIs)."""

EYE_CENTRES_MM: dict[str, tuple[float, float, float]] = {
    "Eye_L": (32.0, -66.0, 21.0),
    "Eye_R": (-32.0, -66.0, 21.0),
}
"""Centres (x, y, z) in mm, LPS, of the eyes; Eye_L is on the patient's left (+x)."""

LENS_RADIUS_MM = 3.5
"""Radius (mm) of each lens sphere."""

LENS_CENTRES_MM: dict[str, tuple[float, float, float]] = {
    "Lens_L": (32.0, -73.0, 21.0),
    "Lens_R": (-32.0, -73.0, 21.0),
}
"""Centres (x, y, z) in mm, LPS, of the lenses (anterior part of each eye)."""

SPHERE_VERTICES = 32
"""Vertices per plane of a sphere ROI; a multiple of 4 so the angles 0/90/180/270 deg occur."""

BOXES_MM: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    # name: ((x_min, x_max), (y_min, y_max), (z_min, z_max)), mm, LPS
    "PTV_Face": ((-16.0, 16.0), (-100.0, -56.0), (1.25, 31.25)),
    "PTV_Neck": ((-30.0, 30.0), (-20.0, 16.0), (-101.25, -61.25)),
    "Brainstem": ((-10.0, 10.0), (10.0, 30.0), (-18.75, 11.25)),
    "Parotid_L": ((38.0, 56.0), (-10.0, 20.0), (-41.25, -13.75)),
    "Parotid_R": ((-56.0, -38.0), (-10.0, 20.0), (-41.25, -13.75)),
    "SpinalCord": ((-4.0, 4.0), (36.0, 44.0), (-121.25, -18.75)),
    "Mouth_Avoid": ((-20.0, 20.0), (-90.0, -60.0), (-36.25, -21.25)),
}
"""Axis-aligned box ROIs: ((x_min, x_max), (y_min, y_max), (z_min, z_max)) in mm."""

RING_OUTER_MM = ((-36.0, 36.0), (-26.0, 22.0))
"""x and y extent (mm) of the outer boundary of z_PTV_ring (z range as PTV_Neck)."""

SKULL_CENTRE_MM = (0.0, 5.0, 15.0)
"""Centre (mm) of the head and skull ellipsoids."""

SKULL_OUTER_SEMI_AXES_MM = (66.0, 86.0, 86.0)
"""Semi-axes (mm) of the outer skull table."""

SKULL_INNER_SEMI_AXES_MM = (60.0, 80.0, 80.0)
"""Semi-axes (mm) of the inner skull table (the brain)."""

SKULL_ROI_Z_RANGE_MM = (46.25, 93.75)
"""Bone_Skull is written (outer + inner ellipse) on planes inside this z range."""

ELLIPSE_VERTICES = 64
"""Vertices per ellipse contour of Bone_Skull."""

MARKER_POINT_MM = (0.0, -84.0, 25.0)
"""The single POINT contour of ROI 'Marker' (on a baseline CT plane, in the face)."""

MASK_LINE_Z_MM = 40.0
"""Plane (mm) of the OPEN_PLANAR ROI 'Mask_Line' (above the eyes)."""

MASK_LINE_XY_MM = ((-60.0, -70.0), (-30.0, -85.0), (0.0, -90.0), (30.0, -85.0), (60.0, -70.0))
"""Vertices (x, y) in mm of the open polyline 'Mask_Line'."""

PRESCRIPTION_GY = 60.0
"""Dose inside both PTV boxes (Gy)."""

BATH_DOSE_GY = 2.0
"""Minimum dose (Gy) anywhere inside the body."""

DOSE_FALLOFF_MM = 8.0
"""Gaussian fall-off length (mm) of the dose outside each PTV box."""

DOSE_GRID_SCALING = 1e-5
"""Gy per stored RTDOSE unit."""

HU_AIR = -1000.0
HU_SOFT_TISSUE = 40.0
HU_BONE = 800.0
HU_BRAIN = 30.0
HU_FAT = -80.0
HU_VITREOUS = 10.0
HU_LENS = 70.0
HU_NEURAL = 35.0
HU_GLAND = 20.0
HU_MANDIBLE = 700.0
HU_VERTEBRA = 600.0

PATIENT_NAME = "PHANTOM^HEAD"
PATIENT_ID = "PH-0001"
STUDY_DATE = "20240115"
STUDY_TIME = "093000"


# --------------------------------------------------------------------------- lattices


@dataclass(frozen=True)
class Lattice:
    """An axis-aligned lattice of voxel centres in patient coordinates (mm, LPS).

    The centres are ``x_first_mm + dx_mm * n`` for ``n < nx`` (likewise y and z); the spacings
    are positive. A DICOM grid samples the lattice through its own orientation.
    """

    x_first_mm: float
    dx_mm: float
    nx: int
    y_first_mm: float
    dy_mm: float
    ny: int
    z_first_mm: float
    dz_mm: float
    nz: int

    def x_mm(self) -> FloatArray:
        """Lattice x values (mm), increasing, shape (nx,)."""
        return self.x_first_mm + self.dx_mm * np.arange(self.nx, dtype=np.float64)

    def y_mm(self) -> FloatArray:
        """Lattice y values (mm), increasing, shape (ny,)."""
        return self.y_first_mm + self.dy_mm * np.arange(self.ny, dtype=np.float64)

    def z_mm(self) -> FloatArray:
        """Lattice z values (mm), increasing, shape (nz,)."""
        return self.z_first_mm + self.dz_mm * np.arange(self.nz, dtype=np.float64)


BASELINE_CT_LATTICE = Lattice(-127.0, 2.0, 128, -127.0, 2.0, 128, -120.0, 2.5, 92)
"""Baseline CT: 128 x 128 pixels of 2 mm (x, y in -127..127), 92 slices z = -120..107.5."""

ANISO_CT_LATTICE = Lattice(-87.7, 0.8, 220, -104.45, 1.1, 190, -119.5, 3.0, 76)
"""The ``aniso`` CT: 0.8 mm columns (x), 1.1 mm rows (y), 3 mm slices (z = -119.5..105.5)."""

BASELINE_DOSE_LATTICE = Lattice(-88.5, 3.0, 60, -111.25, 2.5, 86, -119.0, 3.0, 76)
"""Dose grid: 3 mm in x, 2.5 mm in y, 3 mm frames (z = -119..106); offset from the CT."""

PARTIAL_DOSE_LATTICE = Lattice(-145.5, 3.0, 98, -111.25, 2.5, 86, -119.0, 3.0, 40)
"""``dose_partial``: wider than the CT in x (-145.5..145.5), frames only z = -119..-2."""


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """How one phantom case is stored.

    Attributes
    ----------
    name : str
        Key in :data:`VARIANTS`; also the entropy of every UID of the case.
    patient_position : str
        DICOM PatientPosition (HFS, HFP, FFS, FFP, HFDL, FFDR).
    ct_orientation : tuple of 6 float
        CT ImageOrientationPatient (row direction cosines, then column direction cosines).
    ct_lattice : Lattice
        Patient-space lattice of CT voxel centres.
    pixel_representation : int
        0 unsigned, 1 signed (two's complement) CT storage.
    bits_stored : int
        CT BitsStored (BitsAllocated is always 16).
    rescale_slope, rescale_intercept : float
        HU = stored * slope + intercept.
    rle : bool
        Write the CT with the RLE Lossless transfer syntax.
    slice_order : str
        ``"increasing"`` (files and InstanceNumber inferior to superior) or ``"shuffled"``
        (files written superior to inferior, InstanceNumber a non-monotonic permutation, file
        names derived from a hash).
    dose_lattice : Lattice
        Patient-space lattice of dose voxel centres.
    dose_orientation : tuple of 6 float
        RTDOSE ImageOrientationPatient.
    dose_frames_descending : bool
        Frames stored in decreasing position along the slice normal (negative offsets).
    dose_offsets_absolute : bool
        GridFrameOffsetVector holds absolute z (needs an HFS dose orientation).
    dvh : bool
        Write a small DVHSequence in the RTDOSE.
    face_mask : bool
        Add a thermoplastic mask shell molded to the face (:func:`add_face_mask`) to the CT.
        The BODY ROI and every other ROI are unchanged (the mask lies outside the body).
    """

    name: str
    patient_position: str = "HFS"
    ct_orientation: tuple[float, float, float, float, float, float] = (1, 0, 0, 0, 1, 0)
    ct_lattice: Lattice = BASELINE_CT_LATTICE
    pixel_representation: int = 1
    bits_stored: int = 16
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    rle: bool = False
    slice_order: str = "increasing"
    dose_lattice: Lattice = BASELINE_DOSE_LATTICE
    dose_orientation: tuple[float, float, float, float, float, float] = (1, 0, 0, 0, 1, 0)
    dose_frames_descending: bool = False
    dose_offsets_absolute: bool = False
    dvh: bool = False
    face_mask: bool = False

    def __post_init__(self) -> None:
        for iop in (self.ct_orientation, self.dose_orientation):
            r, c = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
            if not (np.isclose(r @ r, 1) and np.isclose(c @ c, 1) and np.isclose(r @ c, 0)):
                raise ValueError(f"variant {self.name}: orientation {iop} is not orthonormal")
            if abs(np.cross(r, c)[2]) != 1.0:
                raise ValueError(f"variant {self.name}: orientation {iop} is not axial")
        if self.slice_order not in ("increasing", "shuffled"):
            raise ValueError(f"variant {self.name}: unknown slice_order {self.slice_order!r}")
        if self.dose_offsets_absolute and tuple(self.dose_orientation) != (1, 0, 0, 0, 1, 0):
            raise ValueError(f"variant {self.name}: absolute dose offsets need HFS orientation")


def _oriented(
    name: str, position: str, iop: tuple[float, float, float, float, float, float]
) -> Variant:
    return Variant(name, patient_position=position, ct_orientation=iop, dose_orientation=iop)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("hfs", dvh=True),
        _oriented("hfp", "HFP", (-1, 0, 0, 0, -1, 0)),
        _oriented("ffs", "FFS", (-1, 0, 0, 0, 1, 0)),
        _oriented("ffp", "FFP", (1, 0, 0, 0, -1, 0)),
        _oriented("hfdl", "HFDL", (0, -1, 0, 1, 0, 0)),
        _oriented("ffdr", "FFDR", (0, -1, 0, -1, 0, 0)),
        Variant("reversed", slice_order="shuffled"),
        Variant("unsigned", pixel_representation=0, bits_stored=12, rescale_intercept=-1024.0),
        Variant("slope", rescale_slope=0.5, rescale_intercept=-1024.0),
        Variant("rle", rle=True),
        Variant("aniso", ct_lattice=ANISO_CT_LATTICE),
        Variant("dose_desc", dose_frames_descending=True),
        Variant("dose_abs", dose_offsets_absolute=True),
        Variant("dose_partial", dose_lattice=PARTIAL_DOSE_LATTICE),
    )
}
"""Every storage variant by name. All share the anatomy; see :class:`Variant`."""

SAME_CT_LATTICE_VARIANTS = (
    "hfs",
    "hfp",
    "ffs",
    "ffp",
    "hfdl",
    "ffdr",
    "reversed",
    "unsigned",
    "slope",
    "rle",
    "dose_desc",
    "dose_abs",
    "dose_partial",
)
"""Variants whose CT voxel centres and HU equal the baseline's exactly."""


def get_variant(variant: str | Variant) -> Variant:
    """Return the :class:`Variant` for a name in :data:`VARIANTS` (or the variant itself)."""
    if isinstance(variant, Variant):
        return variant
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"unknown phantom variant {variant!r}; choose one of {sorted(VARIANTS)}"
        ) from None


# --------------------------------------------------------------------------- anatomy


def _as_arrays(x: npt.ArrayLike, y: npt.ArrayLike, z: npt.ArrayLike) -> tuple[FloatArray, ...]:
    xa, ya, za = np.broadcast_arrays(
        np.asarray(x, dtype=np.float64),
        np.asarray(y, dtype=np.float64),
        np.asarray(z, dtype=np.float64),
    )
    return xa, ya, za


def _ellipsoid(
    x: FloatArray,
    y: FloatArray,
    z: FloatArray,
    centre: Sequence[float],
    semi: Sequence[float],
) -> BoolArray:
    q = ((x - centre[0]) / semi[0]) ** 2
    q += ((y - centre[1]) / semi[1]) ** 2
    q += ((z - centre[2]) / semi[2]) ** 2
    return np.asarray(q < 1.0)


def _in_box(x: FloatArray, y: FloatArray, z: FloatArray, name: str) -> BoolArray:
    (x0, x1), (y0, y1), (z0, z1) = BOXES_MM[name]
    return np.asarray((x > x0) & (x < x1) & (y > y0) & (y < y1) & (z > z0) & (z < z1))


def _analytic_body(x: FloatArray, y: FloatArray, z: FloatArray) -> BoolArray:
    """The continuous head-and-neck shape (before voxelisation)."""
    head = _ellipsoid(x, y, z, (0.0, 5.0, 15.0), (72.0, 92.0, 92.0))
    neck = (((x / 48.0) ** 2 + ((y - 15.0) / 50.0) ** 2) < 1.0) & (z < -40.0)
    brow = _ellipsoid(x, y, z, (0.0, -80.0, 37.0), (50.0, 8.0, 6.0))
    # Nose: a triangular wedge below the eyes, protruding further at its base.
    t = np.clip((22.0 - z) / 34.0, 0.0, 1.0)  # 0 at the bridge (z = 22), 1 at the base (z = -12)
    tip_y = -84.0 - 20.0 * t
    half_width = 6.0 + 10.0 * t
    depth = np.clip((y - tip_y) / (-70.0 - tip_y), 0.0, None)
    nose = (z > -12.0) & (z < 22.0) & (y > tip_y) & (y < -60.0) & (np.abs(x) < half_width * depth)
    upper_lip = _ellipsoid(x, y, z, (0.0, -80.0, -24.0), (22.0, 8.0, 4.5))
    lower_lip = _ellipsoid(x, y, z, (0.0, -78.0, -33.0), (20.0, 8.0, 4.5))
    chin = _ellipsoid(x, y, z, (0.0, -68.0, -52.0), (25.0, 15.0, 12.0))
    ears = _ellipsoid(np.abs(x), y, z, (72.0, 10.0, 15.0), (8.0, 14.0, 22.0))
    body = head | neck | brow | nose | upper_lip | lower_lip | chin | ears
    return np.asarray(body)


def _snap_to_baseline(
    x: FloatArray, y: FloatArray, z: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Nearest baseline CT voxel centre of each point (clipped to the baseline CT)."""
    lat = BASELINE_CT_LATTICE
    out = []
    for v, first, step, n in (
        (x, lat.x_first_mm, lat.dx_mm, lat.nx),
        (y, lat.y_first_mm, lat.dy_mm, lat.ny),
        (z, lat.z_first_mm, lat.dz_mm, lat.nz),
    ):
        idx = np.clip(np.floor((v - first) / step + 0.5), 0, n - 1)
        out.append(first + step * idx)
    return out[0], out[1], out[2]


def body_mask(x: npt.ArrayLike, y: npt.ArrayLike, z: npt.ArrayLike) -> BoolArray:
    """Whether patient points lie inside the body (the BODY ROI), vectorised.

    The body is the analytic head shape voxelised on :data:`BASELINE_CT_LATTICE`: a point is
    inside when its nearest baseline CT voxel centre is inside the analytic shape. Points
    outside the baseline CT are outside the body.

    Parameters
    ----------
    x, y, z : array_like
        Patient coordinates (mm, LPS), broadcast together.

    Returns
    -------
    numpy.ndarray of bool
        Broadcast shape of the inputs.
    """
    xa, ya, za = _as_arrays(x, y, z)
    sx, sy, sz = _snap_to_baseline(xa, ya, za)
    lat = BASELINE_CT_LATTICE
    half = np.array([lat.dx_mm, lat.dy_mm, lat.dz_mm]) / 2
    inside_fov = (
        (np.abs(xa - sx) <= half[0]) & (np.abs(ya - sy) <= half[1]) & (np.abs(za - sz) <= half[2])
    )
    return np.asarray(_analytic_body(sx, sy, sz) & inside_fov)


def phantom_hu(x: npt.ArrayLike, y: npt.ArrayLike, z: npt.ArrayLike) -> FloatArray:
    """Hounsfield units of the phantom at patient points, vectorised.

    Air outside the body; soft tissue, a skull vault with a brain, bony orbits lined with fat
    around vitreous eyes and lenses, nasal airway, mandible, vertebra with spinal cord,
    brainstem and parotid glands inside. All values are integers.

    Parameters
    ----------
    x, y, z : array_like
        Patient coordinates (mm, LPS), broadcast together.

    Returns
    -------
    numpy.ndarray of float64
        HU, broadcast shape of the inputs.
    """
    x, y, z = _as_arrays(x, y, z)
    body = body_mask(x, y, z)
    hu = np.full(x.shape, HU_AIR)
    hu[body] = HU_SOFT_TISSUE
    c = SKULL_CENTRE_MM
    outer = _ellipsoid(x, y, z, c, SKULL_OUTER_SEMI_AXES_MM)
    inner = _ellipsoid(x, y, z, c, SKULL_INNER_SEMI_AXES_MM)
    vault = z >= 0.0
    hu[body & outer & vault & ~inner] = HU_BONE
    hu[body & inner & vault] = HU_BRAIN
    hu[body & outer & (z > -4.0) & (z < 0.0)] = HU_BONE  # skull base
    # Mandible: a U of bone open posteriorly.
    ring = ((x / 50.0) ** 2 + (y / 66.0) ** 2 < 1.0) & ((x / 44.0) ** 2 + (y / 60.0) ** 2 >= 1.0)
    hu[body & ring & (y < -10.0) & (z > -58.0) & (z < -36.0)] = HU_MANDIBLE
    # Vertebral column with the cord inside.
    vert = (x**2 + (y - 40.0) ** 2 < 13.0**2) & (z < -8.0)
    hu[body & vert] = HU_VERTEBRA
    hu[body & _in_box(x, y, z, "SpinalCord")] = HU_NEURAL
    hu[body & _in_box(x, y, z, "Brainstem")] = HU_NEURAL
    hu[body & (_in_box(x, y, z, "Parotid_L") | _in_box(x, y, z, "Parotid_R"))] = HU_GLAND
    # Nasal airway.
    airway = (np.abs(x) < 5.0) & (y > -78.0) & (y < -45.0) & (z > -8.0) & (z < 10.0)
    hu[body & airway] = HU_AIR
    # Orbits: bone cup behind each eye, fat inside, vitreous, lens; eyelid tissue in front.
    for name, (ex, ey, ez) in EYE_CENTRES_MM.items():
        r = np.sqrt((x - ex) ** 2 + (y - ey) ** 2 + (z - ez) ** 2)
        behind = y > ey - 4.0
        hu[body & behind & (r >= 17.0) & (r < 20.0)] = HU_BONE
        hu[body & (r < 17.0) & (y >= ey - EYE_RADIUS_MM)] = HU_FAT
        hu[body & (r < 17.0) & (y < ey - EYE_RADIUS_MM)] = HU_SOFT_TISSUE
        hu[body & (r < EYE_RADIUS_MM)] = HU_VITREOUS
        lx, ly, lz = LENS_CENTRES_MM["Lens" + name[3:]]
        lens = (x - lx) ** 2 + (y - ly) ** 2 + (z - lz) ** 2 < LENS_RADIUS_MM**2
        hu[body & lens] = HU_LENS
    return hu


def _box_distance_mm(x: FloatArray, y: FloatArray, z: FloatArray, name: str) -> FloatArray:
    (x0, x1), (y0, y1), (z0, z1) = BOXES_MM[name]
    dx = np.maximum(np.maximum(x0 - x, x - x1), 0.0)
    dy = np.maximum(np.maximum(y0 - y, y - y1), 0.0)
    dz = np.maximum(np.maximum(z0 - z, z - z1), 0.0)
    return np.asarray(np.sqrt(dx**2 + dy**2 + dz**2))


def phantom_dose_gy(x: npt.ArrayLike, y: npt.ArrayLike, z: npt.ArrayLike) -> FloatArray:
    """Physical dose (Gy) at patient points, vectorised.

    :data:`PRESCRIPTION_GY` inside the PTV_Face and PTV_Neck boxes, a Gaussian fall-off of
    length :data:`DOSE_FALLOFF_MM` outside them, at least :data:`BATH_DOSE_GY` anywhere in the
    body (:func:`body_mask`) and exactly 0 outside it.

    Parameters
    ----------
    x, y, z : array_like
        Patient coordinates (mm, LPS), broadcast together.

    Returns
    -------
    numpy.ndarray of float64
        Dose in Gy, broadcast shape of the inputs.
    """
    x, y, z = _as_arrays(x, y, z)
    d = np.minimum(_box_distance_mm(x, y, z, "PTV_Face"), _box_distance_mm(x, y, z, "PTV_Neck"))
    dose = np.maximum(PRESCRIPTION_GY * np.exp(-0.5 * (d / DOSE_FALLOFF_MM) ** 2), BATH_DOSE_GY)
    return np.asarray(np.where(body_mask(x, y, z), dose, 0.0))


# --------------------------------------------------------------------------- ROIs


@dataclass(frozen=True)
class RoiSpec:
    """One ROI of the structure set.

    Attributes
    ----------
    name : str
        ROIName.
    number : int
        ROINumber (deliberately not contiguous).
    interpreted_type : str
        RTROIInterpretedType.
    geometric_type : str
        ContourGeometricType of all its contours.
    colour : tuple of 3 int
        ROIDisplayColor.
    """

    name: str
    number: int
    interpreted_type: str
    geometric_type: str
    colour: tuple[int, int, int]


ROI_SPECS: tuple[RoiSpec, ...] = (
    RoiSpec("BODY", 1, "EXTERNAL", "CLOSED_PLANAR", (0, 255, 0)),
    RoiSpec("Eye_L", 2, "ORGAN", "CLOSED_PLANAR", (0, 128, 255)),
    RoiSpec("Eye_R", 3, "ORGAN", "CLOSED_PLANAR", (0, 128, 255)),
    RoiSpec("Lens_L", 4, "ORGAN", "CLOSED_PLANAR", (255, 255, 0)),
    RoiSpec("Lens_R", 5, "ORGAN", "CLOSED_PLANAR", (255, 255, 0)),
    RoiSpec("Brainstem", 7, "ORGAN", "CLOSED_PLANAR", (255, 0, 255)),
    RoiSpec("Parotid_L", 8, "ORGAN", "CLOSED_PLANAR", (128, 255, 128)),
    RoiSpec("Parotid_R", 9, "ORGAN", "CLOSED_PLANAR", (128, 255, 128)),
    RoiSpec("SpinalCord", 10, "ORGAN", "CLOSED_PLANAR", (255, 128, 0)),
    RoiSpec("PTV_Face", 12, "PTV", "CLOSED_PLANAR", (255, 0, 0)),
    RoiSpec("PTV_Neck", 13, "PTV", "CLOSED_PLANAR", (200, 0, 0)),
    RoiSpec("z_PTV_ring", 15, "CONTROL", "CLOSED_PLANAR", (128, 128, 128)),
    RoiSpec("Mouth_Avoid", 16, "AVOIDANCE", "CLOSED_PLANAR", (0, 255, 255)),
    RoiSpec("Bone_Skull", 20, "ORGAN", "CLOSED_PLANAR", (255, 255, 255)),
    RoiSpec("Marker", 30, "MARKER", "POINT", (255, 255, 128)),
    RoiSpec("Mask_Line", 31, "CONTROL", "OPEN_PLANAR", (128, 0, 255)),
)
"""All ROIs, in StructureSetROISequence order (ROIContourSequence is written reversed)."""

ROI_BY_NAME: dict[str, RoiSpec] = {r.name: r for r in ROI_SPECS}


def _q(v: npt.ArrayLike) -> FloatArray:
    """Round coordinates to :data:`CONTOUR_DECIMALS` (and turn -0.0 into 0.0)."""
    return np.asarray(np.round(np.asarray(v, dtype=np.float64), CONTOUR_DECIMALS) + 0.0)


def _box_polygon(x0: float, x1: float, y0: float, y1: float) -> Polygon:
    return Polygon([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])


def _ellipse_ring(cx: float, cy: float, a: float, b: float, n: int) -> list[tuple[float, float]]:
    """Vertices of an ellipse, ``n`` a multiple of 4: 0/90/180/270 deg are exact extremes."""
    t = 2.0 * np.pi * np.arange(n) / n
    c, s = np.cos(t), np.sin(t)
    quarter = n // 4
    c[[0, quarter, 2 * quarter, 3 * quarter]] = [1.0, 0.0, -1.0, 0.0]
    s[[0, quarter, 2 * quarter, 3 * quarter]] = [0.0, 1.0, 0.0, -1.0]
    xs, ys = _q(cx + a * c), _q(cy + b * s)
    return [(float(px), float(py)) for px, py in zip(xs, ys, strict=True)]


def _sphere_section(centre: Sequence[float], radius: float, z: float) -> list[BaseGeometry]:
    r2 = radius**2 - (z - centre[2]) ** 2
    if r2 <= 0.0:
        return []
    r = float(np.sqrt(r2))
    return [Polygon(_ellipse_ring(centre[0], centre[1], r, r, SPHERE_VERTICES))]


def _z_in(z: float, z_range: tuple[float, float]) -> bool:
    return z_range[0] < z < z_range[1]


@lru_cache(maxsize=512)
def _body_section(z_mm: float) -> tuple[Polygon, ...]:
    """Union of the baseline pixel squares whose centre is in the body, on plane z."""
    lat = BASELINE_CT_LATTICE
    xs, ys = lat.x_mm(), lat.y_mm()
    xx, yy = np.meshgrid(xs, ys)  # (ny, nx)
    mask = body_mask(xx, yy, np.full(xx.shape, z_mm))
    boxes = []
    for i in np.flatnonzero(mask.any(axis=1)):
        row = np.concatenate([[False], mask[i], [False]]).astype(np.int8)
        edges = np.flatnonzero(np.diff(row))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            x0 = xs[start] - lat.dx_mm / 2
            x1 = xs[stop - 1] + lat.dx_mm / 2
            boxes.append(_box_polygon(x0, x1, ys[i] - lat.dy_mm / 2, ys[i] + lat.dy_mm / 2))
    if not boxes:
        return ()
    union = shapely.union_all(boxes)
    union = shapely.simplify(union, 0.0)  # drop collinear vertices only
    parts = list(getattr(union, "geoms", [union]))
    out = []
    for p in parts:
        p = orient(p, 1.0)
        ext = [(float(a), float(b)) for a, b in _q(np.asarray(p.exterior.coords))[:-1]]
        holes = [
            [(float(a), float(b)) for a, b in _q(np.asarray(h.coords))[:-1]] for h in p.interiors
        ]
        out.append(Polygon(ext, holes))
    out.sort(key=lambda g: (g.bounds[0], g.bounds[1]))
    return tuple(out)


def _section(name: str, z: float) -> list[BaseGeometry]:
    """Geometry of ROI ``name`` on the plane z (empty when the ROI does not cross it)."""
    if name == "BODY":
        return list(_body_section(z))
    if name in EYE_CENTRES_MM:
        return _sphere_section(EYE_CENTRES_MM[name], EYE_RADIUS_MM, z)
    if name in LENS_CENTRES_MM:
        return _sphere_section(LENS_CENTRES_MM[name], LENS_RADIUS_MM, z)
    if name in BOXES_MM:
        (x0, x1), (y0, y1), zr = BOXES_MM[name]
        return [_box_polygon(x0, x1, y0, y1)] if _z_in(z, zr) else []
    if name == "z_PTV_ring":
        _, _, zr = BOXES_MM["PTV_Neck"]
        if not _z_in(z, zr):
            return []
        (ox0, ox1), (oy0, oy1) = RING_OUTER_MM
        outer = _box_polygon(ox0, ox1, oy0, oy1)
        hole = _box_polygon(-32.0, 32.0, -22.0, 18.0)
        return [Polygon(outer.exterior.coords, [list(hole.exterior.coords)[::-1]])]
    if name == "Bone_Skull":
        if not _z_in(z, SKULL_ROI_Z_RANGE_MM):
            return []
        cx, cy, cz = SKULL_CENTRE_MM
        rings = []
        for a, b, c in (SKULL_OUTER_SEMI_AXES_MM, SKULL_INNER_SEMI_AXES_MM):
            f = float(np.sqrt(1.0 - ((z - cz) / c) ** 2))
            rings.append(_ellipse_ring(cx, cy, a * f, b * f, ELLIPSE_VERTICES))
        return [Polygon(rings[0], [rings[1]])]
    if name == "Marker":
        mx, my, mz = MARKER_POINT_MM
        return [Point(mx, my, z)] if np.isclose(z, mz, atol=1e-6) else []
    if name == "Mask_Line":
        if not np.isclose(z, MASK_LINE_Z_MM, atol=1e-6):
            return []
        return [LineString([(px, py, z) for px, py in MASK_LINE_XY_MM])]
    raise ValueError(f"unknown phantom ROI {name!r}; choose one of {[r.name for r in ROI_SPECS]}")


def roi_polygons(name: str, variant: str | Variant = "hfs") -> dict[float, list[BaseGeometry]]:
    """Exact geometry written for one ROI, per CT plane of a variant.

    Parameters
    ----------
    name : str
        An ROI name from :data:`ROI_SPECS`.
    variant : str or Variant
        The contours lie on this variant's CT planes (only ``aniso`` differs).

    Returns
    -------
    dict of float to list of shapely geometry
        Plane z (mm, exactly the CT slice z) to the geometries on that plane, in the order
        written: 2-D Polygons (x, y in mm; each exterior and each hole is written as its own
        contour, without repeating the first vertex) for CLOSED_PLANAR ROIs, 3-D Points for
        POINT and 3-D LineStrings for OPEN_PLANAR. Planes without geometry are absent.
    """
    v = get_variant(variant)
    out: dict[float, list[BaseGeometry]] = {}
    planes = v.ct_lattice.z_mm()
    for z in planes:
        geoms = _section(name, float(z))
        if name in ("Marker", "Mask_Line"):
            # Single-plane ROIs sit on the variant's CT plane nearest their nominal z.
            nominal = MARKER_POINT_MM[2] if name == "Marker" else MASK_LINE_Z_MM
            nearest = float(planes[np.argmin(np.abs(planes - nominal))])
            geoms = _section(name, nominal) if z == nearest else []
            geoms = [shapely.force_3d(shapely.force_2d(g), z) for g in geoms]
        if geoms:
            out[float(z)] = geoms
    return out


def contour_rings(geom: BaseGeometry, z_mm: float) -> list[FloatArray]:
    """The DICOM contours (each shape (n, 3), mm) that represent one ROI geometry on plane z.

    A Polygon gives its exterior then each hole (first vertex not repeated); a Point gives one
    point; a LineString gives its vertices.
    """
    if isinstance(geom, Polygon):
        rings = [np.asarray(geom.exterior.coords)[:-1]]
        rings += [np.asarray(h.coords)[:-1] for h in geom.interiors]
        return [
            np.column_stack([r[:, 0], r[:, 1], np.full(len(r), z_mm)]).astype(np.float64)
            for r in rings
        ]
    pts = np.asarray(geom.coords, dtype=np.float64)
    return [np.column_stack([pts[:, 0], pts[:, 1], np.full(len(pts), z_mm)])]


# --------------------------------------------------------------------------- truth


@dataclass(frozen=True)
class PhantomTruth:
    """Expected landmarks of a case, from the written eye contours (published definitions).

    Attributes
    ----------
    z_inferior_eye_mm : float
        Smallest z of any Eye_L / Eye_R contour point.
    z_central_eye_plane_mm : float
        The eye contour plane nearest the mean of the two eyes' mean contour-plane z (ties go
        to the lower z).
    y_mid_mm : float
        Midpoint of the smallest and largest y of all eye contour points on the central plane.
    eye_centres_mm : dict of str to (x, y, z)
        :data:`EYE_CENTRES_MM`.
    eye_radius_mm : float
        :data:`EYE_RADIUS_MM`.
    ct_slice_z_mm : tuple of float
        z of every CT slice, increasing.
    """

    z_inferior_eye_mm: float
    z_central_eye_plane_mm: float
    y_mid_mm: float
    eye_centres_mm: dict[str, tuple[float, float, float]]
    eye_radius_mm: float
    ct_slice_z_mm: tuple[float, ...]


def compute_truth(variant: str | Variant = "hfs") -> PhantomTruth:
    """Landmarks of a variant's case from its eye contours (see :class:`PhantomTruth`)."""
    v = get_variant(variant)
    eyes = {name: roi_polygons(name, v) for name in EYE_CENTRES_MM}
    all_planes = sorted({z for planes in eyes.values() for z in planes})
    z_inf = float(min(all_planes))
    target = float(np.mean([np.mean(list(planes)) for planes in eyes.values()]))
    dist = [abs(z - target) for z in all_planes]
    best = min(dist)
    z_central = float(min(z for z, d in zip(all_planes, dist, strict=True) if d == best))
    ys = np.concatenate(
        [
            np.asarray(g.exterior.coords)[:, 1]
            for planes in eyes.values()
            for g in planes.get(z_central, [])
            if isinstance(g, Polygon)
        ]
    )
    y_mid = float((ys.min() + ys.max()) / 2.0)
    return PhantomTruth(
        z_inferior_eye_mm=z_inf,
        z_central_eye_plane_mm=z_central,
        y_mid_mm=y_mid,
        eye_centres_mm=dict(EYE_CENTRES_MM),
        eye_radius_mm=EYE_RADIUS_MM,
        ct_slice_z_mm=tuple(float(z) for z in v.ct_lattice.z_mm()),
    )


# --------------------------------------------------------------------------- grid layout


@dataclass(frozen=True, eq=False)
class _PlaneLayout:
    """How an axial lattice is indexed through one orientation."""

    orientation: tuple[float, ...]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    origin_xy: tuple[float, float]  # x, y of pixel (0, 0)
    normal_z: float  # +1 or -1

    def plane_xy(self) -> tuple[FloatArray, FloatArray]:
        """x and y (mm) of every pixel of a plane, each shape (rows, columns)."""
        r = np.asarray(self.orientation[:3], dtype=np.float64)
        c = np.asarray(self.orientation[3:], dtype=np.float64)
        i = np.arange(self.rows, dtype=np.float64)[:, None] * self.pixel_spacing[0]
        j = np.arange(self.columns, dtype=np.float64)[None, :] * self.pixel_spacing[1]
        x = self.origin_xy[0] + i * c[0] + j * r[0]
        y = self.origin_xy[1] + i * c[1] + j * r[1]
        return x, y


def _layout(lattice: Lattice, orientation: Sequence[float]) -> _PlaneLayout:
    r = np.asarray(orientation[:3], dtype=np.float64)
    c = np.asarray(orientation[3:], dtype=np.float64)
    along_x = (lattice.nx, lattice.dx_mm)
    along_y = (lattice.ny, lattice.dy_mm)
    columns, col_spacing = along_x if abs(r[0]) > 0.5 else along_y
    rows, row_spacing = along_x if abs(c[0]) > 0.5 else along_y
    xs, ys = lattice.x_mm(), lattice.y_mm()
    # Pixel (0, 0) is the lattice corner that is smallest along both the row and column axes.
    ox = float(xs[0] if (r[0] + c[0]) >= 0 else xs[-1])
    oy = float(ys[0] if (r[1] + c[1]) >= 0 else ys[-1])
    return _PlaneLayout(
        tuple(float(v) for v in orientation),
        rows,
        columns,
        (row_spacing, col_spacing),
        (ox, oy),
        float(np.cross(r, c)[2]),
    )


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """A written phantom case.

    Attributes
    ----------
    out_dir : Path
        The case directory.
    ct_paths : tuple of Path
        CT slice files, in the order they were written.
    rtstruct_path, rtdose_path, rtplan_path : Path
        The RT objects.
    variant : Variant
        How the case is stored.
    truth : PhantomTruth
        Expected landmarks.
    ct_affine : numpy.ndarray, shape (4, 4)
        CT index-to-patient affine in the :mod:`rtdeface.geometry` convention, slices ordered
        by increasing position along the slice normal IOP[0:3] x IOP[3:6].
    ct_shape : tuple of 3 int
        ``(slices, rows, columns)``.
    """

    out_dir: Path
    ct_paths: tuple[Path, ...]
    rtstruct_path: Path
    rtdose_path: Path
    rtplan_path: Path
    variant: Variant
    truth: PhantomTruth
    ct_affine: FloatArray = field(repr=False)
    ct_shape: tuple[int, int, int]


def _uid(v: Variant, role: str, index: int = 0) -> str:
    """Deterministic ``2.25.<128-bit int>`` UID from the variant name, role and index.

    (``pydicom.uid.generate_uid(prefix=None, ...)`` ignores ``entropy_srcs`` and is random.)
    """
    digest = hashlib.sha256("\x1f".join(["rtdeface-phantom", v.name, role, str(index)]).encode())
    return f"2.25.{int(digest.hexdigest()[:32], 16)}"


def _fmt(values: npt.ArrayLike) -> list[str]:
    """Decimal strings that read back as exactly the given floats (DS, <= 16 chars)."""
    out = []
    for val in np.asarray(values, dtype=np.float64).ravel():
        s = repr(float(val) + 0.0)
        if s.endswith(".0"):
            s = s[:-2]
        if len(s) > 16:
            raise ValueError(f"value {val!r} does not fit a DS exactly; round it first")
        out.append(s)
    return out


CONTOUR_DATA_TAG = Tag(0x3006, 0x0050)


def _set_raw_ds(ds: Dataset, tag: BaseTag, values: list[str]) -> None:
    """Store already-formatted DS strings as a raw element (fast; pydicom writes it verbatim)."""
    raw = "\\".join(values).encode("ascii")
    if len(raw) % 2:
        raw += b" "
    ds[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, False, True)


def _common(ds: Dataset, v: Variant, uids: dict[str, str], modality: str, series: str) -> None:
    """Patient, study, series, frame-of-reference, equipment and SOP-common attributes."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = STUDY_DATE
    ds.InstanceCreationTime = "101500"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19580312"
    ds.PatientSex = "M"
    ds.PatientAge = "065Y"
    ds.OtherPatientIDs = "MRN-778899"
    ds.PatientAddress = "1 Phantom Street, Testville"
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.StudyID = "HN01"
    ds.AccessionNumber = "ACC123456"
    ds.ReferringPhysicianName = "REFERRER^ROSE"
    ds.StudyDescription = "H&N RT planning (phantom)"
    ds.Modality = modality
    ds.SeriesInstanceUID = uids[series]
    ds.SeriesNumber = {"ct": 1, "rtstruct": 2, "rtplan": 3, "rtdose": 4}[series]
    ds.SeriesDate = STUDY_DATE
    ds.SeriesTime = STUDY_TIME
    ds.SeriesDescription = f"phantom {series} ({v.name})"
    ds.OperatorsName = "OPERATOR^OTTO"
    ds.FrameOfReferenceUID = uids["for"]
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "rtdeface"
    ds.ManufacturerModelName = "phantom"
    ds.InstitutionName = "Phantom General Hospital"
    ds.InstitutionAddress = "2 Hospital Road, Testville"
    ds.StationName = "CTSIM01"
    ds.DeviceSerialNumber = "SN-0042"
    ds.SoftwareVersions = "1.0"


def _save(ds: Dataset, path: Path, transfer_syntax: UID = ExplicitVRLittleEndian) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


@lru_cache(maxsize=4)
def _lattice_hu(lattice: Lattice) -> FloatArray:
    """:func:`phantom_hu` on an axis-aligned lattice, shape (nz, ny, nx), read-only, cached."""
    hu = phantom_hu(
        lattice.x_mm()[None, None, :], lattice.y_mm()[None, :, None], lattice.z_mm()[:, None, None]
    )
    hu.setflags(write=False)
    return hu


MASK_HU = 150.0
"""HU of the phantom's thermoplastic mask shell (dense polymer; below the bone threshold)."""

MASK_GAP_MM = (2.0, 5.0)
"""The mask shell holds air points whose distance to the body lies in this range (mm)."""

MASK_Y_MAX_MM = -40.0
"""The mask covers the face: points anterior to this y (mm)."""

MASK_Z_RANGE_MM = (-75.0, 60.0)
"""z range (mm) of the mask shell (chin to forehead)."""


def add_face_mask(hu: FloatArray, lattice: Lattice) -> FloatArray:
    """A thermoplastic mask shell molded to the face, added to a lattice HU volume.

    The shell is the air between :data:`MASK_GAP_MM` from the body (Euclidean distance on the
    lattice), anterior to :data:`MASK_Y_MAX_MM`, within :data:`MASK_Z_RANGE_MM`, at
    :data:`MASK_HU`: a 3 mm shell 2 mm off the skin of the nose, lips, chin and forehead.

    Parameters
    ----------
    hu : numpy.ndarray, shape (nz, ny, nx)
        HU on ``lattice`` (axis-aligned, as :func:`phantom_hu` on its centres).
    lattice : Lattice

    Returns
    -------
    numpy.ndarray, shape (nz, ny, nx)
        A new array with the shell.
    """
    from scipy import ndimage

    body = hu > HU_AIR + 1.0
    dist = ndimage.distance_transform_edt(
        ~body, sampling=(lattice.dz_mm, lattice.dy_mm, lattice.dx_mm)
    )
    y = lattice.y_mm()[None, :, None]
    z = lattice.z_mm()[:, None, None]
    shell = (dist > MASK_GAP_MM[0]) & (dist <= MASK_GAP_MM[1]) & (y < MASK_Y_MAX_MM)
    shell &= (z >= MASK_Z_RANGE_MM[0]) & (z <= MASK_Z_RANGE_MM[1])
    out = np.array(hu, dtype=np.float64)
    out[shell] = MASK_HU
    return out


def _write_ct(
    v: Variant, uids: dict[str, str], ct_dir: Path
) -> tuple[list[Path], list[tuple[float, str]], FloatArray, tuple[int, int, int]]:
    """Write the CT slices; return paths, (z, SOPInstanceUID) per slice by z, affine, shape."""
    lay = _layout(v.ct_lattice, v.ct_orientation)
    px, py = lay.plane_xy()
    zs = v.ct_lattice.z_mm()
    nz = zs.size
    lat = v.ct_lattice
    jx = np.rint((px - lat.x_first_mm) / lat.dx_mm).astype(np.intp)
    iy = np.rint((py - lat.y_first_mm) / lat.dy_mm).astype(np.intp)
    lattice_hu = add_face_mask(_lattice_hu(lat), lat) if v.face_mask else _lattice_hu(lat)
    hu = lattice_hu[:, iy, jx]  # (nz, rows, cols)
    stored = (np.round(hu) - v.rescale_intercept) / v.rescale_slope
    if v.pixel_representation == 1:
        lo, hi = -(2 ** (v.bits_stored - 1)), 2 ** (v.bits_stored - 1) - 1
        dtype: type[np.integer] = np.int16
    else:
        lo, hi = 0, 2**v.bits_stored - 1
        dtype = np.uint16
    pixels = np.clip(np.round(stored), lo, hi).astype(dtype)

    if v.slice_order == "shuffled":
        write_order = list(range(nz))[::-1]
        rng = np.random.default_rng(20240115)
        numbers = rng.permutation(nz) + 1
    else:
        write_order = list(range(nz))
        numbers = np.arange(nz) + 1
    paths: list[Path] = []
    slices: list[tuple[float, str]] = []
    for k in range(nz):
        slices.append((float(zs[k]), _uid(v, "ct-slice", k)))
    header = Dataset()
    _common(header, v, uids, "CT", "ct")
    header.SOPClassUID = CT_IMAGE_STORAGE
    header.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    header.PatientPosition = v.patient_position
    header.AcquisitionNumber = 1
    header.ContentDate = STUDY_DATE
    header.ContentTime = STUDY_TIME
    header.AcquisitionDate = STUDY_DATE
    header.AcquisitionTime = STUDY_TIME
    header.KVP = "120"
    header.ScanOptions = "HELICAL MODE"
    header.ConvolutionKernel = "STANDARD"
    header.BodyPartExamined = "HEAD"
    header.ImageOrientationPatient = _fmt(v.ct_orientation)
    header.PixelSpacing = _fmt(lay.pixel_spacing)
    header.SliceThickness = _fmt([v.ct_lattice.dz_mm])[0]
    header.SamplesPerPixel = 1
    header.PhotometricInterpretation = "MONOCHROME2"
    header.Rows = lay.rows
    header.Columns = lay.columns
    header.BitsAllocated = 16
    header.BitsStored = v.bits_stored
    header.HighBit = v.bits_stored - 1
    header.PixelRepresentation = v.pixel_representation
    header.RescaleIntercept = _fmt([v.rescale_intercept])[0]
    header.RescaleSlope = _fmt([v.rescale_slope])[0]
    header.RescaleType = "HU"
    header.WindowCenter = "40"
    header.WindowWidth = "400"
    for k in write_order:
        # Shared, never-mutated header elements; per-slice elements are new tags.
        ds = Dataset(dict(header.items()))
        ds.SOPInstanceUID = slices[k][1]
        ds.InstanceNumber = int(numbers[k])
        ds.ImagePositionPatient = _fmt([lay.origin_xy[0], lay.origin_xy[1], zs[k]])
        ds.SliceLocation = _fmt([zs[k]])[0]
        if v.slice_order == "shuffled":
            digest = hashlib.sha1(ds.SOPInstanceUID.encode()).hexdigest()[:12]
            path = ct_dir / f"IM_{digest}.dcm"
        else:
            path = ct_dir / f"CT_{k + 1:04d}.dcm"
        if v.rle:
            ds.compress(RLELossless, pixels[k], generate_instance_uid=False)
            _save(ds, path, RLELossless)
        else:
            ds.PixelData = pixels[k].tobytes()
            _save(ds, path)
        paths.append(path)

    iop = v.ct_orientation
    normal_sorted = sorted(range(nz), key=lambda kk: lay.normal_z * zs[kk])
    first = normal_sorted[0]
    affine = affine_from_attributes(
        [lay.origin_xy[0], lay.origin_xy[1], float(zs[first])],
        iop,
        lay.pixel_spacing,
        v.ct_lattice.dz_mm,
    )
    return paths, slices, affine, (nz, lay.rows, lay.columns)


def _ref(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item


def _write_rtstruct(
    v: Variant, uids: dict[str, str], slices: list[tuple[float, str]], path: Path
) -> None:
    ds = Dataset()
    _common(ds, v, uids, "RTSTRUCT", "rtstruct")
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = uids["rtstruct_sop"]
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "HN_PHANTOM"
    ds.StructureSetName = "Head and neck phantom"
    ds.StructureSetDate = STUDY_DATE
    ds.StructureSetTime = "110000"

    slice_uid = {z: uid for z, uid in slices}
    series = Dataset()
    series.SeriesInstanceUID = uids["ct"]
    series.ContourImageSequence = DicomSequence([_ref(CT_IMAGE_STORAGE, uid) for _, uid in slices])
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired)
    study.ReferencedSOPInstanceUID = uids["study"]
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = uids["for"]
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    roi_items, contour_items, observation_items = [], [], []
    for n, spec in enumerate(ROI_SPECS):
        item = Dataset()
        item.ROINumber = spec.number
        item.ReferencedFrameOfReferenceUID = uids["for"]
        item.ROIName = spec.name
        item.ROIGenerationAlgorithm = "MANUAL"
        roi_items.append(item)

        contours = []
        for z, geoms in roi_polygons(spec.name, v).items():
            for geom in geoms:
                for ring in contour_rings(geom, z):
                    c = Dataset()
                    c.ContourImageSequence = DicomSequence([_ref(CT_IMAGE_STORAGE, slice_uid[z])])
                    c.ContourGeometricType = spec.geometric_type
                    c.NumberOfContourPoints = len(ring)
                    _set_raw_ds(c, CONTOUR_DATA_TAG, _fmt(ring))
                    contours.append(c)
        rc = Dataset()
        rc.ROIDisplayColor = list(spec.colour)
        rc.ContourSequence = DicomSequence(contours)
        rc.ReferencedROINumber = spec.number
        contour_items.append(rc)

        obs = Dataset()
        obs.ObservationNumber = n + 1
        obs.ReferencedROINumber = spec.number
        obs.ROIObservationLabel = spec.name
        obs.RTROIInterpretedType = spec.interpreted_type
        obs.ROIInterpreter = "PLANNER^PAT"
        observation_items.append(obs)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items[::-1])
    ds.RTROIObservationsSequence = DicomSequence(observation_items)
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = STUDY_DATE
    ds.ReviewTime = "120000"
    ds.ReviewerName = "REVIEWER^RITA"
    _save(ds, path)


def _write_rtplan(v: Variant, uids: dict[str, str], path: Path) -> None:
    ds = Dataset()
    _common(ds, v, uids, "RTPLAN", "rtplan")
    ds.SOPClassUID = RT_PLAN_STORAGE
    ds.SOPInstanceUID = uids["rtplan_sop"]
    ds.InstanceNumber = 1
    ds.RTPlanLabel = "HN_IMRT"
    ds.RTPlanName = "HN IMRT 60Gy"
    ds.RTPlanDate = STUDY_DATE
    ds.RTPlanTime = "113000"
    ds.RTPlanGeometry = "PATIENT"
    ds.ReferencedStructureSetSequence = DicomSequence(
        [_ref(RT_STRUCTURE_SET_STORAGE, uids["rtstruct_sop"])]
    )
    dose_ref = Dataset()
    dose_ref.DoseReferenceNumber = 1
    dose_ref.DoseReferenceUID = _uid(v, "dose-reference")
    dose_ref.DoseReferenceStructureType = "SITE"
    dose_ref.DoseReferenceDescription = "PTV"
    dose_ref.DoseReferenceType = "TARGET"
    dose_ref.TargetPrescriptionDose = _fmt([PRESCRIPTION_GY])[0]
    ds.DoseReferenceSequence = DicomSequence([dose_ref])

    isocentre = _fmt([0.0, -20.0, -40.0])
    beams, refs = [], []
    for number, (name, gantry) in enumerate((("G180", 180.0), ("G000", 0.0)), start=1):
        beam = Dataset()
        beam.BeamNumber = number
        beam.BeamName = name
        beam.BeamDescription = f"IMRT field {name}"
        beam.BeamType = "DYNAMIC"
        beam.RadiationType = "PHOTON"
        beam.TreatmentMachineName = "LINAC_A"
        beam.Manufacturer = "rtdeface"
        beam.PrimaryDosimeterUnit = "MU"
        beam.SourceAxisDistance = "1000"
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.NumberOfWedges = 0
        beam.NumberOfCompensators = 0
        beam.NumberOfBoli = 0
        beam.NumberOfBlocks = 0
        beam.FinalCumulativeMetersetWeight = "1"
        beam.ReferencedPatientSetupNumber = 1
        devices = []
        for kind, pairs in (("ASYMX", 1), ("ASYMY", 1), ("MLCX", 4)):
            d = Dataset()
            d.RTBeamLimitingDeviceType = kind
            d.NumberOfLeafJawPairs = pairs
            if kind == "MLCX":
                d.LeafPositionBoundaries = ["-40", "-20", "0", "20", "40"]
            devices.append(d)
        beam.BeamLimitingDeviceSequence = DicomSequence(devices)
        cps = []
        for index, (weight, shift) in enumerate(((0.0, 0.0), (1.0, 10.0))):
            cp = Dataset()
            cp.ControlPointIndex = index
            cp.CumulativeMetersetWeight = _fmt([weight])[0]
            positions = []
            for kind, values in (
                ("ASYMX", [-60.0, 60.0]),
                ("ASYMY", [-80.0, 80.0]),
                ("MLCX", [-30 + shift] * 4 + [30 + shift] * 4),
            ):
                p = Dataset()
                p.RTBeamLimitingDeviceType = kind
                p.LeafJawPositions = _fmt(values)
                positions.append(p)
            cp.BeamLimitingDevicePositionSequence = DicomSequence(positions)
            if index == 0:
                cp.NominalBeamEnergy = "6"
                cp.DoseRateSet = "600"
                cp.GantryAngle = _fmt([gantry])[0]
                cp.GantryRotationDirection = "NONE"
                cp.BeamLimitingDeviceAngle = "0"
                cp.BeamLimitingDeviceRotationDirection = "NONE"
                cp.PatientSupportAngle = "0"
                cp.PatientSupportRotationDirection = "NONE"
                cp.TableTopEccentricAngle = "0"
                cp.TableTopEccentricRotationDirection = "NONE"
                cp.IsocenterPosition = isocentre
                cp.SourceToSurfaceDistance = "900"
            cps.append(cp)
        beam.NumberOfControlPoints = len(cps)
        beam.ControlPointSequence = DicomSequence(cps)
        beams.append(beam)
        ref = Dataset()
        ref.ReferencedBeamNumber = number
        ref.BeamMeterset = "250"
        ref.BeamDose = "1"
        refs.append(ref)
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = 30
    group.NumberOfBeams = len(beams)
    group.NumberOfBrachyApplicationSetups = 0
    group.ReferencedBeamSequence = DicomSequence(refs)
    ds.FractionGroupSequence = DicomSequence([group])
    ds.BeamSequence = DicomSequence(beams)
    setup = Dataset()
    setup.PatientSetupNumber = 1
    setup.PatientPosition = v.patient_position
    setup.SetupTechnique = "ISOCENTRIC"
    ds.PatientSetupSequence = DicomSequence([setup])
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = STUDY_DATE
    ds.ReviewTime = "120000"
    ds.ReviewerName = "REVIEWER^RITA"
    _save(ds, path)


def _write_rtdose(v: Variant, uids: dict[str, str], path: Path) -> None:
    lay = _layout(v.dose_lattice, v.dose_orientation)
    px, py = lay.plane_xy()
    zs = v.dose_lattice.z_mm()
    # Frames ordered along the slice normal (ascending projection), reversed if descending.
    frame_z = zs if lay.normal_z > 0 else zs[::-1]
    if v.dose_frames_descending:
        frame_z = frame_z[::-1]
    dose = phantom_dose_gy(px[None], py[None], frame_z[:, None, None])
    stored = np.round(dose / DOSE_GRID_SCALING).astype(np.uint32)
    if v.dose_offsets_absolute:
        offsets = frame_z
    else:
        offsets = (frame_z - frame_z[0]) * lay.normal_z

    ds = Dataset()
    _common(ds, v, uids, "RTDOSE", "rtdose")
    ds.SOPClassUID = RT_DOSE_STORAGE
    ds.SOPInstanceUID = uids["rtdose_sop"]
    ds.InstanceNumber = 1
    ds.ContentDate = STUDY_DATE
    ds.ContentTime = "113500"
    ds.ImagePositionPatient = _fmt([lay.origin_xy[0], lay.origin_xy[1], frame_z[0]])
    ds.ImageOrientationPatient = _fmt(v.dose_orientation)
    ds.PixelSpacing = _fmt(lay.pixel_spacing)
    ds.SliceThickness = _fmt([v.dose_lattice.dz_mm])[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = int(frame_z.size)
    ds.FrameIncrementPointer = Tag(0x3004, 0x000C)
    ds.Rows = lay.rows
    ds.Columns = lay.columns
    ds.BitsAllocated = 32
    ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ds.DoseComment = "phantom dose"
    ds.GridFrameOffsetVector = _fmt(offsets)
    ds.DoseGridScaling = _fmt([DOSE_GRID_SCALING])[0]
    plan_ref = _ref(RT_PLAN_STORAGE, uids["rtplan_sop"])
    ds.ReferencedRTPlanSequence = DicomSequence([plan_ref])
    ds.ReferencedStructureSetSequence = DicomSequence(
        [_ref(RT_STRUCTURE_SET_STORAGE, uids["rtstruct_sop"])]
    )
    if v.dvh:
        dvh = Dataset()
        roi_ref = Dataset()
        roi_ref.ReferencedROINumber = ROI_BY_NAME["PTV_Neck"].number
        roi_ref.DVHROIContributionType = "INCLUDED"
        dvh.DVHReferencedROISequence = DicomSequence([roi_ref])
        dvh.DVHType = "CUMULATIVE"
        dvh.DoseUnits = "GY"
        dvh.DoseType = "PHYSICAL"
        dvh.DVHDoseScaling = "1"
        dvh.DVHVolumeUnits = "CM3"
        dvh.DVHNumberOfBins = 3
        dvh.DVHData = ["20", "86.4", "20", "86.4", "20", "86.4"]
        dvh.DVHMinimumDose = "60"
        dvh.DVHMaximumDose = "60"
        dvh.DVHMeanDose = "60"
        ds.DVHSequence = DicomSequence([dvh])
    ds.PixelData = stored.tobytes()
    _save(ds, path)


def write_phantom_case(out_dir: Path, variant: str | Variant = "hfs") -> PhantomCase:
    """Write one phantom case (CT series, RTSTRUCT, RTDOSE, RTPLAN) into ``out_dir``.

    Files written: ``out_dir/CT/*.dcm`` (one per slice), ``out_dir/RTSTRUCT.dcm``,
    ``out_dir/RTDOSE.dcm`` and ``out_dir/RTPLAN.dcm``. UIDs are derived deterministically from
    the variant name, and dates are fixed, so rebuilding gives identical files.

    Parameters
    ----------
    out_dir : Path
        Case directory; created if missing. Existing files of the same names are overwritten.
    variant : str or Variant
        A name from :data:`VARIANTS` or a custom :class:`Variant`.

    Returns
    -------
    PhantomCase
        Paths, variant, landmark truth and CT affine of the written case.
    """
    v = get_variant(variant)
    out_dir = Path(out_dir)
    ct_dir = out_dir / "CT"
    ct_dir.mkdir(parents=True, exist_ok=True)
    roles = ("study", "for", "ct", "rtstruct", "rtplan", "rtdose")
    uids = {role: _uid(v, role) for role in roles}
    for role in ("rtstruct", "rtplan", "rtdose"):
        uids[f"{role}_sop"] = _uid(v, f"{role}-sop")
    ct_paths, slices, affine, shape = _write_ct(v, uids, ct_dir)
    rtstruct_path = out_dir / "RTSTRUCT.dcm"
    rtplan_path = out_dir / "RTPLAN.dcm"
    rtdose_path = out_dir / "RTDOSE.dcm"
    _write_rtstruct(v, uids, slices, rtstruct_path)
    _write_rtplan(v, uids, rtplan_path)
    _write_rtdose(v, uids, rtdose_path)
    return PhantomCase(
        out_dir=out_dir,
        ct_paths=tuple(ct_paths),
        rtstruct_path=rtstruct_path,
        rtdose_path=rtdose_path,
        rtplan_path=rtplan_path,
        variant=v,
        truth=compute_truth(v),
        ct_affine=affine,
        ct_shape=shape,
    )


__all__ = [
    "ANISO_CT_LATTICE",
    "BASELINE_CT_LATTICE",
    "BASELINE_DOSE_LATTICE",
    "BOXES_MM",
    "CONTOUR_DECIMALS",
    "DOSE_GRID_SCALING",
    "EYE_CENTRES_MM",
    "EYE_RADIUS_MM",
    "LENS_CENTRES_MM",
    "LENS_RADIUS_MM",
    "PARTIAL_DOSE_LATTICE",
    "ROI_BY_NAME",
    "ROI_SPECS",
    "SAME_CT_LATTICE_VARIANTS",
    "VARIANTS",
    "Lattice",
    "PhantomCase",
    "PhantomTruth",
    "RoiSpec",
    "Variant",
    "add_face_mask",
    "body_mask",
    "compute_truth",
    "contour_rings",
    "get_variant",
    "phantom_dose_gy",
    "phantom_hu",
    "roi_polygons",
    "write_phantom_case",
]
