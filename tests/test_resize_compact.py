"""resize, compact and check -r: sizes change and space comes back without losing a byte."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

import vmdk
from vmdk.check import check
from vmdk.compact import compact
from vmdk.resize import resize
from conftest import pattern, run

MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.parametrize("subformat", ["monolithicSparse", "monolithicFlat",
                                       "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_grow_then_write_at_the_new_end(tmp_path: Path, subformat: str) -> None:
    path = tmp_path / "d.vmdk"
    data = pattern(3 * MiB, seed=2)
    with vmdk.create(path, 3 * MiB, subformat) as disk:
        disk.write(data)
    new_size = 5 * GiB if subformat.startswith("twoGb") else 3 * GiB
    resize(path, new_size)
    with vmdk.open(path, "r+") as disk:
        assert disk.size == new_size
        disk.seek(new_size - 70_000)
        disk.write(b"\x55" * 70_000)
    with vmdk.open(path) as disk:
        assert disk.read(3 * MiB) == data
        disk.seek(new_size - 70_000)
        assert disk.read() == b"\x55" * 70_000
        assert disk.read_at(4 * MiB, 4096) == bytes(4096)
    assert check(path).exit_code == 0
    if subformat.startswith("twoGb"):
        assert len(vmdk.open(path).image.extents) == 3


def test_shrink_needs_the_flag_and_refuses_to_lose_data(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    with vmdk.create(path, 8 * MiB) as disk:
        disk.write(b"a" * MiB)
        disk.seek(6 * MiB)
        disk.write(b"b" * 10)
    with pytest.raises(vmdk.VmdkError, match="shrink=True"):
        resize(path, 4 * MiB)
    with pytest.raises(vmdk.VmdkError, match="offset 6291456"):
        resize(path, 4 * MiB, shrink=True)
    with vmdk.open(path, "r+") as disk:
        disk.write_zeroes_at(6 * MiB, 10)
    resize(path, 4 * MiB, shrink=True)
    with vmdk.open(path) as disk:
        assert disk.size == 4 * MiB
        assert disk.read(MiB) == b"a" * MiB


def test_streamoptimized_cannot_be_resized(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    with vmdk.create(path, MiB, "streamOptimized") as disk:
        disk.write(b"x" * 1000)
    with pytest.raises(vmdk.UnsupportedFormatError, match="streamOptimized"):
        resize(path, 2 * MiB)


@pytest.mark.interop
def test_grown_images_pass_qemu_check(tmp_path: Path, qemu_img: str) -> None:
    path = tmp_path / "d.vmdk"
    with vmdk.create(path, MiB) as disk:
        disk.write(pattern(MiB, seed=3))
    resize(path, 40 * GiB)  # the directory must move: more entries than its sector holds
    with vmdk.open(path, "r+") as disk:
        disk.seek(39 * GiB)
        disk.write(b"end" * 1000)
    assert run(qemu_img, "check", path).returncode == 0
    out = run(qemu_img, "info", "--output=json", path).stdout
    assert str(40 * GiB) in out
    run(qemu_img, "convert", "-O", "raw", path, tmp_path / "out.raw")
    with open(tmp_path / "out.raw", "rb") as f:
        assert f.read(MiB) == pattern(MiB, seed=3)
        f.seek(39 * GiB)
        assert f.read(3000) == b"end" * 1000


def test_compact_drops_zero_grains_and_truncates(tmp_path: Path) -> None:
    path = tmp_path / "c.vmdk"
    data = bytearray(pattern(4 * MiB, seed=5, zero_every=0))
    with vmdk.create(path, 8 * MiB) as disk:
        disk.write(data)
        disk.seek(65536)
        disk.write(bytes(5 * 65536))  # stored zeros: compact gives them back
    data[65536:6 * 65536] = bytes(5 * 65536)
    before = os.path.getsize(path)
    result = compact(path)
    assert result.zero_grains_dropped == 5
    assert os.path.getsize(path) == before - 5 * 65536
    with vmdk.open(path) as disk:
        assert disk.read(4 * MiB) == bytes(data)
    assert check(path).exit_code == 0


def test_check_finds_and_repairs_leaks(tmp_path: Path) -> None:
    path = tmp_path / "k.vmdk"
    with vmdk.create(path, 8 * MiB) as disk:
        disk.write(pattern(2 * MiB, seed=6, zero_every=0))
    with open(path, "ab") as f:
        f.write(os.urandom(3 * 65536))  # space no table references, as after a crash
    result = check(path)
    assert (result.exit_code, result.leaks, result.corruptions) == (3, 3, 0)
    fixed = check(path, repair="leaks")
    assert fixed.exit_code == 0 and fixed.leaks_fixed == 3
    with vmdk.open(path) as disk:
        assert disk.read(2 * MiB) == pattern(2 * MiB, seed=6, zero_every=0)


def _first_gt_sector(path: Path) -> tuple[int, int]:
    with vmdk.open(path) as disk:
        extent = disk.image.extents[0]
        return int(extent.gd[0]), int(extent.rgd[0])


def test_check_finds_and_repairs_corruption(tmp_path: Path) -> None:
    path = tmp_path / "k.vmdk"
    with vmdk.create(path, 8 * MiB) as disk:
        disk.write(pattern(2 * MiB, seed=7, zero_every=0))
    gt, _rgt = _first_gt_sector(path)
    with open(path, "r+b") as f:
        f.seek(gt * 512 + 40 * 4)
        f.write(struct.pack("<I", 10 ** 7))  # an entry past the end of the file
    result = check(path)
    assert result.exit_code == 2
    messages = " ".join(p.message for p in result.problems)
    assert "past the end" in messages and "redundant" in messages
    fixed = check(path, repair="all")
    assert fixed.exit_code == 0 and fixed.corruptions_fixed == 2
    with vmdk.open(path) as disk:
        assert disk.read(MiB) == pattern(2 * MiB, seed=7, zero_every=0)[:MiB]


def test_check_reports_and_clears_the_unclean_flag(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "u.vmdk"
    with vmdk.create(path, MiB) as disk:
        disk.write(b"x")
    with open(path, "r+b") as f:
        f.seek(72)
        f.write(b"\x01")
    result = check(path)
    assert any("not closed cleanly" in p.message for p in result.problems)
    assert result.exit_code == 0 and not result.unclean_cleared
    repaired = check(path, repair="all")
    assert repaired.unclean_cleared and repaired.to_json()["unclean-flag-cleared"] is True
    assert not repaired.problems
    # check says it once in its report; opening for it adds no log lines of its own
    assert not [r for r in caplog.records if "not closed cleanly" in r.getMessage()]
    with open(path, "rb") as f:
        f.seek(72)
        assert f.read(1) == b"\x00"


def _set_gte(path: Path, grain: int, sector: int) -> None:
    """Point grain ``grain``'s entry, in both tables, at ``sector``."""
    gt, rgt = _first_gt_sector(path)
    with open(path, "r+b") as f:
        for table in (gt, rgt):
            f.seek(table * 512 + grain * 4)
            f.write(struct.pack("<I", sector))


