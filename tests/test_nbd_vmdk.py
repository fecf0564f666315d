"""The NBD server exporting real VMDK images to real clients (qemu-img, nbdcopy)."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmdk
from vmdk.nbd.server import NbdServer
from conftest import have, pattern, run

MiB = 1 << 20
pytestmark = pytest.mark.interop


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    with vmdk.create(path, 8 * MiB) as disk:
        disk.write(pattern(3 * MiB, seed=12))
        disk.seek(6 * MiB)
        disk.write(b"tail" * 1000)
    return path


def test_qemu_img_reads_and_maps_a_vmdk_over_nbd(image: Path, tmp_path: Path, qemu_img: str
                                                  ) -> None:
    with vmdk.open(image) as disk:
        expected = disk.read()
        with NbdServer(disk, port=0, read_only=True) as server:
            run(qemu_img, "convert", "-f", "raw", server.uri, tmp_path / "out.raw")
            mapped = run(qemu_img, "map", "--output=json", "-f", "raw", server.uri).stdout
    assert (tmp_path / "out.raw").read_bytes() == expected
    assert '"data": true' in mapped and '"data": false' in mapped


def test_nbdcopy_writes_into_a_vmdk(image: Path, tmp_path: Path, qemu_img: str) -> None:
    if not have("nbdcopy"):
        pytest.skip("nbdcopy is not installed")
    new = pattern(8 * MiB, seed=13)
    (tmp_path / "in.raw").write_bytes(new)
    with vmdk.open(image, "r+") as disk:
        with NbdServer(disk, port=0) as server:
            run("nbdcopy", tmp_path / "in.raw", server.uri)
    with vmdk.open(image) as disk:
        assert disk.read() == new
    assert run(qemu_img, "check", image).returncode == 0
    assert run(qemu_img, "compare", image, tmp_path / "in.raw").returncode == 0
