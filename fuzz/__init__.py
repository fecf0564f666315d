"""Structure-aware mutation fuzzing of every parser in :mod:`vmdk`.

An input is a small set of files (one image: a descriptor and its extents, or
a single monolithic / stream / COWD / seSparse file).  Seeds are built by
:func:`make_seeds` from images the library creates plus the small third-party
samples; :class:`Mutator` damages one file of a seed (bit flips, interesting
integers written over header fields, grain directory and grain table entries
and stream markers, truncation, chunk duplication, descriptor token edits).

:func:`exercise` is the oracle: open the image, read what ``map()`` calls
allocated (bounded) plus a few random places, sometimes write one grain,
then ``vmdk.check.check()``.  Success or a :class:`vmdk.VmdkError` subclass is
fine; any other exception, a peak of traced memory above
:data:`MEMORY_LIMIT`, resident memory growing by more than
:data:`RESIDENT_LIMIT` (it sees memory maps and C allocations too), or more
than :data:`TIME_LIMIT` seconds is a finding.

Two targets have oracles of their own: "pipe-stream" feeds streamOptimized
files of all three layouts (spec, VMware's tables-first, qemu's) to the
sequential reader through a reader that cannot seek and returns short reads,
and checks that whatever it accepts as whole reads the same through
``vmdk.open``; "ova" runs ``ova_info``, ``ova_disks``, ``copy_from_ova``, ``verify``, the
random reader of ``serve`` and
``convert`` on damaged and cut packages (a refused convert must leave no
output behind).

Findings are saved as gzip'd tar files (one per distinct signature) that
:func:`replay` loads again; ``tests/test_fuzz.py`` replays every file in
``tests/fuzz_regressions``.  ``python -m fuzz --help`` runs it for longer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import io
import os
import random
import re
import shutil
import signal
import struct
import sys
import tarfile
import tempfile
import time
import tracemalloc
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "samples"
REGRESSIONS = ROOT / "tests" / "fuzz_regressions"

#: Per input: bytes read from the virtual disk, traced memory peak, wall time.
READ_BUDGET = 64 << 20
#: Every seed and 3000 mutants of them trace at most 3.3 MiB and grow the resident set by
#: at most 6 MiB; what the format allows one input to hold at once (a 32 MiB grain, the
#: 16 MiB table cache) stays below these.  A header that makes us allocate by its claims,
#: not by what the file holds, crosses them.
MEMORY_LIMIT = 48 << 20
#: Growth of the resident set while one input runs (memory maps and C allocations too).
RESIDENT_LIMIT = 64 << 20
TIME_LIMIT = 10.0  # catches hangs and runaway loops, with room for a loaded CI machine
#: A hung input is interrupted after this long (then reported as a timeout).
HARD_TIMEOUT = 20.0
#: Saved regression inputs must stay small.
MAX_SAVED_BYTES = 64 << 10

TARGETS = ("sparse", "stream", "cowd", "sesparse", "descriptor", "split", "flat", "child",
           "sample", "pipe-stream", "ova")

MiB = 1 << 20


# --------------------------------------------------------------------- seeds


@dataclasses.dataclass(frozen=True)
class Seed:
    name: str
    target: str  # one of TARGETS: what kind of parser the mutations aim at
    files: dict[str, bytes]
    entry: str  # the file handed to vmdk.open
    mutable: tuple[str, ...]  # files the mutator may damage

    def __post_init__(self) -> None:
        assert self.entry in self.files and all(m in self.files for m in self.mutable)


def _low_entropy(n: int, tag: int) -> bytes:
    """Data that is not zero but compresses well (saved inputs stay small)."""
    unit = bytes((tag * 7 + i) & 0xFF for i in range(251))
    return (unit * (n // len(unit) + 1))[:n]


def _slurp(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _fill(disk: Any, writes: Iterable[tuple[int, int]], zeros: Iterable[tuple[int, int]] = ()
          ) -> None:
    for i, (off, n) in enumerate(writes):
        disk.write_at(off, _low_entropy(n, i + 1))
    for off, n in zeros:
        disk.write_zeroes_at(off, n)


def _sesparse_image(capacity: int = 2048, grains: int = 12) -> bytes:
    """A small seSparse file built from the layout, with every GT entry state present."""
    const = struct.pack(
        "<6Q32x16Q304x", 0xCAFEBABE, 0x0000000200000001, capacity, 8, 64, 0,
        1, 1,  # volatile header
        2, 2, 4, 4,  # journal header, journal
        8, 8,  # grain directory
        16, 128,  # grain tables (room for 2)
        144, 8, 152, 8,  # free bitmap, backmap
        160, 8 * grains)
    volatile = struct.pack("<4Q480x", 0xCAFECAFE, 1, 1, 0)
    gd = struct.pack("<Q", (0x10000000 << 32) | 0).ljust(8 * 512, b"\0")
    entries = [0] * 4096
    for i in range(grains):
        cluster = i
        entries[2 * i] = (3 << 60) | ((cluster & 0xFFF) << 48) | (cluster >> 12)
    entries[1] = 2 << 60  # zeroed
    entries[3] = 1 << 60  # SCSI-unmapped
    gt = struct.pack("<4096Q", *entries)
    out = bytearray(160 * 512 + grains * 4096)
    out[0:512] = const
    out[512:1024] = volatile
    out[8 * 512:16 * 512] = gd
    out[16 * 512:16 * 512 + len(gt)] = gt
    for i in range(grains):
        out[160 * 512 + i * 4096:160 * 512 + (i + 1) * 4096] = _low_entropy(4096, i + 3)
    return bytes(out)


def _cowd_delta(folder: Path, name: str, capacity: int, parent_name: str | None = None,
                grain_size: int = 1) -> None:
    from vmdk.extents.cowd import CowdExtent

    ext = CowdExtent.create(str(folder / name), capacity, grain_size=grain_size,
                            parent_file_name=parent_name)
    try:
        for i, (off, n) in enumerate([(0, 4096), (512 * 100, 700), (capacity * 512 - 1024, 1024)]):
            ext.write(off, memoryview(_low_entropy(n, i + 9)))
    finally:
        ext.close()


def table_stream(grains: dict[int, bytes], capacity: int, *, qemu: bool = False) -> bytes:
    """A streamOptimized file with its tables in front, built from the documented layout.

    VMware's vmdk-convert (``qemu=False``): header with the real gdOffset, GD
    and every GT right after the descriptor, grain records, EOS.  qemu-img
    (``qemu=True``): a redundant GD and GTs before those, the first grain at a
    grain boundary, no EOS.  ``grains`` maps a grain index (64 KiB grains) to
    its data.
    """
    import zlib

    grain = 128
    num_gt = -(-capacity // (grain * 512))
    desc = ("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
            'createType="streamOptimized"\n\n# Extent description\n'
            f'RW {capacity} SPARSE "disk.vmdk"\n\n# The Disk Data Base\n#DDB\n\n'
            'ddb.adapterType = "lsilogic"\n').encode()
    gd_sectors = -(-num_gt * 4 // 512)
    copy = gd_sectors + num_gt * 4  # one directory and its tables, in sectors
    rgd = 21 if qemu else 0
    gd = 21 + (copy if qemu else 0)
    overhead = gd + copy
    if qemu:
        overhead = -(-overhead // grain) * grain
    records = bytearray()
    tables = [[0] * 512 for _ in range(num_gt)]
    for index in sorted(grains):
        data = zlib.compress(grains[index].ljust(grain * 512, b"\0"), 1)
        tables[index // 512][index % 512] = overhead + len(records) // 512
        record = struct.pack("<QI", index * grain, len(data)) + data
        records += record + bytes(-len(record) % 512)
    if not qemu:
        records += bytes(512)  # EOS
    flags = 0x30001 | (0x2 if qemu else 0)
    head = struct.pack("<4sIIQQQQIQQQB4sH433x", b"KDMV", 3, flags, capacity, grain, 1, 20, 512,
                       rgd, gd, overhead, 0, b"\n \r\n", 1)
    out = bytearray(overhead * 512)
    out[:512] = head
    out[512:512 + len(desc)] = desc
    for base in ([rgd, gd] if qemu else [gd]):
        first_gt = base + gd_sectors
        gd_entries = [first_gt + 4 * i for i in range(num_gt)]
        out[base * 512:base * 512 + 4 * num_gt] = struct.pack(f"<{num_gt}I", *gd_entries)
        for i, table in enumerate(tables):
            at = (first_gt + 4 * i) * 512
            out[at:at + 2048] = struct.pack("<512I", *table)
    return bytes(out + records)


def _ova(folder: Path, name: str, disk: bytes) -> None:
    """An OVA holding ``disk`` as its one disk, laid out as export_ova lays one out."""
    from vmdk.ova import build_ovf

    capacity = struct.unpack_from("<Q", disk, 12)[0] * 512
    members = [(f"{name}.ovf", build_ovf(name, f"{name}-disk1.vmdk", len(disk), capacity, 0)),
               (f"{name}-disk1.vmdk", disk), (f"{name}.mf", b"")]
    with tarfile.open(folder / f"{name}.ova", "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _pipe_and_ova_seeds(base: Path, add: Callable[..., None]) -> None:
    """Streams of the three layouts for the sequential reader, and packages holding them."""
    import vmdk
    from vmdk.ova import export_ova

    d = base / "pipe-spec"
    d.mkdir()
    # 8 KiB grains: one grain table covers 4 MiB, so three ranges hold data.
    with vmdk.create(d / "disk.vmdk", 12 * MiB, "streamOptimized", cluster_size=8192) as disk:
        for i, off in enumerate((0, 8192 * 3, 4 * MiB + 8192, 11 * MiB)):
            disk.seek(off)
            disk.write(_low_entropy(8192 + 100, i + 1))
    add("pipe-spec", "pipe-stream", d, "disk.vmdk")
    grains = {0: _low_entropy(65536, 1), 1: _low_entropy(3000, 2), 515: _low_entropy(65536, 3),
              1023: _low_entropy(512, 4)}
    for name, qemu in (("pipe-vmware", False), ("pipe-qemu", True)):
        d = base / name
        d.mkdir()
        (d / "disk.vmdk").write_bytes(table_stream(grains, 1024 * 128, qemu=qemu))
        add(name, "pipe-stream", d, "disk.vmdk")
    d = base / "ova"
    d.mkdir()
    (d / "src.raw").write_bytes(_low_entropy(MiB, 5) + bytes(MiB) + _low_entropy(4096, 6))
    export_ova(d / "src.raw", d / "vm.ova")
    (d / "src.raw").unlink()
    add("ova", "ova", d, "vm.ova")
    d = base / "ova-vmware"
    d.mkdir()
    _ova(d, "vm", table_stream(grains, 1024 * 128))
    add("ova-vmware", "ova", d, "vm.ova")


def make_seeds(samples: Path | None = SAMPLES, *, max_sample_bytes: int = 400 << 10
               ) -> list[Seed]:
    """Build the seed corpus (in a temporary folder) and return it in memory."""
    import vmdk

    seeds: list[Seed] = []
    with tempfile.TemporaryDirectory(prefix="vmdk-seeds-") as tmp:
        base = Path(tmp)

        def folder(name: str) -> Path:
            path = base / name
            path.mkdir()
            return path

        def add(name: str, target: str, path: Path, entry: str,
                mutable: Iterable[str] | None = None) -> None:
            files = _slurp(path)
            seeds.append(Seed(name, target, files, entry, tuple(mutable or files)))

        writes = [(0, 65536), (65536 * 3 + 1000, 3000), (2 * MiB - 512, 512)]
        for cluster, name in ((65536, "sparse-64k"), (4096, "sparse-4k")):
            d = folder(name)
            with vmdk.create(d / "disk.vmdk", 3 * MiB, cluster_size=cluster) as disk:
                _fill(disk, writes)
            add(name, "sparse", d, "disk.vmdk")
        d = folder("sparse-zeroed")
        with vmdk.create(d / "disk.vmdk", 2 * MiB, cluster_size=4096, zeroed_grain=True) as disk:
            _fill(disk, writes[:2], zeros=[(8192, 16384)])
        add("sparse-zeroed", "sparse", d, "disk.vmdk")

        d = folder("split")
        with vmdk.create(d / "disk.vmdk", 2 * MiB, "twoGbMaxExtentSparse") as disk:
            _fill(disk, writes)
        add("split", "split", d, "disk.vmdk")
        add("split-descriptor", "descriptor", d, "disk.vmdk", ["disk.vmdk"])

        d = folder("flat")
        with vmdk.create(d / "disk.vmdk", 256 << 10, "monolithicFlat") as disk:
            _fill(disk, [(0, 4096), (100000, 5000)])
        add("flat", "flat", d, "disk.vmdk", ["disk.vmdk"])
        add("flat-descriptor", "descriptor", d, "disk.vmdk", ["disk.vmdk"])

        d = folder("stream")
        with vmdk.create(d / "disk.vmdk", 3 * MiB, "streamOptimized") as disk:
            for i, (off, n) in enumerate(writes):
                disk.seek(off)
                disk.write(_low_entropy(n, i + 1))
        add("stream", "stream", d, "disk.vmdk")

        d = folder("child")
        with vmdk.create(d / "base.vmdk", 2 * MiB, cluster_size=4096) as disk:
            _fill(disk, writes)
        with vmdk.create(d / "child.vmdk", parent=d / "base.vmdk", cluster_size=4096) as disk:
            _fill(disk, [(4096, 4096), (10000, 300)])
        add("child", "child", d, "child.vmdk")

        d = folder("cowd")
        _cowd_delta(d, "delta.vmdk", 2048, grain_size=1)
        add("cowd", "cowd", d, "delta.vmdk")
        d = folder("cowd-chain")
        with vmdk.create(d / "base.vmdk", 1 * MiB, "monolithicFlat") as disk:
            _fill(disk, [(0, 8192)])
        with vmdk.open(d / "base.vmdk") as disk:
            parent_cid = disk.image.cid
        _cowd_delta(d, "child-delta.vmdk", 2048, parent_name="base.vmdk", grain_size=2)
        (d / "child.vmdk").write_text(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=1a2b3c4d\n"
            f"parentCID={parent_cid:08x}\ncreateType=\"vmfsSparse\"\n"
            "parentFileNameHint=\"base.vmdk\"\n\n# Extent description\n"
            "RW 2048 VMFSSPARSE \"child-delta.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n"
            "ddb.adapterType = \"lsilogic\"\nddb.virtualHWVersion = \"4\"\n")
        add("cowd-chain", "cowd", d, "child.vmdk", ["child.vmdk", "child-delta.vmdk"])

        d = folder("sesparse")
        (d / "delta-sesparse.vmdk").write_bytes(_sesparse_image())
        add("sesparse", "sesparse", d, "delta-sesparse.vmdk")

        _pipe_and_ova_seeds(base, add)

    for seed in _sample_seeds(samples, max_sample_bytes):
        seeds.append(seed)
    return seeds


def _sample_seeds(samples: Path | None, max_bytes: int) -> Iterator[Seed]:
    """The small single-file third-party samples (descriptor-only ones fuzz the text parser)."""
    if samples is None or not samples.is_dir():
        return
    for path in sorted(samples.rglob("*")):
        if not path.is_file() or path.suffix not in (".vmdk", ".img"):
            continue
        if path.stat().st_size > max_bytes:
            continue
        name = f"sample-{path.parent.name}-{path.name}"
        data = path.read_bytes()
        yield Seed(name, "sample", {path.name: data}, path.name, (path.name,))
        if data[:4] == b"KDMV" and _u(data, 8, "<I") & 0x30000 == 0x30000:
            yield Seed(f"pipe-{name}", "pipe-stream", {path.name: data}, path.name, (path.name,))


# ----------------------------------------------------------- field locations

#: (offset, width) of the u32/u64 fields of each header.
_KDMV_FIELDS = [(4, 4), (8, 4), (12, 8), (20, 8), (28, 8), (36, 8), (44, 4), (48, 8), (56, 8),
                (64, 8), (72, 1), (73, 1), (77, 2)]
_COWD_FIELDS = [(4, 4), (8, 4), (12, 4), (16, 4), (20, 4), (24, 4), (28, 4), (1056, 4),
                (1060, 4), (1636, 4), (1648, 4)]
_SES_FIELDS = [(o, 8) for o in list(range(8, 48, 8)) + list(range(80, 208, 8))]
_VOLATILE_FIELDS = [(0, 8), (8, 8), (16, 8), (24, 8)]
_MARKER_FIELDS = [(0, 8), (8, 4), (12, 4)]


def _u(data: bytes, off: int, fmt: str) -> int:
    size = struct.calcsize(fmt)
    if off < 0 or off + size > len(data):
        return 0
    return int(struct.unpack_from(fmt, data, off)[0])


def _table_fields(data: bytes, sector: int, count: int, width: int, limit: int = 48
                  ) -> list[tuple[int, int]]:
    """Up to ``limit`` entries of a table at ``sector``: the non-zero ones first."""
    base = sector * 512
    if sector <= 0 or base >= len(data):
        return []
    fmt = "<I" if width == 4 else "<Q"
    count = min(count, (len(data) - base) // width, 1 << 16)
    used = [i for i in range(count) if _u(data, base + i * width, fmt)]
    picked = used[:limit] + list(range(min(count, 4)))
    return [(base + i * width, width) for i in dict.fromkeys(picked)]


def _tar_fields(data: bytes) -> list[tuple[int, int]]:
    """The size and checksum of each member header of a tar, and the fields of its disks."""
    fields: list[tuple[int, int]] = []
    pos = 0
    while pos + 512 <= len(data) and data[pos + 257:pos + 262] == b"ustar":
        fields += [(pos + 124, 8), (pos + 128, 4), (pos + 148, 8)]
        try:
            size = int(data[pos + 124:pos + 136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            break
        body = pos + 512
        if data[body:body + 4] == b"KDMV":
            fields += [(body + o, w) for o, w in field_offsets(data[body:body + size])]
        pos = body + -(-size // 512) * 512
    return fields


def field_offsets(data: bytes) -> list[tuple[int, int]]:
    """Where the integers that steer a parser live in ``data``: (offset, width) pairs."""
    fields: list[tuple[int, int]] = []
    if data[257:262] == b"ustar":
        fields += _tar_fields(data)
    elif data[:4] == b"KDMV":
        fields += _KDMV_FIELDS
        grain = max(1, _u(data, 20, "<Q"))
        gtes = max(1, min(_u(data, 44, "<I"), 4096))
        capacity = _u(data, 12, "<Q")
        gd = _u(data, 56, "<Q")
        compressed = bool(_u(data, 8, "<I") & 0x10000)
        if gd == 0xFFFFFFFFFFFFFFFF and len(data) >= 1536:
            footer = len(data) - 1024
            fields += [(footer + o, w) for o, w in _KDMV_FIELDS]
            fields += [(len(data) - 1536 + o, w) for o, w in _MARKER_FIELDS]
            fields += [(len(data) - 512 + o, w) for o, w in _MARKER_FIELDS]
            gd = _u(data, footer + 56, "<Q")
        n_gd = min(-(-capacity // (grain * gtes)) if capacity else 0, 4096)
        gd_fields = _table_fields(data, gd, n_gd, 4)
        fields += gd_fields + _table_fields(data, _u(data, 48, "<Q"), n_gd, 4, 8)
        if compressed and gd > 0:
            fields += [(gd * 512 - 512 + o, w) for o, w in _MARKER_FIELDS]
        for off, _w in gd_fields[:3]:
            gt = _u(data, off, "<I")
            gt_fields = _table_fields(data, gt, gtes, 4)
            fields += gt_fields
            if compressed and gt > 0:
                fields += [(gt * 512 - 512 + o, w) for o, w in _MARKER_FIELDS]
                for g_off, _ in gt_fields[:16]:
                    sector = _u(data, g_off, "<I")
                    fields += [(sector * 512, 8), (sector * 512 + 8, 4)]
    elif data[:4] == b"COWD":
        fields += _COWD_FIELDS
        gd = _u(data, 20, "<I")
        gd_fields = _table_fields(data, gd, _u(data, 24, "<I"), 4)
        fields += gd_fields
        for off, _w in gd_fields[:3]:
            fields += _table_fields(data, _u(data, off, "<I"), 4096, 4)
    elif _u(data, 0, "<Q") == 0xCAFEBABE:
        fields += _SES_FIELDS
        vol = _u(data, 48, "<Q")
        if 0 < vol < len(data) // 512:
            fields += [(vol * 512 + o, w) for o, w in _VOLATILE_FIELDS]
        gd_fields = _table_fields(data, _u(data, 96, "<Q"), 64, 8)
        fields += gd_fields
        gts = _u(data, 112, "<Q")
        for off, _w in gd_fields[:3]:
            index = _u(data, off, "<Q") & 0xFFFFFFFF
            fields += _table_fields(data, gts + index * 64, 4096, 8)
    return [(o, w) for o, w in fields if 0 <= o and o + w <= len(data)]


# ------------------------------------------------------------------ mutation

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 15, 16, 0x7F, 0x80, 0xFF, 0x100, 0x1FF, 0x200, 0x3FF,
               0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x200000, 0x7FFFFFFF, 1 << 31,
               0xFFFFFFFE, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 47, 1 << 48, 1 << 62,
               1 << 63, (1 << 64) - 2, (1 << 64) - 1]

_DESCRIPTOR_TOKENS = [
    b"RW", b"RDONLY", b"NOACCESS", b"SPARSE", b"FLAT", b"ZERO", b"VMFS", b"VMFSSPARSE",
    b"SESPARSE", b"VMFSRDM", b"VMFSRAW", b"monolithicSparse", b"monolithicFlat",
    b"twoGbMaxExtentSparse", b"streamOptimized", b"vmfsSparse", b"seSparse", b"fullDevice",
    b"partitionedDevice", b"custom", b"version=1", b"version=3", b"CID=ffffffff",
    b"parentCID=ffffffff", b"parentCID=0", b'parentFileNameHint="disk.vmdk"',
    b'parentFileNameHint="/etc/passwd"', b'parentFileNameHint="..\\\\x.vmdk"',
    b'"../disk.vmdk"', b'"/dev/zero"', b'""', b'"', b"=", b"#DDB", b"# Disk DescriptorFile",
    b'ddb.geometry.cylinders = "99999999999"', b'ddb.uuid = "zz"', b"\xff\xfe", b"\x00",
    b"\r\n", b"\t", b" " * 300, b"9" * 40, b"-1", b"0x10", b"4294967296", b"18446744073709551616",
    b'encoding="Shift_JIS"', b'encoding="nope"', b"\xe2\x80\xae",
]


class Mutator:
    """Applies one to four random damaging edits to one file of a seed."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def mutate(self, seed: Seed) -> tuple[dict[str, bytes], str]:
        """A damaged copy of the seed's files and a short description of what changed."""
        rng = self.rng
        files = dict(seed.files)
        name = rng.choice(seed.mutable)
        data = bytearray(files[name])
        text = _is_text(data)
        notes = []
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
            ops = self.text_ops if text else self.binary_ops
            op = rng.choice(ops)
            notes.append(op.__name__.lstrip("_") + op(data))
        files[name] = bytes(data)
        return files, f"{name}: {', '.join(notes)}"

    # -- binary ---------------------------------------------------------------

    @property
    def binary_ops(self) -> list[Callable[[bytearray], str]]:
        return [self._field_int, self._field_int, self._field_int, self._field_delta,
                self._bit_flip, self._random_bytes, self._aligned_int, self._truncate,
                self._duplicate_chunk, self._zero_chunk, self._extend]

    def _field_int(self, data: bytearray) -> str:
        fields = field_offsets(bytes(data))
        if not fields:
            return self._aligned_int(data)
        off, width = self.rng.choice(fields)
        value = self._interesting(data) & ((1 << (8 * width)) - 1)
        data[off:off + width] = value.to_bytes(width, "little")
        return f"@{off}/{width}={value:#x}"

    def _field_delta(self, data: bytearray) -> str:
        fields = field_offsets(bytes(data))
        if not fields:
            return self._bit_flip(data)
        off, width = self.rng.choice(fields)
        old = int.from_bytes(data[off:off + width], "little")
        value = (old + self.rng.choice((-8, -1, 1, 8, 128, old, -old))) & ((1 << (8 * width)) - 1)
        data[off:off + width] = value.to_bytes(width, "little")
        return f"@{off}/{width}={value:#x}"

    def _interesting(self, data: bytearray) -> int:
        sectors = len(data) // 512
        return self.rng.choice(INTERESTING + [sectors, sectors - 1, sectors + 1, len(data)])

    def _aligned_int(self, data: bytearray) -> str:
        if len(data) < 8:
            return self._extend(data)
        width = self.rng.choice((4, 8))
        region = min(len(data), self.rng.choice((512, 4096, len(data))))
        off = self.rng.randrange(0, max(1, region - width)) & ~(width - 1)
        value = self._interesting(data) & ((1 << (8 * width)) - 1)
        data[off:off + width] = value.to_bytes(width, "little")
        return f"@{off}/{width}={value:#x}"

    def _bit_flip(self, data: bytearray) -> str:
        if not data:
            return self._extend(data)
        hot = min(len(data), self.rng.choice((512, 2048, len(data))))
        out = []
        for _ in range(self.rng.choice((1, 1, 2, 8))):
            off = self.rng.randrange(hot)
            data[off] ^= 1 << self.rng.randrange(8)
            out.append(str(off))
        return "@" + "/".join(out)

    def _random_bytes(self, data: bytearray) -> str:
        if not data:
            return self._extend(data)
        off = self.rng.randrange(len(data))
        n = min(len(data) - off, self.rng.choice((1, 2, 4, 16, 512)))
        data[off:off + n] = self.rng.randbytes(n)
        return f"@{off}+{n}"

    def _truncate(self, data: bytearray) -> str:
        if not data:
            return ""
        size = self.rng.choice((
            self.rng.randrange(len(data)), (self.rng.randrange(len(data)) // 512) * 512,
            len(data) - 512, len(data) - 1, 511, 512, 1024, 2048))
        size = max(0, size)
        del data[size:]
        return f"@{size}"

    def _duplicate_chunk(self, data: bytearray) -> str:
        if len(data) < 2:
            return self._extend(data)
        n = self.rng.choice((4, 8, 64, 512, 2048))
        src = self.rng.randrange(len(data))
        chunk = bytes(data[src:src + n])
        dst = self.rng.randrange(len(data))
        if self.rng.random() < 0.5:
            data[dst:dst] = chunk
            return f"insert {src}->{dst}+{len(chunk)}"
        data[dst:dst + len(chunk)] = chunk
        return f"copy {src}->{dst}+{len(chunk)}"

    def _zero_chunk(self, data: bytearray) -> str:
        if not data:
            return self._extend(data)
        off = (self.rng.randrange(len(data)) // 512) * 512
        n = self.rng.choice((512, 2048, 65536))
        data[off:off + n] = bytes(min(n, len(data) - off))
        return f"@{off}+{n}"

    def _extend(self, data: bytearray) -> str:
        n = self.rng.choice((1, 511, 512, 4096))
        data += self.rng.choice((bytes(n), self.rng.randbytes(n)))
        return f"+{n}"

    # -- descriptor text ----------------------------------------------------------

    @property
    def text_ops(self) -> list[Callable[[bytearray], str]]:
        return [self._token, self._token, self._number, self._number, self._line_edit,
                self._bit_flip, self._truncate, self._duplicate_chunk]

    def _token(self, data: bytearray) -> str:
        token = self.rng.choice(_DESCRIPTOR_TOKENS)
        words = [m for m in re.finditer(rb'[^\s="]+', data)]
        if words and self.rng.random() < 0.7:
            m = self.rng.choice(words)
            data[m.start():m.end()] = token
        else:
            pos = self.rng.randrange(len(data) + 1)
            data[pos:pos] = token
        return repr(token[:20])

    def _number(self, data: bytearray) -> str:
        numbers = list(re.finditer(rb"\b[0-9a-fA-F]+\b", data))
        if not numbers:
            return self._token(data)
        m = self.rng.choice(numbers)
        value = self.rng.choice(INTERESTING + [-1, -2])
        text = (f"{value:x}" if self.rng.random() < 0.3 else str(value)).encode()
        data[m.start():m.end()] = text
        return f"{m.group()!r}->{text!r}"

    def _line_edit(self, data: bytearray) -> str:
        lines = bytes(data).split(b"\n")
        i = self.rng.randrange(len(lines))
        what = self.rng.choice(("drop", "dup", "swap", "long"))
        if what == "drop":
            del lines[i]
        elif what == "dup":
            lines.insert(i, lines[i])
        elif what == "swap":
            j = self.rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = lines[i] * 200
        data[:] = b"\n".join(lines)
        return f"{what} {i}"


def _is_text(data: bytes | bytearray) -> bool:
    head = bytes(data[:4096])
    return b"\0" not in head and b"version" in head.lower()


# -------------------------------------------------------------------- oracle


class FuzzTimeout(BaseException):
    """Raised from SIGALRM when one input runs past the hard limit."""


@dataclasses.dataclass
class Finding:
    signature: str  # kind + exception type + innermost frame in vmdk
    detail: str  # the traceback or measurement
    seed: str
    mutation: str
    files: dict[str, bytes]
    entry: str
    target: str | None = None  # whose oracle ran it (None: opened as an image)
    saved: str | None = None


def _signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    inside = [f for f in frames if f"{os.sep}vmdk{os.sep}" in f.filename]
    where = inside[-1] if inside else (frames[-1] if frames else None)
    loc = f"{Path(where.filename).name}:{where.name}:{where.lineno}" if where else "?"
    return f"{type(exc).__name__} at {loc}"


def _refused(exc: BaseException) -> str:
    """How a VmdkError reads in the outcome.  ENOMEM (an mmap past the address-space cap,
    which the library reports as an ImageIOError) is no refusal but a finding."""
    if getattr(exc, "errno", None) == errno.ENOMEM:
        raise MemoryError(f"the address-space cap was hit: {exc}") from exc
    return f"refused: {type(exc).__name__}"


def exercise(entry: str | os.PathLike[str], rng: random.Random | None = None, *,
             read_budget: int = READ_BUDGET, write: bool = False) -> str:
    """Open, map, read, maybe write, and check one image; return what happened.

    Raises whatever the library raises other than ``VmdkError``.
    """
    import vmdk
    import vmdk.check

    rng = rng or random.Random(0)
    outcome = "ok"
    try:
        with vmdk.open(entry) as disk:
            disk.info()
            size = disk.size
            left = read_budget
            for run in disk.map():
                if not run.data or left <= 0:
                    continue
                pos, end = run.start, run.start + min(run.length, left)
                while pos < end:
                    n = min(end - pos, 4 * MiB)
                    disk.read_at(pos, n)
                    pos += n
                left -= end - run.start
            for _ in range(4):
                if size:
                    off = rng.randrange(size)
                    disk.seek(off)
                    disk.read(min(size - off, rng.choice((1, 512, 4097, 65536))))
            if size:
                disk.read_at(size - min(size, 1000), min(size, 1000))
    except vmdk.VmdkError as exc:
        outcome = _refused(exc)
    if write and outcome == "ok":
        try:
            with vmdk.open(entry, "r+") as disk:
                if disk.size:
                    off = rng.randrange(disk.size)
                    n = min(disk.size - off, rng.choice((1, 512, 65536)))
                    disk.write_at(off, _low_entropy(n, 77))
                    if disk.read_at(off, n) != _low_entropy(n, 77):
                        raise AssertionError(f"read after write at {off}+{n} differs")
        except vmdk.VmdkError as exc:
            _refused(exc)
    try:
        vmdk.check.check(entry)
    except vmdk.VmdkError as exc:
        outcome += f", check {_refused(exc)}"
    return outcome


class _Pipe(io.RawIOBase):
    """A pipe: it cannot seek, and each read hands out a piece of random size."""

    def __init__(self, data: bytes, rng: random.Random) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._rng = rng

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), len(self._data) - self._pos,
                self._rng.choice((1, 13, 512, 4096, 65536, 1 << 20)))
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def _read_pipe(data: bytes, rng: random.Random, recover: bool) -> tuple[Any, dict[int, tuple[int, int]]]:
    """Run the sequential reader to the end: the reader, and (length, crc) of each grain."""
    import zlib

    from vmdk.stream_read import StreamReader

    reader = StreamReader(_Pipe(data, rng), "<pipe>", recover=recover)
    seen: dict[int, tuple[int, int]] = {}
    for offset, grain in reader.grains():
        if not (0 <= offset and offset + len(grain) <= reader.capacity
                and len(grain) <= reader.grain_bytes and offset % reader.grain_bytes == 0):
            raise AssertionError(f"grain of {len(grain)} bytes at {offset} is not a grain of "
                                 f"the disk ({reader.capacity} bytes)")
        seen[offset] = (len(grain), zlib.crc32(grain))
    return reader, seen


