"""Cost follows the data a file holds, never a number it claims.

Crafted files with a few KiB on disk and a large apparent size used to drive
``vmdk info`` to gigabytes of memory: directories were read and validated in
full, with temporaries several times their size, once per extent line naming
the file.  Each case here runs in a child process whose peak memory is read
from the kernel (``os.wait4``), so the numbers are the process's own.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import vmdk
from vmdk._structs import SparseFlags, SparseHeader
from vmdk.extents.sparse import MAX_GD_ENTRIES

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
#: The issue's target for opening and ``info`` of any crafted file under 10 MiB.
PEAK_LIMIT = 256 * MiB
SRC = Path(__file__).resolve().parents[1] / "src"


#: Run in the child: the verb, then its own peak.  ``ru_maxrss`` would not do: it keeps
#: the resident size the child had before exec, a copy of the (large) test process.
_MEASURED = """
import atexit, sys, runpy
def peak():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\nPEAK {kib}\\n")
atexit.register(peak)
sys.argv = ["vmdk", *sys.argv[1:]]
runpy.run_module("vmdk", run_name="__main__")
"""


def run_measured(*args: str) -> tuple[int, str, int]:
    """Run ``python -m vmdk ARGS``: (exit code, stderr, peak resident bytes)."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    done = subprocess.run([sys.executable, "-c", _MEASURED, *args], env=env, check=False,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err, _, peak = done.stderr.rpartition("\nPEAK ")
    return done.returncode, err, int(peak) * KiB


