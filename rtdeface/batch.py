"""Deface every case of an input tree: parallel, failure-isolated, resumable.

Layout of a batch output (no identifiers in any name or file)::

    OUTPUT_ROOT/<pseudonym>_<keyed hash>/    one folder per case, written atomically:
        CT/CT_0001.dcm ... RTSTRUCT.dcm RTDOSE_n.dcm RTPLAN_n.dcm rtdeface_report.json
    OUTPUT_ROOT/rtdeface_manifest.json       per case: status, input and option digests
    OUTPUT_ROOT/summary.csv, summary.json    one row per case or problem
    OUTPUT_ROOT/rtdeface.log                 log of every run (scrubbed of paths, UIDs, names)
    OUTPUT_ROOT.audit.json                   beside it, mode 0600: original PatientID -> pseudonym
    OUTPUT_ROOT.audit-cases.json             beside it, mode 0600: case folder -> input paths

A case is redone unless the manifest says it was completed with the same input content
(SHA-256 of every input file) and the same options; a case killed mid-write leaves only a
hidden ``.rtdeface-partial-*`` folder, removed by the next run. Workers run
:func:`process_case`, which never raises: a failing case becomes a ``failed`` row.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pydicom

from rtdeface import __version__
from rtdeface.deid import DeidOptions, DeidRecord, pseudonym_for, write_audit
from rtdeface.discover import FoundCase, TreeCases, pool_context
from rtdeface.errors import OutputError, RtDefaceError

log = logging.getLogger(__name__)

REPORT_NAME = "rtdeface_report.json"
"""Per-case report inside each case folder (same as a single-case output)."""
MANIFEST_NAME = "rtdeface_manifest.json"
"""Resume manifest inside OUTPUT_ROOT."""
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
LOG_NAME = "rtdeface.log"
"""Default log file inside OUTPUT_ROOT."""
LOCK_NAME = ".rtdeface.lock"
PARTIAL_PREFIX = ".rtdeface-partial-"
"""Prefix of the temporary folders of :func:`rtdeface.write.write_atomic`."""
TRASH_PREFIX = ".rtdeface-old-"
MANIFEST_FORMAT = 1
FOLDER_HASH_CHARS = 10
"""Hex characters of the keyed hash in a case folder name (40 bits)."""

STATUSES = ("done", "failed", "cancelled", "ambiguous", "orphan", "unreadable")
"""Row statuses; every status but ``done`` makes the batch exit 1."""

SUMMARY_COLUMNS = (
    "case",
    "pseudonym",
    "status",
    "reason",
    "reused",
    "eyes_source",
    "eye_rois",
    "landmark_confidence",
    "z_inferior_mm",
    "y_mid_mm",
    "preserved_rois",
    "preserved_in_region_ml",
    "ct_slices",
    "ct_voxels_changed",
    "ct_slices_changed",
    "rois_changed",
    "rois_removed",
    "doses",
    "dose_voxels_zeroed",
    "max_dose_removed_gy",
    "plans",
    "input_files",
    "warnings",
    "time_hash_s",
    "time_load_s",
    "time_deface_s",
    "time_write_s",
    "time_total_s",
)
"""Columns of ``summary.csv`` (``summary.json`` has the same keys).

