"""``vmdk mount`` and ``vmdk umount``: the disk and its partitions as files, through FUSE.

Mounts run in subprocesses of this work tree's package; every mount a test makes is
unmounted at teardown (lazily, by fusermount3) whatever the test did, and every wait
has a timeout.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import vmdk
from conftest import pattern
from vmdk.convert import convert

SRC = Path(__file__).resolve().parents[1] / "src"
MiB = 1 << 20
SIZE = 32 * MiB
WAIT = 30.0  # seconds for a mount to appear or go

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"),
                                reason="/dev/fuse is absent: this machine cannot mount FUSE")
needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None and
                                  not os.access("/usr/sbin/sfdisk", os.X_OK),
                                  reason="sfdisk (Debian: fdisk) is not installed")
SFDISK = shutil.which("sfdisk") or "/usr/sbin/sfdisk"

#: sfdisk scripts: primaries, an extended partition with two logical ones, and a GPT.
LAYOUTS = {
    "dos": "label: dos\n,6M,83\n,4M,7\n,,5\n,5M,83\n,,82\n",
    "gpt": "label: gpt\n,6M,L\n,4M,L\n,,S\n",
}


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]))


def cli(*args: str | os.PathLike[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmdk", *map(os.fspath, args)],
                          capture_output=True, text=True, env=env(), timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def mounted(directory: Path) -> bool:
    point = os.fsencode(os.path.realpath(directory)).replace(b" ", b"\\040")
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == point for line in f)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("vmdk: error: "), text
    return lines[0]


class Mounts:
    """Starts mounts and makes sure none outlives the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.dirs: list[Path] = []
        self.procs: list[subprocess.Popen[str]] = []

    def dir(self, name: str = "mnt") -> Path:
        path = self.tmp_path / name
        path.mkdir(exist_ok=True)
        self.dirs.append(path)
        return path

    def daemon(self, image: Path, directory: Path, *options: str) -> None:
        """``vmdk mount`` in the background: it returns once the mount is up."""
        self.dirs.append(directory)
        done = cli("mount", *options, image, directory)
        assert done.returncode == 0, done.stderr
        assert mounted(directory)

    def foreground(self, image: Path, directory: Path, *options: str
                   ) -> subprocess.Popen[str]:
        self.dirs.append(directory)
        proc = subprocess.Popen([sys.executable, "-m", "vmdk", "mount", "-f", *options,
                                 os.fspath(image), os.fspath(directory)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env())
        self.procs.append(proc)
        wait_until(lambda: mounted(directory) or proc.poll() is not None, "the mount")
        assert proc.poll() is None, proc.communicate()
        return proc

    def cleanup(self) -> None:
        for directory in self.dirs:
            if mounted(directory):
                lazily = (["fusermount3", "-u", "-z"] if shutil.which("fusermount3")
                          else ["umount", "-l"])
                subprocess.run([*lazily, os.fspath(directory)], capture_output=True,
                               timeout=WAIT, check=False)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=WAIT)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


