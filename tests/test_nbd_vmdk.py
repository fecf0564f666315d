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


def test_block_status_costs_what_the_client_walks(tmp_path: Path, qemu_img: str) -> None:
    """qemu-img asks for the status from each extent it reaches to the end of the disk; the
    server mapped all of that every time, time squared in the disk's size (qemu-img convert
    from nbd:// ran at half qemu-nbd's speed).  A reply may cover less: it maps a window."""
    path = tmp_path / "many.vmdk"
    size = 256 * MiB
    with vmdk.create(path, size) as disk:
        for i in range(0, size, 2 * MiB):  # 128 data extents, each followed by a hole
            disk.write_at(i, b"\x01" * 65536)
    with vmdk.open(path) as disk:
        mapped: list[int] = []
        real = disk.map

        def counting(offset: int = 0, length: int | None = None) -> list[vmdk.image.MapRun]:
            mapped.append(size - offset if length is None else length)
            return real(offset, length)

        disk.map = counting  # type: ignore[method-assign]
        with NbdServer(disk, port=0, read_only=True) as server:
            run(qemu_img, "convert", "-f", "raw", server.uri, tmp_path / "out.raw")
    with vmdk.open(path) as disk:
        assert (tmp_path / "out.raw").read_bytes() == disk.read()
    assert sum(mapped) <= 4 * size, f"mapped {sum(mapped) >> 20} MiB for a {size >> 20} MiB disk"


def test_block_status_after_a_write_tells_the_truth(tmp_path: Path) -> None:
    """The window of block status a server keeps is forgotten on any write: a client
    mapping the disk after another client wrote sees the new data."""
    if not have("nbdinfo") or not have("qemu-io"):
        pytest.skip("nbdinfo and qemu-io are needed")
    path = tmp_path / "d.vmdk"
    vmdk.create(path, 16 * MiB).close()
    with vmdk.open(path, "r+") as disk, NbdServer(disk, port=0) as server:
        before = run("nbdinfo", "--map", server.uri).stdout  # maps (and keeps) a window
        run("qemu-io", "-f", "raw", "-c", "write -P 1 4M 64k", server.uri)
        after = run("nbdinfo", "--map", server.uri).stdout
    assert [line.split()[0] for line in before.splitlines()] == ["0"]  # one hole
    assert any(line.split()[0] == str(4 * MiB) and "data" in line
               for line in after.splitlines()), after