``preserved_in_region_ml`` is the CT volume inside the removal region R that was kept because
it lies in a preserved ROI (the PTVs, plus ``--keep`` ROIs): the PTV overlap with R.
``rois_changed`` and ``rois_removed`` hold ROI names as written (after Clean Descriptors);
list cells are joined with ``;``. ``time_*`` columns are wall-clock seconds of this run."""

TIME_COLUMNS = tuple(c for c in SUMMARY_COLUMNS if c.startswith("time_"))


# --------------------------------------------------------------------------------------------
# Names, digests and scrubbing
# --------------------------------------------------------------------------------------------

_UNSAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")
_UID_RE = re.compile(r"(?<![\w.])[0-2](?:\.\d+){3,}(?![\w.])")


def case_folder_name(case: FoundCase, deid: DeidOptions | None) -> tuple[str, str]:
    """Output folder name and pseudonym of a case: ``<pseudonym>_<keyed hash>``.

    The hash is an HMAC (de-identification key) of the CT SeriesInstanceUID and the RTSTRUCT
    SOPInstanceUID, so several cases of one patient get distinct, stable folders. Without
    de-identification the pseudonym is ``nodeid`` and the hash is unkeyed.

    Raises
    ------
    InputError
        The pseudonym CSV has no row for the case's PatientID.
    """
    if deid is None:
        digest = hashlib.sha256(b"rtdeface-folder\x00" + case.identity.encode()).hexdigest()
        pseudonym = "nodeid"
    else:
        pseudonym = pseudonym_for(case.patient_id, deid)
        digest = hmac.new(
            deid.key, b"rtdeface-folder\x00" + case.identity.encode(), hashlib.sha256
        ).hexdigest()
    safe = _UNSAFE_NAME_RE.sub("_", pseudonym).strip("._") or "case"
    return f"{safe}_{digest[:FOLDER_HASH_CHARS]}", pseudonym


def options_digest(deface: object, deid: DeidOptions | None, pseudonym: str) -> str:
    """SHA-256 (hex) of everything that shapes a case's output except its input files.

    The de-identification key enters as an HMAC, never in clear; the pseudonym map enters
    only through this case's pseudonym.
    """
    parts: dict[str, object] = {"rtdeface": __version__, "deface": repr(deface)}
    if deid is not None:
        parts["deid"] = {
            f.name: repr(getattr(deid, f.name))
            for f in dataclasses.fields(deid)
            if f.name not in ("key", "pseudonym_map")
        }
        parts["key"] = hmac.new(deid.key, b"rtdeface-options", hashlib.sha256).hexdigest()
        parts["pseudonym"] = pseudonym
    blob = json.dumps(parts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


class PhiScrubber(logging.Filter):
    """Remove input paths, UIDs and patient names/IDs from text bound for shareable files.

    Used as a :class:`logging.Filter` on the batch log file and on every reason written to
    the manifest and summary. Paths are replaced by ``<input>``, UIDs by ``<uid>`` and known
    PatientIDs and PatientName components (3+ characters) by ``<patient>``.
    """

    def __init__(
        self, root: Path, paths: Iterable[Path] = (), identities: Iterable[str] = ()
    ) -> None:
        super().__init__()
        self.root = str(Path(root).absolute())
        known = {self.root}
        for p in paths:
            known.add(str(p))
            known.update(str(parent) for parent in p.parents if self.root in str(parent))
        self._known = known
        self._max_len = max(len(k) for k in known)
        words: set[str] = set()
        for ident in identities:
            ident = ident.strip()
            if len(ident) >= 3:
                words.add(ident)
            words.update(w for w in re.split(r"[\^\s,=]+", ident) if len(w) >= 3)
        self._words = (
            re.compile(
                r"(?<!\w)(?:"
                + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
                + r")(?!\w)",
                re.IGNORECASE,
            )
            if words
            else None
        )

    def scrub(self, text: str) -> str:
        """``text`` without paths under the input root, UIDs and patient identifiers."""
        out: list[str] = []
        pos = 0
        while True:
            at = text.find(self.root, pos)
            if at < 0:
                out.append(text[pos:])
                break
            out.append(text[pos:at])
            end = next(
                (
                    e
                    for e in range(min(len(text), at + self._max_len), at, -1)
                    if text[at:e] in self._known
                ),
                None,
            )
            if end is None:  # an unknown path below the root: up to the next separator
                m = re.compile(r"[^\s:;,()'\"]*").match(text, at)
                end = m.end() if m else at + len(self.root)
            out.append("<input>")
            pos = end
        result = _UID_RE.sub("<uid>", "".join(out))
        if self._words is not None:
            result = self._words.sub("<patient>", result)
        return result

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub the record's message in place (always keeps the record)."""
        record.msg = self.scrub(record.getMessage())
        record.args = None
        return True


def scrubber_for(tree: TreeCases) -> PhiScrubber:
    """A :class:`PhiScrubber` knowing every path and patient identity of ``tree``."""
    idents: set[str] = set()
    for r in tree.index.records:
        idents.update(v for v in (r.patient_id, r.patient_name) if v)
    paths = [r.path for r in tree.index.records]
    paths += [p for p, _ in tree.index.unreadable]
    paths += list(tree.index.non_dicom)
    return PhiScrubber(tree.index.root, paths, idents)


