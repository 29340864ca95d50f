"""De-identification (rtdeface.deid) and the PHI scanner (rtdeface.phi)."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTDoseStorage,
    RTPlanStorage,
    RTStructureSetStorage,
)

from rtdeface.annex_e import ACTIONS, EDITION
from rtdeface.deid import (
    DUMMY_DATE,
    RT_SUPPLEMENT,
    DeidOptions,
    deidentify_datasets,
    is_safe_text,
    load_key,
    read_pseudonym_csv,
    shift_date,
    shift_datetime,
    what_if,
    write_audit,
)
from rtdeface.errors import InputError, UsageError
from rtdeface.phi import scan_phi
from rtdeface.uids import iter_uid_elements

KEY = b"test-key-0123456789abcdef"
OTHER_KEY = b"another-key-0123456789abc"

STUDY_UID = "1.2.826.0.1.3680043.9.7777.1"
FRAME_UID = "1.2.826.0.1.3680043.9.7777.2"
CT_SERIES_UID = "1.2.826.0.1.3680043.9.7777.3"
CT_UIDS = ("1.2.826.0.1.3680043.9.7777.10.1", "1.2.826.0.1.3680043.9.7777.10.2")
STRUCT_UID = "1.2.826.0.1.3680043.9.7777.20"
PLAN_UID = "1.2.826.0.1.3680043.9.7777.30"
DOSE_UID = "1.2.826.0.1.3680043.9.7777.40"

PLANTED = {
    "OperatorsName": "BEAMOP^BERTA",
    "ReviewerName": "REVIEWER^RALPH",
    "ROIInterpreter": "INTERP^IVAN",
    "RTPlanDate": "20230407",
    "ContentDate": "20230408",
    "ROIDescription": "contoured for Johnathan Doe",
    "private": "DOE^JOHNATHAN",
}
"""Identifying values planted at depth; each must be found before and gone after."""


def _item(**attrs: object) -> Dataset:
    item = Dataset()
    for keyword, value in attrs.items():
        setattr(item, keyword, value)
    return item


def _common(ds: Dataset, sop_class: str, sop_uid: str, modality: str, series_uid: str) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "MERCY_TPS"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.PatientName = "DOE^JOHNATHAN"
    ds.PatientID = "PID-123456"
    ds.PatientBirthDate = "19500220"
    ds.PatientSex = "M"
    ds.PatientAge = "073Y"
    ds.PatientWeight = "81.5"
    ds.OtherPatientIDs = "MRN-998877"
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyDate = "20230405"
    ds.StudyTime = "081500"
    ds.StudyID = "ST7788"
    ds.AccessionNumber = "ACC-445566"
    ds.ReferringPhysicianName = "REFER^ROBERTA"
    ds.InstitutionName = "Mercy Riverside Clinic"
    ds.StationName = "MERCYCT01"
    ds.DeviceSerialNumber = "SN-77231"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = FRAME_UID
    ds.Manufacturer = "Acme Medical"


def make_case() -> list[Dataset]:
    """Two CT slices, an RTSTRUCT, an RTPLAN and an RTDOSE with PHI planted at depth."""
    cts = []
    for index, uid in enumerate(CT_UIDS):
        ct = Dataset()
        _common(ct, CTImageStorage, uid, "CT", CT_SERIES_UID)
        ct.InstanceNumber = index + 1
        ct.ContentDate = "20230405"
        ct.ContentTime = "081733.250"
        ct.AcquisitionDateTime = "20230405081700.5+0100"
        ct.ImagePositionPatient = [0.0, 0.0, float(index) * 2.5]
        ct.SeriesDescription = "HN planning 2.5mm"
        block = ct.private_block(0x0009, "ACME 1.0", create=True)
        block.add_new(0x01, "LO", PLANTED["private"])
        cts.append(ct)

    ss = Dataset()
    _common(ss, RTStructureSetStorage, STRUCT_UID, "RTSTRUCT", "1.2.826.0.1.3680043.9.7777.21")
    ss.StructureSetLabel = "HN_structures"
    ss.StructureSetName = "Dr Who's set"
    ss.StructureSetDate = "20230406"
    ss.StructureSetTime = "101010"
    ss.ReviewerName = PLANTED["ReviewerName"]
    ss.ReviewDate = "20230406"
    ss.ApprovalStatus = "APPROVED"
    contour_images = DicomSequence(
        [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=u) for u in CT_UIDS]
    )
    series = _item(SeriesInstanceUID=CT_SERIES_UID, ContourImageSequence=contour_images)
    study = _item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
        ReferencedSOPInstanceUID=STUDY_UID,
        RTReferencedSeriesSequence=DicomSequence([series]),
    )
    ss.ReferencedFrameOfReferenceSequence = DicomSequence(
        [_item(FrameOfReferenceUID=FRAME_UID, RTReferencedStudySequence=DicomSequence([study]))]
    )
    names = ["PTV_70", "Parotid_L", "Doe_tumour", "Eye_R 2"]
    ss.StructureSetROISequence = DicomSequence(
        [
            _item(
                ROINumber=n + 1,
                ReferencedFrameOfReferenceUID=FRAME_UID,
                ROIName=name,
                ROIGenerationAlgorithm="MANUAL",
            )
            for n, name in enumerate(names)
        ]
    )
    ss.StructureSetROISequence[0].ROIDescription = PLANTED["ROIDescription"]
    ss.RTROIObservationsSequence = DicomSequence(
        [
            _item(
                ObservationNumber=n + 1,
                ReferencedROINumber=n + 1,
                RTROIInterpretedType="PTV" if n == 0 else "ORGAN",
                ROIInterpreter=PLANTED["ROIInterpreter"],
            )
            for n in range(len(names))
        ]
    )

    plan = Dataset()
    _common(plan, RTPlanStorage, PLAN_UID, "RTPLAN", "1.2.826.0.1.3680043.9.7777.31")
    plan.RTPlanLabel = "HN_IMRT"
    plan.RTPlanName = "HN IMRT 70Gy"
    plan.RTPlanDate = PLANTED["RTPlanDate"]
    plan.RTPlanTime = "120000"
    plan.SecondaryReviewDate = "20230409"  # a date Table E.1-1 does not list
    beams = []
    for n in range(2):
        beam = _item(
            BeamNumber=n + 1,
            BeamName=f"G{n * 180:03d}",
            TreatmentMachineName="TrueBeam_SN1",
            InstitutionName="Mercy Riverside Clinic",
            OperatorsName=PLANTED["OperatorsName"],
        )
        block = beam.private_block(0x300B, "ACME RT", create=True)
        block.add_new(0x02, "LO", "planned by DOE^JOHNATHAN")
        beams.append(beam)
    plan.BeamSequence = DicomSequence(beams)
    plan.ReferencedStructureSetSequence = DicomSequence(
        [_item(ReferencedSOPClassUID=RTStructureSetStorage, ReferencedSOPInstanceUID=STRUCT_UID)]
    )

    dose = Dataset()
    _common(dose, RTDoseStorage, DOSE_UID, "RTDOSE", "1.2.826.0.1.3680043.9.7777.41")
    dose.ContentDate = PLANTED["ContentDate"]
    dose.ContentTime = "130000"
    dose.DoseComment = "Eclipse AAA 15.6"
    dose.ReferencedRTPlanSequence = DicomSequence(
        [_item(ReferencedSOPClassUID=RTPlanStorage, ReferencedSOPInstanceUID=PLAN_UID)]
    )
    return [*cts, ss, plan, dose]


def deidentified(
    key: bytes = KEY, *, ct_defaced: bool = True, **options: object
) -> tuple[list[Dataset], list[Dataset]]:
    originals = make_case()
    outputs = copy.deepcopy(originals)
    deidentify_datasets(outputs, DeidOptions(key=key, **options), ct_defaced=ct_defaced)  # type: ignore[arg-type]
    return originals, outputs


def all_uids(ds: Dataset) -> Iterator[str]:
    for owner, tag in iter_uid_elements(ds):
        value = owner[tag].value
        yield from ([value] if isinstance(value, str) else list(value))


# ---------------------------------------------------------------------------------------------
# Planted PHI and the scanner
# ---------------------------------------------------------------------------------------------


def test_scanner_finds_every_planted_value_in_originals() -> None:
    originals = make_case()
    hits = scan_phi(originals, copy.deepcopy(originals))
    where = [h.where for h in hits]
    for field in ("OperatorsName", "ReviewerName", "ROIInterpreter", "RTPlanDate", "ContentDate"):
        assert any(w.endswith(field) for w in where), field
    assert any("BeamSequence[0].OperatorsName" in w for w in where)
    assert any("ROIDescription" in w for w in where)
    assert any("(0009,1001)" in w for w in where)  # private tag
    assert any("(300B,1002)" in w for w in where)  # private tag inside a beam
    values = {h.value for h in hits}
    assert {"20230407", "20230408", "pid-123456", STRUCT_UID} <= values


def test_planted_phi_is_gone_after_deidentify() -> None:
    originals, outputs = deidentified()
    assert scan_phi(originals, outputs) == []


def test_scanner_checks_files_directories_and_extra_texts(tmp_path: Path) -> None:
    originals, outputs = deidentified()
    out_dir = tmp_path / "out" / "PID-123456"  # identifier in a directory name
    out_dir.mkdir(parents=True)
    pydicom.dcmwrite(out_dir / "plan.dcm", outputs[3], enforce_file_format=True)
    (out_dir / "report.json").write_text(json.dumps({"note": "study 05.04.2023"}))
    hits = scan_phi(originals, [tmp_path / "out"], extra_texts=["seen Mercy Riverside Clinic"])
    kinds = {(h.where.split(":")[0], h.value) for h in hits}
    assert ("path", "pid-123456") in kinds
    assert ("text", "20230405") in kinds  # date written as DD.MM.YYYY in a JSON report
    assert ("text", "mercy riverside clinic") in kinds
    assert not [h for h in hits if h.where.split(":")[0] not in ("path", "text")]


def test_scanner_ignores_trivial_and_kept_values() -> None:
    originals, outputs = deidentified()
    outputs[3].BeamSequence[0].BeamDescription = "YES"
    outputs[4].DoseComment = "M"
    assert scan_phi(originals, outputs) == []


# ---------------------------------------------------------------------------------------------
# Identity, UIDs, links
# ---------------------------------------------------------------------------------------------


def test_same_key_is_deterministic_and_other_key_differs() -> None:
    _, first = deidentified(KEY)
    _, second = deidentified(KEY)
    _, other = deidentified(OTHER_KEY)
    for a, b, c in zip(first, second, other, strict=True):
        assert list(all_uids(a)) == list(all_uids(b))
        assert a.SOPInstanceUID != c.SOPInstanceUID
        assert a.PatientID == b.PatientID != c.PatientID
        assert a.StudyDate == b.StudyDate


def test_identity_is_one_pseudonym_everywhere() -> None:
    _, outputs = deidentified()
    pseudonym = outputs[0].PatientID
    assert pseudonym.startswith("RTD-") and len(pseudonym) == 14
    for ds in outputs:
        assert ds.PatientID == pseudonym == str(ds.PatientName)
        assert ds.StudyID.startswith("S") and ds.StudyID != "ST7788" and len(ds.StudyID) <= 16
        assert ds.AccessionNumber.startswith("A") and ds.AccessionNumber != "ACC-445566"
    assert len({ds.StudyID for ds in outputs}) == 1  # one study stays one study


def test_uids_are_remapped_valid_and_registered_ones_kept() -> None:
    originals, outputs = deidentified(uid_root="1.2.3.")
    original_uids = {u for ds in originals for u in all_uids(ds)}
    for ds in outputs:
        for uid in all_uids(ds):
            assert len(uid) <= 64
            assert uid.startswith(("1.2.3.", "1.2.840.10008."))
            assert uid not in original_uids or uid.startswith("1.2.840.10008.")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    ss, plan, dose = outputs[2], outputs[3], outputs[4]
    assert ss.SOPClassUID == RTStructureSetStorage
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPClassUID == RTPlanStorage
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == ss.SOPInstanceUID
    assert {ds.FrameOfReferenceUID for ds in outputs} == {
        ss.StructureSetROISequence[0].ReferencedFrameOfReferenceUID
    }


def test_objects_deidentified_in_separate_calls_still_link() -> None:
    originals = make_case()
    cts = copy.deepcopy(originals[:2])
    ss = copy.deepcopy(originals[2])
    rec_ct = deidentify_datasets(cts, DeidOptions(key=KEY), ct_defaced=True)
    rec_ss = deidentify_datasets([ss], DeidOptions(key=KEY), ct_defaced=True)
    series = ss.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    series = series.RTReferencedSeriesSequence[0]
    refs = [item.ReferencedSOPInstanceUID for item in series.ContourImageSequence]
    assert refs == [ct.SOPInstanceUID for ct in cts]
    assert series.SeriesInstanceUID == cts[0].SeriesInstanceUID
    assert ss.FrameOfReferenceUID == cts[0].FrameOfReferenceUID
    assert ss.StudyInstanceUID == cts[0].StudyInstanceUID and ss.StudyID == cts[0].StudyID
    assert rec_ct.pseudonym == rec_ss.pseudonym
    assert rec_ct.date_offset_days == rec_ss.date_offset_days


def test_mixed_patients_are_refused() -> None:
    case = make_case()
    case[-1].PatientID = "SOMEONE-ELSE"
    with pytest.raises(InputError, match="different PatientIDs"):
        deidentify_datasets(case, DeidOptions(key=KEY), ct_defaced=False)


# ---------------------------------------------------------------------------------------------
# Profile markers and options
# ---------------------------------------------------------------------------------------------


def _codes(ds: Dataset) -> list[str]:
    return [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]


def test_every_output_carries_the_profile_markers() -> None:
    _, outputs = deidentified(ct_defaced=True)
    for ds in outputs:
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert any(EDITION in text for text in ds.DeidentificationMethod)
        assert all(
            item.CodingSchemeDesignator == "DCM" for item in ds.DeidentificationMethodCodeSequence
        )
        codes = _codes(ds)
        assert codes[:5] == ["113100", "113107", "113105", "113109", "113108"]
        assert ("113102" in codes) == (ds.Modality != "RTPLAN")
    _, not_defaced = deidentified(ct_defaced=False)
    assert all("113102" not in _codes(ds) for ds in not_defaced)


def test_options_off_change_the_codes_and_values() -> None:
    _, outputs = deidentified(
        ct_defaced=False,
        retain_patient_characteristics=False,
        retain_device_identity=False,
        clean_descriptors=False,
        modified_dates=False,
    )
    ct, ss, plan = outputs[0], outputs[2], outputs[3]
    assert _codes(ct) == ["113100"]
    assert ct.LongitudinalTemporalInformationModified == "REMOVED"
    assert ct.PatientSex == "" and "PatientWeight" not in ct
    assert plan.BeamSequence[0].TreatmentMachineName == ""
    assert ss.StructureSetROISequence[0].ROIName == "ROI_1"
    assert ct.StudyDate == "" and ct.StudyTime == ""
    assert ct.AcquisitionDateTime == ""
    assert plan.SecondaryReviewDate == ""  # not listed by the table: emptied with the option off


def test_rt_names_kept_when_safe_and_replaced_otherwise() -> None:
    _, outputs = deidentified()
    ss, plan, dose = outputs[2], outputs[3], outputs[4]
    names = [item.ROIName for item in ss.StructureSetROISequence]
    assert names == ["PTV_70", "Parotid_L", "ROI_3", "Eye_R 2"]  # 'Doe' is part of the name
    assert ss.StructureSetLabel == "HN_structures"
    assert plan.RTPlanLabel == "HN_IMRT"
    assert [b.BeamName for b in plan.BeamSequence] == ["G000", "G180"]
    assert plan.BeamSequence[0].TreatmentMachineName == "TrueBeam_SN1"
    assert plan.BeamSequence[0].InstitutionName == ""
    assert "StructureSetName" not in ss or ss.StructureSetName in ("", None)  # 'Dr' rejected
    assert dose.DoseComment == "Eclipse AAA 15.6"  # safe free text kept
    assert ss.StructureSetROISequence[0].ROIGenerationAlgorithm == "MANUAL"


@pytest.mark.filterwarnings("ignore:The value length")
def test_patient_characteristics_kept_and_invalid_ones_emptied() -> None:
    originals = make_case()
    originals[0].PatientSex = "7cff2f01-7c53-3fa2-9f20-17d5732eb892"
    outputs = copy.deepcopy(originals)
    deidentify_datasets(outputs, DeidOptions(key=KEY), ct_defaced=False)
    assert outputs[0].PatientSex == "" and outputs[1].PatientSex == "M"
    assert outputs[1].PatientAge == "073Y" and outputs[1].PatientWeight == "81.5"
    assert outputs[1].PatientBirthDate == ""


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_dates_shift_together_times_stay_and_bad_dates_are_replaced() -> None:
    originals = make_case()
    originals[0].StudyDate = "7f7f1423-825f-3a05-8881-3c16401f32c6"  # as in real hashed data
    outputs = copy.deepcopy(originals)
    record = deidentify_datasets(outputs, DeidOptions(key=KEY), ct_defaced=False)
    assert -3650 <= record.date_offset_days <= -365
    ct, plan, dose = outputs[1], outputs[3], outputs[4]
    assert outputs[0].StudyDate == DUMMY_DATE
    assert ct.StudyDate == shift_date("20230405", record.date_offset_days)
    assert plan.RTPlanDate == shift_date("20230407", record.date_offset_days)
    assert plan.SecondaryReviewDate == shift_date("20230409", record.date_offset_days)
    assert dose.ContentDate == shift_date("20230408", record.date_offset_days)
    assert ct.StudyTime == "081500" and ct.ContentTime == "081733.250"
    assert ct.AcquisitionDateTime.endswith("081700.5+0100")
    assert ct.AcquisitionDateTime[:8] == ct.StudyDate
    assert record.action_counts["date_replaced"] == 1


@given(
    st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2100, 12, 31)),
    st.integers(min_value=-3650, max_value=3650),
)
def test_date_shift_round_trips(day: dt.date, offset: int) -> None:
    text = day.strftime("%Y%m%d")
    shifted = shift_date(text, offset)
    assert shifted is not None and shift_date(shifted, -offset) == text
    assert shift_datetime(text + "1230", offset) == shifted + "1230"


@pytest.mark.parametrize("value", ["7f7f1423-825f-3a05-8881-3c16401f32c6", "20231350", "", "2023"])
def test_shift_date_rejects_non_dates(value: str) -> None:
    assert shift_date(value, -400) is None


def test_private_tags_removed_unless_kept() -> None:
    _, outputs = deidentified()
    assert not any(elem.tag.is_private for ds in outputs for elem in ds.iterall())
    assert "SourceApplicationEntityTitle" not in outputs[0].file_meta
    _, kept = deidentified(keep_private=((0x0009, "ACME 1.0"),))
    block = kept[0].private_block(0x0009, "ACME 1.0")
    assert block[0x01].value == PLANTED["private"]
    assert (0x300B, 0x0010) not in kept[3].BeamSequence[0]
    assert "113111" in _codes(kept[0])


@pytest.mark.parametrize("value", ["PTV_70", "Parotid_L", "CTV 56+5mm", "Eye_R", "z_ring.2"])
def test_safe_labels(value: str) -> None:
    assert is_safe_text(value, {"doe"}, label=True)


@pytest.mark.parametrize(
    "value", ["Doe_PTV", "PTV 2023-04-05", "ID 1234567", "DOE^JOHN", "Dr Who", "x@y", "05/04/2023"]
)
def test_unsafe_labels(value: str) -> None:
    assert not is_safe_text(value, {"doe"}, label=True)


def test_rt_supplement_names_are_dicom_keywords() -> None:
    from pydicom.datadict import keyword_dict

    assert RT_SUPPLEMENT <= set(keyword_dict)


def test_annex_e_table_is_generated_and_plausible() -> None:
    from rtdeface import annex_e

    assert annex_e.SOURCE.startswith("dicom-anonymizer") and EDITION
    assert ACTIONS[0x00100010] == "Z"  # PatientName
    assert ACTIONS[0x00080018] == "U"  # SOPInstanceUID
    assert ACTIONS[0x00081070] == "X/Z/D"  # OperatorsName
    assert ACTIONS[0x300E0008] == "X/Z"  # ReviewerName
    assert len(ACTIONS) > 500


# ---------------------------------------------------------------------------------------------
# Keys, pseudonym CSV, audit, what-if
# ---------------------------------------------------------------------------------------------


def test_load_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RTDEFACE_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_bytes(b"file-secret-0123456789\n")
    assert load_key(key_file) == (b"file-secret-0123456789", False)
    monkeypatch.setenv("RTDEFACE_KEY", "env-secret-0123456789")
    assert load_key(None) == (b"env-secret-0123456789", False)
    monkeypatch.delenv("RTDEFACE_KEY")
    key, is_random = load_key(None, random_key=True)
    assert is_random and len(key) == 32
    with pytest.raises(UsageError, match=r"--deid-key-file FILE or set RTDEFACE_KEY.*--random-key"):
        load_key(None)
    with pytest.raises(UsageError, match="cannot read"):
        load_key(tmp_path / "missing")
    with pytest.raises(UsageError):
        DeidOptions(key=b"")


def test_pseudonym_csv(tmp_path: Path) -> None:
    csv_path = tmp_path / "map.csv"
    csv_path.write_text("PatientID,pseudonym\nPID-123456,HN-001\nPID-2,HN-002\n")
    mapping = read_pseudonym_csv(csv_path)
    assert mapping == {"PID-123456": "HN-001", "PID-2": "HN-002"}
    _, outputs = deidentified(pseudonym_map=mapping)
    assert {ds.PatientID for ds in outputs} == {"HN-001"}
    assert {str(ds.PatientName) for ds in outputs} == {"HN-001"}
    with pytest.raises(InputError, match="no row"):
        deidentified(pseudonym_map={"other": "HN-9"})
    csv_path.write_text("a,HN-1\nb,HN-1\n")
    with pytest.raises(InputError, match="unique"):
        read_pseudonym_csv(csv_path)


def test_write_audit_is_private_json(tmp_path: Path) -> None:
    outputs = copy.deepcopy(make_case())
    record = deidentify_datasets(outputs, DeidOptions(key=KEY), ct_defaced=True)
    path = tmp_path / "audit.json"
    write_audit(path, [record])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = json.loads(path.read_text())
    case = data["cases"][0]
    assert case["original_patient_id"] == "PID-123456"
    assert case["pseudonym"] == outputs[0].PatientID
    assert case["date_offset_days"] == record.date_offset_days
    assert case["action_counts"]["private_removed"] == 8  # 4 creators + 4 private elements
    assert "Clean Recognizable Visual Features" in case["options"]
    assert EDITION in data["profile"]


def test_what_if_describes_without_modifying() -> None:
    plan = make_case()[3]
    before = copy.deepcopy(plan)
    entries = what_if(plan, DeidOptions(key=KEY))
    assert plan == before
    by_path = {e.path: e for e in entries}
    assert by_path["BeamSequence[0].OperatorsName"].before == PLANTED["OperatorsName"]
    assert by_path["BeamSequence[0].OperatorsName"].after == ""
    assert by_path["RTPlanDate"].action == "date_shifted"
    assert by_path["SOPInstanceUID"].action == "U"
    assert by_path["PatientName"].after.startswith("RTD-")
    assert by_path["BeamSequence[0].(300B,1002)"].action == "private_removed"


# ---------------------------------------------------------------------------------------------
# Phantom case on disk, real data
# ---------------------------------------------------------------------------------------------


def test_phantom_case_written_to_disk_has_no_phi(tmp_path: Path) -> None:
    phantom = pytest.importorskip("rtdeface.phantom")
    case = phantom.write_phantom_case(tmp_path / "in")
    paths = [*case.ct_paths, case.rtstruct_path, case.rtdose_path, case.rtplan_path]
    originals = [pydicom.dcmread(p) for p in paths]
    outputs = copy.deepcopy(originals)
    deidentify_datasets(outputs, DeidOptions(key=KEY), ct_defaced=False)
    out_dir = tmp_path / "out" / "case_0001"
    out_dir.mkdir(parents=True)
    for index, ds in enumerate(outputs):
        pydicom.dcmwrite(out_dir / f"{index:04d}.dcm", ds, enforce_file_format=True)
    assert scan_phi(originals, [tmp_path / "out"]) == []
    assert len(scan_phi(originals, [tmp_path / "in"])) > len(paths)


REAL_CASE = Path(__file__).resolve().parents[2] / "shared" / "data" / "onko_hn_eyes"


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_CASE.is_dir(), reason=f"{REAL_CASE} not present")
def test_real_case_deidentified_in_memory_has_no_phi() -> None:
    paths = sorted((REAL_CASE / "CT").glob("*.dcm"))
    paths += [REAL_CASE / name for name in ("RTSTRUCT.dcm", "RTDOSE.dcm", "RTPLAN.dcm")]
    originals = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert len(scan_phi(originals, originals)) > 0
    outputs = copy.deepcopy(originals)
    record = deidentify_datasets(outputs, DeidOptions(key=KEY), ct_defaced=True)
    assert record.action_counts["date_replaced"] > 0  # the hashed DA values
    assert scan_phi(originals, outputs) == []
    roi_names = {item.ROIName for item in outputs[-3].StructureSetROISequence}
    assert {"Eye_L", "Eye_R"} <= roi_names
    assert outputs[-1].RTPlanLabel == "tongue.0"
    for ds in outputs:
        assert ds.PatientIdentityRemoved == "YES"
        assert len(ds.PatientID) == 14 and ds.PatientID == str(ds.PatientName)