def _same_as_random_reader(entry: str | os.PathLike[str], seen: dict[int, tuple[int, int]],
                           grain_bytes: int, read_budget: int) -> str:
    """What a stream the sequential reader took as whole reads as through ``vmdk.open``."""
    import zlib

    import vmdk

    try:
        with vmdk.open(entry) as disk:
            for offset, (length, crc) in seen.items():
                if offset + length <= disk.size and zlib.crc32(disk.read_at(offset, length)) != crc:
                    raise AssertionError(f"grain at {offset}: the sequential reader and "
                                         "vmdk.open read different bytes")
            left = read_budget
            for run in disk.map():
                if not run.data or left <= 0:
                    continue
                for offset in range(run.start - run.start % grain_bytes, run.start + run.length,
                                    grain_bytes):
                    if offset in seen or left <= 0:
                        continue
                    n = min(grain_bytes, disk.size - offset)
                    left -= n
                    if disk.read_at(offset, n).strip(b"\0"):
                        raise AssertionError(f"vmdk.open reads data at {offset}, where the "
                                             "sequential reader found no grain")
    except vmdk.VmdkError as exc:
        return f", vmdk.open {_refused(exc)}"
    return ""


def exercise_pipe(entry: str | os.PathLike[str], rng: random.Random | None = None, *,
                  read_budget: int = READ_BUDGET, write: bool = False) -> str:
    """Read a streamOptimized file as a pipe, plainly and with ``recover``; what a whole
    stream holds must read the same through ``vmdk.open``."""
    import vmdk

    rng = rng or random.Random(0)
    data = Path(entry).read_bytes()
    try:
        reader, seen = _read_pipe(data, rng, recover=False)
    except vmdk.VmdkError as exc:
        outcome = _refused(exc)
    else:
        outcome = "ok" + _same_as_random_reader(entry, seen, reader.grain_bytes, read_budget)
    try:
        _read_pipe(data, rng, recover=True)
    except vmdk.VmdkError as exc:
        _refused(exc)
    return outcome


