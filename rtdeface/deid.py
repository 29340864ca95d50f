"""De-identification of every object of a case: PS3.15 Annex E with RT-aware options.

What is done to each element, at every nesting depth (file meta included), in this order:

1. Private elements are removed, unless their ``(group, element)`` or ``(group, creator)`` is on
   :attr:`DeidOptions.keep_private` (Retain Safe Private, on the user's list only).
2. Identity: PatientID and PatientName become the same pseudonym (from a CSV or a keyed hash);
   StudyID and AccessionNumber become keyed hashes so studies neither leak nor merge on import.
3. Options (named as in PS3.15 E.3, all on by default):

   * Retain Patient Characteristics: PatientSex, PatientAge, PatientSize, PatientWeight kept
     (values that are not valid for their VR are emptied).
   * Retain Device Identity: TreatmentMachineName kept (what a TPS import needs); every other
     device identifier follows the Basic Profile.
   * Retain Longitudinal Temporal Information with Modified Dates: every DA and DT is shifted by
     one keyed per-patient offset (:func:`date_offset_days`), TM is kept, so intervals survive.
     Values that are not dates (e.g. hash strings) are replaced by :data:`DUMMY_DATE`.
     PatientBirthDate and PatientBirthTime are emptied (Basic Profile), not shifted.
   * Clean Descriptors: label fields (ROIName, StructureSetLabel, RTPlanLabel, BeamName) are kept
     when they look like TG-263 style names (:func:`is_safe_text`), otherwise replaced by a neutral
     label (``ROI_<ROINumber>``, ``BEAM_<BeamNumber>``, ``SS_1``, ``PLAN_1``); descriptions,
     comments and other free text are kept only when they pass the same test, else they get the
     Basic Profile action (or are emptied when the table does not list them).

4. Basic Profile action of :mod:`rtdeface.annex_e` (generated from a machine-readable Table E.1-1),
   with combined actions resolved as: Z/D -> Z, X/Z -> Z, X/D -> D, X/Z/D -> Z, X/Z/U* -> keep
   the sequence (its UIDs are remapped, its other elements processed) and Z otherwise. Choosing Z
   or D over X keeps every type 1 and type 2 attribute present without identifying content.
5. RT supplement for identifying elements the table does not list (:data:`RT_SUPPLEMENT`,
   any other PN, any other LT/ST/UT, the AE titles of the file meta): cleaned or emptied; with
   Modified Dates off, DA and DT values the table does not list are emptied too.
6. Every UID that is not registered (``1.2.840.10008.*``) and not a class UID (SOP class, transfer
   syntax, implementation class) is remapped with :class:`rtdeface.uids.UidMapper`, so references
   between objects, and between objects de-identified in separate calls with the same key, resolve.
7. PatientIdentityRemoved, DeidentificationMethod, DeidentificationMethodCodeSequence (CID 7050)
   and LongitudinalTemporalInformationModified are set on every object.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag

from rtdeface import __version__, rawseq
from rtdeface.annex_e import ACTIONS, EDITION, MASKED_ACTIONS, SOURCE
from rtdeface.discover import peek_element, peek_str
from rtdeface.errors import InputError, UsageError
from rtdeface.forking import Deferred
from rtdeface.uids import (
    DEFAULT_UID_ROOT,
    REGISTERED_UID_ROOT,
    SameLengthTable,
    UidMapper,
    dictionary_vr,
    element_vr,
    tag_keyword,
)

logger = logging.getLogger(__name__)

PROFILE_NAME = f"PS3.15 Annex E Basic Profile (Table E.1-1, DICOM {EDITION})"
"""Human-readable name of the action table used, recorded in outputs and audit records."""

DEFAULT_KEY_ENV_VAR = "RTDEFACE_KEY"
"""Environment variable read by :func:`load_key` when no key file is given."""

DEFAULT_DATE_OFFSET_RANGE_DAYS = (-3650, -365)
"""Inclusive range of the keyed per-patient date offset, in days (always into the past)."""

DUMMY_DATE = "19000101"
"""Replacement for DA values that are not dates (shifting them is impossible)."""

DUMMY_DATETIME = "19000101000000"
"""Replacement for DT values that are not date-times."""

DUMMY_TEXT = "ANONYMIZED"
"""Dummy value of the Basic Profile's D action for text VRs (valid for every string VR)."""

RETAINED_PATIENT_CHARACTERISTICS = frozenset(
    {"PatientSex", "PatientAge", "PatientSize", "PatientWeight"}
)
"""Kept by Retain Patient Characteristics (when valid for their VR)."""

RETAINED_DEVICE_IDENTITY = frozenset({"TreatmentMachineName"})
"""Kept by Retain Device Identity: the identifiers a TPS needs to import a plan."""

LABEL_FIELDS: Mapping[str, tuple[str, str | None]] = {
    "ROIName": ("ROI", "ROINumber"),
    "BeamName": ("BEAM", "BeamNumber"),
    "StructureSetLabel": ("SS", None),
    "RTPlanLabel": ("PLAN", None),
}
"""Label keyword -> (neutral prefix, sibling keyword giving the number) for Clean Descriptors."""

RT_SUPPLEMENT = frozenset(
    {
        "ApplicatorDescription",
        "ApplicatorID",
        "BeamDescription",
        "BeamName",
        "BlockName",
        "BlockTrayID",
        "BolusDescription",
        "BolusID",
        "CompensatorDescription",
        "CompensatorID",
        "DoseComment",
        "DoseReferenceDescription",
        "FixationDeviceDescription",
        "FixationDeviceLabel",
        "FractionGroupDescription",
        "GeneralAccessoryDescription",
        "GeneralAccessoryID",
        "PatientSetupLabel",
        "PrescriptionDescription",
        "ProtocolName",
        "RangeShifterDescription",
        "RangeShifterID",
        "ROIDescription",
        "ROIGenerationAlgorithm",
        "ROIGenerationDescription",
        "ROIObservationDescription",
        "ROIObservationLabel",
        "RTPlanDescription",
        "RTPlanName",
        "SetupDeviceDescription",
        "SetupDeviceLabel",
        "ShieldingDeviceDescription",
        "ShieldingDeviceLabel",
        "SnoutID",
        "SourceApplicatorID",
        "SourceApplicatorName",
        "StructureSetDescription",
        "StructureSetName",
        "ToleranceTableLabel",
        "WedgeID",
    }
)
"""RT free text and labels cleaned as descriptors whether or not Table E.1-1 lists them."""

FILE_META_REMOVED = frozenset(
    {
        "SourceApplicationEntityTitle",
        "SendingApplicationEntityTitle",
        "ReceivingApplicationEntityTitle",
        "PrivateInformationCreatorUID",
        "PrivateInformation",
    }
)
"""File meta elements that name systems of the originating site; removed."""

DESCRIPTOR_SUFFIXES = ("Description", "Comments", "Comment", "Label")
"""Keyword endings of free-text descriptors handled by Clean Descriptors."""

NOT_DESCRIPTOR_PREFIXES = (
    "Patient",
    "Institution",
    "Person",
    "Admitting",
    "Visit",
    "Occupation",
    "Requested",
    "Physician",
    "Operator",
)
"""Keywords starting like this are about people or sites and are never kept as descriptors."""

TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
"""String VRs that carry free text."""

FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
"""Long free-text VRs; treated as descriptors when Table E.1-1 does not list them."""

_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"})
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_UI = frozenset({"UI"})
_UNTOUCHED_VRS = (_NUMERIC_VRS | _BINARY_VRS | {"DS", "IS", "US or SS", "OB or OW"}) - {"UN"}

_LABEL_RE = re.compile(r"^[A-Za-z0-9_+.\- ]*$")
_TEXT_RE = re.compile(r"^[A-Za-z0-9_+.\-, :;()/%=#&<>\[\]']*$")
_DATE_LIKE_RE = re.compile(
    r"(?<!\d)(19|20)\d{2}[-./]?(0[1-9]|1[0-2])[-./]?(0[1-9]|[12]\d|3[01])(?!\d)"
    r"|(?<!\d)\d{1,2}[./-]\d{1,2}[./-]\d{2,4}(?!\d)"
)
_LONG_DIGITS_RE = re.compile(r"\d{5,}")
_WORD_RE = re.compile(r"[0-9a-z]+")
_HONORIFICS = frozenset({"dr", "mr", "mrs", "ms", "miss", "prof", "md", "phd"})
_AS_RE = re.compile(r"^\d{3}[DWMY]$")
_DT_RE = re.compile(
    r"^(\d{4})(\d{2})?(\d{2})?(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?$"
)

TRIVIAL_VALUES = frozenset(
    {
        "",
        "yes",
        "no",
        "none",
        "unknown",
        "anonymous",
        "anonymized",
        "anonymised",
        "anon",
        "n/a",
        "na",
        "null",
        "other",
        "male",
        "female",
        "removed",
        "deidentified",
    }
)
"""Values never treated as identifying (too common to mean anything)."""

