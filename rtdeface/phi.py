"""PHI scanner: find any identifying value of the original objects anywhere in the outputs.

:func:`scan_phi` first collects, from the originals, every value that could identify the
patient: every element Table E.1-1 lists (all of them are non-K), every person name, date and
date-time, every non-registered instance UID, every private element, and the RT free text of
:data:`rtdeface.deid.RT_SUPPLEMENT`, at every depth and in the file meta. Values kept on purpose
by the default options are not collected (safe labels and descriptors, TreatmentMachineName,
patient sex/age/size/weight, TM times, class UIDs), nor trivial values (short, ``YES``, plain
small numbers).

It then looks for them in every element of every output (any depth, private tags, file meta),
in the output file and directory names and in extra text files (reports, JSON):

* UIDs: whole values of UI elements, and dotted-number tokens in text;
* dates: DA/DT values, and in text ``YYYYMMDD``, ``YYYY-MM-DD``, ``DD.MM.YYYY``, ``DD/MM/YYYY``
  and ``MM/DD/YYYY``;
* text: case-insensitive substring for values of six characters or more, whole-word match for
  shorter ones and for the parts of person names.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from rtdeface.deid import (
    RETAINED_DEVICE_IDENTITY,
    RETAINED_PATIENT_CHARACTERISTICS,
    RT_SUPPLEMENT,
    TRIVIAL_VALUES,
    case_identity_tokens,
    is_class_uid_keyword,
    is_descriptor_field,
    is_label_field,
    is_safe_text,
    iter_elements,
    table_action,
)
from rtdeface.uids import REGISTERED_UID_ROOT

logger = logging.getLogger(__name__)

MIN_TEXT_LENGTH = 4
"""Shorter text values are never searched for (too likely to occur by chance)."""

MIN_SUBSTRING_LENGTH = 6
"""Text values at least this long are searched as substrings; shorter ones as whole words."""

MIN_NAME_PART_LENGTH = 3
"""Parts of person names at least this long are searched as whole words."""

MIN_NUMBER_DIGITS = 6
"""Values that are plain numbers are searched only when they have at least this many digits."""

MAX_TEXT_FILE_BYTES = 50_000_000
"""Non-DICOM output files larger than this are not read as text."""

_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
)
_SCANNED_VRS = _STRING_VRS | {"UI", "UN"}
_WORD_RE = re.compile(r"[0-9a-z]+")
_UID_TOKEN_RE = re.compile(r"(?<![\d.])\d+(?:\.\d+){2,}(?![\d.])")
_DATE_PATTERNS = (
    (re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"), ("Y", "M", "D")),
    (re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"), ("Y", "M", "D")),
    (re.compile(r"(?<!\d)(\d{1,2})[./](\d{1,2})[./](\d{4})(?!\d)"), ("D", "M", "Y")),
    (re.compile(r"(?<!\d)(\d{1,2})[./](\d{1,2})[./](\d{4})(?!\d)"), ("M", "D", "Y")),
)


@dataclass(frozen=True)
class PhiHit:
    """One identifying value of the originals found in the outputs.

    Attributes
    ----------
    where : str
        Where it was found: ``<file or output[i]>:<element path>``, ``path:<file path>`` or
        ``text:<name>``.
    value : str
        The original value that matched (as collected, lower case for text).
    original_field : str
        Where the value came from in the originals: ``original[i](<Modality>):<element path>``.
    """

    where: str
    value: str
    original_field: str


@dataclass
class _Needles:
    uids: dict[str, str] = field(default_factory=dict)
    dates: dict[str, str] = field(default_factory=dict)
    long_texts: dict[str, str] = field(default_factory=dict)
    words: dict[str, str] = field(default_factory=dict)
    _word_re: re.Pattern[str] | None = None

    def word_pattern(self) -> re.Pattern[str] | None:
        if self._word_re is None and self.words:
            alternatives = "|".join(re.escape(w) for w in sorted(self.words, key=len, reverse=True))
            self._word_re = re.compile(rf"(?<![0-9a-z])(?:{alternatives})(?![0-9a-z])")
        return self._word_re


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, bytes):
        text = value.decode("latin-1").strip("\x00 ")
        printable = sum(ch.isprintable() for ch in text)
        return [text] if text and printable >= 0.9 * len(text) else []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value if v is not None]  # type: ignore[attr-defined]
    return [str(value)]


def _valid_date(text: str) -> str | None:
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        dt.datetime.strptime(text[:8], "%Y%m%d")
    except ValueError:
        return None
    return text[:8]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _kept_on_purpose(keyword: str, vr: str, tag: int, value: str, tokens: frozenset[str]) -> bool:
    if keyword in RETAINED_PATIENT_CHARACTERISTICS or keyword in RETAINED_DEVICE_IDENTITY:
        return True
    if is_label_field(keyword):
        return is_safe_text(value, tokens, label=True)
    if is_descriptor_field(keyword, vr, tag):
        return is_safe_text(value, tokens)
    return False


def _collect(originals: list[Dataset]) -> _Needles:
    tokens = case_identity_tokens(originals)
    needles = _Needles()
    retained_words: set[str] = set()
    for index, ds in enumerate(originals):
        label = f"original[{index}]({ds.get('Modality', '?')})"
        for path, _owner, elem in iter_elements(ds, vrs=_SCANNED_VRS):
            vr = elem.VR
            if vr == "SQ" or vr == "TM":
                continue
            private = elem.tag.is_private
            keyword = "" if private else elem.keyword
            tag = int(elem.tag)
            source = f"{label}:{path}"
            if vr == "UI":
                if is_class_uid_keyword(keyword):
                    continue
                for uid in _values(elem.value):
                    uid = uid.strip().rstrip("\x00")
                    if uid and not uid.startswith(REGISTERED_UID_ROOT):
                        needles.uids.setdefault(uid, source)
                continue
            identifying = (
                private
                or vr in {"PN", "DA", "DT"}
                or table_action(tag) is not None
                or keyword in RT_SUPPLEMENT
                or (vr in {"LT", "ST", "UT"})
            )
            if vr not in _STRING_VRS and not private:
                continue
            if not identifying:
                for raw in _values(elem.value):
                    retained_words.update(_WORD_RE.findall(raw.lower()))
                continue
            for raw in _values(elem.value):
                value = raw.strip()
                if not value or _kept_on_purpose(keyword, vr, tag, value, tokens):
                    continue
                if vr in {"DA", "DT"}:
                    date = _valid_date(value)
                    if date is not None:
                        needles.dates.setdefault(date, source)
                        continue
                _add_text(needles, value, source, id_like=keyword.endswith(("ID", "IDs")))
                if vr == "PN":
                    for part in re.split(r"[\^=\s,]+", value.lower()):
                        if len(part) >= MIN_NAME_PART_LENGTH and part not in TRIVIAL_VALUES:
                            if not _is_number(part):
                                needles.words.setdefault(part, source)
    for word in retained_words & needles.words.keys():
        del needles.words[word]  # also a retained value (e.g. model 'phantom'): not evidence
    return needles


def _add_text(needles: _Needles, value: str, source: str, *, id_like: bool) -> None:
    low = value.lower()
    if low in TRIVIAL_VALUES or len(low) < MIN_TEXT_LENGTH:
        return
    digits = low.replace(".", "").replace("-", "").replace("+", "")
    if _is_number(low) and not id_like and len(digits) < MIN_NUMBER_DIGITS:
        return
    if len(low) >= MIN_SUBSTRING_LENGTH:
        needles.long_texts.setdefault(low, source)
    else:
        needles.words.setdefault(low, source)


def _dates_in_text(text: str) -> set[str]:
    found: set[str] = set()
    for pattern, order in _DATE_PATTERNS:
        for match in pattern.finditer(text):
            parts = dict(zip(order, match.groups(), strict=True))
            candidate = f"{int(parts['Y']):04d}{int(parts['M']):02d}{int(parts['D']):02d}"
            if _valid_date(candidate):
                found.add(candidate)
    return found


def _search_text(text: str, needles: _Needles) -> Iterator[tuple[str, str]]:
    """Yield ``(value, original field)`` of every needle found in free text."""
    low = text.lower()
    for needle, source in needles.long_texts.items():
        if needle in low:
            yield needle, source
    pattern = needles.word_pattern()
    if pattern is not None:
        for match in set(pattern.findall(low)):
            yield match, needles.words[match]
    for uid in set(_UID_TOKEN_RE.findall(text)):
        if uid in needles.uids:
            yield uid, needles.uids[uid]
    for date in _dates_in_text(text) & needles.dates.keys():
        yield date, needles.dates[date]


def _scan_dataset(ds: Dataset, where: str, needles: _Needles) -> Iterator[PhiHit]:
    for path, _owner, elem in iter_elements(ds, vrs=_SCANNED_VRS):
        vr = elem.VR
        if vr in {"SQ", "TM", "DS", "IS"}:
            continue
        values = (
            _values(elem.value)
            if (vr in _STRING_VRS or vr == "UI" or vr == "UN" or elem.tag.is_private)
            else []
        )
        for value in values:
            value = value.strip().rstrip("\x00")
            if not value:
                continue
            if vr == "UI":
                if value in needles.uids:
                    yield PhiHit(f"{where}:{path}", value, needles.uids[value])
                continue
            if vr in {"DA", "DT"}:
                date = _valid_date(value)
                if date is not None and date in needles.dates:
                    yield PhiHit(f"{where}:{path}", date, needles.dates[date])
                    continue
            for matched, source in _search_text(value, needles):
                yield PhiHit(f"{where}:{path}", matched, source)


def _iter_files(item: Path) -> Iterator[Path]:
    if item.is_dir():
        yield from sorted(p for p in item.rglob("*") if p.is_file())
    else:
        yield item


def _scan_file(path: Path, root: Path | None, needles: _Needles) -> Iterator[PhiHit]:
    shown = path.relative_to(root) if root is not None and path.is_relative_to(root) else path
    name_text = str(shown) if root is not None else f"{path.parent.name}/{path.name}"
    for matched, source in _search_text(name_text, needles):
        yield PhiHit(f"path:{shown}", matched, source)
    try:
        ds = dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, KeyError):
        ds = None
    if ds is not None:
        yield from _scan_dataset(ds, str(shown), needles)
        return
    if path.stat().st_size > MAX_TEXT_FILE_BYTES:
        logger.warning("not scanning %s for PHI: larger than %d bytes", path, MAX_TEXT_FILE_BYTES)
        return
    text = path.read_bytes().decode("utf-8", errors="replace")
    for matched, source in _search_text(text, needles):
        yield PhiHit(f"text:{shown}", matched, source)


def scan_phi(
    original_datasets: Iterable[Dataset],
    outputs: Iterable[Path | Dataset],
    *,
    extra_texts: Iterable[Path | str] = (),
) -> list[PhiHit]:
    """Report every identifying value of the originals that occurs in the outputs.

    Parameters
    ----------
    original_datasets : iterable of Dataset
        The objects as they were before de-identification (headers suffice).
    outputs : iterable of Path or Dataset
        De-identified datasets, output files, or output directories (searched recursively: every
        DICOM file's elements, every other file as text, and every file's path below the
        directory, directory names included).
    extra_texts : iterable of Path or str
        More text to search: a Path is read as a text file, a str is the text itself.

    Returns
    -------
    list of PhiHit
        Empty when nothing identifying was found. Hits are unique per (where, value).
    """
    originals = list(original_datasets)
    needles = _collect(originals)
    logger.debug(
        "PHI scan: %d UIDs, %d dates, %d texts, %d words collected",
        len(needles.uids),
        len(needles.dates),
        len(needles.long_texts),
        len(needles.words),
    )
    hits: list[PhiHit] = []
    for index, item in enumerate(outputs):
        if isinstance(item, Dataset):
            hits.extend(_scan_dataset(item, f"output[{index}]", needles))
            continue
        root = Path(item) if Path(item).is_dir() else None
        for path in _iter_files(Path(item)):
            hits.extend(_scan_file(path, root, needles))
    for index, extra in enumerate(extra_texts):
        if isinstance(extra, Path):
            text = extra.read_text(encoding="utf-8", errors="replace")
            name = str(extra)
        else:
            text, name = extra, f"extra[{index}]"
        for matched, source in _search_text(text, needles):
            hits.append(PhiHit(f"text:{name}", matched, source))
    unique = list(dict.fromkeys(hits))
    if unique:
        logger.info("PHI scan found %d occurrence(s)", len(unique))
    return unique


__all__ = ["PhiHit", "scan_phi"]
