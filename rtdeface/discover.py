"""Index DICOM files by content (never by file name) and assemble cases.

A *case* is one CT series with the RTSTRUCT that references it and the RTPLANs and RTDOSEs
that belong to it (by reference, else by frame of reference). Anything ambiguous is an error
that says what was found; nothing is guessed silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from rtdeface.errors import InputError

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RTDOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RTPLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
ION_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.8"

ROLE_BY_SOP_CLASS = {
    CT_IMAGE_STORAGE: "CT",
    RTSTRUCT_STORAGE: "RTSTRUCT",
    RTDOSE_STORAGE: "RTDOSE",
    RTPLAN_STORAGE: "RTPLAN",
    ION_PLAN_STORAGE: "RTPLAN",
}
"""Roles rtdeface handles, by SOPClassUID."""


@dataclass(frozen=True)
class FileRecord:
    """What one DICOM file is, from its header.

    Attributes
    ----------
    path : Path
        The file.
    role : str
        ``CT``, ``RTSTRUCT``, ``RTDOSE``, ``RTPLAN`` or ``OTHER``.
    sop_class_uid, sop_instance_uid, modality, study_instance_uid, series_instance_uid : str
        Header values ("" when absent).
    frame_of_reference_uid : str
        The object's frame of reference (for an RTSTRUCT, the one its ROIs are defined in).
    referenced_series_uids : tuple of str
        Series an RTSTRUCT references (RTReferencedSeriesSequence).
    referenced_sop_uids : tuple of str
        Structure sets / plans this object references (ReferencedStructureSetSequence,
        ReferencedRTPlanSequence).
    """

    path: Path
    role: str
    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    referenced_series_uids: tuple[str, ...] = ()
    referenced_sop_uids: tuple[str, ...] = ()


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def classify(ds: Dataset, path: Path) -> FileRecord:
    """Describe a dataset (a header read is enough) as a :class:`FileRecord`."""
    sop_class = _str(ds, "SOPClassUID")
    if not sop_class and "file_meta" in ds.__dict__ and ds.file_meta is not None:
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    role = ROLE_BY_SOP_CLASS.get(sop_class, "OTHER")
    for_uid = _str(ds, "FrameOfReferenceUID")
    ref_series: list[str] = []
    if role == "RTSTRUCT":
        for fr in ds.get("ReferencedFrameOfReferenceSequence", []) or []:
            for_uid = for_uid or _str(fr, "FrameOfReferenceUID")
            for st in fr.get("RTReferencedStudySequence", []) or []:
                for se in st.get("RTReferencedSeriesSequence", []) or []:
                    ref_series.append(_str(se, "SeriesInstanceUID"))
    ref_sops: list[str] = []
    for keyword in ("ReferencedStructureSetSequence", "ReferencedRTPlanSequence"):
        for item in ds.get(keyword, []) or []:
            ref_sops.append(_str(item, "ReferencedSOPInstanceUID"))
    return FileRecord(
        path=path,
        role=role,
        sop_class_uid=sop_class,
        sop_instance_uid=_str(ds, "SOPInstanceUID"),
        modality=_str(ds, "Modality"),
        study_instance_uid=_str(ds, "StudyInstanceUID"),
        series_instance_uid=_str(ds, "SeriesInstanceUID"),
        frame_of_reference_uid=for_uid,
        referenced_series_uids=tuple(u for u in ref_series if u),
        referenced_sop_uids=tuple(u for u in ref_sops if u),
    )


def iter_files(root: Path) -> list[Path]:
    """Every regular file below ``root`` (or ``root`` itself), sorted, hidden files skipped."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"{root}: no such file or directory; give the folder of one case")
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def read_dicom(path: Path, *, header_only: bool) -> Dataset | None:
    """Read one file; None when it is not DICOM at all (a text file, a DICOMDIR).

    Raises
    ------
    InputError
        The file claims to be DICOM (preamble ``DICM``) but cannot be parsed.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=header_only)
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types on truncated/corrupt input
        raise InputError(
            f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc}); "
            "re-export it or remove it from the input"
        ) from exc
    if "DirectoryRecordSequence" in ds:  # DICOMDIR: an index, not an object
        return None
    if not _str(ds, "SOPClassUID") and not _str(ds, "SOPInstanceUID"):
        return None
    return ds


def index_directory(root: Path) -> list[FileRecord]:
    """Header-only index of every DICOM object below ``root`` (non-DICOM files are skipped)."""
    records = []
    for path in iter_files(root):
        ds = read_dicom(path, header_only=True)
        if ds is None:
            log.debug("skipping non-DICOM file %s", path)
            continue
        records.append(classify(ds, path))
    return records


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case, by role.

    Attributes
    ----------
    ct : tuple of FileRecord
        The slices of one CT series (unsorted).
    rtstruct : FileRecord
        The structure set that references the CT series.
    doses, plans : tuple of FileRecord
        RTDOSE and RTPLAN objects of the case.
    ignored : tuple of FileRecord
        Other objects found beside the case (not written).
    """

    ct: tuple[FileRecord, ...]
    rtstruct: FileRecord | None
    doses: tuple[FileRecord, ...]
    plans: tuple[FileRecord, ...]
    ignored: tuple[FileRecord, ...] = ()


