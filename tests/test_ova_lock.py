"""OVA in and out, and image locking (here and against qemu)."""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
from pathlib import Path

import pytest

import vmdk
from vmdk.convert import convert
from vmdk.ova import export_ova, ova_disks
from conftest import pattern, run

MiB = 1 << 20


def test_export_ova_layout_and_manifest(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(pattern(3 * MiB + 4096, seed=8))
    export_ova(raw, tmp_path / "vm.ova")
    with tarfile.open(tmp_path / "vm.ova") as tar:
        names = tar.getnames()
        assert names == ["vm.ovf", "vm-disk1.vmdk", "vm.mf"]  # the OVF comes first
        files = {n: tar.extractfile(n).read() for n in names}  # type: ignore[union-attr]
    manifest = files["vm.mf"].decode().splitlines()
    for name in ("vm.ovf", "vm-disk1.vmdk"):
        assert f"SHA256({name})= {hashlib.sha256(files[name]).hexdigest()}" in manifest
    assert b'ovf:href="vm-disk1.vmdk"' in files["vm.ovf"]
    assert b"streamOptimized" in files["vm.ovf"]
    assert ova_disks(str(tmp_path / "vm.ova")) == ["vm-disk1.vmdk"]


@pytest.mark.parametrize("out_format", ["raw", "vmdk"])
def test_convert_reads_a_disk_out_of_an_ova(tmp_path: Path, out_format: str) -> None:
    data = pattern(3 * MiB + 4096, seed=9)
    (tmp_path / "src.raw").write_bytes(data)
    export_ova(tmp_path / "src.raw", tmp_path / "vm.ova")
    out = tmp_path / f"out.{out_format}"
    convert(tmp_path / "vm.ova", out, out_format=out_format)
    if out_format == "raw":
        assert out.read_bytes() == data
    else:
        with vmdk.open(out) as disk:
            assert disk.read() == data


@pytest.mark.interop
def test_ova_disk_passes_qemu(tmp_path: Path, qemu_img: str) -> None:
    (tmp_path / "src.raw").write_bytes(pattern(2 * MiB, seed=10))
    export_ova(tmp_path / "src.raw", tmp_path / "vm.ova")
    with tarfile.open(tmp_path / "vm.ova") as tar:
        tar.extract("vm-disk1.vmdk", tmp_path, filter="data")
    assert run(qemu_img, "check", tmp_path / "vm-disk1.vmdk").returncode == 0
    assert run(qemu_img, "compare", tmp_path / "vm-disk1.vmdk", tmp_path / "src.raw").returncode == 0


def test_truncated_ova_disk_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "src.raw").write_bytes(pattern(2 * MiB, seed=11, zero_every=0))
    export_ova(tmp_path / "src.raw", tmp_path / "vm.ova")
    with tarfile.open(tmp_path / "vm.ova") as tar:
        disk = tar.extractfile("vm-disk1.vmdk").read()  # type: ignore[union-attr]
    with tarfile.open(tmp_path / "cut.ova", "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("cut.vmdk")
        cut = disk[:len(disk) // 2]
        info.size = len(cut)
        import io
        tar.addfile(info, io.BytesIO(cut))
    with pytest.raises(vmdk.CorruptImageError, match="cut.vmdk"):
        convert(tmp_path / "cut.ova", tmp_path / "o.raw", out_format="raw")


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.vmdk"
    with vmdk.create(path, MiB):
        pass
    with vmdk.open(path, "r+"):
        with pytest.raises(vmdk.ImageInUseError, match="in use"):
            vmdk.open(path, "r+")
        with pytest.raises(vmdk.ImageInUseError):
            vmdk.open(path)
        with vmdk.open(path, force_share=True) as reader:
            assert reader.read(1) == b"\0"
    readers = [vmdk.open(path), vmdk.open(path)]  # readers share
    with pytest.raises(vmdk.ImageInUseError, match="do not allow writes"):
        vmdk.open(path, "r+")
    for r in readers:
        r.close()
    vmdk.open(path, "r+").close()


@pytest.mark.interop
def test_locks_are_seen_by_qemu(tmp_path: Path, qemu_img: str) -> None:
    path = tmp_path / "l.vmdk"
    with vmdk.create(path, MiB):
        pass
    with vmdk.open(path, "r+"):
        result = run(qemu_img, "info", path, check=False)
        assert result.returncode != 0 and "lock" in result.stderr
        assert run(qemu_img, "info", "-U", path).returncode == 0
    proc = subprocess.Popen(["qemu-io", "-c", "sleep 30000", str(path)])
    try:
        import os
        import time

        from vmdk._lock import PERM_BASE, WRITE, _held_by_other

        fd = os.open(path, os.O_RDONLY)
        try:  # probe without taking a lock, so qemu-io is free to take its own
            deadline = time.monotonic() + 15
            while not _held_by_other(fd, PERM_BASE + WRITE):
                assert time.monotonic() < deadline, "qemu-io never took its write lock"
                time.sleep(0.02)
        finally:
            os.close(fd)
        with pytest.raises(vmdk.ImageInUseError, match="in use"):
            vmdk.open(path, "r+")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_info_looks_inside_an_ova(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from vmdk.cli import main

    (tmp_path / "src.raw").write_bytes(pattern(2 * MiB, seed=12))
    export_ova(tmp_path / "src.raw", tmp_path / "vm.ova")
    assert main(["info", "--output=json", str(tmp_path / "vm.ova")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "ova" and info["members"][0] == "vm.ovf"
    assert info["disks"] == [{"name": "vm-disk1.vmdk", "file-size": info["disks"][0]["file-size"],
                              "virtual-size": 2 * MiB}]
