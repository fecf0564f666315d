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


def test_one_writer_many_readers(image: Path, tmp_path: Path) -> None:
    import socket
    import struct
    import subprocess

    if not have("qemu-io"):
        pytest.skip("qemu-io is not installed")
    with vmdk.open(image, "r+") as disk:
        with NbdServer(disk, port=0) as server:
            host, port = server.address  # type: ignore[misc]
            # A raw client that connects, negotiates and then writes: it holds the writer slot.
            holder = socket.create_connection((host, port), timeout=10)
            try:
                holder.recv(18)  # greeting
                holder.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
                holder.sendall(struct.pack(">QII", 0x49484156454F5054, 1, 0))  # EXPORT_NAME ""
                holder.recv(10)  # export size + flags
                holder.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 4) + b"held")
                reply = holder.recv(16)
                assert struct.unpack(">IIQ", reply)[1] == 0  # the write succeeded
                # Another client may read but not write while the first one is connected.
                read = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x68 0 1",
                                       server.uri], capture_output=True, text=True, timeout=60)
                assert read.returncode == 0, read.stdout + read.stderr
                write = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 4k", server.uri],
                                       capture_output=True, text=True, timeout=60)
                assert "Operation not permitted" in write.stdout + write.stderr
            finally:
                holder.close()
            # Once the writer is gone the slot is free again.
            import time
            deadline = time.monotonic() + 15
            while True:
                write = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4k",
                                        server.uri], capture_output=True, text=True, timeout=60)
                if "wrote" in write.stdout or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert "wrote" in write.stdout, write.stdout + write.stderr
    with vmdk.open(image) as disk:
        assert disk.read(4096) == b"\x33" * 4096