def exercise_ova(entry: str | os.PathLike[str], rng: random.Random | None = None, *,
                 read_budget: int = READ_BUDGET, write: bool = False) -> str:
    """List and convert a package; a refused convert must leave no output behind."""
    import vmdk
    from vmdk.convert import convert
    from vmdk.ova import copy_from_ova, ova_disk_size, ova_disks, ova_info

    path = os.fspath(entry)
    outcome = []
    for look in (ova_info, ova_disks):
        try:
            look(path)
        except vmdk.VmdkError as exc:
            outcome.append(f"{look.__name__} {_refused(exc)}")
    try:
        size = ova_disk_size(path)

        def write_at(offset: int, data: memoryview) -> None:
            if offset < 0 or offset + len(data) > size:
                raise AssertionError(f"{len(data)} bytes at {offset} pass the disk's end {size}")

        copy_from_ova(path, write_at)
    except vmdk.VmdkError as exc:
        outcome.append(_refused(exc))
        size = None
    for recover in (False, True):
        out = Path(entry).with_name(f"out-{recover}.raw")
        try:
            if (size if size is not None else ova_disk_size(path)) <= read_budget:
                convert(path, out, out_format="raw", durable=False, recover=recover,
                        overwrite=True)
        except vmdk.VmdkError as exc:
            _refused(exc)
            if out.exists():
                raise AssertionError(f"a refused convert left {out.name} behind") from None
    outcome.append(_verify_and_read_in_place(path, Path(entry).with_name("out-False.raw")))
    return ", ".join(o for o in outcome if o) or "ok"