def _gte(path: Path, grain: int) -> int:
    gt, _rgt = _first_gt_sector(path)
    with open(path, "rb") as f:
        f.seek(gt * 512 + grain * 4)
        return int(struct.unpack("<I", f.read(4))[0])


@pytest.mark.parametrize("where", ["shared", "metadata"])
def test_check_all_gives_tangled_entries_their_own_grain(tmp_path: Path, where: str) -> None:
    """Two entries on one grain, or one on a grain table: -r all copies, nothing read changes."""
    path = tmp_path / "t.vmdk"
    with vmdk.create(path, 8 * MiB) as disk:
        disk.write(pattern(2 * MiB, seed=8, zero_every=0))
    gt, _rgt = _first_gt_sector(path)
    _set_gte(path, 5, _gte(path, 9) if where == "shared" else gt)
    with vmdk.open(path) as disk:
        before = disk.read()
    result = check(path)
    assert result.exit_code == 2
    assert ("more than one entry" if where == "shared" else "into metadata") in " ".join(
        p.message for p in result.problems)
    fixed = check(path, repair="all")
    assert fixed.exit_code == 0 and fixed.corruptions_fixed >= 1
    with vmdk.open(path) as disk:
        assert disk.read() == before
    with vmdk.open(path, "r+") as disk:  # writes through either entry stay apart now
        disk.write_at(5 * 65536, b"\x5a" * 65536)
    with vmdk.open(path) as disk:
        after = disk.read()
    assert after[5 * 65536:6 * 65536] == b"\x5a" * 65536
    assert after[:5 * 65536] + after[6 * 65536:] == before[:5 * 65536] + before[6 * 65536:]
    assert check(path).exit_code == 0


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat",
                                       "streamOptimized"])