# --------------------------------------------------------------------------------------------
# One case (runs in a worker)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseTask:
    """Everything a worker needs to deface one case (picklable).

    Attributes
    ----------
    name : str
        Output folder name (see :func:`case_folder_name`).
    pseudonym : str
    case : FoundCase
    out_root : Path
        OUTPUT_ROOT; the case is written to ``out_root / name``.
    deface : DefaceOptions
    deid : DeidOptions or None
    options_sha256 : str
        :func:`options_digest` of this case.
    reuse_input_sha256 : str or None
        Input digest of a previous completed run with the same options: when the inputs
        still hash to it and the folder exists, the case is reused, not redone.
    log_level : int
        Lowest level of the log records returned with the result.
    """

    name: str
    pseudonym: str
    case: FoundCase
    out_root: Path
    deface: Any
    deid: DeidOptions | None
    options_sha256: str
    reuse_input_sha256: str | None = None
    log_level: int = logging.INFO


@dataclass(frozen=True)
class CaseResult:
    """What became of one case.

    Attributes
    ----------
    name, pseudonym : str
    status : str
        ``done``, ``failed`` or ``cancelled``.
    reused : bool
        Completed by an earlier run with the same inputs and options; not redone.
    detail : str
        Failure message for the operator (may hold input paths; never written to OUTPUT_ROOT).
    error_type : str
        Exception class name of a failure.
    input_sha256, options_sha256 : str
    row : dict
        Summary row (see :data:`SUMMARY_COLUMNS`), without ``reason``.
    audit : dict or None
        :meth:`DeidRecord.as_dict` of the case (identifiers: audit file only).
    logs : tuple of (int, str)
        Log records (level, message) emitted while processing the case.
    """

    name: str
    pseudonym: str
    status: str
    reused: bool = False
    detail: str = ""
    error_type: str = ""
    input_sha256: str = ""
    options_sha256: str = ""
    row: Mapping[str, Any] = field(default_factory=dict)
    audit: Mapping[str, Any] | None = None
    logs: tuple[tuple[int, str], ...] = ()


