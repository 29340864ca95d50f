"""Generate ``rtdeface/annex_e.py`` from a machine-readable PS3.15 Annex E table.

Source: the ``dicomfields_<edition>.py`` tables shipped in the ``dicom-anonymizer`` PyPI package
(KitwareMedical/dicom-anonymizer, BSD-3-Clause), which are themselves generated from the DICOM
standard's Table E.1-1 (Basic Application Level Confidentiality Profile, "Basic Prof." column).
The table file is parsed with :mod:`ast`, never imported or typed by hand.

Usage::

    pip download --no-deps dicom-anonymizer==2.1.0 -d /tmp/da
    python scripts/gen_annex_e.py --source /tmp/da/dicom_anonymizer-2.1.0-py3-none-any.whl \
        --edition 2026c > rtdeface/annex_e.py
    ruff format rtdeface/annex_e.py

``--source`` may also name an unpacked ``dicomfields_<edition>.py`` file, or be omitted when
``dicom-anonymizer`` is installed in the running interpreter.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import io
import re
import sys
import zipfile
from pathlib import Path

from pydicom.datadict import keyword_for_tag

CATEGORY_ACTIONS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
"""dicom-anonymizer list name -> PS3.15 Table E.1-1 action code."""

TABLE_MEMBER = "dicomanonymizer/dicom_anonymization_databases/dicomfields_{edition}.py"


def read_source(source: Path | None, edition: str) -> tuple[str, str]:
    """Return ``(python source text, description of where it came from)``."""
    member = TABLE_MEMBER.format(edition=edition)
    if source is None:
        dist = importlib.metadata.distribution("dicom_anonymizer")
        path = Path(str(dist.locate_file(member)))
        origin = f"dicom-anonymizer {dist.version} (PyPI), {Path(member).name}"
        return path.read_text(encoding="utf-8"), origin
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as zf:
            text = zf.read(member).decode("utf-8")
        name, version = source.name.split("-")[:2]
        return text, f"{name.replace('_', '-')} {version} (PyPI), {Path(member).name}"
    return source.read_text(encoding="utf-8"), source.name


def parse_names(text: str) -> dict[int, str]:
    """Attribute names from the table's ``(0xGGGG, 0xEEEE),  # Name`` comments."""
    names: dict[int, str] = {}
    for match in re.finditer(r"\(0x([0-9A-Fa-f]{4}),\s*0x([0-9A-Fa-f]{4})\),\s*#\s*(.+)", text):
        names[(int(match[1], 16) << 16) | int(match[2], 16)] = match[3].strip()
    return names


def parse_table(text: str) -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    """Parse the table lists into ``{tag: action}`` and ``[(value, mask, action)]``."""
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    tree = ast.parse(text)
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        if not isinstance(target, ast.Name) or target.id not in CATEGORY_ACTIONS:
            continue
        action = CATEGORY_ACTIONS[target.id]
        entries = ast.literal_eval(node.value)
        for entry in entries:
            if len(entry) == 2:
                tag = (entry[0] << 16) | entry[1]
                if tag in exact and exact[tag] != action:
                    raise SystemExit(f"tag {tag:08X} listed as {exact[tag]} and {action}")
                exact[tag] = action
            elif len(entry) == 4:
                group, element, group_mask, element_mask = entry
                masked.append(((group << 16) | element, (group_mask << 16) | element_mask, action))
            else:
                raise SystemExit(f"unexpected entry {entry!r} in {target.id}")
    return exact, masked


def render(
    exact: dict[int, str],
    masked: list[tuple[int, int, str]],
    names: dict[int, str],
    origin: str,
    edition: str,
) -> str:
    """Render the generated module text."""
    out = io.StringIO()
    out.write(
        '"""PS3.15 Annex E Table E.1-1, Basic Profile actions (GENERATED, do not edit).\n\n'
        f"Source: {origin}.\n"
        f"DICOM edition: {edition}.\n"
        "Generator: scripts/gen_annex_e.py (parses the source with ast; nothing typed by hand).\n\n"
        "Action codes: D dummy, Z zero-length, X remove, U replace UID, and the combinations\n"
        "Z/D, X/Z, X/D, X/Z/D, X/Z/U* of Table E.1-1. Attributes not listed are retained (K).\n"
        '"""\n\n'
        "from __future__ import annotations\n\n"
        f'EDITION = "{edition}"\n'
        '"""DICOM standard edition of the table."""\n\n'
        f'SOURCE = "{origin}"\n'
        '"""Machine-readable source the table was generated from."""\n\n'
        "ACTIONS: dict[int, str] = {\n"
    )
    for tag in sorted(exact):
        name = keyword_for_tag(tag) or names.get(tag, "(unnamed)") + " (retired)"
        out.write(f'    0x{tag:08X}: "{exact[tag]}",  # {name}\n')
    out.write("}\n")
    out.write('"""Tag (as ``0xGGGGEEEE``) -> Basic Profile action code."""\n\n')
    out.write("MASKED_ACTIONS: tuple[tuple[int, int, str], ...] = (\n")
    for value, mask, action in sorted(masked):
        out.write(f'    (0x{value:08X}, 0x{mask:08X}, "{action}"),\n')
    out.write(")\n")
    out.write(
        '"""Repeating groups: ``(value, mask, action)`` applies when ``tag & mask == value``."""\n'
    )
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Write the generated module to stdout (or ``--output``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="wheel or dicomfields_*.py")
    parser.add_argument("--edition", default="2026c", help="table edition, e.g. 2026c")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    text, origin = read_source(args.source, args.edition)
    exact, masked = parse_table(text)
    module = render(exact, masked, parse_names(text), origin, args.edition)
    if args.output is None:
        sys.stdout.write(module)
    else:
        args.output.write_text(module, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