IDENTITY_ID_KEYWORDS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "AccessionNumber",
        "MedicalRecordLocator",
        "IssuerOfPatientID",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
    }
)
"""Keywords whose values (and words) are identity tokens of a case."""

SITE_KEYWORDS = frozenset(
    {"InstitutionName", "InstitutionalDepartmentName", "StationName", "InstitutionAddress"}
)
"""Keywords whose words (four letters or more) are identity tokens of a case."""


# --------------------------------------------------------------------------------------------
# Options, records, keys
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeidOptions:
    """How to de-identify a case (PS3.15 E.1 Basic Profile plus the named options).

    Attributes
    ----------
    key : bytes
        Secret HMAC key: the same key gives the same UIDs, pseudonyms and date offsets.
    uid_root : str
        Root of generated UIDs (``2.25.`` by default).
    pseudonym_map : Mapping[str, str] or None
        Original PatientID -> pseudonym (e.g. from :func:`read_pseudonym_csv`); when given,
        every case's PatientID must be in it.
    pseudonym_prefix : str
        Prefix of keyed-hash pseudonyms (used when ``pseudonym_map`` is None).
    retain_patient_characteristics : bool
        Retain Patient Characteristics Option (sex, age, size, weight).
    keep_private : tuple of (int, int | str)
        Private elements kept: ``(group, element)`` for one tag or ``(group, creator)`` for a
        whole private block (Retain Safe Private Option, on this list only).
    clean_descriptors : bool
        Clean Descriptors Option (keep safe labels/descriptions, replace the rest).
    retain_device_identity : bool
        Retain Device Identity Option, limited to :data:`RETAINED_DEVICE_IDENTITY`.
    modified_dates : bool
        Retain Longitudinal Temporal Information with Modified Dates Option; when False, dates
        and times get the Basic Profile action.
    date_offset_range_days : tuple of int
        Inclusive ``(low, high)`` range of the keyed per-patient date offset, in days.
    """

    key: bytes
    uid_root: str = DEFAULT_UID_ROOT
    pseudonym_map: Mapping[str, str] | None = None
    pseudonym_prefix: str = "RTD-"
    retain_patient_characteristics: bool = True
    keep_private: tuple[tuple[int, int | str], ...] = ()
    clean_descriptors: bool = True
    retain_device_identity: bool = True
    modified_dates: bool = True
    date_offset_range_days: tuple[int, int] = DEFAULT_DATE_OFFSET_RANGE_DAYS

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or not self.key:
            raise UsageError(
                "de-identification key is empty: give --deid-key-file FILE or set "
                f"{DEFAULT_KEY_ENV_VAR}, or --random-key (runs will not link)"
            )
        try:
            UidMapper(self.key, self.uid_root)
        except ValueError as exc:
            raise UsageError(f"invalid UID root: {exc}") from exc
        low, high = self.date_offset_range_days
        if low > high:
            raise UsageError(f"date offset range {self.date_offset_range_days} has low > high")
        if len(self.pseudonym_prefix) > 40 or "\\" in self.pseudonym_prefix:
            raise UsageError(
                f"pseudonym prefix {self.pseudonym_prefix!r} must be at most 40 characters "
                "without backslashes"
            )
        for entry in self.keep_private:
            if len(entry) != 2 or not isinstance(entry[0], int) or entry[0] % 2 == 0:
                raise UsageError(
                    f"keep_private entry {entry!r} must be (odd group, element or creator)"
                )

    def applied_options(self, *, ct_defaced: bool) -> tuple[str, ...]:
        """PS3.15 names of the options these settings apply (in code order)."""
        names = []
        if self.modified_dates:
            names.append("Retain Longitudinal Temporal Information Modified Dates")
        if self.clean_descriptors:
            names.append("Clean Descriptors")
        if self.retain_device_identity:
            names.append("Retain Device Identity")
        if self.retain_patient_characteristics:
            names.append("Retain Patient Characteristics")
        if self.keep_private:
            names.append("Retain Safe Private")
        if ct_defaced:
            names.append("Clean Recognizable Visual Features")
        return tuple(names)


@dataclass(frozen=True)
class DeidRecord:
    """Audit record of one case (contains the original PatientID: keep it private).

    Attributes
    ----------
    original_patient_id : str
        PatientID before de-identification.
    pseudonym : str
        The new PatientID and PatientName.
    date_offset_days : int
        Days added to every date (0 when Modified Dates is off).
    n_objects : int
        Number of datasets de-identified.
    action_counts : Mapping[str, int]
        Number of elements per action class (``X``, ``Z``, ``D``, ``U``, ``date_shifted``,
        ``retained_option``, ``label_kept``, ``label_replaced``, ``descriptor_kept``,
        ``private_removed``, ...).
    profile : str
        Name and edition of the Annex E table used.
    options : tuple of str
        PS3.15 names of the options applied.
    identity_tokens : frozenset of str
        The case's identity tokens (:func:`case_identity_tokens`); identifying, never written.
    """

    original_patient_id: str
    pseudonym: str
    date_offset_days: int
    n_objects: int
    action_counts: Mapping[str, int]
    profile: str = PROFILE_NAME
    options: tuple[str, ...] = ()
    identity_tokens: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready representation."""
        return {
            "original_patient_id": self.original_patient_id,
            "pseudonym": self.pseudonym,
            "date_offset_days": self.date_offset_days,
            "n_objects": self.n_objects,
            "action_counts": dict(sorted(self.action_counts.items())),
            "profile": self.profile,
            "table_source": SOURCE,
            "options": list(self.options),
            "rtdeface_version": __version__,
        }


@dataclass(frozen=True)
class WhatIfEntry:
    """One action :func:`what_if` predicts.

    Attributes
    ----------
    path : str
        Element path, e.g. ``BeamSequence[0].OperatorsName`` (``file_meta.`` for group 2).
    tag : str
        ``(GGGG,EEEE)``.
    keyword : str
        DICOM keyword (empty for private elements).
    action : str
        Action class (same names as :attr:`DeidRecord.action_counts`).
    before : str
        Original value (shortened).
    after : str
        New value (shortened; empty when removed).
    """

    path: str
    tag: str
    keyword: str
    action: str
    before: str
    after: str


def load_key(
    path: Path | None, env_var: str = DEFAULT_KEY_ENV_VAR, random_key: bool = False
) -> tuple[bytes, bool]:
    """Load the de-identification key.

    Parameters
    ----------
    path : Path or None
        Key file (its bytes, without trailing whitespace, are the key). Wins over the others.
    env_var : str
        Environment variable holding the key (UTF-8) when no file is given.
    random_key : bool
        When no file and no variable: make a random 32-byte key (runs will not link).

    Returns
    -------
    tuple of (bytes, bool)
        The key and whether it was generated at random.

    Raises
    ------
    UsageError
        No key available, or the key file is unreadable or empty.
    """
    if path is not None:
        try:
            key = Path(path).read_bytes().strip()
        except OSError as exc:
            raise UsageError(
                f"cannot read de-identification key file {path}: {exc.strerror}; "
                "give a readable --deid-key-file"
            ) from exc
        if not key:
            raise UsageError(f"de-identification key file {path} is empty; put a secret in it")
        if len(key) < 16:
            logger.warning("de-identification key from %s is shorter than 16 bytes", path)
        return key, False
    value = os.environ.get(env_var, "")
    if value:
        if len(value) < 16:
            logger.warning("de-identification key from $%s is shorter than 16 bytes", env_var)
        return value.encode("utf-8"), False
    if random_key:
        logger.info("using a random de-identification key: UIDs and pseudonyms will not link")
        return secrets.token_bytes(32), True
    raise UsageError(
        "no de-identification key: give --deid-key-file FILE or set "
        f"{env_var}, or --random-key (runs will not link)"
    )


def read_pseudonym_csv(path: Path | str) -> dict[str, str]:
    """Read a two-column CSV ``original PatientID,pseudonym`` (an optional header is skipped).

    Raises
    ------
    InputError
        Unreadable file, a row without two values, an ID mapped twice, a pseudonym used for two
        IDs, a pseudonym equal to an original ID, or a pseudonym that is not a valid LO/PN value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read pseudonym CSV {path}: {exc}") from exc
    mapping: dict[str, str] = {}
    owners: dict[str, str] = {}
    for line_no, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if len(cells) < 2 or not cells[0] or not cells[1]:
            raise InputError(
                f"pseudonym CSV {path} line {line_no}: expected 'PatientID,pseudonym', "
                f"got {len(cells)} value(s)"
            )
        original, pseudonym = cells[0], cells[1]
        if line_no == 1 and original.lower().replace("_", "") in {
            "patientid",
            "original",
            "originalpatientid",
            "id",
        }:
            continue
        if len(pseudonym) > 64 or any(ch in pseudonym for ch in "\\^=\r\n"):
            raise InputError(
                f"pseudonym CSV {path} line {line_no}: pseudonym {pseudonym!r} must be at most "
                "64 characters without \\ ^ ="
            )
        if mapping.get(original, pseudonym) != pseudonym:
            raise InputError(
                f"pseudonym CSV {path} line {line_no}: PatientID {original!r} is mapped twice"
            )
        if owners.get(pseudonym, original) != original:
            raise InputError(
                f"pseudonym CSV {path} line {line_no}: pseudonym {pseudonym!r} is given to two "
                "patients; pseudonyms must be unique"
            )
        mapping[original] = pseudonym
        owners[pseudonym] = original
    clash = set(mapping) & set(owners)
    if clash:
        raise InputError(
            f"pseudonym CSV {path}: {len(clash)} pseudonym(s) equal an original PatientID; "
            "choose pseudonyms that are not real IDs"
        )
    return mapping