class _Capture(logging.Handler):
    """Collect the records of this thread (workers may be threads of one process)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append((record.levelno, record.getMessage()))


def hash_inputs(case: FoundCase) -> tuple[str, dict[Path, bytes]]:
    """SHA-256 (hex) of the content of every input file of a case, and the bytes read.

    The digest covers role, SOPInstanceUID and bytes of each file in a fixed order, not the
    paths, so moving the input tree does not invalidate completed cases.
    """
    f = case.files
    rs = (f.rtstruct,) if f.rtstruct else ()
    records = sorted((*f.ct, *rs, *f.doses, *f.plans), key=lambda r: (r.role, r.sop_instance_uid))
    total = hashlib.sha256(b"rtdeface-inputs-v1")
    data: dict[Path, bytes] = {}
    for r in records:
        blob = r.path.read_bytes()
        data[r.path] = blob
        total.update(f"\x00{r.role}\x00{r.sop_instance_uid}\x00".encode())
        total.update(hashlib.sha256(blob).digest())
    return total.hexdigest(), data


def _read_all(case: FoundCase, data: Mapping[Path, bytes]) -> dict[Path, pydicom.Dataset]:
    from rtdeface.errors import InputError

    out: dict[Path, pydicom.Dataset] = {}
    for path, blob in data.items():
        try:
            out[path] = pydicom.dcmread(io.BytesIO(blob))
        except Exception as exc:
            raise InputError(
                f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc}); "
                "re-export it or remove it from the input"
            ) from exc
    return out


def summary_row(name: str, pseudonym: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """The summary row of a completed case from its per-case report (no identifiers)."""
    lm = report["landmarks"]
    ct = report["ct"]
    doses = report["doses"]
    changed = [r["name"] for r in report["rois"] if r.get("planes_changed") and not r["removed"]]
    return {
        "case": name,
        "pseudonym": pseudonym,
        "status": "done",
        "reason": "",
        "reused": False,
        "eyes_source": lm["source"],
        "eye_rois": ";".join(lm["eye_rois"]),
        "landmark_confidence": lm["confidence"],
        "z_inferior_mm": round(float(lm["z_inferior_mm"]), 3),
        "y_mid_mm": round(float(lm["y_mid_mm"]), 3),
        "preserved_rois": ";".join(report["cut"]["preserved_rois"]),
        "preserved_in_region_ml": ct["preserved_ml_in_region"],
        "ct_slices": ct["shape_kij"][0],
        "ct_voxels_changed": ct["voxels_changed"],
        "ct_slices_changed": ct["slices_changed"],
        "rois_changed": ";".join(changed),
        "rois_removed": ";".join(report["rois_removed"]),
        "doses": len(doses),
        "dose_voxels_zeroed": ";".join(str(d["voxels_zeroed"]) for d in doses),
        "max_dose_removed_gy": max((float(d["max_dose_removed_gy"]) for d in doses), default=0.0),
        "plans": report["plans"],
        "warnings": len(lm["warnings"]),
    }


def _swap_out(target: Path) -> Path | None:
    """Move an existing case folder aside (hidden) so it can be rewritten atomically."""
    if not target.exists():
        return None
    trash = target.parent / f"{TRASH_PREFIX}{target.name}-{secrets.token_hex(4)}"
    os.replace(target, trash)
    return trash


def process_case(task: CaseTask) -> CaseResult:
    """Hash, load, deface, de-identify and write one case; never raises for a bad case.

    Returns a ``done`` result (or a reused one, see :attr:`CaseTask.reuse_input_sha256`) or a
    ``failed`` result carrying the error message.
    """
    from rtdeface.load import load_case_files
    from rtdeface.pipeline import deface_case
    from rtdeface.report import case_report, to_json
    from rtdeface.write import build_outputs, write_atomic

    root_log = logging.getLogger("rtdeface")
    if root_log.getEffectiveLevel() > task.log_level:
        root_log.setLevel(task.log_level)
    capture = _Capture()
    root_log.addHandler(capture)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    input_sha = ""
    target = task.out_root / task.name
    try:
        input_sha, data = hash_inputs(task.case)
        timings["hash"] = time.perf_counter() - t0
        report_path = target / REPORT_NAME
        if input_sha == task.reuse_input_sha256 and report_path.is_file():
            report = json.loads(report_path.read_text(encoding="utf-8"))
            row = summary_row(task.name, task.pseudonym, report)
            row.update(reused=True, input_files=len(data))
            return CaseResult(
                task.name,
                task.pseudonym,
                "done",
                reused=True,
                input_sha256=input_sha,
                options_sha256=task.options_sha256,
                row=row,
            )
        t = time.perf_counter()
        datasets = _read_all(task.case, data)
        del data
        case = load_case_files(task.case.files, task.case.folder, datasets)
        del datasets
        timings["load"] = time.perf_counter() - t
        t = time.perf_counter()
        defaced = deface_case(case, task.deface)
        outputs, record = build_outputs(defaced, task.deid)
        defaced.timings_s["load"] = timings["load"]
        timings["deface"] = time.perf_counter() - t
        report = case_report(defaced, outputs, record)
        t = time.perf_counter()
        trash = _swap_out(target)
        write_atomic(outputs, target, {REPORT_NAME: to_json(report)})
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        timings["write"] = time.perf_counter() - t
        row = summary_row(task.name, task.pseudonym, report)
        row["input_files"] = len(task.case.paths())
        for k, v in timings.items():
            row[f"time_{k}_s"] = round(v, 3)
        row["time_total_s"] = round(time.perf_counter() - t0, 3)
        log.info(
            "done: eyes from %s, cut z >= %.2f mm, y < %.2f mm, %d CT voxels changed",
            row["eyes_source"],
            row["z_inferior_mm"],
            row["y_mid_mm"],
            row["ct_voxels_changed"],
        )
        return CaseResult(
            task.name,
            task.pseudonym,
            "done",
            input_sha256=input_sha,
            options_sha256=task.options_sha256,
            row=row,
            audit=record.as_dict() if record is not None else None,
            logs=tuple(capture.records),
        )
    except Exception as exc:
        detail = str(exc) if isinstance(exc, RtDefaceError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, RtDefaceError):
            log.debug("case %s: unexpected error", task.name, exc_info=True)
        return CaseResult(
            task.name,
            task.pseudonym,
            "failed",
            detail=detail,
            error_type=type(exc).__name__,
            input_sha256=input_sha,
            options_sha256=task.options_sha256,
            row={"time_total_s": round(time.perf_counter() - t0, 3)},
            logs=tuple(capture.records),
        )
    finally:
        root_log.removeHandler(capture)


_BLAS_SETTERS = (
    "openblas_set_num_threads",
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "MKL_Set_Num_Threads",
)


def limit_native_threads() -> None:
    """One BLAS thread per worker: parallelism comes from the workers, not from BLAS.

    Without this, each worker's OpenBLAS starts one thread per core and two workers on two
    cores run slower than one. Uses threadpoolctl when installed, else the BLAS libraries
    already loaded (Linux ``/proc/self/maps``); does nothing where neither works.
    """
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-not-found,unused-ignore]

        threadpool_limits(1)
        return
    except ImportError:
        pass
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            libs = {line.split()[-1] for line in fh if "blas" in line.lower() or "mkl" in line}
    except OSError:
        return
    for lib in sorted(libs):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in _BLAS_SETTERS:
            setter = getattr(handle, name, None)
            if setter is not None:
                setter(1)


def _worker_init() -> None:
    """Process-pool initializer: quiet worker logging, ignore SIGINT, die with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_native_threads()
    logger = logging.getLogger("rtdeface")
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False
    try:  # Linux: the kernel kills the worker when the batch process dies (even by SIGKILL)
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# --------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """The cases to run and the problem rows of a tree.

    Attributes
    ----------
    tasks : tuple of CaseTask
    problem_rows : tuple of dict
        Summary rows of problems (ambiguous, orphan, unreadable, unmapped pseudonyms).
    problem_details : tuple of str
        The same problems for the operator (with relative paths).
    warnings : tuple of str
        Non-fatal notes (duplicates, unhandled objects), for the operator.
    inputs : dict
        Case folder name -> input description (audit only: holds paths).
    """

    tasks: tuple[CaseTask, ...]
    problem_rows: tuple[dict[str, Any], ...]
    problem_details: tuple[str, ...]
    warnings: tuple[str, ...]
    inputs: Mapping[str, Mapping[str, Any]]


def _empty_row(case: str, pseudonym: str, status: str, reason: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(case=case, pseudonym=pseudonym, status=status, reason=reason, reused=False)
    return row


def plan_batch(
    tree: TreeCases,
    out_root: Path,
    deface: Any,
    deid: DeidOptions | None,
    manifest: Mapping[str, Any] | None = None,
    log_level: int = logging.INFO,
) -> BatchPlan:
    """Name every case, compute its option digest and what a previous run lets it reuse."""
    out_root = Path(out_root).absolute()
    previous = (manifest or {}).get("cases", {})
    tasks: list[CaseTask] = []
    rows: list[dict[str, Any]] = []
    details: list[str] = []
    notes: list[str] = []
    inputs: dict[str, dict[str, Any]] = {}
    root = tree.index.root
    for case in tree.cases:
        try:
            name, pseudonym = case_folder_name(case, deid)
        except RtDefaceError as exc:
            short = hashlib.sha256(case.identity.encode()).hexdigest()[:FOLDER_HASH_CHARS]
            rows.append(_empty_row(f"unmapped_{short}", "", "failed", "no pseudonym: " + str(exc)))
            details.append(f"case in {case.folder}: {exc}")
            continue
        digest = options_digest(deface, deid, pseudonym)
        prev = previous.get(name, {})
        reuse = (
            prev.get("input_sha256")
            if prev.get("status") == "done" and prev.get("options_sha256") == digest
            else None
        )
        tasks.append(
            CaseTask(name, pseudonym, case, out_root, deface, deid, digest, reuse, log_level)
        )
        inputs[name] = {
            "input_folder": str(case.folder),
            "files": len(case.paths()),
            "counts": case.counts(),
            "ct_series_instance_uid": case.files.ct[0].series_instance_uid,
            "rtstruct_sop_instance_uid": case.files.rtstruct.sop_instance_uid
            if case.files.rtstruct
            else "",
            "pseudonym": pseudonym,
        }
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise OutputError("two cases map to one output folder name; report this as a bug")
    for p in tree.problems:
        if not p.is_error:
            notes.append(p.detail)
            continue
        pseudonym = ""
        if p.patient_id and deid is not None:
            try:
                pseudonym = pseudonym_for(p.patient_id, deid)
            except RtDefaceError:
                pseudonym = ""
        status = p.kind if p.kind in STATUSES else "failed"
        rows.append(_empty_row("", pseudonym, status, p.summary))
        details.append(p.detail)
    _ = root
    return BatchPlan(tuple(tasks), tuple(rows), tuple(details), tuple(notes), inputs)


@dataclass(frozen=True)
class BatchResult:
    """Outcome of :func:`run_batch`.

    Attributes
    ----------
    results : tuple of CaseResult
        One per task, in task order.
    rows : tuple of dict
        Summary rows (cases, then problems), as written.
    failed : int
        Rows whose status is not ``done``.
    interrupted : bool
    """

    results: tuple[CaseResult, ...]
    rows: tuple[dict[str, Any], ...]
    failed: int
    interrupted: bool = False


class OutputLock:
    """Exclusive lock on OUTPUT_ROOT (``.rtdeface.lock``) so two runs never interleave."""

    def __init__(self, out_root: Path) -> None:
        self.path = Path(out_root) / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(
                f"{self.path.parent}: another rtdeface run is writing this output; wait for it "
                "or choose another output folder"
            ) from None
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def prepare_output(out_root: Path) -> dict[str, Any]:
    """Check OUTPUT_ROOT can take a batch (creating it) and read its manifest.

    Raises
    ------
    OutputError
        OUTPUT_ROOT is a file, or a non-empty folder without a manifest (rtdeface never
        writes into a folder it did not create).
    """
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise OutputError(f"{out_root}: exists and is not a folder; choose a new output folder")
    out_root.mkdir(parents=True, exist_ok=True)
    manifest_path = out_root / MANIFEST_NAME
    visible = [p for p in out_root.iterdir() if not p.name.startswith(".")]
    if visible and not manifest_path.is_file():
        raise OutputError(
            f"{out_root}: not empty and not an rtdeface batch output (no {MANIFEST_NAME}); "
            "choose a new output folder (rtdeface never overwrites)"
        )
    if not manifest_path.is_file():
        return {"format": MANIFEST_FORMAT, "cases": {}}
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(
            f"{manifest_path}: unreadable manifest ({exc}); remove it to redo every case"
        ) from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise OutputError(f"{manifest_path}: manifest format {manifest.get('format')!r} unknown")
    return manifest


def clean_leftovers(out_root: Path) -> int:
    """Remove the hidden partial and swapped-out case folders of an interrupted run.

    Call it while holding the :class:`OutputLock`. Returns the number of folders removed.
    """
    n = 0
    for leftover in Path(out_root).iterdir():
        if leftover.name.startswith((PARTIAL_PREFIX, TRASH_PREFIX)) and leftover.is_dir():
            log.info("removing %s left by an interrupted run", leftover.name)
            shutil.rmtree(leftover, ignore_errors=True)
            n += 1
    return n


def _atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _record_from_dict(d: Mapping[str, Any]) -> DeidRecord:
    return DeidRecord(
        original_patient_id=str(d["original_patient_id"]),
        pseudonym=str(d["pseudonym"]),
        date_offset_days=int(d["date_offset_days"]),
        n_objects=int(d["n_objects"]),
        action_counts=dict(d["action_counts"]),
        profile=str(d["profile"]),
        options=tuple(d["options"]),
    )


def audit_paths(out_root: Path, audit: Path | None = None) -> tuple[Path, Path]:
    """The audit file (:func:`rtdeface.deid.write_audit`) and the case-inputs file beside it."""
    out_root = Path(out_root).absolute()
    main = Path(audit).absolute() if audit else out_root.with_name(out_root.name + ".audit.json")
    cases = main.with_name(main.name.removesuffix(".json") + "-cases.json")
    return main, cases


class _State:
    """Manifest, audit and summary of a running batch, rewritten atomically after each case."""

    def __init__(
        self,
        out_root: Path,
        plan: BatchPlan,
        manifest: dict[str, Any],
        audit: Path | None,
        scrub: Callable[[str], str],
    ) -> None:
        self.out_root = out_root
        self.plan = plan
        self.manifest = manifest
        self.scrub = scrub
        self.audit_path, self.cases_path = audit_paths(out_root, audit)
        self.audit_cases: dict[str, Any] = {}
        if self.cases_path.is_file():
            try:
                self.audit_cases = json.loads(self.cases_path.read_text(encoding="utf-8"))["cases"]
            except (OSError, ValueError, KeyError):
                self.audit_cases = {}

    def record(self, result: CaseResult) -> None:
        entry: dict[str, Any] = {
            "status": result.status,
            "input_sha256": result.input_sha256,
            "options_sha256": result.options_sha256,
            "pseudonym": result.pseudonym,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if result.status != "done":
            entry["reason"] = self.scrub(result.detail)
        else:
            prev = self.manifest["cases"].get(result.name, {})
            row = dict(result.row) if not result.reused else dict(prev.get("row", result.row))
            row.update(reused=result.reused)
            entry["row"] = row
        self.manifest["cases"][result.name] = entry
        self.manifest.update(format=MANIFEST_FORMAT, rtdeface_version=__version__)
        _atomic_write_bytes(
            self.out_root / MANIFEST_NAME,
            (json.dumps(self.manifest, indent=1, sort_keys=True) + "\n").encode(),
        )
        if result.audit is not None:
            info = dict(self.plan.inputs.get(result.name, {}))
            info["deid"] = result.audit
            self.audit_cases[result.name] = info
            self.write_audit()

    def write_audit(self) -> None:
        records = [
            _record_from_dict(c["deid"])
            for _, c in sorted(self.audit_cases.items())
            if c.get("deid")
        ]
        write_audit(self.audit_path, records)
        payload = {"rtdeface_version": __version__, "cases": self.audit_cases}
        _atomic_write_bytes(
            self.cases_path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode(), 0o600
        )
        os.chmod(self.cases_path, 0o600)

    def rows(self, results: Sequence[CaseResult]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for r in sorted(results, key=lambda r: r.name):
            row = _empty_row(r.name, r.pseudonym, r.status, "")
            if r.status == "cancelled":
                row["reason"] = "not run (stopped by --fail-fast or an interruption)"
            if r.status == "done":
                stored = self.manifest["cases"].get(r.name, {}).get("row", {})
                row.update(stored if r.reused else r.row)
                row["reused"] = r.reused
                if r.reused:
                    for c in TIME_COLUMNS:
                        row[c] = ""
                    row["time_hash_s"] = r.row.get("time_hash_s", "")
            else:
                row.update({k: v for k, v in r.row.items() if k in SUMMARY_COLUMNS})
                row["reason"] = self.scrub(
                    f"{r.error_type}: {r.detail}" if r.error_type else r.detail
                )
            rows.append(row)
        rows.extend(dict(r, reason=self.scrub(str(r["reason"]))) for r in self.plan.problem_rows)
        return rows

    def write_summary(self, rows: Sequence[Mapping[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
        _atomic_write_bytes(self.out_root / SUMMARY_CSV, buf.getvalue().encode())
        counts: dict[str, int] = {}
        for row in rows:
            counts[str(row["status"])] = counts.get(str(row["status"]), 0) + 1
        payload = {
            "rtdeface_version": __version__,
            "columns": list(SUMMARY_COLUMNS),
            "counts": dict(sorted(counts.items())),
            "rows": [{k: row.get(k, "") for k in SUMMARY_COLUMNS} for row in rows],
        }
        _atomic_write_bytes(
            self.out_root / SUMMARY_JSON,
            (json.dumps(payload, indent=1, default=float) + "\n").encode(),
        )


ProgressCallback = Callable[[CaseResult, int, int], None]
"""Called after each case with (result, cases finished, cases total)."""


def _emit_logs(result: CaseResult) -> None:
    for level, message in result.logs:
        log.log(level, "case %s: %s", result.name, message)


def _run_pool(tasks: Sequence[CaseTask], jobs: int, fail_fast: bool) -> Iterator[CaseResult]:
    """Run tasks in a process pool; a worker that dies takes only its round of cases down."""
    pending = list(tasks)
    attempts: dict[str, int] = {}
    while pending:
        broken: list[CaseTask] = []
        stop = False
        with ProcessPoolExecutor(
            max_workers=max(1, min(jobs, len(pending))),
            mp_context=pool_context(),
            initializer=_worker_init,
        ) as ex:
            futures: dict[Future[CaseResult], CaseTask] = {
                ex.submit(process_case, t): t for t in pending
            }
            pending = []
            waiting = set(futures)
            try:
                while waiting:
                    done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                    for fut in done:
                        task = futures[fut]
                        if fut.cancelled():
                            yield CaseResult(task.name, task.pseudonym, "cancelled")
                            continue
                        try:
                            result = fut.result()
                        except BrokenProcessPool:
                            broken.append(task)
                            continue
                        yield result
                        if fail_fast and result.status == "failed" and not stop:
                            stop = True
                            for other in waiting:
                                other.cancel()
            except BaseException:
                for proc in list(getattr(ex, "_processes", {}).values()):
                    proc.terminate()
                ex.shutdown(wait=False, cancel_futures=True)
                raise
        for task in broken:
            attempts[task.name] = attempts.get(task.name, 0) + 1
            if attempts[task.name] >= 2:
                yield CaseResult(
                    task.name,
                    task.pseudonym,
                    "failed",
                    detail="the worker process died twice while this case ran (out of memory "
                    "or a crash in a library); run it alone with --jobs 1 -v",
                    error_type="BrokenProcessPool",
                )
            else:
                pending.append(task)
        if pending:
            log.warning("a worker process died; retrying %d case(s) in a new pool", len(pending))


def _run_dask(tasks: Sequence[CaseTask], client: Any, fail_fast: bool) -> Iterator[CaseResult]:
    """Run tasks on a Dask ``distributed.Client`` (same function, same outputs)."""
    from distributed import as_completed

    futures = {
        client.submit(process_case, t, pure=False, key=f"rtdeface-{t.name}"): t for t in tasks
    }
    stop = False
    try:
        for fut in as_completed(list(futures)):  # type: ignore[no-untyped-call]
            task = futures[fut]
            if fut.cancelled() or fut.status == "cancelled":
                yield CaseResult(task.name, task.pseudonym, "cancelled")
                continue
            try:
                result: CaseResult = fut.result()
            except Exception as exc:  # the worker died or the task was lost
                result = CaseResult(
                    task.name,
                    task.pseudonym,
                    "failed",
                    detail=f"dask task failed: {type(exc).__name__}: {exc}",
                    error_type=type(exc).__name__,
                )
            yield result
            if fail_fast and result.status == "failed" and not stop:
                stop = True
                for other in futures:
                    if not other.done():
                        other.cancel()
    finally:
        for other in futures:
            if not other.done():
                other.cancel()


def run_batch(
    plan: BatchPlan,
    out_root: Path,
    manifest: dict[str, Any],
    *,
    jobs: int | None = None,
    client: Any = None,
    fail_fast: bool = False,
    audit: Path | None = None,
    scrubber: PhiScrubber | None = None,
    progress: ProgressCallback | None = None,
) -> BatchResult:
    """Run every task of ``plan`` and write manifest, summary and audit.

    Parameters
    ----------
    plan : BatchPlan
        From :func:`plan_batch`.
    out_root : Path
        OUTPUT_ROOT, prepared by :func:`prepare_output` (hold an :class:`OutputLock`).
    manifest : dict
        As returned by :func:`prepare_output`; updated in place and on disk after each case.
    jobs : int, optional
        Worker processes of the process pool [default: the CPU count].
    client : distributed.Client, optional
        Run on this Dask cluster instead of a process pool.
    fail_fast : bool
        Cancel the cases not yet started after the first failure.
    audit : Path, optional
        Audit file [default: OUTPUT_ROOT.audit.json beside OUTPUT_ROOT].
    scrubber : PhiScrubber, optional
        Applied to every reason written to OUTPUT_ROOT.
    progress : callable, optional
        See :data:`ProgressCallback`.

    Returns
    -------
    BatchResult
    """
    out_root = Path(out_root).absolute()
    scrub = scrubber.scrub if scrubber is not None else (lambda s: s)
    state = _State(out_root, plan, manifest, audit, scrub)
    total = len(plan.tasks)
    jobs = max(1, jobs or os.cpu_count() or 1)
    log.info(
        "batch of %d case(s) with %s; %d problem(s) found in the input",
        total,
        f"dask scheduler {client.scheduler.address}" if client is not None else f"{jobs} job(s)",
        len(plan.problem_rows),
    )
    results: dict[str, CaseResult] = {}
    interrupted = False
    runner = (
        _run_dask(plan.tasks, client, fail_fast)
        if client is not None
        else _run_pool(plan.tasks, jobs, fail_fast)
    )
    try:
        for result in runner:
            results[result.name] = result
            _emit_logs(result)
            if result.status == "failed":
                log.error("case %s failed: %s", result.name, scrub(result.detail))
            elif result.reused:
                log.info("case %s: already done with the same inputs and options", result.name)
            if result.status != "cancelled":
                state.record(result)
            if progress is not None:
                progress(result, len(results), total)
    except KeyboardInterrupt:
        interrupted = True
        log.error("interrupted: %d of %d case(s) finished", len(results), total)
    finally:
        ordered = [
            results.get(t.name) or CaseResult(t.name, t.pseudonym, "cancelled") for t in plan.tasks
        ]
        rows = state.rows(ordered)
        state.write_summary(rows)
    failed = sum(1 for r in rows if r["status"] != "done")
    log.info("batch finished: %d row(s), %d not done", len(rows), failed)
    if interrupted:
        raise KeyboardInterrupt
    return BatchResult(tuple(ordered), tuple(rows), failed, interrupted)
