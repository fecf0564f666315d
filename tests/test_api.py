"""The Python API says what it does: documented, precisely typed, consistent refusals."""

from __future__ import annotations

import errno
import inspect
from pathlib import Path

import pytest

import vmdk
from vmdk._file import VmdkFile
from vmdk._positioned import PositionedDisk
from vmdk.cli import build_parser

MiB = 1 << 20


def _public_methods(cls: type) -> list[str]:
    return [name for name, value in vars(cls).items()
            if not name.startswith("_") and (callable(value) or isinstance(value, property))]


def test_every_public_method_of_a_disk_is_documented() -> None:
    """help(vmdk.VmdkFile.read_at) said nothing."""
    missing = [f"{cls.__name__}.{name}" for cls in (VmdkFile, PositionedDisk)
               for name in _public_methods(cls)
               if not inspect.getdoc(getattr(cls, name))]
    assert not missing, missing
    assert "offset" in inspect.getdoc(VmdkFile.read_at)  # type: ignore[operator]


def test_positional_io_is_precisely_typed() -> None:
    assert inspect.signature(VmdkFile.write_at).parameters["data"].annotation == "Buffer"
    assert inspect.signature(VmdkFile.readinto_at).return_annotation == "int"
    assert inspect.signature(VmdkFile.readinto_at).parameters["buf"].annotation == "Buffer"


def test_readinto_at_returns_the_bytes_read(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    with vmdk.create(path, MiB) as disk:
        disk.write_at(0, b"abc")
    with vmdk.open(path) as disk:
        buf = bytearray(4096)
        assert disk.readinto_at(0, buf) == 4096
        assert buf[:3] == b"abc"


@pytest.mark.parametrize("offset", [0, MiB - 1, MiB, 10 * MiB])
def test_a_read_only_disk_refuses_writes_whatever_the_offset(tmp_path: Path,
                                                             offset: int) -> None:
    """Past the end, a write on a read-only handle said "outside the disk"."""
    path = tmp_path / "d.vmdk"
    vmdk.create(path, MiB).close()
    with vmdk.open(path) as disk:
        with pytest.raises(vmdk.ReadOnlyError):
            disk.write_at(offset, b"x")
        with pytest.raises(vmdk.ReadOnlyError):
            disk.write_zeroes_at(offset, 512)
        disk.seek(offset)
        with pytest.raises(vmdk.ReadOnlyError):
            disk.write(b"x")


def test_a_missing_image_is_enoent(tmp_path: Path) -> None:
    with pytest.raises(vmdk.MissingExtentError) as info:
        vmdk.open(tmp_path / "none.vmdk")
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, FileNotFoundError)


def test_convert_refuses_to_replace_a_file_as_create_does(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.raw", tmp_path / "dst.vmdk"
    src.write_bytes(b"new" * 1000)
    vmdk.create(dst, MiB).close()
    before = dst.read_bytes()
    with pytest.raises(vmdk.ImageExistsError):
        vmdk.create(dst, MiB)
    with pytest.raises(vmdk.ImageExistsError):
        vmdk.convert.convert(src, dst)
    assert dst.read_bytes() == before
    vmdk.convert.convert(src, dst, overwrite=True)
    with vmdk.open(dst) as disk:
        assert disk.read_at(0, 3) == b"new"


def test_the_cli_says_it_replaces_outputs() -> None:
    parser = build_parser("convert")
    sub = next(a for a in parser._actions if a.dest == "verb")
    text = sub.choices["convert"].format_help()  # type: ignore[union-attr]
    assert "replaced if it exists" in text