def write_audit(path: Path | str, records: Iterable[DeidRecord]) -> None:
    """Write audit records as JSON readable by the owner only (mode 0600), atomically.

    The file holds original PatientIDs and date offsets: keep it outside the shareable output.
    """
    path = Path(path)
    payload = {
        "profile": PROFILE_NAME,
        "table_source": SOURCE,
        "rtdeface_version": __version__,
        "cases": [r.as_dict() for r in records],
    }
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Keyed values
# --------------------------------------------------------------------------------------------


def _keyed_hex(key: bytes, purpose: str, value: str, n_chars: int) -> str:
    digest = hmac.new(key, f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()
    return digest[:n_chars].upper()


def date_offset_days(key: bytes, patient_id: str, range_days: tuple[int, int]) -> int:
    """Keyed per-patient date offset in days, uniform in the inclusive ``range_days``."""
    low, high = range_days
    digest = hmac.new(key, f"date-offset\x00{patient_id}".encode(), hashlib.sha256).digest()
    return low + int.from_bytes(digest[:8], "big") % (high - low + 1)


def pseudonym_for(patient_id: str, options: DeidOptions) -> str:
    """The pseudonym of ``patient_id`` (CSV mapping, or prefix + 10 keyed hex characters).

    Raises
    ------
    InputError
        A mapping is given and it has no row for ``patient_id``.
    """
    if options.pseudonym_map is not None:
        try:
            return options.pseudonym_map[patient_id]
        except KeyError:
            raise InputError(
                f"the pseudonym CSV has no row for PatientID {patient_id!r}; add one or run "
                "without the CSV to use keyed-hash pseudonyms"
            ) from None
    return options.pseudonym_prefix + _keyed_hex(options.key, "patient", patient_id, 10)


# --------------------------------------------------------------------------------------------
# Shared classification (also used by rtdeface.phi)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def table_action(tag: int) -> str | None:
    """Basic Profile action of ``tag`` from Table E.1-1, or None when it is not listed (K)."""
    action = ACTIONS.get(tag)
    if action is not None:
        return action
    for value, mask, masked_action in MASKED_ACTIONS:
        if tag & mask == value:
            return masked_action
    return None


def is_label_field(keyword: str) -> bool:
    """True for the label fields kept when safe and otherwise replaced by a neutral label."""
    return keyword in LABEL_FIELDS


def is_descriptor_field(keyword: str, vr: str, tag: int) -> bool:
    """True when Clean Descriptors may keep this element's value if it is safe text."""
    if vr not in TEXT_VRS or vr == "PN" or not keyword:
        return False
    if keyword in LABEL_FIELDS or keyword in RT_SUPPLEMENT:
        return True
    if keyword.startswith(NOT_DESCRIPTOR_PREFIXES):
        return False
    if keyword.endswith(DESCRIPTOR_SUFFIXES) and vr != "CS":
        return True
    return vr in FREE_TEXT_VRS and table_action(tag) is None


@functools.lru_cache(maxsize=4096)
def _is_class_uid_tag(tag: int) -> bool:
    return is_class_uid_keyword(tag_keyword(tag))


def is_class_uid_keyword(keyword: str) -> bool:
    """True for UI elements that name a class or encoding, not an instance (never remapped)."""
    return (
        keyword.endswith("ClassUID")
        or "TransferSyntax" in keyword
        or keyword in {"SOPClassesInStudy", "CodingSchemeUID", "ImplementationClassUID"}
    )


def _str_values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def _pn_parts(value: str) -> list[str]:
    return [p for p in re.split(r"[\^=\s,]+", value.lower()) if p]


def iter_elements(
    ds: Dataset,
    prefix: str = "",
    *,
    vrs: frozenset[str] | None = None,
    scans: SequenceScans | None = None,
    want: Callable[[BaseTag, str], bool] | None = None,
) -> Iterator[tuple[str, Dataset, DataElement]]:
    """Yield ``(path, owner, element)`` for every element at every depth, file meta first.

    Parameters
    ----------
    ds : Dataset
        Dataset to walk (its file meta too, when ``prefix`` is empty).
    prefix : str
        Path prefix of ``ds`` (used for nested items).
    vrs : frozenset of str or None
        When given, only elements with these VRs, and private elements, are yielded;
        sequences are always walked into.
    scans : SequenceScans or None
        When given, raw sequences holding only inert elements (:func:`is_inert`) are scanned
        and skipped, not parsed or yielded.
    want : callable or None
        ``want(tag, vr)``: when given, elements it rejects are skipped (sequences are walked).

    Notes
    -----
    A read-only view: sequences are parsed in place, other raw elements are parsed for the
    caller without replacing their raw form in ``ds``. Paths look like
    ``file_meta.MediaStorageSOPInstanceUID`` or
    ``BeamSequence[0].ControlPointSequence[3].(300B,1001)``.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and not prefix:
        for tag in list(meta.keys()):
            vr = element_vr(meta, tag)
            if (vrs is None or vr in vrs) and (want is None or want(tag, vr)):
                elem = peek_element(meta, tag)
                yield f"file_meta.{_elem_name(elem)}", meta, elem
    for tag, raw in list(ds.items()):
        vr = raw.VR or dictionary_vr(tag)
        if vr == "SQ":
            if scans is not None and scans.inert(ds, tag) is not None:
                continue
            elem = ds[tag]
        elif (vrs is not None and vr not in vrs and not tag.is_private) or (
            want is not None and not want(tag, vr)
        ):
            continue
        else:
            elem = peek_element(ds, tag)
        path = f"{prefix}{_elem_name(elem)}"
        yield path, ds, elem
        if elem.VR == "SQ" and elem.value is not None:
            for index, item in enumerate(elem.value):
                yield from iter_elements(item, f"{path}[{index}].", vrs=vrs, scans=scans, want=want)


def _elem_name(elem: DataElement) -> str:
    keyword = elem.keyword if not elem.tag.is_private else ""
    return keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"


_SPECIAL_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "StudyID",
        "AccessionNumber",
        "PatientBirthDate",
        "PatientBirthTime",
    }
)
"""Keywords :func:`_process_element` handles by name (besides the option and label sets)."""

_INERT_VRS = (_UNTOUCHED_VRS | {"CS", "TM"}) - {"UN"}
"""VRs whose unlisted, unnamed elements de-identification keeps as they are."""


@functools.lru_cache(maxsize=4096)
def is_inert(tag: int, vr: str) -> bool:
    """True when de-identification keeps this element as it is, apart from UID remapping.

    Mirrors :func:`_process_element`: a public, non-file-meta element whose keyword is handled
    by no name rule (identity, options, labels, RT supplement) and which Table E.1-1 does not
    list, of a VR kept as it is (numbers, binary, CS, TM); a UI element whose action is at most
    U (remapped); a sequence the table does not list or lists as U (its items are checked
    element by element). A raw sequence made only of inert elements needs no processing.
    """
    group = tag >> 16
    if group & 1 or group == 0x0002 or group == 0xFFFE:
        return False
    keyword = tag_keyword(tag)
    if (
        not keyword
        or keyword in _SPECIAL_KEYWORDS
        or keyword in RETAINED_PATIENT_CHARACTERISTICS
        or keyword in RETAINED_DEVICE_IDENTITY
        or keyword in LABEL_FIELDS
        or keyword in RT_SUPPLEMENT
        or keyword in IDENTITY_ID_KEYWORDS
        or keyword in SITE_KEYWORDS
    ):
        return False
    listed = table_action(tag)
    if vr == "UI":
        return listed in (None, "U")
    if vr == "SQ":
        return listed is None or _resolve(listed) in ("U", "U*")
    return listed is None and vr in _INERT_VRS


@dataclass(frozen=True)
class SequenceScan:
    """What one raw sequence holds, from one pass over its bytes.

    Attributes
    ----------
    inert : bool
        Every element at every depth is :func:`is_inert`.
    class_uids, uids : frozenset of str
        Values of its class-UID elements, and of all its UI elements (inert scans only).
    ui_spans : tuple of (int, int)
        Byte spans of the UI values in the sequence value (inert scans only).
    """

    inert: bool
    class_uids: frozenset[str] = frozenset()
    uids: frozenset[str] = frozenset()
    ui_spans: tuple[tuple[int, int], ...] = ()


class SequenceScans:
    """Scans of raw sequence values of one case, by value (each value is walked once)."""

    def splicer(self, table: SameLengthTable) -> Callable[[RawDataElement], bytes | None]:
        """A ``splice`` hook for :func:`rtdeface.uids.remap_uids_raw`: inert raw sequences are
        rewritten at their UI values' positions instead of being searched."""

        def splice(elem: RawDataElement) -> bytes | None:
            scan = self.scan(elem)
            value = elem.value
            if not scan.inert or not isinstance(value, bytes):
                return None
            if table.fallback and scan.uids & table.fallback:
                return None
            return splice_uids(value, scan.ui_spans, table)

        return splice

    def __init__(self) -> None:
        self._by_value: dict[tuple[bytes, bool, bool], SequenceScan] = {}
        self._items: _ItemScans = {}

    def scan(self, elem: RawDataElement) -> SequenceScan:
        value = elem.value
        if not isinstance(value, bytes):
            return SequenceScan(False)
        key = (value, bool(elem.is_implicit_VR), bool(elem.is_little_endian))
        found = self._by_value.get(key)
        if found is None:
            found = scan_raw_sequence(*key, items=self._items)
            self._by_value[key] = found
        return found

    def add(self, value: bytes, implicit: bool, little: bool, scan: SequenceScan) -> None:
        """Record ``scan`` as the scan of ``value`` (made elsewhere, e.g. in a child
        process, by :func:`scan_raw_sequence` of the same bytes and encoding)."""
        self._by_value[(value, bool(implicit), bool(little))] = scan

    def inert(self, ds: Dataset, tag: BaseTag) -> SequenceScan | None:
        """The scan of ``ds[tag]`` when it is a raw, inert sequence (None otherwise)."""
        elem = ds.get_item(tag)
        if not isinstance(elem, RawDataElement) or not is_inert(int(tag), "SQ"):
            return None
        found = self.scan(elem)
        return found if found.inert else None

    def all(self) -> list[SequenceScan]:
        """Every inert scan made so far."""
        return [v for v in self._by_value.values() if v.inert]


_ItemScan = tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, int], ...]] | None
"""(UIDs, class UIDs, UI value spans relative to the item start) of an inert item; None when
the item is not inert."""