def test_check_progress_counts_the_whole_disk(tmp_path: Path, subformat: str) -> None:
    """-p's bar runs in virtual bytes, table by table, and ends exactly at the disk's size."""
    path = tmp_path / "p.vmdk"
    size = 3 * 64 * MiB + 4096  # a few grain tables' worth, the last one partial
    with vmdk.create(path, size, subformat=subformat) as disk:
        disk.write_at(70 * MiB, b"data")
    steps: list[int] = []
    result = check(path, progress=steps.append)
    assert result.exit_code == 0
    assert sum(steps) == size and all(n >= 0 for n in steps)
    if subformat != "monolithicFlat":
        assert len([n for n in steps if n]) >= 2


def test_writes_refuse_entries_that_point_outside_the_data(tmp_path: Path) -> None:
    """Writes through a damaged entry would grow the file or overwrite a table: refused."""
    path = tmp_path / "w.vmdk"
    with vmdk.create(path, 8 * MiB) as disk:
        disk.write(pattern(2 * MiB, seed=9, zero_every=0))
    gt, _rgt = _first_gt_sector(path)
    _set_gte(path, 0, 1_000_000)   # past the end of the file
    _set_gte(path, 5, gt)          # onto the grain table itself
    size = os.path.getsize(path)
    with vmdk.open(path, "r+") as disk:
        with pytest.raises(vmdk.CorruptImageError, match="grain 0 .*past the end"):
            disk.write_at(0, b"x" * 16)
        with pytest.raises(vmdk.CorruptImageError, match="grain 5 .*metadata"):
            disk.write_at(5 * 65536 + 100, b"x" * 16)
        disk.write_at(7 * 65536, b"fine")  # healthy grains still take writes
    assert os.path.getsize(path) == size
    assert _gte(path, 5) == gt and check(path).exit_code == 2


def test_tables_inside_the_descriptor_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    with vmdk.create(path, 8 * MiB) as disk:
        disk.write(b"data")
    with vmdk.open(path) as disk:
        header = disk.image.extents[0].header
        gd, rgd = header.gd_offset, header.rgd_offset
    with open(path, "r+b") as f:
        for directory in (gd, rgd):
            f.seek(directory * 512)
            f.write(struct.pack("<I", 1))  # sector 1: the embedded descriptor
    for mode in ("r", "r+"):
        with pytest.raises(vmdk.CorruptImageError, match="d.vmdk.*into metadata"):
            vmdk.open(path, mode)


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentFlat"])
def test_shrinking_a_flat_image_gives_the_space_back(tmp_path: Path, subformat: str) -> None:
    from vmdk.resize import resize

    path = tmp_path / "f.vmdk"
    with vmdk.create(path, 6 * MiB, subformat=subformat, preallocate=True) as disk:
        disk.write(b"head")
    flat = next(p for p in tmp_path.iterdir() if p.name != "f.vmdk")
    resize(path, 2 * MiB, shrink=True)
    assert flat.stat().st_size == 2 * MiB
    with vmdk.open(path) as disk:
        assert disk.size == 2 * MiB and disk.read_at(0, 4) == b"head"
    assert check(path).exit_code == 0


