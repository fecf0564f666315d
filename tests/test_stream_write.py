"""Tests for vmdk.stream.StreamWriter.

Every image is checked three ways: by a small walker in this file that knows
only the spec (markers, GT/GD, footer, EOS), by the peers that can read it
(qemu-img, dissect.hypervisor, pyvmdk; each skipped when absent), and against
the raw bytes it was made from.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from vmdk import stream
from vmdk._structs import (
    GD_AT_END,
    SECTOR_SIZE,
    GrainMarker,
    MarkerType,
    MetadataMarker,
    SparseHeader,
)
from vmdk.errors import OutOfRangeError, UnsupportedFormatError
from vmdk.stream import StreamWriter

QEMU_IMG = shutil.which("qemu-img")
GT_ENTRIES = 512


# -- building inputs -------------------------------------------------------------------------


def descriptor(capacity: int, name: str) -> bytes:
    cylinders = min(capacity // (255 * 63), 65535)
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=12345678\n"
        "parentCID=ffffffff\n"
        'createType="streamOptimized"\n'
        "\n"
        "# Extent description\n"
        f'RW {capacity} SPARSE "{name}"\n'
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        'ddb.adapterType = "lsilogic"\n'
        'ddb.toolsVersion = "2147483647"\n'
        'ddb.virtualHWVersion = "4"\n'
        f'ddb.geometry.cylinders = "{cylinders}"\n'
        'ddb.geometry.heads = "255"\n'
        'ddb.geometry.sectors = "63"\n'
    ).encode()


@dataclasses.dataclass
class Case:
    capacity: int  # sectors
    grain_size: int  # sectors
    kinds: str  # per grain: "0" zero, "r" random, "p" pattern; cycled; "" = all zero
    zero_grains: range = range(0)  # grains forced to zero on top of the kinds


CASES = {
    "partial-last-grain": Case(capacity=8192 + 77, grain_size=128, kinds="rp0rr0pr"),
    "several-gts": Case(capacity=2 * 8192 + 21, grain_size=16, kinds="r0pp0r",
                        zero_grains=range(512, 1024)),  # the second GT range is empty
    "default-grain-3-gts": Case(capacity=65536 * 2 + 300, grain_size=128, kinds="r",
                                zero_grains=range(4, 1024 + 2)),
    "empty-disk": Case(capacity=4096, grain_size=128, kinds=""),
    "one-sector": Case(capacity=1, grain_size=128, kinds="r"),
}


def make_disk(case: Case, seed: int = 1) -> bytes:
    """Raw disk bytes: whole grains of zeros, random bytes or a repeated byte."""
    grain_bytes = case.grain_size * SECTOR_SIZE
    num_grains = -(-case.capacity // case.grain_size)
    rng = np.random.default_rng(seed)
    disk = np.zeros(num_grains * grain_bytes, dtype=np.uint8)
    grains = disk.reshape(num_grains, grain_bytes)
    if case.kinds:
        for index in range(num_grains):
            if index in case.zero_grains:
                continue
            kind = case.kinds[index % len(case.kinds)]
            if kind == "r":
                grains[index] = rng.integers(0, 256, grain_bytes, dtype=np.uint8)
            elif kind == "p":
                grains[index] = index % 255 + 1
    return disk[: case.capacity * SECTOR_SIZE].tobytes()


def write_by_grains(path: Path | io.BytesIO, disk: bytes, case: Case, **kwargs: object) -> None:
    grain_bytes = case.grain_size * SECTOR_SIZE
    name = path.name if isinstance(path, Path) else "memory.vmdk"
    with StreamWriter(path, case.capacity, descriptor(case.capacity, name),
                      grain_size=case.grain_size, **kwargs) as writer:
        view = memoryview(disk)
        for index in range(-(-len(disk) // grain_bytes)):
            writer.write_grain(index, view[index * grain_bytes:(index + 1) * grain_bytes])


def write_by_bytes(path: Path, disk: bytes, case: Case, seed: int = 2) -> None:
    """Odd-sized sequential writes that skip some all-zero stretches entirely."""
    rng = np.random.default_rng(seed)
    view = memoryview(disk)
    with StreamWriter(path, case.capacity, descriptor(case.capacity, path.name),
                      grain_size=case.grain_size, threads=3) as writer:
        offset = 0
        while offset < len(disk):
            size = int(rng.integers(1, 3 * case.grain_size * SECTOR_SIZE))
            chunk = view[offset:offset + size]
            if chunk != bytes(len(chunk)) or rng.random() < 0.5:
                writer.write(offset, chunk)
            offset += len(chunk)


# -- a reader that knows only the spec -------------------------------------------------------


@dataclasses.dataclass
class Parsed:
    header: SparseHeader
    footer: SparseHeader
    grains: dict[int, int]  # grain index -> sector of its marker
    gt_sectors: list[int]  # sector of each GT block, in file order
    gd_sector: int
    gd: np.ndarray


def parse_stream(image: bytes) -> Parsed:
    """Walk the markers of a footer-layout stream image, asserting the layout rules."""
    header = SparseHeader.unpack(image[:SECTOR_SIZE])
    assert header.overhead % header.grain_size == 0
    assert header.overhead >= 1 + header.descriptor_size
    grain_bytes = header.grain_size * SECTOR_SIZE
    grains: dict[int, int] = {}
    gt_sectors: list[int] = []
    gd_sector = -1
    gd = np.zeros(0, dtype="<u4")
    footer = None
    sector = header.overhead
    last_lba = -1
    while True:
        lba, size = GrainMarker.FORMAT.unpack_from(image, sector * SECTOR_SIZE)
        if size:
            assert lba > last_lba and lba % header.grain_size == 0, "grains must ascend"
            assert not gd.size and footer is None, "grains after the GD"
            last_lba = lba
            start = sector * SECTOR_SIZE + GrainMarker.SIZE
            assert zlib.decompress(image[start:start + size]) is not None
            assert len(zlib.decompress(image[start:start + size])) == grain_bytes
            grains[lba // header.grain_size] = sector
            pad = image[start + size:_round_sector(start + size)]
            assert pad == bytes(len(pad)), "grain padding must be zeros"
            sector = _round_sector(start + size) // SECTOR_SIZE
            continue
        marker = MetadataMarker.unpack(image[sector * SECTOR_SIZE:(sector + 1) * SECTOR_SIZE])
        block = image[(sector + 1) * SECTOR_SIZE:(sector + 1 + marker.num_sectors) * SECTOR_SIZE]
        if marker.type == MarkerType.EOS:
            assert marker.num_sectors == 0
            assert image[sector * SECTOR_SIZE:] == bytes(SECTOR_SIZE), "EOS must end the file"
            break
        if marker.type == MarkerType.GRAIN_TABLE:
            assert marker.num_sectors == 4
            gt_sectors.append(sector + 1)
        elif marker.type == MarkerType.GRAIN_DIRECTORY:
            gd_sector = sector + 1
            gd = np.frombuffer(block, dtype="<u4")
        elif marker.type == MarkerType.FOOTER:
            assert marker.num_sectors == 1
            footer = SparseHeader.unpack(block)
        else:
            raise AssertionError(f"unexpected marker type {marker.type}")
        sector += 1 + marker.num_sectors
    assert footer is not None
    return Parsed(header, footer, grains, gt_sectors, gd_sector, gd)


def _round_sector(offset: int) -> int:
    return -(-offset // SECTOR_SIZE) * SECTOR_SIZE


def assemble(image: bytes, parsed: Parsed) -> bytes:
    """The disk as the footer's GD and the GTs describe it."""
    header = parsed.footer
    grain_bytes = header.grain_size * SECTOR_SIZE
    num_grains = -(-header.capacity // header.grain_size)
    disk = bytearray(num_grains * grain_bytes)
    gd = np.frombuffer(image, dtype="<u4", count=-(-num_grains // GT_ENTRIES),
                       offset=header.gd_offset * SECTOR_SIZE)
    for gt_index, gt_sector in enumerate(gd.tolist()):
        if not gt_sector:
            continue
        gt = np.frombuffer(image, dtype="<u4", count=GT_ENTRIES, offset=gt_sector * SECTOR_SIZE)
        for slot, grain_sector in enumerate(gt.tolist()):
            if grain_sector:
                lba, size = GrainMarker.FORMAT.unpack_from(image, grain_sector * SECTOR_SIZE)
                index = gt_index * GT_ENTRIES + slot
                assert lba == index * header.grain_size
                start = grain_sector * SECTOR_SIZE + GrainMarker.SIZE
                disk[index * grain_bytes:(index + 1) * grain_bytes] = zlib.decompress(
                    image[start:start + size])
    return bytes(disk[: header.capacity * SECTOR_SIZE])


def stored_grains(disk: bytes, grain_bytes: int) -> list[int]:
    return [i for i in range(-(-len(disk) // grain_bytes))
            if any(disk[i * grain_bytes:(i + 1) * grain_bytes])]


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(params=sorted(CASES), name="made")
def made_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, bytes, Case]:
    case = CASES[request.param]
    disk = make_disk(case)
    image, raw = tmp_path / "out.vmdk", tmp_path / "expected.raw"
    write_by_grains(image, disk, case, threads=2)
    raw.write_bytes(disk)
    return image, raw, disk, case


# -- structure -------------------------------------------------------------------------------


def test_structure(made: tuple[Path, Path, bytes, Case]) -> None:
    image_path, _, disk, case = made
    image = image_path.read_bytes()
    parsed = parse_stream(image)
    header = parsed.header
    assert (header.version, header.flags, header.compress_algorithm) == (3, 0x30001, 1)
    assert (header.gd_offset, header.rgd_offset, header.num_gtes_per_gt) == (GD_AT_END, 0, 512)
    assert (header.capacity, header.grain_size) == (case.capacity, case.grain_size)
    assert header.descriptor_offset == 1
    desc = image[SECTOR_SIZE:(1 + header.descriptor_size) * SECTOR_SIZE].rstrip(b"\0")
    assert desc == descriptor(case.capacity, image_path.name)
    assert image[(1 + header.descriptor_size) * SECTOR_SIZE:header.overhead * SECTOR_SIZE] == bytes(
        (header.overhead - 1 - header.descriptor_size) * SECTOR_SIZE)
    assert parsed.footer == dataclasses.replace(header, gd_offset=parsed.gd_sector)
    assert image[-1536:-1024] == MetadataMarker(1, MarkerType.FOOTER).pack()
    assert image[-SECTOR_SIZE:] == bytes(SECTOR_SIZE)

    grain_bytes = case.grain_size * SECTOR_SIZE
    expected = stored_grains(disk, grain_bytes)
    assert sorted(parsed.grains) == expected
    expected_gts = sorted({i // GT_ENTRIES for i in expected})
    assert [i for i, s in enumerate(parsed.gd.tolist()) if s] == expected_gts
    assert sorted(s for s in parsed.gd.tolist() if s) == parsed.gt_sectors
    assert len(parsed.gd) * 4 <= len(image) and len(parsed.gd) >= -(-case.capacity // (
        case.grain_size * GT_ENTRIES))
    assert assemble(image, parsed) == disk


@pytest.mark.parametrize("case_name", ["partial-last-grain", "several-gts", "default-grain-3-gts"])
def test_byte_writes_match_grain_writes(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    disk = make_disk(case)
    by_grain, by_byte = tmp_path / "g.vmdk", tmp_path / "b.vmdk"
    write_by_grains(by_grain, disk, case, threads=1)
    write_by_bytes(by_byte, disk, case)
    # Same descriptor name length, so the files must be identical but for the name.
    assert by_byte.read_bytes().replace(b'"b.vmdk"', b'"g.vmdk"') == by_grain.read_bytes()


def test_threads_do_not_change_output(tmp_path: Path) -> None:
    case = CASES["several-gts"]
    disk = make_disk(case, seed=7)
    outputs = []
    for threads in (1, 2, 8):
        buf = io.BytesIO()
        write_by_grains(buf, disk, case, threads=threads)
        outputs.append(buf.getvalue())
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize("threads", [1, 4])
def test_batch_buffers_are_reused_only_when_free(threads: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of three grains cycle the writer's few batch buffers hundreds of times and
    end at every grain-table boundary; the file is the same as with large batches."""
    case = CASES["several-gts"]
    disk = make_disk(case, seed=11)
    large = io.BytesIO()
    write_by_grains(large, disk, case, threads=threads)
    monkeypatch.setattr(stream, "BATCH_BYTES", 3 * case.grain_size * SECTOR_SIZE)
    small = io.BytesIO()
    write_by_grains(small, disk, case, threads=threads)
    image = small.getvalue()
    assert assemble(image, parse_stream(image)) == disk
    assert image == large.getvalue()


@pytest.mark.parametrize("level", range(10))
def test_every_level_round_trips(level: int) -> None:
    case = CASES["partial-last-grain"]
    disk = make_disk(case, seed=level)
    buf = io.BytesIO()
    write_by_grains(buf, disk, case, compression_level=level, threads=2)
    image = buf.getvalue()
    assert assemble(image, parse_stream(image)) == disk


def test_zlib_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "_isal_zlib", None)
    case = CASES["partial-last-grain"]
    disk = make_disk(case)
    buf = io.BytesIO()
    write_by_grains(buf, disk, case, compression_level=6, threads=2)
    image = buf.getvalue()
    parsed = parse_stream(image)
    assert assemble(image, parsed) == disk
    grain_bytes = case.grain_size * SECTOR_SIZE
    first = min(parsed.grains)
    offset = parsed.grains[first] * SECTOR_SIZE
    _, size = GrainMarker.FORMAT.unpack_from(image, offset)
    payload = image[offset + GrainMarker.SIZE:offset + GrainMarker.SIZE + size]
    assert payload == zlib.compress(disk[first * grain_bytes:(first + 1) * grain_bytes], 6)


def test_isal_levels_above_three_are_clamped() -> None:
    if stream._isal_zlib is None:
        pytest.skip("isal is not installed")
    data = np.random.default_rng(3).integers(0, 4, 65536, dtype=np.uint8).tobytes()
    assert stream.make_compressor(9)(data) == stream.make_compressor(3)(data)


# -- behaviour at the API edges --------------------------------------------------------------


def new_writer(target: Path | io.BytesIO, capacity: int = 1024, **kwargs: object) -> StreamWriter:
    return StreamWriter(target, capacity, descriptor(capacity, "x.vmdk"), **kwargs)


def test_backward_write_is_refused() -> None:
    with new_writer(io.BytesIO()) as writer:
        writer.write(1000, b"abc")
        with pytest.raises(UnsupportedFormatError, match="written sequentially"):
            writer.write(999, b"x")
        writer.write_grain(3, bytes(65536))
        with pytest.raises(UnsupportedFormatError, match="written sequentially"):
            writer.write_grain(3, bytes(65536))
        with pytest.raises(UnsupportedFormatError, match="written sequentially"):
            writer.write(4 * 65536 - 1, b"x")


def test_argument_checks() -> None:
    with new_writer(io.BytesIO(), capacity=200) as writer:
        with pytest.raises(OutOfRangeError):
            writer.write_grain(2, bytes(65536))
        with pytest.raises(OutOfRangeError):
            writer.write(200 * SECTOR_SIZE - 1, b"ab")
        with pytest.raises(ValueError, match="must be 65536 bytes"):
            writer.write_grain(0, bytes(100))
        with pytest.raises(ValueError, match="or 36864"):
            writer.write_grain(1, bytes(100))
        writer.write_grain(1, b"\1" * (200 * SECTOR_SIZE - 65536))
    with pytest.raises(ValueError, match="I/O operation on closed file"):
        writer.write(0, b"x")
    for bad in ({"grain_size": 24}, {"grain_size": 8}, {"compression_level": 10},
                {"threads": 0}):
        with pytest.raises(ValueError):
            new_writer(io.BytesIO(), **bad)
    with pytest.raises(ValueError, match="capacity"):
        new_writer(io.BytesIO(), capacity=0)


def test_caller_may_reuse_its_buffer() -> None:
    scratch = bytearray(b"\7" * 65536)
    buf = io.BytesIO()
    with new_writer(buf, capacity=384, threads=2) as writer:
        for index in range(3):
            writer.write_grain(index, scratch)
            scratch[:] = bytes([index + 8]) * 65536
    image = buf.getvalue()
    disk = assemble(image, parse_stream(image))
    assert disk == b"\7" * 65536 + b"\10" * 65536 + b"\11" * 65536


def test_write_only_target_is_never_seeked() -> None:
    class Sink:
        def __init__(self) -> None:
            self.chunks: list[bytes] = []

        def write(self, data: bytes) -> int:
            self.chunks.append(bytes(data))
            return len(data)

        def flush(self) -> None:
            pass

    sink = Sink()
    with new_writer(sink, capacity=300) as writer:  # type: ignore[arg-type]
        writer.write(70000, b"hello")
    image = b"".join(sink.chunks)
    disk = assemble(image, parse_stream(image))
    assert disk[70000:70005] == b"hello" and disk.count(0) == len(disk) - 5


def test_exception_in_with_leaves_no_footer(tmp_path: Path) -> None:
    path = tmp_path / "broken.vmdk"
    with pytest.raises(RuntimeError), new_writer(path) as writer:
        writer.write_grain(0, b"\1" * 65536)
        raise RuntimeError("source failed")
    assert writer.closed
    image = path.read_bytes()
    assert image[-1536:-1024] != MetadataMarker(1, MarkerType.FOOTER).pack()


def test_output_is_written_in_large_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "FLUSH_BYTES", 1 << 20)
    sizes: list[int] = []

    class Counting(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            sizes.append(len(data))
            return super().write(data)

    case = CASES["partial-last-grain"]
    write_by_grains(Counting(), make_disk(case), case, compression_level=0)
    # A batch of records at a time (grains are dropped or compressed to about 700 KiB a
    # batch here), small pieces joined: never a write per grain.
    assert len(sizes) <= 6 and min(sizes[:-1]) >= 1 << 16


# -- peers -----------------------------------------------------------------------------------


@pytest.mark.interop
def test_qemu_img(made: tuple[Path, Path, bytes, Case]) -> None:
    if QEMU_IMG is None:
        pytest.skip("qemu-img is not installed")
    image, raw, _, _ = made
    check = subprocess.run([QEMU_IMG, "check", str(image)], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    compare = subprocess.run([QEMU_IMG, "compare", "-f", "vmdk", "-F", "raw", str(image), str(raw)],
                             capture_output=True, text=True, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr


@pytest.mark.interop
def test_dissect(made: tuple[Path, Path, bytes, Case]) -> None:
    dissect_vmdk = pytest.importorskip("dissect.hypervisor.disk.vmdk")
    image, _, disk, _ = made
    # dissect's read() fails at the end of a disk whose size is not a multiple of
    # 8 KiB, so read whole aligned 8 KiB blocks and compare only those.
    readable = len(disk) // 8192 * 8192
    with image.open("rb") as fh:
        vmdk = dissect_vmdk.VMDK(fh)
        assert vmdk.size == len(disk)
        vmdk.seek(0)
        got = b"".join(vmdk.read(min(1 << 20, readable - pos))
                       for pos in range(0, readable, 1 << 20))
    assert got == disk[:readable]


@pytest.mark.interop
def test_pyvmdk(made: tuple[Path, Path, bytes, Case]) -> None:
    pyvmdk = pytest.importorskip("pyvmdk")
    image, _, disk, case = made
    handle = pyvmdk.handle()
    handle.open(str(image))
    try:
        handle.open_extent_data_files()
        assert handle.get_media_size() == len(disk)
        grain_bytes = case.grain_size * SECTOR_SIZE
        for index in stored_grains(disk, grain_bytes):
            offset = index * grain_bytes
            size = min(grain_bytes, len(disk) - offset)
            assert handle.read_buffer_at_offset(size, offset) == disk[offset:offset + size]
        # Absent grains: pyvmdk read zeros for them in every case tried so far.
        assert handle.read_buffer_at_offset(len(disk), 0) == disk
    finally:
        handle.close()


def test_header_struct_is_little_endian_v3_stream() -> None:
    buf = io.BytesIO()
    with new_writer(buf):
        pass
    raw = buf.getvalue()
    assert raw[:4] == b"KDMV"
    assert struct.unpack_from("<IIQQ", raw, 4) == (3, 0x30001, 1024, 128)


@pytest.mark.parametrize("length", [0, 1, 511, 512, 1023])
def test_descriptor_area_always_ends_with_nul(length: int) -> None:
    buf = io.BytesIO()
    text = b"#" * length
    with StreamWriter(buf, 64, text, grain_size=16) as writer:
        writer.write_grain(0, b"\5" * 8192)
    image = buf.getvalue()
    header = parse_stream(image).header
    area = image[SECTOR_SIZE:(1 + header.descriptor_size) * SECTOR_SIZE]
    assert area == text + bytes(len(area) - length) and len(area) > length
    assert header.descriptor_size == length // SECTOR_SIZE + 1
    assert header.overhead == 16  # grains start at the first grain boundary after it


def test_descriptor_with_nul_is_refused() -> None:
    with pytest.raises(ValueError, match="NUL"):
        StreamWriter(io.BytesIO(), 64, b"a\0b")
