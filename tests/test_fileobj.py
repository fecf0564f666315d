"""vmdk.open(file object): one-file images from any seekable binary file object, and the
other files of a descriptor through a resolver."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

import vmdk
from conftest import pattern

SIZE = 8 << 20


def _make(path: Path, subformat: str = "monolithicSparse", **kw: object) -> bytes:
    data = pattern(SIZE, seed=3)
    with vmdk.create(path, SIZE, subformat, **kw) as disk:  # type: ignore[call-overload]
        disk.write(data)
    return data


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_one_file_image_reads_from_a_borrowed_file_object(tmp_path: Path, subformat: str) -> None:
    data = _make(tmp_path / "d.vmdk", subformat)
    with open(tmp_path / "d.vmdk", "rb") as f:
        with vmdk.open(f) as disk:
            assert disk.read() == data
            assert disk.name == str(tmp_path / "d.vmdk")
            assert disk.info()["virtual-size"] == SIZE
        assert not f.closed  # borrowed, not closed
        f.seek(0)
        assert f.read(4) == b"KDMV"


def test_a_bytes_buffer_opens_too(tmp_path: Path) -> None:
    data = _make(tmp_path / "d.vmdk", "streamOptimized")
    buf = io.BytesIO((tmp_path / "d.vmdk").read_bytes())
    with vmdk.open(buf) as disk:
        assert disk.read_at(SIZE // 2, 4096) == data[SIZE // 2:SIZE // 2 + 4096]
        assert disk.name == "<BytesIO>"
        runs = disk.map()
    with vmdk.open(tmp_path / "d.vmdk") as local:
        assert [(r.start, r.length, r.data) for r in runs] == [
            (r.start, r.length, r.data) for r in local.map()]


def test_a_bare_extent_reads_from_a_file_object(tmp_path: Path) -> None:
    data = _make(tmp_path / "s.vmdk", "twoGbMaxExtentSparse")
    with open(tmp_path / "s-s001.vmdk", "rb") as f, vmdk.open(f) as disk:
        assert disk.read() == data


def test_descriptor_extents_come_from_the_resolver_which_opens_and_closes_them(
        tmp_path: Path) -> None:
    data = _make(tmp_path / "f.vmdk", "monolithicFlat")
    opened: list[io.BufferedReader] = []

    def resolver(name: str) -> io.BufferedReader:
        f = open(tmp_path / name, "rb")  # noqa: SIM115 - the image closes it
        opened.append(f)
        return f

    with open(tmp_path / "f.vmdk", "rb") as f, vmdk.open(f, resolver=resolver) as disk:
        assert disk.read() == data
        assert [os.path.basename(x.name) for x in opened] == ["f-flat.vmdk"]
    assert all(x.closed for x in opened)


def test_without_a_resolver_a_descriptor_names_what_is_missing(tmp_path: Path) -> None:
    _make(tmp_path / "f.vmdk", "monolithicFlat")
    with open(tmp_path / "f.vmdk", "rb") as f, pytest.raises(vmdk.MissingExtentError,
                                                             match="no resolver"):
        vmdk.open(f)


def test_names_leaving_the_folder_are_refused_before_the_resolver_sees_them(
        tmp_path: Path) -> None:
    _make(tmp_path / "f.vmdk", "monolithicFlat")
    text = (tmp_path / "f.vmdk").read_text().replace('"f-flat.vmdk"', '"../f-flat.vmdk"')
    asked: list[str] = []

    def resolver(name: str) -> io.BufferedReader:
        asked.append(name)
        return open(tmp_path / os.path.basename(name), "rb")

    with pytest.raises(vmdk.UnsafePathError, match="outside the image's folder"):
        vmdk.open(io.BytesIO(text.encode()), resolver=resolver)
    assert asked == []
    with vmdk.open(io.BytesIO(text.encode()), resolver=resolver, allow_external=True) as disk:
        assert disk.size == SIZE
    assert asked == ["../f-flat.vmdk"]


def test_file_objects_open_read_only(tmp_path: Path) -> None:
    _make(tmp_path / "d.vmdk")
    with open(tmp_path / "d.vmdk", "rb") as f, pytest.raises(vmdk.UnsupportedFormatError,
                                                             match="read-only"):
        vmdk.open(f, "r+")


def test_a_pipe_is_refused_as_it_cannot_seek() -> None:
    r, w = os.pipe()
    with open(r, "rb") as f, open(w, "wb"), pytest.raises(vmdk.UnsupportedFormatError,
                                                           match="cannot seek"):
        vmdk.open(f)


def test_what_is_no_vmdk_says_so(tmp_path: Path) -> None:
    with pytest.raises(vmdk.UnsupportedFormatError, match="not a VMDK image"):
        vmdk.open(io.BytesIO(b"\x01" * 4096))