def _verify_and_read_in_place(path: str, converted: Path) -> str:
    """verify reports (never raises on) what it finds; the random reader of ``serve`` and
    ``cat`` reads what ``convert`` wrote."""
    import vmdk
    from vmdk.ova.disk import OvaDisk
    from vmdk.ova.verify import verify

    try:
        verify(path)
    except vmdk.VmdkError as exc:
        return f"verify {_refused(exc)}"
    if not converted.exists():
        return ""
    try:
        with OvaDisk(path) as disk, open(converted, "rb") as expected:
            for offset in range(0, disk.size, 1 << 20):  # in pieces: the memory cap holds
                if disk.read_at(offset, min(1 << 20, disk.size - offset)) != expected.read(
                        1 << 20):
                    raise AssertionError(f"the random reader reads other data at {offset} "
                                         "than convert wrote")
    except vmdk.VmdkError as exc:
        raise AssertionError(f"convert read the disk, the random reader refused: {exc}"
                             ) from exc
    return ""


#: The oracle of each target that is not opened as an image.
ORACLES: dict[str, Callable[..., str]] = {"pipe-stream": exercise_pipe, "ova": exercise_ova}


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for child in folder.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _on_alarm(signum: int, frame: Any) -> None:
    raise FuzzTimeout(f"input ran longer than {HARD_TIMEOUT} s")


