"""Reading stays where it is: convert, info, cat, compare and serve take an OVA, any of its
disks, and gzip-compressed disks (ovftool --compress)."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import pattern
from ova_support import (  # noqa: F401 - fixtures
    MiB,
    SRC,
    cli,
    lay_out,
    members,
    vmdk_convert_exe,
)
from vmdk.ova import export_ova
from vmdk.ova.create import build_ovf
from vmdk.ova.disk import OvaDisk
from vmdk.ova.verify import verify

CONTENT = pattern(3 * MiB + 65536, seed=40)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("read")
    (folder / "src.raw").write_bytes(CONTENT)
    export_ova(folder / "src.raw", folder / "vm.ova")
    return folder / "vm.ova"


def _gzipped(plain: Path, folder: Path) -> Path:
    """The package with its disk stored gzip-compressed, as ovftool --compress writes it."""
    parts = members(plain)
    disk = gzip.compress(parts["vm-disk1.vmdk"], 6)
    ovf = parts["vm.ovf"].replace(
        f'ovf:href="vm-disk1.vmdk" ovf:id="file1" ovf:size="{len(parts["vm-disk1.vmdk"])}"'
        .encode(), f'ovf:compression="gzip" ovf:href="vm-disk1.vmdk" ovf:id="file1" '
        f'ovf:size="{len(disk)}"'.encode())
    assert b"gzip" in ovf
    mf = "".join(f"SHA256({n})= {hashlib.sha256(d).hexdigest()}\n"
                 for n, d in (("vm.ovf", ovf), ("vm-disk1.vmdk", disk))).encode()
    return lay_out(folder / "gz.ova", [("vm.ovf", ovf), ("vm.mf", mf), ("vm-disk1.vmdk", disk)])


def test_a_gzip_compressed_disk_converts_and_verifies(plain: Path, tmp_path: Path) -> None:
    ova = _gzipped(plain, tmp_path)
    out = tmp_path / "o.raw"
    for selector in ([], ["--disk", "vmdisk1"], ["--disk", "1"]):
        done = cli("convert", "-O", "raw", *selector, ova, out)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes() == CONTENT
    report = verify(ova)
    assert not report.findings and report.disks_read == 1, [f.line() for f in report.findings]
    info = cli("info", ova)
    assert f"virtual size 3.06 MiB ({len(CONTENT)} bytes)" in info.stdout, info.stdout


def test_a_cut_gzip_disk_is_one_error_line(plain: Path, tmp_path: Path) -> None:
    ova = _gzipped(plain, tmp_path)
    data = ova.read_bytes()
    cut = tmp_path / "cut.ova"
    cut.write_bytes(data[:len(data) * 2 // 3])
    done = cli("convert", "-O", "raw", cut, tmp_path / "o.raw")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and str(cut) in done.stderr
    assert "[disk-stream]" in cli("ova", "verify", cut).stdout


def test_cat_and_compare_take_an_ova(plain: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "vmdk", "cat", str(plain)], capture_output=True,
                          env=dict(os.environ, PYTHONPATH=str(SRC)), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == CONTENT
    (tmp_path / "same.raw").write_bytes(CONTENT)
    assert cli("compare", plain, tmp_path / "same.raw").returncode == 0
    (tmp_path / "other.raw").write_bytes(CONTENT[:-1] + b"\1")
    assert cli("compare", plain, tmp_path / "other.raw").returncode == 1


def test_cat_of_a_gzip_disk_says_to_convert(plain: Path, tmp_path: Path) -> None:
    done = cli("cat", _gzipped(plain, tmp_path))
    assert done.returncode == 1 and "gzip-compressed" in done.stderr
    assert "'vmdk convert' it first" in done.stderr and "Traceback" not in done.stderr


def test_random_reads_of_an_unordered_vmware_stream(tmp_path: Path,
                                                    vmdk_convert_exe: str) -> None:  # noqa: F811
    """vmdk-convert --noreorder stores grains in the order its threads finish them."""
    (tmp_path / "src.raw").write_bytes(CONTENT)
    subprocess.run([vmdk_convert_exe, "--noreorder", "-n", "4", "-c", "1",
                    str(tmp_path / "src.raw"), str(tmp_path / "s.vmdk")], check=True,
                   capture_output=True, timeout=300)
    stream = (tmp_path / "s.vmdk").read_bytes()
    ovf = build_ovf("vm", "vm-disk1.vmdk", len(stream), len(CONTENT), len(CONTENT))
    ova = lay_out(tmp_path / "vm.ova", [("vm.ovf", ovf), ("vm-disk1.vmdk", stream)])
    with OvaDisk(str(ova)) as disk:
        assert disk.size == len(CONTENT)
        for offset, length in ((0, 512), (65536 - 100, 300), (MiB + 7, 200000),
                               (len(CONTENT) - 4096, 4096), (2 * MiB, MiB)):
            assert disk.read_at(offset, length) == CONTENT[offset:offset + length]
        runs = disk.map()
        assert sum(r.length for r in runs) == len(CONTENT)
        zero_blocks = {i for i in range(0, len(CONTENT), 65536)
                       if not any(CONTENT[i:i + 65536])}
        assert {r.start for r in runs if not r.data} <= zero_blocks
        with pytest.raises(Exception, match="read-only"):
            disk.write_at(0, b"x")


@pytest.mark.interop
def test_serve_exports_an_ova_disk_read_only(plain: Path, tmp_path: Path, qemu_img: str) -> None:
    sock = tmp_path / "nbd.sock"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    refused = subprocess.run([sys.executable, "-m", "vmdk", "serve", "--socket", str(sock),
                              str(plain)], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and "--read-only" in refused.stderr, refused.stderr
    with subprocess.Popen([sys.executable, "-m", "vmdk", "serve", "--read-only", "--socket",
                           str(sock), str(plain)], stdout=subprocess.PIPE, env=env,
                          text=True) as server:
        _compare_served(server, sock, tmp_path, qemu_img)


def _compare_served(server: subprocess.Popen[str], sock: Path, tmp_path: Path,
                    qemu_img: str) -> None:
    try:
        assert server.stdout is not None
        assert "serving" in server.stdout.readline()
        (tmp_path / "expected.raw").write_bytes(CONTENT)
        done = subprocess.run([qemu_img, "compare", "-f", "raw", "-F", "raw",
                               f"nbd+unix:///?socket={sock}", str(tmp_path / "expected.raw")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        server.terminate()
        deadline = time.monotonic() + 30
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if server.poll() is None:
            server.kill()
        server.wait()
