"""A flat extent file shorter than its descriptor says: the missing part is an error.

A cut copy of a ``-flat.vmdk`` used to read as zeros past its end, so a
conversion succeeded with the tail of the disk silently blanked.  It now fails
as a grain past the end of a sparse file does, unless the caller asks for the
missing part as zeros.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
from tests.conftest import pattern

import vmdk
from vmdk.cli import main
from vmdk.convert import convert

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def cut_flat(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.vmdk"
    content = pattern(SIZE, seed=8, zero_every=0)
    with vmdk.create(path, SIZE, "monolithicFlat") as disk:
        disk.write(content)
    os.truncate(tmp_path / "disk-flat.vmdk", 3 * MiB + 1000)
    return path, content


def test_reading_past_the_end_of_a_cut_flat_file_fails(cut_flat: tuple[Path, bytes]) -> None:
    path, content = cut_flat
    with vmdk.open(path) as disk:
        assert disk.read_at(0, MiB) == content[:MiB]  # what is there reads as ever
        with pytest.raises(vmdk.CorruptImageError, match="disk-flat.vmdk.*missing"):
            disk.read_at(3 * MiB, 4096)
        with pytest.raises(vmdk.CorruptImageError, match="missing_as_zeros"):
            disk.read()


def test_converting_a_cut_flat_image_fails_and_leaves_no_output(
        cut_flat: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = cut_flat
    out = path.parent / "out.raw"
    assert main(["convert", "-O", "raw", str(path), str(out)]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(vmdk.CorruptImageError):
        convert(path, path.parent / "out.vmdk")


def test_the_opt_in_reads_the_missing_part_as_zeros(cut_flat: tuple[Path, bytes]) -> None:
    path, content = cut_flat
    keep = 3 * MiB + 1000
    expected = content[:keep] + bytes(SIZE - keep)
    with vmdk.open(path, missing_as_zeros=True) as disk:
        assert disk.read() == expected
    out = path.parent / "out.raw"
    convert(path, out, out_format="raw", missing_as_zeros=True)
    assert out.read_bytes() == expected


def test_a_whole_flat_file_with_holes_still_reads_zeros_in_them(tmp_path: Path) -> None:
    path = tmp_path / "holes.vmdk"
    with vmdk.create(path, SIZE, "monolithicFlat") as disk:
        disk.write_at(MiB, b"\x77" * 4096)  # the rest stays holes of a full-size file
    with vmdk.open(path) as disk:
        assert disk.read() == bytes(MiB) + b"\x77" * 4096 + bytes(SIZE - MiB - 4096)


def test_the_cli_has_the_opt_in_its_error_names(cut_flat: tuple[Path, bytes],
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal points at --missing-as-zeros: convert, cat and compare take it."""
    path, content = cut_flat
    keep = 3 * MiB + 1000
    expected = content[:keep] + bytes(SIZE - keep)
    out = path.parent / "out.raw"
    assert main(["convert", "-O", "raw", str(path), str(out)]) == 1
    assert "--missing-as-zeros" in capsys.readouterr().err
    assert main(["convert", "--missing-as-zeros", "-O", "raw", str(path), str(out)]) == 0
    assert out.read_bytes() == expected
    assert main(["compare", "--missing-as-zeros", str(path), str(out)]) == 0
    assert main(["compare", str(path), str(out)]) == 4
    stdout = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["cat", "--missing-as-zeros", str(path)]) == 0
    assert stdout.buffer.getvalue() == expected  # type: ignore[attr-defined]