def run_input(folder: Path, files: dict[str, bytes], entry: str, rng: random.Random, *,
              write: bool = False, measure: bool = True, target: str | None = None
              ) -> tuple[str | None, str]:
    """Run one input through the oracle of ``target``; return (signature of a finding or
    None, detail)."""
    oracle = ORACLES.get(target or "", exercise)
    _write_files(folder, files)
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, HARD_TIMEOUT)
    started = measure and not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0] if measure else 0
    if measure:
        tracemalloc.reset_peak()
    resident = _reset_resident_peak() if measure else 0
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # as pytest is configured: a warning is a failure
            detail = oracle(folder / entry, rng, write=write)
    except FuzzTimeout as exc:
        return f"Timeout at {_signature(exc).split(' at ', 1)[1]}", traceback.format_exc()
    except Exception as exc:  # anything but VmdkError is a finding
        return _signature(exc), traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - base if measure else 0
        resident = _resident_peak() - resident if measure and resident else 0
        if started:
            tracemalloc.stop()
    if peak > MEMORY_LIMIT:
        return "MemoryPeak", f"traced memory peak {peak / MiB:.1f} MiB ({detail})"
    if resident > RESIDENT_LIMIT:
        return "MemoryPeak", f"resident memory grew by {resident / MiB:.1f} MiB ({detail})"
    if elapsed > TIME_LIMIT:
        return "Slow", f"{elapsed:.2f} s ({detail})"
    return None, detail