_ItemScans = dict[tuple[bytes, bool, bool], _ItemScan]
"""Scans of items worth caching (:data:`CACHED_ITEM_BYTES`), by item bytes and encoding."""

CACHED_ITEM_BYTES = 512
"""Items at least this long are scanned once per value (smaller ones are cheaper to walk)."""


def scan_raw_sequence(
    value: bytes, implicit: bool, little: bool, items: _ItemScans | None = None
) -> SequenceScan:
    """Walk a raw sequence value once: is it inert, and which UIDs does it hold?

    ``items`` caches the scan of every large item at every depth by its bytes, so a sequence
    rebuilt from another one's items (a defaced ROIContourSequence) walks only its new items.
    """
    codec = rawseq.Codec(implicit, little)
    uids: list[str] = []
    class_uids: list[str] = []
    spans: list[tuple[int, int]] = []
    try:
        inert = _scan_items(
            value, 0, len(value), codec, {} if items is None else items, uids, class_uids, spans
        )
    except rawseq.RawSequenceError:
        return SequenceScan(False)  # let pydicom parse it (and report what is wrong)
    if not inert:
        return SequenceScan(False)
    return SequenceScan(True, frozenset(class_uids), frozenset(uids), tuple(sorted(spans)))


def _scan_items(
    value: bytes,
    start: int,
    end: int,
    codec: rawseq.Codec,
    cache: _ItemScans,
    uids: list[str],
    class_uids: list[str],
    spans: list[tuple[int, int]],
) -> bool:
    """Add the UIDs and spans (relative to ``value``) of the items in ``value[start:end]``;
    False when one is not inert."""
    for item in rawseq.items(value, codec, start, end):
        if item.end - item.start < CACHED_ITEM_BYTES:
            if not _scan_item(value, item, codec, cache, uids, class_uids, spans, 0):
                return False
            continue
        key = (value[item.start : item.end], codec.implicit, codec.little)
        if key in cache:
            found = cache[key]
        else:
            u: list[str] = []
            c: list[str] = []
            sp: list[tuple[int, int]] = []
            inert = _scan_item(value, item, codec, cache, u, c, sp, item.start)
            found = cache[key] = (tuple(u), tuple(c), tuple(sp)) if inert else None
        if found is None:
            return False
        uids.extend(found[0])
        class_uids.extend(found[1])
        spans.extend((a + item.start, b + item.start) for a, b in found[2])
    return True


def _scan_item(
    value: bytes,
    item: rawseq.RawItem,
    codec: rawseq.Codec,
    cache: _ItemScans,
    uids: list[str],
    class_uids: list[str],
    spans: list[tuple[int, int]],
    origin: int,
) -> bool:
    """Add one item's UIDs and spans (relative to ``origin``); False when it is not inert."""
    for tag, vr, start, end in rawseq.item_tags(value, codec, item):
        if not is_inert(tag, vr):
            return False
        if vr == "UI":
            text = value[start:end].decode("ascii", "replace").strip(" \x00")
            values = [v for v in text.split("\\") if v]
            uids.extend(values)
            spans.append((start - origin, end - origin))
            if _is_class_uid_tag(tag):
                class_uids.extend(values)
        elif vr == "SQ":
            nested: list[tuple[int, int]] = []
            if not _scan_items(value, start, end, codec, cache, uids, class_uids, nested):
                return False
            spans.extend((a - origin, b - origin) for a, b in nested)
    return True


def splice_uids(
    value: bytes, spans: Sequence[tuple[int, int]], table: SameLengthTable
) -> bytes | None:
    """``value`` with the UI values at ``spans`` mapped through ``table`` (same lengths).

    Returns None when a value would change length (then the caller parses the sequence).
    """
    out: list[bytes] = []
    pos = 0
    mapping = table.table
    for start, end in spans:
        old = value[start:end]
        stripped = old.rstrip(b" \x00")
        new = b"\\".join(mapping.get(p.strip(), p) for p in stripped.split(b"\\"))
        if len(new) != len(stripped):
            return None
        out.append(value[pos:start])
        out.append(new)
        out.append(old[len(stripped) :])
        pos = end
    out.append(value[pos:])
    return b"".join(out)


def _token_source(tag: BaseTag, vr: str) -> bool:
    """Whether an element can hold identity tokens (checked before its value is converted)."""
    if vr == "PN":
        return True
    keyword = tag_keyword(int(tag))
    return keyword in IDENTITY_ID_KEYWORDS or keyword in SITE_KEYWORDS


def case_identity_tokens(
    datasets: Iterable[Dataset], scans: SequenceScans | None = None
) -> frozenset[str]:
    """Lower-case words that identify the case: person-name parts, IDs and site names.

    Used by :func:`is_safe_text` so that a label or description that mentions the patient, a
    clinician, an ID or the institution is never kept. Raw sequences holding only inert
    elements (:func:`is_inert`, e.g. ROIContourSequence) hold no such words and are not parsed.
    """
    tokens: set[str] = set()
    scans = SequenceScans() if scans is None else scans
    for ds in datasets:
        for _path, _owner, elem in iter_elements(ds, vrs=TEXT_VRS, scans=scans, want=_token_source):
            if elem.VR == "SQ" or elem.tag.is_private:
                continue
            keyword = elem.keyword
            is_pn = elem.VR == "PN"
            if not (is_pn or keyword in IDENTITY_ID_KEYWORDS or keyword in SITE_KEYWORDS):
                continue
            for value in _str_values(elem.value):
                low = value.strip().lower()
                if low in TRIVIAL_VALUES:
                    continue
                if keyword in IDENTITY_ID_KEYWORDS and len(low) >= 3:
                    tokens.add(low)
                min_len = 4 if keyword in SITE_KEYWORDS else 3
                parts = _pn_parts(low) if is_pn else _WORD_RE.findall(low)
                tokens.update(p for p in parts if len(p) >= min_len and p not in TRIVIAL_VALUES)
    return frozenset(tokens)


