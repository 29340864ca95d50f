"""Compressed CT input is defaced losslessly in its own transfer syntax (needs the jpeg extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from rtdeface.cli import main
from rtdeface.phantom import write_phantom_case

pytest.importorskip("pylibjpeg")
pytest.importorskip("openjpeg")
pytest.importorskip("jpeg_ls")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compressed")
    write_phantom_case(root / "in", "hfs")
    out = root / "out"
    assert (
        main(["-q", "deface", str(root / "in"), "-o", str(out), "--no-deid", "--no-eye-check"]) == 0
    )
    return root / "in", out


def _by_position(folder: Path) -> dict[float, pydicom.Dataset]:
    out = {}
    for p in (folder / "CT").glob("*.dcm"):
        ds = pydicom.dcmread(p)
        out[float(ds.ImagePositionPatient[2])] = ds
    return out


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless, RLELossless], ids=str)
def test_compressed_ct_defaced_losslessly(
    plain: tuple[Path, Path], tmp_path: Path, syntax: pydicom.uid.UID
) -> None:
    src, plain_out = plain
    case = tmp_path / "in"
    import shutil

    shutil.copytree(src, case)
    for p in (case / "CT").glob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.compress(syntax, ds.pixel_array, generate_instance_uid=False)
        ds.save_as(p)
    out = tmp_path / "out"
    assert main(["-q", "deface", str(case), "-o", str(out), "--no-deid", "--no-eye-check"]) == 0
    before, after, expected = _by_position(case), _by_position(out), _by_position(plain_out)
    assert before.keys() == after.keys() == expected.keys()
    changed = 0
    for z, ds in after.items():
        assert ds.file_meta.TransferSyntaxUID == syntax  # re-encoded in its own syntax
        np.testing.assert_array_equal(ds.pixel_array, expected[z].pixel_array)
        if z < 10.0:  # below the eye plane: the compressed bytes are untouched
            assert ds.PixelData == before[z].PixelData
        elif not np.array_equal(ds.pixel_array, before[z].pixel_array):
            changed += 1
    assert changed > 0


def test_rle_goes_through_the_compiled_codec_with_pydicoms_results(
    plain: tuple[Path, Path],
) -> None:
    """pylibjpeg-rle (a dependency) is available to pydicom for RLE Lossless and gives the
    bytes and values of pydicom's own pure-Python codec, which is about 10x slower."""
    from pydicom.pixels import pixel_array
    from pydicom.pixels.decoders import RLELosslessDecoder
    from pydicom.pixels.encoders import RLELosslessEncoder

    assert "pylibjpeg" in RLELosslessDecoder.available_plugins
    assert "pylibjpeg" in RLELosslessEncoder.available_plugins
    src = sorted((plain[0] / "CT").glob("*.dcm"))[5]
    values = pydicom.dcmread(src).pixel_array
    native, compiled = pydicom.dcmread(src), pydicom.dcmread(src)
    native.compress(RLELossless, values, encoding_plugin="pydicom", generate_instance_uid=False)
    compiled.compress(RLELossless, values, generate_instance_uid=False)  # the default choice
    assert compiled.PixelData == native.PixelData
    decoded = pixel_array(compiled, decoding_plugin="pylibjpeg")
    assert np.array_equal(decoded, values)
    assert np.array_equal(pixel_array(compiled, decoding_plugin="pydicom"), values)