# -------------------------------------------------------------- the fuzz loop


@dataclasses.dataclass
class Stats:
    inputs: int = 0
    refused: int = 0
    accepted: int = 0
    findings: dict[str, Finding] = dataclasses.field(default_factory=dict)
    hits: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs, "refused": self.refused, "accepted": self.accepted,
            "seconds": round(self.seconds, 1),
            "findings": [{"signature": f.signature, "count": self.hits[f.signature],
                          "seed": f.seed, "mutation": f.mutation, "saved": f.saved,
                          "detail": f.detail[-3000:]} for f in self.findings.values()],
        }


def fuzz(seeds: list[Seed], *, seconds: float | None = None, max_inputs: int | None = None,
         seed: int = 0, save_dir: Path | None = None, write_ratio: float = 0.1,
         log: Callable[[str], None] | None = None) -> Stats:
    """Mutate the seeds round-robin until the time or input budget is spent."""
    if not seeds:
        raise ValueError("no seeds")
    rng = random.Random(seed)
    mutator = Mutator(rng)
    stats = Stats()
    deadline = time.monotonic() + seconds if seconds is not None else None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vmdk-fuzz-") as tmp, _tracing():
        folder = Path(tmp)
        # The unmodified seeds must pass, or every finding would be noise.
        for s in seeds:
            sig, detail = run_input(folder, s.files, s.entry, random.Random(seed),
                                    target=s.target)
            if sig is not None:
                _record(stats, Finding(f"seed {s.name}: {sig}", detail, s.name, "(none)",
                                       s.files, s.entry, s.target), save_dir, log)
        while True:
            if max_inputs is not None and stats.inputs >= max_inputs:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            s = seeds[stats.inputs % len(seeds)]
            files, note = mutator.mutate(s)
            write = rng.random() < write_ratio
            sig, detail = run_input(folder, files, s.entry, random.Random(rng.random()),
                                    write=write, target=s.target)
            if sig in ("Slow",):  # one more try: the machine may just have been busy
                sig, detail = run_input(folder, files, s.entry, random.Random(0), write=write,
                                        target=s.target)
            stats.inputs += 1
            if log and stats.inputs % 1000 == 0:
                log(f"{stats.inputs} inputs, {len(stats.findings)} findings, "
                    f"{time.monotonic() - started:.0f} s{_address_space()}")
            if sig is None:
                if detail.startswith("refused"):
                    stats.refused += 1
                else:
                    stats.accepted += 1
                continue
            _record(stats, Finding(sig, detail, s.name, note, files, s.entry, s.target),
                    save_dir, log)
    stats.seconds = time.monotonic() - started
    return stats


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) << 10


