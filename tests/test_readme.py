"""The README matches the program: quick start, CI command, options, sample case."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pydicom
import pytest

from rtdeface.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_exactly_two_commands_and_ci_runs_the_second() -> None:
    commands = _quick_start()
    assert len(commands) == 2
    assert commands[0].startswith("pip install . && rtdeface deface sample_data/")
    assert commands[1] == 'pip install ".[test]" && python -m pytest'
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci


def test_quick_start_deface_runs_on_the_sample_case(tmp_path: Path) -> None:
    argv = shlex.split(_quick_start()[0].split("&&", 1)[1])
    assert argv[0] == "rtdeface"
    args = argv[1:]
    out = tmp_path / "defaced_sample"
    args[args.index("-o") + 1] = str(out)
    args[args.index("deface") + 1] = str(ROOT / args[args.index("deface") + 1])
    assert main(["-q", *args]) == 0
    assert len(list((out / "CT").glob("*.dcm"))) == 92
    rs = pydicom.dcmread(out / "RTSTRUCT.dcm")
    assert rs.PatientIdentityRemoved == "YES"
    # README: the sample RTSTRUCT has 16 ROIs; three (lenses, mask line) lie wholly in the cut
    src = pydicom.dcmread(ROOT / "sample_data" / "phantom_hn" / "RTSTRUCT.dcm")
    assert "16 ROIs" in README and len(src.StructureSetROISequence) == 16
    assert len(rs.StructureSetROISequence) == 13


def _parser_options() -> set[str]:
    parser = build_parser()
    options: set[str] = set(parser._option_string_actions)
    for action in parser._subparsers._group_actions:  # type: ignore[union-attr]
        for sub in action.choices.values():  # type: ignore[union-attr]
            options |= set(sub._option_string_actions)
    return options


def test_every_option_in_the_readme_exists() -> None:
    mentioned = set(re.findall(r"`(--[a-z][a-z-]+)", README))
    assert mentioned, "README names no option"
    missing = mentioned - _parser_options()
    assert not missing, f"README documents options the CLI does not have: {sorted(missing)}"


@pytest.mark.parametrize("option", ["--eye-roi", "--keep", "--deid-key-file", "--what-if"])
def test_key_options_documented(option: str) -> None:
    assert f"`{option}" in README


IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def test_every_readme_image_exists_and_is_small() -> None:
    links = IMAGE_LINK.findall(README)
    assert len(links) >= 2, "README shows no figure"
    for link in links:
        assert not link.startswith(("http:", "https:", "/")), f"{link}: use a relative link"
        path = ROOT / link
        assert path.is_file(), f"README links to {link}, which does not exist"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", link
        assert path.stat().st_size < 150_000, f"{link} is {path.stat().st_size} bytes"


def test_figures_come_from_the_figure_script() -> None:
    script = (ROOT / "scripts" / "make_figures.py").read_text()
    for link in IMAGE_LINK.findall(README):
        assert Path(link).name in script, f"{link} is not written by scripts/make_figures.py"
    assert "shared" not in script  # synthetic phantom only, never the real data


def test_compare_command_is_documented() -> None:
    assert "rtdeface compare ORIGINAL" in README
    assert "compare" in build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]


def test_figure_script_writes_small_figures(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_figures", ROOT / "scripts" / "make_figures.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path)]) == 0
    for link in IMAGE_LINK.findall(README):
        written = tmp_path / Path(link).name
        assert written.is_file() and 10_000 < written.stat().st_size < 150_000, link
