"""Checks on a written case. This module starts with the reference checker: every reference
in the output must resolve within the output."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from rtdeface.discover import iter_files, read_dicom


@dataclass(frozen=True)
class ReferenceReport:
    """Result of :func:`check_references`.

    Attributes
    ----------
    problems : tuple of str
        One line per dangling or inconsistent reference (empty when all resolve).
    checked : int
        Number of references checked.
    """

    problems: tuple[str, ...]
    checked: int

    @property
    def ok(self) -> bool:
        """True when every reference resolves."""
        return not self.problems


@dataclass
class _Index:
    sop: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> modality
    series: set[str] = field(default_factory=set)
    studies: set[str] = field(default_factory=set)
    for_uids: set[str] = field(default_factory=set)
    ct_slices: set[str] = field(default_factory=set)


def _s(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v)


def check_references(objects: Sequence[tuple[str, Dataset]]) -> ReferenceReport:
    """Check that every cross-reference among ``objects`` resolves.

    Parameters
    ----------
    objects : sequence of (name, Dataset)
        All objects of one case; ``name`` is used in messages (e.g. a relative path).

    Checks: file meta SOP class/instance equal the dataset's; RTSTRUCT frame of reference,
    referenced study, series and every ContourImageSequence item; ROI numbers across the three
    structure-set sequences; RTPLAN ReferencedStructureSetSequence / ReferencedDoseSequence;
    RTDOSE ReferencedRTPlanSequence / ReferencedStructureSetSequence and frame of reference.
    """
    idx = _Index()
    for _, ds in objects:
        idx.sop[_s(ds, "SOPInstanceUID")] = _s(ds, "Modality")
        idx.series.add(_s(ds, "SeriesInstanceUID"))
        idx.studies.add(_s(ds, "StudyInstanceUID"))
        if _s(ds, "FrameOfReferenceUID"):
            idx.for_uids.add(_s(ds, "FrameOfReferenceUID"))
        if _s(ds, "Modality") == "CT":
            idx.ct_slices.add(_s(ds, "SOPInstanceUID"))
    problems: list[str] = []
    checked = 0

    def need(cond: bool, msg: str) -> None:
        nonlocal checked
        checked += 1
        if not cond:
            problems.append(msg)

    def refs(name: str, items: Iterable[Dataset], want: str) -> None:
        for item in items:
            uid = _s(item, "ReferencedSOPInstanceUID")
            need(
                idx.sop.get(uid) == want,
                f"{name}: references {want} {uid or '(empty)'} that is not in the output",
            )

    for name, ds in objects:
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            need(
                str(meta.MediaStorageSOPInstanceUID) == _s(ds, "SOPInstanceUID"),
                f"{name}: file meta MediaStorageSOPInstanceUID differs from SOPInstanceUID",
            )
            need(
                str(meta.get("MediaStorageSOPClassUID", "")) == _s(ds, "SOPClassUID"),
                f"{name}: file meta MediaStorageSOPClassUID differs from SOPClassUID",
            )
        modality = _s(ds, "Modality")
        if modality == "RTSTRUCT":
            numbers = {int(r.ROINumber) for r in ds.get("StructureSetROISequence", [])}
            for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
                need(
                    _s(fr, "FrameOfReferenceUID") in idx.for_uids,
                    f"{name}: ReferencedFrameOfReferenceUID {_s(fr, 'FrameOfReferenceUID')} "
                    "matches no image",
                )
                for st in fr.get("RTReferencedStudySequence", []):
                    need(
                        _s(st, "ReferencedSOPInstanceUID") in idx.studies,
                        f"{name}: RTReferencedStudy {_s(st, 'ReferencedSOPInstanceUID')} unknown",
                    )
                    for se in st.get("RTReferencedSeriesSequence", []):
                        need(
                            _s(se, "SeriesInstanceUID") in idx.series,
                            f"{name}: RTReferencedSeries {_s(se, 'SeriesInstanceUID')} unknown",
                        )
                        refs(name, se.get("ContourImageSequence", []), "CT")
            for ssr in ds.get("StructureSetROISequence", []):
                need(
                    _s(ssr, "ReferencedFrameOfReferenceUID") in idx.for_uids,
                    f"{name}: ROI {ssr.ROINumber} frame of reference matches no image",
                )
            for rc in ds.get("ROIContourSequence", []):
                need(
                    int(rc.ReferencedROINumber) in numbers,
                    f"{name}: ROIContourSequence references missing ROI {rc.ReferencedROINumber}",
                )
                for item in rc.get("ContourSequence", []):
                    refs(f"{name} ROI {rc.ReferencedROINumber}", item.get("ContourImageSequence", []), "CT")
            for obs in ds.get("RTROIObservationsSequence", []):
                need(
                    int(obs.ReferencedROINumber) in numbers,
                    f"{name}: RTROIObservations references missing ROI {obs.ReferencedROINumber}",
                )
        elif modality == "RTPLAN":
            refs(name, ds.get("ReferencedStructureSetSequence", []), "RTSTRUCT")
            refs(name, ds.get("ReferencedDoseSequence", []), "RTDOSE")
        elif modality == "RTDOSE":
            refs(name, ds.get("ReferencedRTPlanSequence", []), "RTPLAN")
            refs(name, ds.get("ReferencedStructureSetSequence", []), "RTSTRUCT")
            need(
                _s(ds, "FrameOfReferenceUID") in idx.for_uids,
                f"{name}: FrameOfReferenceUID matches no image",
            )
    return ReferenceReport(tuple(problems), checked)


def read_case_objects(folder: Path) -> list[tuple[str, Dataset]]:
    """Header-only read of every DICOM object below ``folder`` as ``(relative path, dataset)``."""
    out = []
    for path in iter_files(Path(folder)):
        ds = read_dicom(path, header_only=True)
        if ds is not None:
            out.append((str(path.relative_to(folder)), ds))
    return out


def check_folder_references(folder: Path) -> ReferenceReport:
    """:func:`check_references` on every DICOM object below ``folder``."""
    return check_references(read_case_objects(folder))


__all__ = ["ReferenceReport", "check_folder_references", "check_references"]