def assemble_single_case(records: Sequence[FileRecord], where: Path) -> CaseFiles:
    """Assemble exactly one case from the records of one case folder.

    Raises
    ------
    InputError
        No CT, several CT series, several structure sets referencing the CT, or no structure
        set; the message lists what was found.
    """
    ct_series: dict[str, list[FileRecord]] = {}
    for r in records:
        if r.role == "CT":
            ct_series.setdefault(r.series_instance_uid, []).append(r)
    if not ct_series:
        found = sorted({f"{r.modality or '?'}" for r in records}) or ["no DICOM files"]
        raise InputError(
            f"{where}: no CT image series found (found: {', '.join(found)}); "
            "point rtdeface at a folder holding the planning CT and its RT objects"
        )
    if len(ct_series) > 1:
        desc = "; ".join(f"{uid} ({len(v)} slices)" for uid, v in sorted(ct_series.items()))
        raise InputError(
            f"{where}: {len(ct_series)} CT series found ({desc}); "
            "put one case per folder (batch mode over a tree handles several)"
        )
    series_uid, ct = next(iter(ct_series.items()))
    for_uid = ct[0].frame_of_reference_uid
    structs = [r for r in records if r.role == "RTSTRUCT"]
    referencing = [s for s in structs if series_uid in s.referenced_series_uids]
    if not referencing:
        referencing = [
            s for s in structs if not s.referenced_series_uids and s.frame_of_reference_uid == for_uid
        ]
    if len(referencing) > 1:
        names = ", ".join(str(s.path.name) for s in referencing)
        raise InputError(
            f"{where}: {len(referencing)} structure sets reference CT series {series_uid} "
            f"({names}); keep one per case folder"
        )
    rtstruct = referencing[0] if referencing else None
    if rtstruct is None and structs:
        names = ", ".join(f"{s.path.name} (series {list(s.referenced_series_uids)})" for s in structs)
        raise InputError(
            f"{where}: no structure set references CT series {series_uid} (found {names}); "
            "export the RTSTRUCT drawn on this CT"
        )
    plans = tuple(r for r in records if r.role == "RTPLAN")
    doses = tuple(r for r in records if r.role == "RTDOSE")
    ignored = tuple(r for r in records if r.role == "OTHER")
    return CaseFiles(tuple(ct), rtstruct, doses, plans, ignored)


def describe(records: Iterable[FileRecord]) -> dict[str, int]:
    """Count records by role (for messages and ``inspect``)."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.role] = counts.get(r.role, 0) + 1
    return counts