def is_safe_text(value: str, tokens: Iterable[str] = (), *, label: bool = False) -> bool:
    """True when ``value`` looks like a non-identifying name or description.

    Parameters
    ----------
    value : str
        The text.
    tokens : iterable of str
        Lower-case identity tokens of the case (:func:`case_identity_tokens`).
    label : bool
        Stricter alphabet for labels (TG-263 style: letters, digits, ``_ - + .`` and space).

    Notes
    -----
    Rejected: characters outside the alphabet (``^`` of person names, ``@``, line breaks),
    date-like patterns, runs of five or more digits (IDs), honorifics (Dr, Mr, ...), and any
    word or substring equal to an identity token.
    """
    text = value.strip()
    if not text:
        return True
    if not (_LABEL_RE if label else _TEXT_RE).match(text):
        return False
    if _DATE_LIKE_RE.search(text) or _LONG_DIGITS_RE.search(text):
        return False
    low = text.lower()
    words = set(_WORD_RE.findall(low))
    if words & _HONORIFICS:
        return False
    token_set = set(tokens)
    if words & token_set or low in token_set:
        return False
    return not any(len(t) >= 6 and t in low for t in token_set)


# --------------------------------------------------------------------------------------------
# Date shifting
# --------------------------------------------------------------------------------------------


def shift_date(value: str, offset_days: int) -> str | None:
    """Shift a DA value (``YYYYMMDD``, or legacy ``YYYY.MM.DD``); None when it is no date."""
    text = value.strip().replace(".", "") if len(value.strip()) == 10 else value.strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        day = dt.datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        return None
    try:
        return (day + dt.timedelta(days=offset_days)).strftime("%Y%m%d").zfill(8)
    except OverflowError:
        return None


def shift_datetime(value: str, offset_days: int) -> str | None:
    """Shift the date part of a DT value keeping its precision, time and offset; None if invalid."""
    match = _DT_RE.match(value.strip())
    if match is None:
        return None
    year, month, day, rest, zone = match.groups()
    try:
        base = dt.date(int(year), int(month or 1), int(day or 1))
        shifted = base + dt.timedelta(days=offset_days)
    except (ValueError, OverflowError):
        return None
    out = f"{shifted.year:04d}"
    if month:
        out += f"{shifted.month:02d}"
    if day:
        out += f"{shifted.day:02d}"
    return out + (rest or "") + (zone or "")


# --------------------------------------------------------------------------------------------
# The walker
# --------------------------------------------------------------------------------------------


@dataclass
class _Context:
    options: DeidOptions
    pseudonym: str
    offset_days: int
    tokens: frozenset[str]
    original_patient_id: str
    counts: Counter[str] = field(default_factory=Counter)
    events: list[WhatIfEntry] | None = None
    scans: SequenceScans = field(default_factory=lambda: SequenceScans())
    memo: dict[tuple[int, str, bytes | None, object, str | None], _Outcome] | None = field(
        default_factory=dict
    )
    stamps: dict[tuple[tuple[str, ...], _RawForm | None], Dataset] = field(default_factory=dict)
    mapper: UidMapper | None = None
    uid_table: SameLengthTable | None = None