def _reset_resident_peak() -> int:
    """Start measuring the resident peak afresh; returns the resident bytes now, or 0 where
    the system cannot reset the peak (then only traced memory is measured)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS:")
    except (OSError, StopIteration, ValueError):
        return 0


def _resident_peak() -> int:
    """The resident peak since the last reset: it sees what tracemalloc does not (memory
    maps, numpy's and the C libraries' own allocations)."""
    try:
        return _status_kib("VmHWM:")
    except (OSError, StopIteration, ValueError):
        return 0


def _address_space() -> str:
    """", N MiB mapped": how close the process is to the cap of ``limit_memory``."""
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return ""
    return f", {size >> 10} MiB mapped"


@contextlib.contextmanager
def _tracing() -> Iterator[None]:
    """Trace allocations for a whole run.  Starting and stopping tracemalloc for each input
    (as ``run_input`` does on its own) grows the C heap by some 7 MiB per 1000 inputs, which
    the address-space cap of a long run would report as a leak of ours."""
    if tracemalloc.is_tracing():
        yield
        return
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _record(stats: Stats, finding: Finding, save_dir: Path | None,
            log: Callable[[str], None] | None) -> None:
    stats.hits[finding.signature] = stats.hits.get(finding.signature, 0) + 1
    if finding.signature in stats.findings:
        return
    stats.findings[finding.signature] = finding
    if save_dir is not None:
        finding.saved = save_finding(finding, save_dir)
    if log:
        log(f"NEW {finding.signature} (seed {finding.seed}; {finding.mutation})"
            f"{' -> ' + finding.saved if finding.saved else ''}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:80]


def pack_input(files: dict[str, bytes], entry: str, note: str = "",
               target: str | None = None) -> bytes:
    """A gzip'd tar of the input's files; member ENTRY names the file to open, TARGET (when
    there is one) the oracle that runs it."""
    buf = io.BytesIO()
    head = [("ENTRY", entry.encode()), ("NOTE", note.encode())]
    if target in ORACLES:
        head.append(("TARGET", str(target).encode()))
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in head + sorted((f"files/{n}", d) for n, d in files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), 9, mtime=0)


def unpack_input(blob: bytes) -> tuple[dict[str, bytes], str]:
    files, entry, _target = load_input(blob)
    return files, entry


def load_input(blob: bytes) -> tuple[dict[str, bytes], str, str | None]:
    """The files, entry and target of a saved input."""
    files: dict[str, bytes] = {}
    entry = ""
    target = None
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob)), mode="r") as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if member.name == "ENTRY":
                entry = data.decode()
            elif member.name == "TARGET":
                target = data.decode()
            elif member.name.startswith("files/"):
                name = member.name[len("files/"):]
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"bad member {member.name!r}")
                files[name] = data
    if entry not in files:
        raise ValueError("regression file has no ENTRY")
    return files, entry, target


def save_finding(finding: Finding, save_dir: Path) -> str | None:
    blob = pack_input(finding.files, finding.entry,
                      f"{finding.signature}\nseed {finding.seed}: {finding.mutation}\n",
                      finding.target)
    if len(blob) > MAX_SAVED_BYTES:
        return None
    save_dir.mkdir(parents=True, exist_ok=True)
    # Without the line number: the name stays put while the code around the bug moves.
    path = save_dir / f"{_slug(finding.signature.rsplit(':', 1)[0])}.tar.gz"
    path.write_bytes(blob)
    return str(path)


def replay(path: Path, *, write: bool = True) -> tuple[str | None, str]:
    """Run one saved regression input (with and without the write step)."""
    files, entry, target = load_input(path.read_bytes())
    with tempfile.TemporaryDirectory(prefix="vmdk-replay-") as tmp:
        folder = Path(tmp)
        sig, detail = run_input(folder, files, entry, random.Random(0), target=target)
        if sig is None and write:
            sig, detail = run_input(folder, files, entry, random.Random(0), write=True,
                                    target=target)
    return sig, detail


#: Default cap of ``limit_memory`` in MiB, besides 8 MiB of stack per worker thread (two per
#: core and four more: 320 MiB on 2 cores).  Every seed and 3000 mutants of them peak at
#: 241 MiB of address space there (Python, numpy, the images); a header that makes us
#: allocate some 80 MiB more than that fails with MemoryError, a finding.
DEFAULT_MEMORY_MB = 256
#: glibc's mallopt parameter for the number of malloc arenas.
_M_ARENA_MAX = -8


def limit_memory(megabytes: int = DEFAULT_MEMORY_MB) -> None:
    """Cap the address space of this process so a runaway allocation fails fast.

    The cap should measure what the code allocates, not what the machine
    reserves: glibc gives each thread a malloc arena that reserves 64 MiB of
    address space (capped here at two arenas), OpenBLAS starts a thread per
    core (one is plenty: nothing here multiplies matrices), and the inflate
    and deflate pools run a thread per core, whose stacks are added to the cap.
    Call it before any thread starts and before numpy is imported.
    """
    import ctypes
    import resource

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to cap
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    if stack == resource.RLIM_INFINITY or stack <= 0:
        stack = 8 * MiB
    threads = 2 * (os.cpu_count() or 1) + 4
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = megabytes * MiB + threads * stack
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def select(seeds: list[Seed], targets: Iterable[str] | None) -> list[Seed]:
    if not targets:
        return seeds
    wanted = set(targets)
    unknown = wanted - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(sorted(unknown))}; one of {TARGETS}")
    return [s for s in seeds if s.target in wanted]


__all__ = ["DEFAULT_MEMORY_MB", "Finding", "Mutator", "ORACLES", "Seed", "Stats", "TARGETS", "exercise",
           "exercise_ova", "exercise_pipe", "field_offsets", "fuzz", "limit_memory",
           "load_input", "make_seeds", "pack_input", "replay", "run_input", "select",
           "table_stream", "unpack_input"]

if sys.version_info < (3, 11):  # pragma: no cover
    raise ImportError("fuzz needs Python 3.11")