def test_zeroing_refuses_entries_that_point_into_metadata(tmp_path: Path) -> None:
    path = tmp_path / "z.vmdk"
    with vmdk.create(path, 8 * MiB) as disk:
        disk.write(b"A" * 65536 + b"B" * 65536)
    gt, _rgt = _first_gt_sector(path)
    _set_gte(path, 1, gt)
    with vmdk.open(path, "r+") as disk:
        with pytest.raises(vmdk.CorruptImageError, match="grain 1 .*metadata"):
            disk.write_zeroes_at(65536, 65536)
        with pytest.raises(vmdk.CorruptImageError, match="grain 1 .*metadata"):
            disk.discard_at(65536, 65536)
    with vmdk.open(path) as disk:
        assert disk.read_at(0, 65536) == b"A" * 65536  # grain 0's table entry survived


def test_shrink_keeps_a_flat_file_other_lines_still_use(tmp_path: Path) -> None:
    path = tmp_path / "sh.vmdk"
    vmdk.create(path, 2 * MiB, subformat="monolithicFlat", preallocate=True).close()
    text = path.read_text().replace('RW 4096 FLAT "sh-flat.vmdk" 0',
                                    'RW 2048 FLAT "sh-flat.vmdk" 0\nRW 2048 FLAT "sh-flat.vmdk" 2048')
    path.write_text(text)
    with vmdk.open(path, "r+") as disk:
        disk.write_at(MiB, b"S" * 512)
    resize(path, 3 * MiB // 2, shrink=True)
    with vmdk.open(path) as disk:
        assert disk.read_at(MiB, 512) == b"S" * 512


def test_check_all_on_more_tables_than_the_cache_holds(tmp_path: Path) -> None:
    """-r all rewrites every redundant table, also those no longer in the table cache
    (16 MiB holds 8192 tables: 256 GiB of 64 KiB grains); it used to raise KeyError."""
    path = tmp_path / "big.vmdk"
    with vmdk.create(path, 300 << 30) as disk:
        disk.write_at(0, b"first")
        disk.write_at((300 << 30) - 5, b"last!")
    result = check(str(path), repair="all")
    assert result.corruptions == 0 and result.check_errors == 0
    assert check(str(path)).corruptions == 0
    with vmdk.open(path) as disk:
        assert disk.read_at(0, 5) == b"first" and disk.read_at((300 << 30) - 5, 5) == b"last!"
    run("qemu-img", "check", str(path))


def test_growing_past_the_2tib_file_limit_is_refused_before_anything_moves(
        tmp_path: Path) -> None:
    from vmdk.errors import UnsupportedFormatError
    from vmdk.extents.sparse import MAX_FILE_SECTORS, SparseExtent
    from vmdk.resize import _grow_sparse

    path = tmp_path / "e.vmdk"
    extent = SparseExtent.create(str(path), 2048 * 128)  # 128 MiB, 64 KiB grains
    try:
        extent._end = MAX_FILE_SECTORS - 2
        with pytest.raises(UnsupportedFormatError, match="2 TiB"):
            _grow_sparse(extent, 8 << 21)  # 8 GiB in sectors
        assert extent._end == MAX_FILE_SECTORS - 2
    finally:
        extent._end = os.path.getsize(path) // 512
        extent.close()


def test_check_silences_extent_warnings_of_its_own_thread_only(
        caplog: pytest.LogCaptureFixture) -> None:
    import threading

    from vmdk.check import _quiet_extent_warnings
    from vmdk.extents.sparse import log as sparse_log

    with caplog.at_level("WARNING"), _quiet_extent_warnings():
        sparse_log.warning("from the checking thread")
        other = threading.Thread(target=sparse_log.warning, args=("from another thread",))
        other.start()
        other.join()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["from another thread"]
