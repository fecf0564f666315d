"""Images this package writes read back identically in dissect.hypervisor and pyvmdk.

Both peers are read by whole sectors in aligned blocks: dissect's read() fails
at the end of disks whose size is not a multiple of 8 KiB, and pyvmdk returns
wrong bytes for zeroed-grain entries, so those images are not given to it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import vmdk
from conftest import pattern

MiB = 1 << 20
SUBFORMATS = ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat", "twoGbMaxExtentFlat",
              "streamOptimized"]
pytestmark = pytest.mark.interop


def make(tmp_path: Path, subformat: str) -> tuple[Path, bytes]:
    data = bytearray(pattern(3 * MiB, seed=41))
    path = tmp_path / f"{subformat}.vmdk"
    with vmdk.create(path, len(data), subformat) as disk:
        disk.write(data)
    if subformat != "streamOptimized":  # random rewrites, partial grains included
        with vmdk.open(path, "r+") as disk:
            for offset, n in ((1000, 5000), (MiB + 17, 70_000), (3 * MiB - 512, 512)):
                chunk = pattern(n, seed=offset, zero_every=0, block=n)
                disk.write_at(offset, chunk)
                data[offset:offset + n] = chunk
    return path, bytes(data)


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_dissect_reads_what_we_write(tmp_path: Path, subformat: str) -> None:
    dissect_vmdk = pytest.importorskip("dissect.hypervisor.disk.vmdk")
    path, data = make(tmp_path, subformat)
    readable = len(data) // 8192 * 8192
    if subformat in ("monolithicSparse", "streamOptimized"):
        names = [path.name]
    else:  # dissect takes a descriptor's extent files as a list
        names = [line.split('"')[1] for line in path.read_text().splitlines()
                 if line.startswith("RW ")]
    opened = [open(tmp_path / name, "rb") for name in names]
    try:
        disk = dissect_vmdk.VMDK(opened if len(opened) > 1 else opened[0])
        got = b"".join(disk.read(min(MiB, readable - pos)) for pos in range(0, readable, MiB))
    finally:
        for f in opened:
            f.close()
    assert got == data[:readable]


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_pyvmdk_reads_what_we_write(tmp_path: Path, subformat: str) -> None:
    pyvmdk = pytest.importorskip("pyvmdk")
    path, data = make(tmp_path, subformat)
    handle = pyvmdk.handle()
    handle.open(str(path))
    try:
        handle.open_extent_data_files()
        assert handle.get_media_size() == len(data)
        got = b"".join(handle.read_buffer_at_offset(min(MiB, len(data) - pos), pos)
                       for pos in range(0, len(data), MiB))
    finally:
        handle.close()
    assert got == data