def _short(value: object) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, DicomSequence):
        return f"<{len(value)} item(s)>"
    text = "\\".join(_str_values(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _note(
    ctx: _Context,
    path: str,
    elem: DataElement,
    action: str,
    before: object,
    after: object,
    *,
    count: bool = True,
) -> None:
    if count:
        ctx.counts[action] += 1
    if ctx.events is not None:
        tag = f"({elem.tag.group:04X},{elem.tag.element:04X})"
        keyword = "" if elem.tag.is_private else elem.keyword
        ctx.events.append(WhatIfEntry(path, tag, keyword, action, _short(before), _short(after)))


def _empty_value(vr: str) -> object:
    if vr == "SQ":
        return DicomSequence([])
    if vr in _BINARY_VRS:
        return b""
    if vr in _NUMERIC_VRS or vr in {"IS", "DS"}:
        return None
    return ""


def _dummy_value(vr: str) -> object:
    if vr in {"SQ", "UI"} or vr in _BINARY_VRS:
        return _empty_value(vr)
    if vr == "DA":
        return DUMMY_DATE
    if vr == "DT":
        return DUMMY_DATETIME
    if vr == "TM":
        return "000000"
    if vr in {"IS", "DS"}:
        return "0"
    if vr in _NUMERIC_VRS:
        return 0
    if vr == "AS":
        return ""
    return DUMMY_TEXT


def _resolve(action: str) -> str:
    """Resolve a combined Table E.1-1 action to the one applied (see module docstring)."""
    return {"Z/D": "Z", "X/Z": "Z", "X/D": "D", "X/Z/D": "Z", "X/Z/U*": "U*"}.get(action, action)


def _private_kept(owner: Dataset, tag: BaseTag, keep: tuple[tuple[int, int | str], ...]) -> bool:
    if not keep:
        return False
    group, element = tag.group, tag.element
    if 0x0010 <= element <= 0x00FF:  # private creator: kept if its block is kept
        creator = str(owner[tag].value or "").strip()
        return any(
            g == group
            and (
                (isinstance(e, str) and e.strip() == creator)
                or (isinstance(e, int) and e >> 8 == element)
            )
            for g, e in keep
        )
    creator_tag = Tag(group, element >> 8)
    creator = str(owner[creator_tag].value or "").strip() if creator_tag in owner else ""
    for g, e in keep:
        if g != group:
            continue
        if isinstance(e, int) and e == element:
            return True
        if isinstance(e, str) and creator and e.strip() == creator:
            return True
    return False


def _neutral_label(owner: Dataset, keyword: str) -> str:
    prefix, number_keyword = LABEL_FIELDS[keyword]
    value = owner.get(number_keyword) if number_keyword else None
    return f"{prefix}_{value}" if value not in (None, "") else f"{prefix}_1"


_RawForm = tuple[bool, bool, tuple[str, ...]]
"""(implicit VR, little endian, SpecificCharacterSet values) of a dataset read from a file."""


def _charset_key(ds: Dataset) -> object:
    """The character set text of ``ds`` is decoded with (its own or its parent's), hashable."""
    charset = ds._character_set
    return tuple(charset) if isinstance(charset, list) else charset


def raw_form(ds: Dataset) -> _RawForm | None:
    """How raw elements of ``ds`` are encoded (None for a dataset built in memory): the key
    under which :func:`encode_raw` results can be shared between datasets."""
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return None
    charset = tuple(_str_values(ds.get("SpecificCharacterSet")))
    return bool(implicit), bool(little), charset


def encode_raw(elem: DataElement, form: _RawForm) -> RawDataElement:
    """``elem`` encoded as a raw element of a dataset of the given form.

    Raw elements are written back byte for byte and can be shared between datasets (they
    are immutable), so a value set on every slice of a series is encoded once.
    """
    implicit, little, charset = form
    fp = DicomBytesIO()
    fp.is_implicit_VR = implicit
    fp.is_little_endian = little
    write_data_element(fp, elem, list(charset) or default_encoding)
    data = fp.getvalue()
    header = 8 if implicit or elem.VR not in rawseq.LONG_LENGTH_VRS else 12
    value = data[header:]
    vr = None if implicit else elem.VR
    return RawDataElement(elem.tag, vr, len(value), value, 0, implicit, little, True, False)


@dataclass(frozen=True)
class _Outcome:
    """What processing did to one raw element: kept, removed or set, and the counts noted.

    ``element`` is the new element: raw (shared) when the dataset's form is known.
    """

    kind: str  # "keep", "remove" or "set"
    element: DataElement | RawDataElement | None
    counts: Counter[str]


_OWNER_DEPENDENT = frozenset({"StudyID", "AccessionNumber", *LABEL_FIELDS})
"""Keywords whose result depends on other elements of their dataset (never memoised)."""


_KEEP, _INERT_UI, _SEQUENCE, _MEMOISED, _BY_STUDY, _OTHER = range(6)

_STUDY_KEYED = frozenset({"StudyID", "AccessionNumber"})
"""Owner-dependent keywords whose outcome depends only on their value and the owner's
StudyInstanceUID (:func:`_keyed_identifier`): memoised by both."""


@functools.lru_cache(maxsize=8192)
def _element_kind(tag: int, vr: str) -> int:
    """How :func:`_process_dataset` treats an element of this tag and VR: kept as it is
    (numbers and binary data the table does not list), an inert UID (remapped only; file
    meta UIDs the profile keeps count as inert too), a sequence, an element whose outcome is
    memoised by value (public, not a sequence, not owner-dependent) or by value and study,
    or any other element."""
    private = bool((tag >> 16) & 1)
    keyword = tag_keyword(tag)
    if vr in _UNTOUCHED_VRS and not private and table_action(tag) is None:
        return _KEEP
    if vr == "UI" and is_inert(tag, "UI"):
        return _INERT_UI
    if vr == "UI" and tag >> 16 == 0x0002 and keyword not in FILE_META_REMOVED:
        return _INERT_UI  # kept by _process_element, then remapped with every other UID
    if vr == "SQ":
        return _SEQUENCE
    if keyword in _STUDY_KEYED:
        return _BY_STUDY
    if private or keyword in _OWNER_DEPENDENT:
        return _OTHER
    return _MEMOISED


def _process_dataset(ds: Dataset, ctx: _Context, prefix: str) -> None:
    """Apply the policy to every element of ``ds`` (and its items), remapping UIDs as it goes.

    Raw elements stay raw wherever the outcome allows: numbers the table does not list are
    never converted, UIDs are rewritten in their bytes (same-length keyed values), raw inert
    sequences are scanned and spliced, and other outcomes are memoised (see :class:`_Outcome`).
    """
    form = raw_form(ds) if prefix == "" else None
    # memo keys: the encoding of a top-level dataset, the character set of a nested item
    # (the same bytes are other text under another character set)
    scope: object = form if prefix == "" else ("item", _charset_key(ds))
    uid_tags: list[BaseTag] = []  # remapped after the policy (StudyID is keyed on the original)
    live = ds.keys()  # a live view: an element removed with an earlier one is skipped
    for tag, raw in list(ds.items()):
        if tag not in live:
            continue
        number = int(tag)
        vr = raw.VR or dictionary_vr(number)
        if vr == "UN" and dictionary_vr(number) == "UI":
            vr = "UI"  # a UID stored as UN (pydicom converts it to UI): remapped all the same
        kind = _element_kind(number, vr)
        if kind == _KEEP:
            continue  # numbers and binary data the table does not list: kept, never converted
        if kind == _INERT_UI:
            uid_tags.append(tag)  # the policy is "keep, remap"
            continue
        if kind == _SEQUENCE and ctx.scans.inert(ds, tag) is not None:
            if _splice_sequence(ds, tag, raw, ctx):
                continue  # raw sequence of inert elements (e.g. ROIContourSequence): UIDs only
        key = None
        if (
            kind in (_MEMOISED, _BY_STUDY)
            and ctx.memo is not None
            and isinstance(raw, RawDataElement)
            and (isinstance(raw.value, bytes) or (raw.value is None and raw.length == 0))
        ):  # an empty raw value is None (a deferred one, of non-zero length, is never read)
            study = peek_str(ds, "StudyInstanceUID") if kind == _BY_STUDY else None
            key = (number, vr, raw.value, scope, study)
            hit = ctx.memo.get(key)
            if hit is not None:
                _replay(ds, tag, raw, hit, ctx)
                if vr == "UI" and tag in ds:
                    uid_tags.append(tag)  # a kept or new UID is remapped, as after a miss
                continue
            before = Counter(ctx.counts)
        elem = ds[tag]
        values_before: list[str] = _str_values(elem.value) if key is not None else []
        # element paths are only recorded for what_if (events)
        path = f"{prefix}{_elem_name(elem)}" if ctx.events is not None else ""
        recurse = _process_element(ds, elem, ctx, path)
        if key is not None and ctx.memo is not None:
            assert isinstance(raw, RawDataElement)  # a memo key is only made for raw elements
            outcome = _record(ds, tag, raw, elem, values_before, ctx.counts - before, form)
            ctx.memo[key] = outcome
        if tag in ds and elem.VR == "UI":
            uid_tags.append(tag)
        if recurse and elem.VR == "SQ" and elem.value:
            for index, item in enumerate(elem.value):
                _process_dataset(item, ctx, f"{path}[{index}].")
    for tag in uid_tags:
        if tag in ds:
            _remap_element(ds, tag, ds.get_item(tag), ctx)


def _remap_element(
    ds: Dataset, tag: BaseTag, elem: DataElement | RawDataElement, ctx: _Context
) -> None:
    """Rewrite the UID values of one UI element through the case's mapping (in place)."""
    table, mapper = ctx.uid_table, ctx.mapper
    if table is None or mapper is None:
        return
    value = elem.value
    if isinstance(elem, RawDataElement) and isinstance(value, bytes):
        if table.fallback and any(
            u.strip(" \x00") in table.fallback for u in value.decode("ascii", "replace").split("\\")
        ):
            elem = ds[tag]  # a UID without a same-length mapping: rewrite the parsed value
        else:
            new = table.sub(value)
            if new != value:
                ds[tag] = elem._replace(value=new)
                ctx.counts["U"] += 1
            return
    if not isinstance(elem, DataElement) or elem.value in (None, ""):
        return
    values = _str_values(elem.value)
    mapped = [table.map(mapper, v) if v else v for v in values]
    if mapped != values:
        elem.value = mapped[0] if len(mapped) == 1 else mapped
        ctx.counts["U"] += 1


def _splice_sequence(
    ds: Dataset, tag: BaseTag, raw: DataElement | RawDataElement, ctx: _Context
) -> bool:
    """Rewrite the UIDs of a raw inert sequence in its bytes; False when it must be parsed."""
    table = ctx.uid_table
    if table is None or not isinstance(raw, RawDataElement) or not isinstance(raw.value, bytes):
        return table is None
    scan = ctx.scans.scan(raw)
    if table.fallback and scan.uids & table.fallback:
        return False  # a UID without a same-length mapping inside: parse and process it
    new = splice_uids(raw.value, scan.ui_spans, table)
    if new is None:
        return False
    if new != raw.value:
        ds[tag] = raw._replace(value=new)
        ctx.counts["U"] += 1
    return True


def _record(
    ds: Dataset,
    tag: BaseTag,
    raw: RawDataElement,
    elem: DataElement,
    values_before: list[str],
    counts: Counter[str],
    form: _RawForm | None,
) -> _Outcome:
    """The outcome of processing ``raw`` (a kept element goes back to its raw bytes)."""
    if tag not in ds:
        return _Outcome("remove", None, counts)
    if ds.get_item(tag) is elem and _str_values(elem.value) == values_before:
        ds[tag] = raw  # unchanged: keep the original bytes
        return _Outcome("keep", None, counts)
    if form is not None:
        new_raw = encode_raw(ds[tag], form)
        ds[tag] = new_raw
        return _Outcome("set", new_raw, counts)
    return _Outcome("set", copy.deepcopy(ds[tag]), counts)


def _replay(
    ds: Dataset, tag: BaseTag, raw: RawDataElement, outcome: _Outcome, ctx: _Context
) -> None:
    """Apply a memoised outcome to an element with the same tag, VR, bytes and form."""
    for key, n in outcome.counts.items():
        ctx.counts[key] += n
    if outcome.kind == "remove":
        del ds[tag]
    elif outcome.kind == "set" and outcome.element is not None:
        new = outcome.element
        ds[tag] = new if isinstance(new, RawDataElement) else copy.deepcopy(new)


def _set(
    ctx: _Context,
    path: str,
    owner: Dataset,
    elem: DataElement,
    action: str,
    new: object,
    *,
    remove: bool = False,
) -> None:
    """Set ``elem`` to ``new`` (or delete it when ``remove``) and note it under ``action``."""
    before = elem.value
    if remove:
        del owner[elem.tag]
        _note(ctx, path, elem, action, before, "")
        return
    if _str_values(before) == _str_values(new) and not isinstance(before, DicomSequence):
        return
    elem.value = new
    _note(ctx, path, elem, action, before, new)


def _process_element(owner: Dataset, elem: DataElement, ctx: _Context, path: str) -> bool:
    """Apply the policy to one element; True when the element stays and may be recursed into."""
    options = ctx.options
    tag = int(elem.tag)
    vr = elem.VR
    if elem.tag.is_private:
        if _private_kept(owner, elem.tag, options.keep_private):
            ctx.counts["private_kept"] += 1
            if vr in {"DA", "DT"} and options.modified_dates:
                _shift(ctx, path, elem)
            return True
        _set(ctx, path, owner, elem, "private_removed", None, remove=True)
        return False
    keyword = elem.keyword or tag_keyword(int(tag))
    if elem.tag.group == 0x0002:
        if keyword in FILE_META_REMOVED:
            _set(ctx, path, owner, elem, "X", None, remove=True)
        return False
    if keyword in {"PatientName", "PatientID"}:
        _set(ctx, path, owner, elem, "pseudonym", ctx.pseudonym)
        return False
    if keyword in {"StudyID", "AccessionNumber"}:
        _keyed_identifier(ctx, path, owner, elem)
        return False
    if keyword in {"PatientBirthDate", "PatientBirthTime"}:
        _set(ctx, path, owner, elem, "Z", _empty_value(vr))
        return False
    if options.retain_patient_characteristics and keyword in RETAINED_PATIENT_CHARACTERISTICS:
        _retain_characteristic(ctx, path, owner, elem)
        return False
    if options.retain_device_identity and keyword in RETAINED_DEVICE_IDENTITY:
        ctx.counts["retained_option"] += 1
        return False
    if vr in {"DA", "DT"} and options.modified_dates:
        _shift(ctx, path, elem)
        return False
    if vr == "TM" and options.modified_dates:
        if table_action(tag) is not None:
            ctx.counts["retained_option"] += 1
        return False
    if keyword in LABEL_FIELDS:
        values = _str_values(elem.value)
        if options.clean_descriptors and all(
            is_safe_text(v, ctx.tokens, label=True) for v in values
        ):
            ctx.counts["label_kept"] += 1
        elif any(v.strip() for v in values):
            _set(ctx, path, owner, elem, "label_replaced", _neutral_label(owner, keyword))
        return False
    if options.clean_descriptors and is_descriptor_field(keyword, vr, tag):
        values = _str_values(elem.value)
        if all(is_safe_text(v, ctx.tokens) for v in values):
            if any(v.strip() for v in values):
                ctx.counts["descriptor_kept"] += 1
            return False
    listed = table_action(tag)
    if listed is not None:
        action = _resolve(listed)
        if action == "Z" and elem.VR == "SQ" and listed.startswith("X/"):
            # an empty sequence is invalid where the attribute is Type 3 (e.g.
            # ReferencedStudySequence): removing it is the profile's other allowed choice
            action = "X"
        return _apply_table_action(ctx, path, owner, elem, action)
    if keyword in RT_SUPPLEMENT or vr in {"PN", "DA", "DT"} or vr in FREE_TEXT_VRS:
        _set(ctx, path, owner, elem, "Z", _empty_value(vr))
        return False
    return True


def _apply_table_action(
    ctx: _Context, path: str, owner: Dataset, elem: DataElement, action: str
) -> bool:
    vr = elem.VR
    if action == "U":
        return True  # remapped by remap_uids with every other UID
    if action == "U*":
        if vr == "SQ":
            return True
        action = "Z"
    if action == "X":
        _set(ctx, path, owner, elem, "X", None, remove=True)
        return False
    if action == "Z":
        _set(ctx, path, owner, elem, "Z", _empty_value(vr))
        return False
    if action == "D":
        if vr in {"DA", "DT"} and ctx.options.modified_dates:
            _shift(ctx, path, elem)
        else:
            _set(ctx, path, owner, elem, "D", _dummy_value(vr))
        return False
    raise AssertionError(f"unknown Annex E action {action!r}")  # pragma: no cover


def _shift(ctx: _Context, path: str, elem: DataElement) -> None:
    values = _str_values(elem.value)
    if not any(v.strip() for v in values):
        return
    shifter: Callable[[str, int], str | None] = shift_date if elem.VR == "DA" else shift_datetime
    dummy = DUMMY_DATE if elem.VR == "DA" else DUMMY_DATETIME
    new_values = []
    replaced = False
    for value in values:
        shifted = shifter(value, ctx.offset_days) if value.strip() else ""
        if shifted is None:
            shifted, replaced = dummy, True
        new_values.append(shifted)
    before = elem.value
    elem.value = new_values[0] if len(new_values) == 1 else new_values
    _note(ctx, path, elem, "date_replaced" if replaced else "date_shifted", before, elem.value)


def _retain_characteristic(ctx: _Context, path: str, owner: Dataset, elem: DataElement) -> None:
    values = _str_values(elem.value)
    value = values[0].strip() if values else ""
    if elem.keyword == "PatientSex":
        valid = value in {"", "M", "F", "O"}
    elif elem.keyword == "PatientAge":
        valid = value == "" or bool(_AS_RE.match(value))
    else:
        try:
            valid = value == "" or float(value) >= 0
        except ValueError:
            valid = False
    if valid:
        ctx.counts["retained_option"] += 1
    else:
        _set(ctx, path, owner, elem, "Z", _empty_value(elem.VR))


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _case_patient_id(datasets: Sequence[Dataset]) -> str:
    ids = {str(ds.get("PatientID", "") or "").strip() for ds in datasets}
    ids.discard("")
    if len(ids) > 1:
        raise InputError(
            f"the {len(datasets)} objects given as one case carry {len(ids)} different "
            "PatientIDs; de-identify each patient's objects in a separate call"
        )
    if ids:
        return ids.pop()
    anchors = sorted(
        str(ds.get(kw, "")) for ds in datasets for kw in ("StudyInstanceUID", "FrameOfReferenceUID")
    )
    anchor = next((a for a in anchors if a), "")
    logger.warning("case has no PatientID; its pseudonym is derived from its study/frame UIDs")
    return f"no-patient-id:{anchor}"


def _code_item(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


OPTION_CODES: Mapping[str, tuple[str, str]] = {
    "Basic Profile": ("113100", "Basic Application Confidentiality Profile"),
    "Retain Longitudinal Temporal Information Modified Dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "Clean Descriptors": ("113105", "Clean Descriptors Option"),
    "Retain Device Identity": ("113109", "Retain Device Identity Option"),
    "Retain Patient Characteristics": ("113108", "Retain Patient Characteristics Option"),
    "Retain Safe Private": ("113111", "Retain Safe Private Option"),
    "Clean Recognizable Visual Features": ("113102", "Clean Recognizable Visual Features Option"),
}
"""Option name -> (DCM code value, code meaning) of PS3.16 CID 7050."""

DEFACED_MODALITIES = frozenset({"CT", "RTSTRUCT", "RTDOSE"})
"""Objects that carry Clean Recognizable Visual Features when the case was defaced."""


def _method_texts(options: tuple[str, ...]) -> list[str]:
    texts = [f"PS3.15 Basic Profile, Table E.1-1 DICOM {EDITION}", f"rtdeface {__version__}"]
    texts.extend(o if len(o) <= 64 else o[:64] for o in options)
    return texts


def _stamp(ds: Dataset, ctx: _Context, options: tuple[str, ...]) -> None:
    modality = peek_str(ds, "Modality")
    applied = tuple(
        o
        for o in options
        if o != "Clean Recognizable Visual Features" or modality in DEFACED_MODALITIES
    )
    form = raw_form(ds)
    template = ctx.stamps.get((applied, form))
    if template is None:
        template = Dataset()
        template.PatientName = ctx.pseudonym
        template.PatientID = ctx.pseudonym
        template.PatientIdentityRemoved = "YES"
        template.DeidentificationMethod = _method_texts(applied)
        template.DeidentificationMethodCodeSequence = DicomSequence(
            [_code_item(*OPTION_CODES["Basic Profile"])]
            + [_code_item(*OPTION_CODES[o]) for o in applied]
        )
        template.LongitudinalTemporalInformationModified = (
            "MODIFIED" if ctx.options.modified_dates else "REMOVED"
        )
        if form is not None:  # encoded once, shared by every object of this form
            template = Dataset({t: encode_raw(template[t], form) for t in template.keys()})
        ctx.stamps[(applied, form)] = template
    for tag in template.keys():
        if form is not None:
            ds[tag] = template.get_item(tag)
            continue
        elem = template[tag]
        if elem.VR == "SQ":
            items = [Dataset({t: copy.copy(item[t]) for t in item.keys()}) for item in elem.value]
            ds[tag] = DataElement(tag, "SQ", DicomSequence(items))
        else:
            ds[tag] = copy.deepcopy(elem)


def _keyed_identifier(ctx: _Context, path: str, owner: Dataset, elem: DataElement) -> None:
    """StudyID and AccessionNumber -> keyed hashes (distinct per study, never merged)."""
    value = "\\".join(_str_values(elem.value)).strip()
    study_uid = peek_str(owner, "StudyInstanceUID")
    if elem.keyword == "StudyID":
        anchor = study_uid or value
        if anchor:
            new = "S" + _keyed_hex(ctx.options.key, "study", anchor, 10)
            _set(ctx, path, owner, elem, "keyed_id", new)
    elif value:
        new = "A" + _keyed_hex(ctx.options.key, "accession", f"{study_uid}\x00{value}", 10)
        _set(ctx, path, owner, elem, "keyed_id", new)


def _uid_inventory(datasets: Iterable[Dataset], scans: SequenceScans) -> tuple[set[str], set[str]]:
    """(class UIDs, every UID value) of the datasets, at every depth, file meta included.

    Raw UI elements are read from their bytes; raw inert sequences from their scan.
    """
    class_uids: set[str] = set()
    uids: set[str] = set()
    stack: list[Dataset] = []
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        stack.extend([ds] if meta is None else [ds, meta])
    while stack:
        current = stack.pop()
        for tag, elem in list(current.items()):  # as stored: raw elements are not converted
            vr = str(elem.VR) if elem.VR else dictionary_vr(int(tag))
            if vr == "SQ":
                if scans.inert(current, tag) is None:
                    stack.extend(current[tag].value or [])
                continue
            if vr != "UI":
                continue
            value = elem.value
            if value is None and isinstance(elem, RawDataElement) and elem.length:
                value = current.get_item(tag).value  # a deferred value: read it
            if value is None:  # an empty raw element
                continue
            if isinstance(value, bytes):
                values = value.decode("ascii", "replace").strip(" \x00").split("\\")
            else:
                values = _str_values(value)
            values = [v.strip().rstrip("\x00") for v in values]
            uids.update(v for v in values if v)
            if _is_class_uid_tag(int(tag)):
                class_uids.update(v for v in values if v)
    for scan in scans.all():
        class_uids.update(scan.class_uids)
        uids.update(scan.uids)
    return class_uids, uids


def deidentify_datasets(
    datasets: Sequence[Dataset], options: DeidOptions, *, ct_defaced: bool
) -> DeidRecord:
    """De-identify, IN PLACE, all objects of one case (pass copies to keep the originals).

    Parameters
    ----------
    datasets : sequence of Dataset
        CT slices, RTSTRUCT, RTDOSE(s), RTPLAN and any other object of one patient.
    options : DeidOptions
        Key and options.
    ct_defaced : bool
        Whether the case was defaced (adds Clean Recognizable Visual Features to the CT,
        RTSTRUCT and RTDOSE objects).

    Returns
    -------
    DeidRecord
        Audit record (original PatientID, pseudonym, date offset, action counts).

    Raises
    ------
    InputError
        The objects carry different PatientIDs, or the pseudonym CSV has no row for the case.
    """
    session = DeidSession(datasets, options, ct_defaced=ct_defaced)
    session.process(datasets)
    return session.record()


class DeidSession:
    """De-identification of one case's objects in parts, with one context.

    The context (pseudonym, date offset, identity tokens and the keyed UID table) is built
    from ``context`` (the case's objects, e.g. the originals of the objects being written);
    :meth:`process` then de-identifies objects in place as they become ready, and
    :meth:`record` gives the audit record. Processing the objects of ``context`` themselves,
    in any number of calls, is :func:`deidentify_datasets`.

    Raises
    ------
    InputError
        As :func:`deidentify_datasets`.
    """

    def __init__(
        self,
        context: Sequence[Dataset],
        options: DeidOptions,
        *,
        ct_defaced: bool,
        describe: bool = False,
    ) -> None:
        self._ctx = ctx = _make_context(context, options)
        if describe:  # every element is visited and described (what_if)
            ctx.events = []
            ctx.memo = None
        self._applied = ctx.options.applied_options(ct_defaced=ct_defaced)
        self._n_objects = 0
        class_uids, uids = _uid_inventory(context, ctx.scans)
        ctx.mapper = UidMapper(ctx.options.key, ctx.options.uid_root)
        # one keyed mapping for the whole case; same-length where possible, so raw bytes
        # (large structure-set sequences, CT headers) are rewritten without being parsed
        ctx.uid_table = SameLengthTable.build(
            ctx.mapper,
            {u for u in uids if u not in class_uids and not u.startswith(REGISTERED_UID_ROOT)},
        )

    def process(self, datasets: Iterable[Dataset]) -> None:
        """De-identify ``datasets`` in place."""
        ctx = self._ctx
        n = 0
        for ds in datasets:
            n += 1
            if ctx.events is not None and ctx.uid_table is not None and ctx.mapper is not None:
                for path, _owner, elem in iter_elements(ds, vrs=_UI):
                    for value in _str_values(elem.value) if elem.VR == "UI" else []:
                        new = ctx.uid_table.map(ctx.mapper, value)
                        if new != value:
                            _note(ctx, path, elem, "U", value, new, count=False)
            meta = getattr(ds, "file_meta", None)
            if meta is not None:
                _process_dataset(meta, ctx, "file_meta.")
            _process_dataset(ds, ctx, "")
            _stamp(ds, ctx, self._applied)
        self._n_objects += n
        logger.debug("de-identified %d object(s): %s", n, dict(ctx.counts))

    def add_scan(self, value: bytes, implicit: bool, little: bool, scan: SequenceScan) -> None:
        """Use ``scan`` for the raw sequence value ``value`` (see :meth:`SequenceScans.add`)."""
        self._ctx.scans.add(value, implicit, little, scan)

    @property
    def events(self) -> list[WhatIfEntry]:
        """What was done to each element (only with ``describe``)."""
        return list(self._ctx.events or [])

    def record(self) -> DeidRecord:
        """The audit record of the objects processed so far."""
        ctx = self._ctx
        return DeidRecord(
            original_patient_id=ctx.original_patient_id,
            pseudonym=ctx.pseudonym,
            date_offset_days=ctx.offset_days,
            n_objects=self._n_objects,
            action_counts=dict(ctx.counts),
            options=self._applied,
            identity_tokens=ctx.tokens,
        )


class SessionJob:
    """A :class:`DeidSession` whose context is built in a forked child process while the
    caller loads and defaces the case (see :class:`rtdeface.forking.Deferred`).

    The context of a case is a function of its input objects only, so it can be built as soon
    as they are read. :meth:`session` returns it for exactly those objects; asked for any other
    list, it builds that list's session in this process (the result is the same either way).
    """

    def __init__(
        self,
        context: Sequence[Dataset],
        options: DeidOptions,
        *,
        ct_defaced: bool,
        parallel: bool = True,
    ) -> None:
        self._context = list(context)  # kept alive, so the identities below stay unique
        self._ids = frozenset(id(ds) for ds in self._context)
        self._options = options
        self._ct_defaced = ct_defaced
        self._call = Deferred.start(
            _session_in_child, self._context, options, ct_defaced, parallel=parallel
        )

    @property
    def forked(self) -> bool:
        """Whether the context is being built in a child process (not yet joined)."""
        return self._call.forked

    def session(self, context: Sequence[Dataset]) -> DeidSession:
        """The session of ``context`` (its errors, e.g. several PatientIDs, are raised here)."""
        if len(context) == len(self._context) and {id(ds) for ds in context} == self._ids:
            return self._call.result()
        self._call.cancel()
        return DeidSession(context, self._options, ct_defaced=self._ct_defaced)

    def cancel(self) -> None:
        """Stop a running child (the case failed)."""
        self._call.cancel()


def _session_in_child(
    context: Sequence[Dataset], options: DeidOptions, ct_defaced: bool
) -> DeidSession:
    """A new session; its sequence scans (a cache holding whole raw sequences) are dropped
    so that the answer sent back stays small."""
    session = DeidSession(context, options, ct_defaced=ct_defaced)
    session._ctx.scans = SequenceScans()
    return session


def _make_context(datasets: Sequence[Dataset], options: DeidOptions) -> _Context:
    patient_id = _case_patient_id(datasets)
    offset = (
        date_offset_days(options.key, patient_id, options.date_offset_range_days)
        if options.modified_dates
        else 0
    )
    scans = SequenceScans()
    return _Context(
        options=options,
        pseudonym=pseudonym_for(patient_id, options),
        offset_days=offset,
        tokens=case_identity_tokens(datasets, scans),
        original_patient_id=patient_id,
        scans=scans,
    )


def what_if(ds: Dataset, options: DeidOptions, *, ct_defaced: bool = False) -> list[WhatIfEntry]:
    """List what :func:`deidentify_datasets` would do to ``ds``, without modifying it.

    Parameters
    ----------
    ds : Dataset
        One object (its PatientID gives the pseudonym and date offset, as in the real run).
    options : DeidOptions
        Key and options.
    ct_defaced : bool
        As in :func:`deidentify_datasets`.

    Returns
    -------
    list of WhatIfEntry
        One entry per element changed or removed (path, tag, keyword, action, before, after).
        The ``before`` values are identifying: show them to the operator only.
    """
    work = copy.deepcopy(ds)
    session = DeidSession([work], options, ct_defaced=ct_defaced, describe=True)
    session.process([work])
    return session.events


__all__ = [
    "DEFAULT_DATE_OFFSET_RANGE_DAYS",
    "DEFAULT_KEY_ENV_VAR",
    "DUMMY_DATE",
    "LABEL_FIELDS",
    "OPTION_CODES",
    "PROFILE_NAME",
    "RETAINED_DEVICE_IDENTITY",
    "RETAINED_PATIENT_CHARACTERISTICS",
    "RT_SUPPLEMENT",
    "DeidOptions",
    "DeidRecord",
    "DeidSession",
    "SessionJob",
    "WhatIfEntry",
    "case_identity_tokens",
    "date_offset_days",
    "deidentify_datasets",
    "is_descriptor_field",
    "is_safe_text",
    "iter_elements",
    "load_key",
    "pseudonym_for",
    "read_pseudonym_csv",
    "shift_date",
    "shift_datetime",
    "table_action",
    "what_if",
    "write_audit",
]
