"""What the verbs report reads right: numbers that mean what they say, English plurals,
and no message that contradicts itself or reports nothing done as something done."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

import vmdk
from vmdk._structs import SparseHeader
from vmdk.check import check
from vmdk.cli import main
from vmdk.resize import resize

MiB = 1 << 20
GRAIN = 65536


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "d.vmdk"
    with vmdk.create(path, 64 * MiB) as disk:
        for i in range(8):
            disk.write_at(i * GRAIN, bytes([i + 1]) * GRAIN)
    return path


def _table_at(path: Path, index: int = 0) -> int:
    """Byte offset of grain table ``index`` (the primary one)."""
    raw = path.read_bytes()
    h = SparseHeader.unpack(raw[:512])
    return struct.unpack_from("<I", raw, h.gd_offset * 512 + 4 * index)[0] * 512


def test_image_end_offset_ignores_pointers_past_the_file(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    """A corrupt pointer used to make image-end-offset 51200065536 for a 38 MB file."""
    path = _image(tmp_path)
    with open(path, "r+b") as f:
        f.seek(_table_at(path) + 4)
        f.write(struct.pack("<I", 100_000_000))  # sector 100 M: 51 GB into a small file
    assert main(["check", "--output=json", str(path)]) == 2
    report = json.loads(capsys.readouterr().out)
    assert 0 < report["image-end-offset"] <= os.path.getsize(path)


def _redundant_table_at(path: Path, index: int = 0) -> int:
    raw = path.read_bytes()
    h = SparseHeader.unpack(raw[:512])
    return struct.unpack_from("<I", raw, h.rgd_offset * 512 + 4 * index)[0] * 512


@pytest.mark.parametrize("copies", ["both", "primary"])
def test_a_table_of_bad_pointers_is_counted_once(tmp_path: Path, copies: str) -> None:
    """512 entries past the end of the file were also 511 "shared" grains: 1023 errors.
    Each entry counts once, under its first fault (where only the primary table is
    damaged, that it differs from its redundant copy)."""
    path = _image(tmp_path)
    past = os.path.getsize(path) // 512 + 4096
    tables = [_table_at(path)] + ([_redundant_table_at(path)] if copies == "both" else [])
    with open(path, "r+b") as f:
        for at in tables:
            f.seek(at)
            f.write(struct.pack("<512I", *([past] * 512)))
    result = check(path)
    assert result.corruptions == 512
    first = [p.message for p in result.problems if p.kind == "corruption"][0]
    assert first.startswith("512 grain entries point past the end of the file" if copies == "both"
                            else "1 grain table differs from its redundant copy (512 entries)")


def test_one_is_singular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _image(tmp_path)
    with open(path, "ab") as f:
        f.write(b"\x99" * GRAIN)  # one grain of space no table uses
    assert main(["check", str(path)]) == 3
    out = capsys.readouterr().out
    assert "1 grain of file space is not referenced" in out
    assert "1 leaked cluster was found on the image." in out
    assert "1 grains" not in out and "1 leaked clusters" not in out


def test_compact_of_a_flat_image_says_there_is_nothing_to_compact(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It used to report "0 B -> 0 B", as if it had compacted something."""
    path = tmp_path / "f.vmdk"
    vmdk.create(path, MiB, "monolithicFlat").close()
    assert main(["compact", str(path)]) == 1
    err = capsys.readouterr().err
    assert "sparse" in err and "monolithicFlat" in err and "0 B" not in err


def test_the_shrink_refusal_does_not_contradict_itself(tmp_path: Path) -> None:
    """"data is stored at offset 33554432, past the new end (33554432 bytes)"."""
    path = tmp_path / "d.vmdk"
    with vmdk.create(path, 64 * MiB) as disk:
        disk.write_at(32 * MiB, b"x")
    with pytest.raises(vmdk.VmdkError) as info:
        resize(path, 32 * MiB, shrink=True)
    assert "byte 33554432 holds data" in str(info.value)
    assert "past the new end (33554432" not in str(info.value)


def test_a_cut_sparse_file_is_called_cut(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A KDMV file cut to 300 bytes has a header, just not all of it."""
    whole = tmp_path / "whole.vmdk"
    vmdk.create(whole, MiB).close()
    cut = tmp_path / "cut.vmdk"
    cut.write_bytes(whole.read_bytes()[:300])
    assert main(["info", str(cut)]) == 1
    err = capsys.readouterr().err
    assert "cut short: 300 bytes" in err and "no KDMV header" not in err


def test_file_names_that_are_not_utf8(tmp_path: Path, capfdbinary: pytest.CaptureFixture[bytes]
                                      ) -> None:
    """Such a name used to fail with the whole descriptor printed as a Python repr; JSON
    held lone surrogates, and messages "\\udcff" where the file name has a byte 0xff."""
    folder = os.fsencode(tmp_path)
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x42" * (3 * MiB))
    for subformat in ("monolithicSparse", "twoGbMaxExtentFlat"):
        name = os.fsdecode(folder + b"/disk\xff-" + subformat.encode() + b".vmdk")
        assert main(["convert", "-f", "raw", "-o", f"subformat={subformat}", str(src),
                     name]) == 0
        with vmdk.open(name) as disk:
            assert disk.read_at(0, 3 * MiB) == src.read_bytes()
        capfdbinary.readouterr()
        assert main(["info", "--output=json", name]) == 0
        out = capfdbinary.readouterr().out
        assert json.loads(out.decode("utf-8"))["filename"].endswith(
            "disk\ufffd-" + subformat + ".vmdk")
    missing = os.fsdecode(folder + b"/gone\xff.vmdk")
    assert main(["info", missing]) == 1
    assert b"gone\xff.vmdk" in capfdbinary.readouterr().err