def partitioned_raw(path: Path, label: str) -> list[tuple[int, int, int]]:
    """A raw disk with ``label``'s table and data in and around its partitions; returns
    (number, start, size) in bytes of each partition as ``sfdisk --json`` reports it."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
    subprocess.run([SFDISK, "-q", os.fspath(path)], input=LAYOUTS[label].encode(), check=True,
                   capture_output=True, timeout=WAIT)
    table = json.loads(subprocess.run([SFDISK, "--json", os.fspath(path)], check=True,
                                      capture_output=True, timeout=WAIT).stdout)
    parts = [(int(p["node"].rsplit("raw", 1)[1]), p["start"] * 512, p["size"] * 512)
             for p in table["partitiontable"]["partitions"]]
    with open(path, "r+b") as f:
        for number, start, size in parts:
            if (label, number) == ("dos", 3):
                continue  # the extended partition: its EBRs live inside it
            n = min(size - 64 * 1024, 3 * MiB)
            f.seek(start + 64 * 1024)  # clear of any EBR at the partition's start
            f.write(pattern(n, seed=number))
        f.seek(SIZE - 3 * MiB)
        f.write(pattern(MiB, seed=99))  # past the last partition (dos) or in the GPT one
    return parts


def vmdk_of(raw: Path) -> Path:
    image = raw.with_suffix(".vmdk")
    convert(raw, image, src_format="raw")
    return image


@pytest.fixture
def dos_image(tmp_path: Path) -> tuple[Path, Path, list[tuple[int, int, int]]]:
    raw = tmp_path / "dos.raw"
    parts = partitioned_raw(raw, "dos")
    return vmdk_of(raw), raw, parts


# --------------------------------------------------------------------- reading


@needs_fuse
@needs_sfdisk
@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_disk_and_partitions_read_as_cat_and_sfdisk_say(tmp_path: Path, mounts: Mounts,
                                                        label: str) -> None:
    raw = tmp_path / f"{label}.raw"
    parts = partitioned_raw(raw, label)
    image = vmdk_of(raw)
    directory = mounts.dir()
    mounts.daemon(image, directory)

    cat = subprocess.run([sys.executable, "-m", "vmdk", "cat", os.fspath(image)],
                         capture_output=True, env=env(), timeout=60, check=True).stdout
    assert (directory / "disk").read_bytes() == cat == raw.read_bytes()
    data = [(n, start, size) for n, start, size in parts if (label, n) != ("dos", 3)]
    assert sorted(os.listdir(directory)) == sorted(["disk", *(f"p{n}" for n, _, _ in data)])
    if label == "dos":
        assert {n for n, _, _ in data} >= {5, 6}  # logical partitions, numbered as Linux does
    for number, start, size in data:
        part = directory / f"p{number}"
        assert part.stat().st_size == size
        assert part.read_bytes() == cat[start:start + size], number

    # Read-only unless asked: the mount refuses writers, as the files' modes say.
    assert (directory / "disk").stat().st_mode & 0o222 == 0
    with pytest.raises(OSError) as refused:
        os.open(directory / "p1", os.O_WRONLY)
    assert refused.value.errno in (errno.EROFS, errno.EACCES)

    done = cli("umount", directory)
    assert done.returncode == 0, done.stderr
    assert not mounted(directory)
    with vmdk.open(image, "r+"):  # released: a writer may open it at once
        pass


@needs_fuse
def test_chains_and_ovas_mount_whole(tmp_path: Path, mounts: Mounts) -> None:
    base, top = tmp_path / "base.vmdk", tmp_path / "top, a snapshot.vmdk"  # libfuse splits at ,
    content = bytearray(pattern(8 * MiB, seed=3))
    with vmdk.create(base, size=len(content)) as disk:
        disk.write_at(0, content)
    with vmdk.create(top, parent=base) as disk:
        disk.write_at(MiB + 100, b"child" * 1000)
    content[MiB + 100:MiB + 5100] = b"child" * 1000
    mounts.daemon(top, mounts.dir("chain dir"))
    assert (tmp_path / "chain dir" / "disk").read_bytes() == content
    done = cli("umount", tmp_path / "chain dir")
    assert done.returncode == 0, done.stderr

    ova = tmp_path / "vm.ova"
    done = cli("export-ova", base, ova)
    assert done.returncode == 0, done.stderr
    mounts.daemon(ova, mounts.dir("ova"))
    assert (tmp_path / "ova" / "disk").read_bytes() == pattern(8 * MiB, seed=3)
    refused = cli("mount", "--read-write", ova, mounts.dir("ova-rw"))
    assert refused.returncode == 1
    assert "OVA is read-only" in one_line(refused.stderr)


@needs_fuse
def test_holes_are_seekable_and_copies_stay_sparse(tmp_path: Path, mounts: Mounts) -> None:
    image = tmp_path / "sparse.vmdk"
    stored = [(2 * MiB, 3 * MiB), (10 * MiB + 65536, 64 * 1024), (30 * MiB, 2 * MiB)]
    with vmdk.create(image, size=SIZE) as disk:
        for start, length in stored:
            disk.write_at(start, pattern(length, seed=start, zero_every=0))
    directory = mounts.dir()
    mounts.daemon(image, directory)
    disk_file = directory / "disk"
    assert disk_file.stat().st_blocks * 512 == sum(n for _, n in stored)

    fd = os.open(disk_file, os.O_RDONLY)
    try:
        found, pos = [], 0
        while True:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                assert exc.errno == errno.ENXIO
                break
            pos = os.lseek(fd, data, os.SEEK_HOLE)
            found.append((data, pos - data))
        assert found == stored
        assert os.lseek(fd, 3 * MiB, os.SEEK_DATA) == 3 * MiB  # inside data: stays
        assert os.lseek(fd, 6 * MiB, os.SEEK_HOLE) == 6 * MiB  # inside a hole: stays
    finally:
        os.close(fd)

    copy = tmp_path / "copy.raw"
    subprocess.run(["cp", "--sparse=always", os.fspath(disk_file), os.fspath(copy)],
                   check=True, timeout=60)
    assert copy.read_bytes() == disk_file.read_bytes()
    assert copy.stat().st_blocks * 512 <= sum(n for _, n in stored) + 1 * MiB


@needs_fuse
def test_readers_in_parallel_see_the_disk(tmp_path: Path, mounts: Mounts) -> None:
    image = tmp_path / "par.vmdk"
    content = pattern(SIZE, seed=5)
    with vmdk.create(image, size=SIZE) as disk:
        disk.write_at(0, content)
    directory = mounts.dir()
    mounts.daemon(image, directory)
    wrong: list[tuple[int, int]] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(directory / "disk", os.O_RDONLY)
        try:
            for _ in range(200):
                offset, length = rng.randrange(SIZE), rng.randrange(1, 2 * MiB)
                if os.pread(fd, length, offset) != content[offset:offset + length]:
                    wrong.append((offset, length))
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not wrong


# --------------------------------------------------------------------- writing


@needs_fuse
@needs_sfdisk
def test_read_write_writes_through(tmp_path: Path, mounts: Mounts,
                                   dos_image: tuple[Path, Path, list[tuple[int, int, int]]],
                                   qemu_img: str) -> None:
    image, raw, parts = dos_image
    starts = {n: (start, size) for n, start, size in parts}
    directory = mounts.dir()
    mounts.daemon(image, directory, "--read-write")
    assert (directory / "disk").read_bytes() == raw.read_bytes()  # its pages are cached now
    rng = random.Random(11)
    with open(raw, "r+b") as expected:
        for name, (start, size) in (("disk", (0, SIZE)), ("p1", starts[1]), ("p5", starts[5])):
            fd = os.open(directory / name, os.O_WRONLY)
            try:
                for _ in range(20):
                    data = rng.randbytes(rng.randrange(1, 300_000))
                    offset = rng.randrange(size - len(data))
                    assert os.pwrite(fd, data, offset) == len(data)
                    expected.seek(start + offset)
                    expected.write(data)
                # Over the end of a partition: the part that fits; at its end: no space.
                assert os.pwrite(fd, b"\xee" * 1000, size - 300) == 300
                expected.seek(start + size - 300)
                expected.write(b"\xee" * 300)
                with pytest.raises(OSError) as full:
                    os.pwrite(fd, b"x", size)
                assert full.value.errno == errno.ENOSPC
                os.fsync(fd)
            finally:
                os.close(fd)
    # 'cp' over a mounted file writes it, as over a block device (O_TRUNC changes nothing).
    (directory / "p6").write_bytes(b"written by open(O_TRUNC)")
    with open(raw, "r+b") as expected:
        expected.seek(starts[6][0])
        expected.write(b"written by open(O_TRUNC)")
    assert (directory / "p6").stat().st_size == starts[6][1]
    # Written through the partitions: the disk, opened again, shows it.
    assert (directory / "disk").read_bytes() == raw.read_bytes()

    done = cli("umount", directory)
    assert done.returncode == 0, done.stderr
    compared = subprocess.run([qemu_img, "compare", "-f", "vmdk", "-F", "raw",
                               os.fspath(image), os.fspath(raw)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert cli("check", image).returncode == 0


# ----------------------------------------------------------------- stopping


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_unmounts_and_releases(tmp_path: Path, mounts: Mounts, sig: int) -> None:
    image = tmp_path / "s.vmdk"
    with vmdk.create(image, size=SIZE) as disk:
        disk.write_at(0, b"before")
    directory = mounts.dir()
    proc = mounts.foreground(image, directory, "--read-write")
    with open(directory / "disk", "r+b") as f:
        f.write(b"after!")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert "mounted" in out and not err
    assert not mounted(directory)
    with vmdk.open(image, "r+") as disk:  # flushed, and its lock released
        assert disk.read_at(0, 6) == b"after!"
    assert cli("check", image).returncode == 0


@needs_fuse
def test_umount_waits_for_open_files_to_close(tmp_path: Path, mounts: Mounts) -> None:
    image = tmp_path / "b.vmdk"
    vmdk.create(image, size=SIZE).close()
    directory = mounts.dir()
    mounts.daemon(image, directory)
    with open(directory / "disk", "rb"):
        busy = cli("umount", directory)
        assert busy.returncode == 1
        assert "busy" in one_line(busy.stderr)
        assert mounted(directory)
    done = cli("umount", directory)
    assert done.returncode == 0, done.stderr
    assert not mounted(directory)
    not_mounted = cli("umount", directory)
    assert not_mounted.returncode == 1
    assert "not mounted" in one_line(not_mounted.stderr)


# ------------------------------------------------------------------- refusals


@needs_fuse
def test_a_busy_mount_point_is_refused(tmp_path: Path, mounts: Mounts) -> None:
    image = tmp_path / "i.vmdk"
    vmdk.create(image, size=SIZE).close()
    directory = mounts.dir()
    mounts.daemon(image, directory)
    again = cli("mount", image, directory)
    assert again.returncode == 1
    assert "already mounted" in one_line(again.stderr)
    full = mounts.dir("full")
    (full / "file").write_text("x")
    refused = cli("mount", image, full)
    assert refused.returncode == 1
    assert "not empty" in one_line(refused.stderr)
    assert not mounted(full)


@needs_fuse
def test_an_image_in_use_is_refused(tmp_path: Path, mounts: Mounts) -> None:
    image = tmp_path / "u.vmdk"
    directory = mounts.dir()
    with vmdk.create(image, size=SIZE) as writer:
        writer.write_at(0, b"x")
        done = cli("mount", image, directory)
        assert done.returncode == 1
        assert "in use" in one_line(done.stderr)
        assert "-U" in done.stderr  # what would read it anyway
    assert not mounted(directory)


def test_without_fuse_the_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from vmdk import mount
    from vmdk.cli import main

    image = tmp_path / "n.vmdk"
    vmdk.create(image, size=SIZE).close()
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(mount, "FUSE_DEVICE", os.fspath(tmp_path / "no-fuse"))
    assert main(["mount", os.fspath(image), os.fspath(tmp_path / "mnt")]) == 1
    assert "FUSE is not available" in one_line(capsys.readouterr().err)

    monkeypatch.setitem(sys.modules, "mfusepy", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "vmdk._fuse", raising=False)
    monkeypatch.delattr(vmdk, "_fuse", raising=False)
    monkeypatch.setattr(mount, "FUSE_DEVICE", os.devnull)  # a device that opens
    assert main(["mount", os.fspath(image), os.fspath(tmp_path / "mnt")]) == 1
    assert "pip install 'vmdk[mount]'" in one_line(capsys.readouterr().err)


def test_import_vmdk_leaves_the_fuse_binding_alone() -> None:
    script = ("import sys, vmdk, vmdk.cli, vmdk.mount; vmdk.cli.build_parser(); "
              "print('mfusepy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True, env=env(), timeout=60, check=True)
    assert done.stdout.strip() == "False"


def test_seek_answers_without_fuse(tmp_path: Path) -> None:
    """The SEEK_DATA/SEEK_HOLE logic, on a file that is a range of the disk."""
    from vmdk.mount import DiskFile, MountedDisk

    image = tmp_path / "k.vmdk"
    with vmdk.create(image, size=SIZE) as disk:
        disk.write_at(4 * MiB, b"\1" * MiB)
    with vmdk.open(image) as disk:
        fs = MountedDisk(disk, [DiskFile("disk", 0, SIZE), DiskFile("p1", 4 * MiB + 4096,
                                                                    2 * MiB)],
                         writable=False, mtime=0)
        whole, part = fs.files["disk"], fs.files["p1"]
        assert fs.seek(whole, 0, os.SEEK_DATA) == 4 * MiB
        assert fs.seek(whole, 4 * MiB, os.SEEK_HOLE) == 5 * MiB
        assert fs.seek(part, 0, os.SEEK_DATA) == 0  # the range starts inside the data
        assert fs.seek(part, 0, os.SEEK_HOLE) == MiB - 4096
        assert fs.seek(part, MiB, os.SEEK_HOLE) == MiB  # a hole runs to the end
        for f, offset, whence in ((whole, 5 * MiB, os.SEEK_DATA), (whole, SIZE, os.SEEK_HOLE),
                                  (part, MiB, os.SEEK_DATA)):
            with pytest.raises(OSError) as nothing:
                fs.seek(f, offset, whence)
            assert nothing.value.errno == errno.ENXIO
        assert fs.stored_bytes(part) == MiB - 4096
        view = memoryview(bytearray(8192))
        assert fs.read(part, 2 * MiB - 4096, view) == 4096  # short at the end of the file


def test_files_without_or_with_a_damaged_table(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A disk never partitioned shows only ``disk``, quietly; a damaged table says so."""
    from vmdk.mount import disk_files

    image = tmp_path / "t.vmdk"
    vmdk.create(image, size=SIZE).close()
    with vmdk.open(image) as disk, caplog.at_level("WARNING"):
        assert [f.name for f in disk_files(disk, "t.vmdk")] == ["disk"]
    assert not caplog.records

    protective = bytearray(512)  # an MBR that points at a GPT that is not there
    protective[446 + 4] = 0xEE
    protective[446 + 8:446 + 16] = (1).to_bytes(4, "little") + (SIZE // 512 - 1).to_bytes(
        4, "little")
    protective[510:512] = b"\x55\xaa"
    with vmdk.open(image, "r+") as disk:
        disk.write_at(0, protective)
    with vmdk.open(image) as disk, caplog.at_level("WARNING"):
        assert [f.name for f in disk_files(disk, "t.vmdk")] == ["disk"]
    assert "no valid GPT" in caplog.text and "only the whole disk" in caplog.text