def crafted(path: Path, entries: int, *, redundant: bool = False, grain: int = 1,
            gtes: int = 1, set_entries: int = 0) -> Path:
    """A header claiming a directory of ``entries`` entries at sector 1 (and its copy right
    after it), in a sparse file just long enough to hold them: a few KiB on disk.
    ``set_entries`` entries at the start of each directory point at one all-zero table."""
    gd_sectors = -(-entries * 4 // 512)
    copies = 2 if redundant else 1
    table = 1 + copies * gd_sectors
    flags = SparseFlags.VALID_NEWLINE | (SparseFlags.REDUNDANT_GT if redundant else 0)
    header = SparseHeader(version=1, flags=int(flags), capacity=entries * gtes * grain,
                          grain_size=grain, num_gtes_per_gt=gtes,
                          gd_offset=1 + (gd_sectors if redundant else 0),
                          rgd_offset=1 if redundant else 0, overhead=table + 1)
    with open(path, "wb") as f:
        f.write(header.pack())
        for copy in range(copies):
            f.seek(512 + copy * gd_sectors * 512)
            f.write(struct.pack(f"<{set_entries}I", *([table] * set_entries)))
        f.truncate((table + 1) * 512)
    return path


def on_disk(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_directory_beyond_the_format_limit_is_refused_at_once(tmp_path: Path) -> None:
    """295 M entries in a 1.1 GiB sparse file of 4 KiB on disk: 7 GiB and 16 s before."""
    path = crafted(tmp_path / "huge.vmdk", 295 << 20)
    assert on_disk(path) < 64 * KiB
    code, err, peak = run_measured("info", str(path))
    assert code == 1
    assert str(path) in err and "grain directory" in err and "Traceback" not in err
    assert peak < PEAK_LIMIT
    with pytest.raises(vmdk.InvalidHeaderError):
        vmdk.open(path)


@pytest.mark.parametrize("redundant", [False, True], ids=["one directory", "redundant"])
def test_a_directory_at_the_limit_costs_what_the_file_holds(tmp_path: Path,
                                                            redundant: bool) -> None:
    """The largest directory the format allows (32 Mi entries, 128 MiB per copy), nearly
    all of it holes: opening, info, map and reads stay far below its claimed size."""
    path = crafted(tmp_path / "limit.vmdk", MAX_GD_ENTRIES, redundant=redundant,
                   set_entries=1000)
    assert on_disk(path) < 256 * KiB
    for verb in (["info"], ["info", "--output=json"], ["map", "--output=json"]):
        code, err, peak = run_measured(*verb, str(path))
        assert code == 0, err
        assert peak < 64 * MiB, f"{verb}: {peak >> 20} MiB"
    with vmdk.open(path) as disk:
        assert disk.size == MAX_GD_ENTRIES * 512
        assert disk.read_at(disk.size - 4096, 4096) == bytes(4096)


def test_forty_extent_lines_naming_one_sparse_file_are_refused(tmp_path: Path) -> None:
    """A sparse extent file named twice would be read (and written) twice over: each line
    used to cost the whole directory again (5.9 GiB for 40 lines)."""
    crafted(tmp_path / "one.vmdk", MAX_GD_ENTRIES)
    lines = ["# Disk DescriptorFile", "version=1", "CID=fffffffe", "parentCID=ffffffff",
             'createType="twoGbMaxExtentSparse"', ""]
    lines += [f'RW {MAX_GD_ENTRIES} SPARSE "one.vmdk"'] * 40
    os.link(tmp_path / "one.vmdk", tmp_path / "two.vmdk")
    lines += [f'RW {MAX_GD_ENTRIES} SPARSE "two.vmdk"']
    desc = tmp_path / "many.vmdk"
    desc.write_text("\n".join(lines + ["", 'ddb.adapterType = "ide"', ""]))
    code, err, peak = run_measured("info", str(desc))
    assert code == 1 and "one.vmdk" in err and "more than once" in err, err
    assert peak < PEAK_LIMIT
    # Hard links are one file too.
    desc.write_text("\n".join(lines[:6] + [f'RW {MAX_GD_ENTRIES} SPARSE "one.vmdk"',
                                           f'RW {MAX_GD_ENTRIES} SPARSE "two.vmdk"', ""]))
    with pytest.raises(vmdk.DescriptorError, match="more than once"):
        vmdk.open(desc)


def test_tables_of_many_extents_share_one_cache_budget(tmp_path: Path) -> None:
    """Grain tables are cached per image, not per extent: reading every table of a split
    image with many extents keeps at most the image's budget of tables in memory."""
    from vmdk.extents.sparse import DEFAULT_GT_CACHE_BYTES, SparseExtent

    path = tmp_path / "split.vmdk"
    size = 40 * 2047 * MiB
    with vmdk.create(path, size, "twoGbMaxExtentSparse") as disk:
        for i in range(40):
            disk.write_at(i * 2047 * MiB + 5 * MiB, b"x")
    with vmdk.open(path) as disk:
        for pos in range(0, size, 32 * MiB):  # one read per grain table of 512 grains
            disk.read_at(pos, 512)
        extents = [e for e in disk.image.extents if isinstance(e, SparseExtent)]
        cached = sum(len(e._cached_tables()) for e in extents)
        table_bytes = extents[0].header.num_gtes_per_gt * 4
        assert 0 < cached * table_bytes <= DEFAULT_GT_CACHE_BYTES


def test_a_sesparse_directory_costs_what_the_file_holds(tmp_path: Path) -> None:
    """A seSparse header claiming 64 TiB: a 32 MiB directory, all holes in a file of a few
    KiB on disk.  It was read whole and checked with temporaries of several times its
    size (175 MiB for ``info``)."""
    capacity = (64 << 40) // 512 - 8
    entries = -(-capacity // (4096 * 8))
    gd_sectors = -(-entries * 8 // 512)
    tables = 8 + gd_sectors
    const = struct.pack("<6Q32x16Q304x", 0xCAFEBABE, 0x0000000200000001, capacity, 8, 64, 0,
                        1, 1, 2, 2, 4, 4, 8, gd_sectors, tables, 128, tables + 128, 8,
                        tables + 136, 8, tables + 144, 8)
    volatile = struct.pack("<4Q480x", 0xCAFECAFE, 1, 1, 0)
    path = tmp_path / "ses.vmdk"
    with open(path, "wb") as f:
        f.write(const + volatile)
        f.truncate((tables + 200) * 512)
    assert on_disk(path) < 64 * KiB
    code, err, peak = run_measured("info", str(path))
    assert code == 0, err
    assert peak < 64 * MiB, f"{peak >> 20} MiB"
