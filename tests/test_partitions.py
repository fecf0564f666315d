"""Partition tables of raw disks, and partitionedDevice images made from partition numbers."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import pytest

import vmdk
from vmdk.partitions import (
    GptHeader,
    MbrEntry,
    PartitionTableError,
    partitioned_ranges,
    read_partition_table,
)

MiB = 1 << 20
LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def mbr_sector(entries: list[tuple[int, int, int]], boot: bytes = b"") -> bytes:
    """An MBR or EBR sector: (type, first sector, sectors) per entry."""
    sector = bytearray(boot.ljust(446, b"\0")[:446] + bytes(66))
    for i, (kind, lba, count) in enumerate(entries):
        MbrEntry.FORMAT.pack_into(sector, 446 + 16 * i, 0, b"\0\0\0", kind, b"\0\0\0", lba, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def fill_partitions(path: Path, parts: list[tuple[int, int]]) -> None:
    """A distinct byte in every partition (start, sectors), so mixing them up shows."""
    with open(path, "r+b") as f:
        for n, (start, count) in enumerate(parts):
            f.seek(start * 512)
            f.write(bytes([0x40 + n]) * (count * 512))


def make_mbr_disk(path: Path) -> None:
    """64 MiB: primaries 1 (linux), 2 (ntfs), 3 (extended, logicals 5 and 6)."""
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
        f.write(mbr_sector([(0x83, 2048, 32768), (0x07, 34816, 16384), (0x05, 51200, 79872)],
                           boot=b"BOOTCODE" * 8))
        f.seek(1000 * 512)
        f.write(b"stage 1.5 of a boot loader")
        f.seek(51200 * 512)
        f.write(mbr_sector([(0x83, 2048, 20480), (0x05, 24576, 55296)]))
        f.seek((51200 + 24576) * 512)
        f.write(mbr_sector([(0x82, 2048, 53248)]))
    fill_partitions(path, [(2048, 32768), (34816, 16384), (53248, 20480), (77824, 53248)])


def make_gpt_disk(path: Path, size: int = 64 * MiB, damage_primary: bool = False) -> None:
    sectors = size // 512
    entries = bytearray(128 * 128)
    parts = [(2048, 34815, "root"), (34816, 51199, "data"), (51200, sectors - 2048, "swap")]
    for i, (first, last, name) in enumerate(parts):
        struct.pack_into("<16s16sQQQ72s", entries, 128 * i, LINUX.bytes_le, uuid.uuid4().bytes_le,
                         first, last, 0, name.encode("utf-16-le"))

    def header(lba: int, backup: int, entries_lba: int) -> bytes:
        fields = [b"EFI PART", 0x10000, 92, 0, 0, lba, backup, 34, sectors - 34,
                  uuid.uuid4().bytes_le, entries_lba, 128, 128, zlib.crc32(entries)]
        raw = bytearray(GptHeader.FORMAT.pack(*fields))
        struct.pack_into("<I", raw, 16, zlib.crc32(raw))
        return bytes(raw).ljust(512, b"\0")

    with open(path, "wb") as f:
        f.truncate(size)
        f.write(mbr_sector([(0xEE, 1, sectors - 1)]))
        f.write(header(1, sectors - 1, 2)[:-1] + (b"X" if damage_primary else b"\0"))
        f.write(entries)
        f.seek((sectors - 33) * 512)
        f.write(entries)
        f.write(header(sectors - 1, 1, sectors - 33))
    if damage_primary:  # a flipped byte inside the checksummed header
        with open(path, "r+b") as g:
            g.seek(512 + 40)
            g.write(b"\xff")
    fill_partitions(path, [(p[0], p[1] - p[0] + 1) for p in parts])


def test_mbr_with_logical_partitions(tmp_path: Path) -> None:
    disk = tmp_path / "mbr.raw"
    make_mbr_disk(disk)
    table = read_partition_table(disk)
    assert table.scheme == "mbr"
    assert [(p.number, p.start // 512, p.size // 512, p.type) for p in table.partitions] == [
        (1, 2048, 32768, "0x83"), (2, 34816, 16384, "0x07"), (3, 51200, 79872, "0x05"),
        (5, 53248, 20480, "0x83"), (6, 77824, 53248, "0x82")]
    assert table.tables == [(0, 512), (51200 * 512, 512), (75776 * 512, 512)]


@pytest.mark.parametrize("damage_primary", [False, True])
def test_gpt_and_its_backup(tmp_path: Path, damage_primary: bool) -> None:
    disk = tmp_path / "gpt.raw"
    make_gpt_disk(disk, damage_primary=damage_primary)
    table = read_partition_table(disk)
    assert table.scheme == "gpt"
    assert [(p.number, p.start // 512, p.size // 512, p.name) for p in table.partitions] == [
        (1, 2048, 32768, "root"), (2, 34816, 16384, "data"), (3, 51200, 77825, "swap")]
    assert all(p.type == str(LINUX) for p in table.partitions)


def test_partitioned_device_from_numbers(tmp_path: Path) -> None:
    disk = tmp_path / "mbr.raw"
    make_mbr_disk(disk)
    original = disk.read_bytes()
    image = tmp_path / "pd.vmdk"
    with vmdk.create(image, subformat="partitionedDevice", raw_device=os.fspath(disk),
                     partitions=[1, 5]) as f:
        assert f.size == 64 * MiB
    with vmdk.open(image, "r+", allow_external=True) as f:
        seen = f.read()
        # the tables and boot code are copies, chosen partitions are the disk, the rest zeros
        for start, end in [(0, 34816), (53248, 73728)]:
            assert seen[start * 512:end * 512] == original[start * 512:end * 512]
        ebrs = [51200, 75776]
        for s in ebrs:
            assert seen[s * 512:(s + 1) * 512] == original[s * 512:(s + 1) * 512]
        hidden = bytearray(original)
        for start, end in [(34816, 51200), (51201, 53248), (73728, 75776), (75777, 131072)]:
            hidden[start * 512:end * 512] = bytes((end - start) * 512)
        assert seen == bytes(hidden)
        f.write_at(446, b"\x80")          # the guest edits its copy of the table...
        f.write_at(2048 * 512, b"root!")  # ...and writes into partition 1
    after = disk.read_bytes()
    assert after[446] == original[446]
    assert after[2048 * 512:2048 * 512 + 5] == b"root!"
    assert (tmp_path / "pd-pt.vmdk").read_bytes()[446] == 0x80


def test_partitioned_device_from_gpt_keeps_both_tables(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.raw"
    make_gpt_disk(disk)
    original = disk.read_bytes()
    ranges = partitioned_ranges(os.fspath(disk), [2])
    copies = [(r.start, r.size) for r in ranges if r.data is not None]
    assert copies == [(0, 2048 * 512), ((131072 - 33) * 512, 33 * 512)]
    image = tmp_path / "g.vmdk"
    vmdk.create(image, subformat="partitionedDevice", raw_device=os.fspath(disk),
                partitions=[2]).close()
    with vmdk.open(image, allow_external=True) as f:
        seen = f.read()
    assert seen[:2048 * 512] == original[:2048 * 512]
    assert seen[34816 * 512:51200 * 512] == original[34816 * 512:51200 * 512]
    assert seen[2048 * 512:34816 * 512] == bytes(32768 * 512)
    assert seen[-33 * 512:] == original[-33 * 512:]


def test_partition_faults_are_clear(tmp_path: Path) -> None:
    disk = tmp_path / "mbr.raw"
    make_mbr_disk(disk)
    with pytest.raises(PartitionTableError, match=r"no partition 4 .*partitions: 1, 2, 3, 5, 6"):
        partitioned_ranges(os.fspath(disk), [4])
    with pytest.raises(PartitionTableError, match="extended partition"):
        partitioned_ranges(os.fspath(disk), [3])
    with open(disk, "r+b") as f:  # the second EBR points back at the first: a loop
        f.seek(75776 * 512)
        f.write(mbr_sector([(0x82, 2048, 53248), (0x05, 0, 1)]))
    with pytest.raises(PartitionTableError, match="loops"):
        read_partition_table(disk)
    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(MiB))
    with pytest.raises(PartitionTableError, match="no partition table"):
        read_partition_table(blank)
    gpt = tmp_path / "gpt.raw"
    make_gpt_disk(gpt)
    with open(gpt, "r+b") as f:  # both headers damaged
        for at in (512 + 40, (MiB * 64 - 512) + 40):
            f.seek(at)
            f.write(b"\xff")
    with pytest.raises(PartitionTableError, match="no valid GPT"):
        read_partition_table(gpt)
    with pytest.raises(vmdk.VmdkError, match="blank.raw"):
        vmdk.create(tmp_path / "x.vmdk", subformat="partitionedDevice",
                    raw_device=os.fspath(blank), partitions=[1])
    assert not (tmp_path / "x.vmdk").exists()


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk (util-linux fdisk) missing")
@pytest.mark.parametrize("label", ["dos", "gpt"])
def test_tables_agree_with_sfdisk(tmp_path: Path, label: str) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    layout = ("label: dos\n,16M,83\n,8M,7\n,,5\n,10M,83\n,4M,82\n,,83\n" if label == "dos" else
              "label: gpt\n,16M,L\n,8M,L\n,,S\n")
    subprocess.run(["sfdisk", "-q", os.fspath(disk)], input=layout.encode(), check=True)
    dump = json.loads(subprocess.run(["sfdisk", "--json", os.fspath(disk)], check=True,
                                     capture_output=True).stdout)["partitiontable"]
    expected = [(int(p["node"].rsplit("raw", 1)[1]), p["start"] * 512, p["size"] * 512)
                for p in dump["partitions"]]
    table = read_partition_table(disk)
    assert [(p.number, p.start, p.size) for p in table.partitions] == expected
    option = f"subformat=partitionedDevice,device={disk},partitions=1:{expected[-1][0]}"
    out = subprocess.run([sys.executable, "-m", "vmdk", "create", "-q", "-o", option,
                          os.fspath(tmp_path / "pd.vmdk")], check=False, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    with vmdk.open(tmp_path / "pd.vmdk", allow_external=True) as f:
        start, size = expected[-1][1:]
        assert f.read_at(start, size) == disk.read_bytes()[start:start + size]
        assert f.read_at(0, 512) == disk.read_bytes()[:512]


@pytest.mark.parametrize("make", [make_mbr_disk, make_gpt_disk])
def test_damaged_tables_give_clear_errors(tmp_path: Path, make: object) -> None:
    """Random damage to the table sectors: a table or a PartitionTableError, nothing else."""
    import random

    assert callable(make)
    disk = tmp_path / "disk.raw"
    make(disk)
    areas = read_partition_table(disk).tables
    whole = disk.read_bytes()
    saved = [(start, whole[start:start + n]) for start, n in areas]
    rng = random.Random(7)
    outcomes: set[str] = set()
    for _ in range(300):
        with open(disk, "r+b") as f:
            for start, data in saved:  # undo the last round's damage
                f.seek(start)
                f.write(data)
            for _ in range(rng.randint(1, 6)):
                start, n = rng.choice(areas)
                f.seek(start + rng.randrange(min(n, 1024)))
                f.write(bytes([rng.randrange(256)]) if rng.random() < 0.7 else
                        struct.pack("<I", rng.choice((0, 1, 2**31, 2**32 - 1, rng.randrange(2**32)))))
        try:
            found = read_partition_table(disk)
            numbers = [p.number for p in found.partitions if p.type not in ("0x05", "0x0f")]
            if numbers:
                partitioned_ranges(os.fspath(disk), numbers, found)
            outcomes.add("read")
        except PartitionTableError as exc:
            assert "disk.raw" in str(exc)
            outcomes.add("refused")
    assert outcomes == {"read", "refused"}


def test_gpt_of_a_grown_disk_copies_the_backup_where_it_is(tmp_path: Path) -> None:
    """A disk grown after partitioning keeps its backup GPT at the old end."""
    disk = tmp_path / "gpt.raw"
    make_gpt_disk(disk)
    with open(disk, "r+b") as f:
        f.truncate(96 * MiB)
    ranges = partitioned_ranges(os.fspath(disk), [1])
    copies = [(r.start, r.size) for r in ranges if r.data is not None]
    old_end = 64 * MiB
    assert (old_end - 33 * 512, 33 * 512) in copies
    assert all(start + size <= old_end for start, size in copies)
