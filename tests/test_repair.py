"""check -r: repairs decide on evidence and lose no byte; leaked space of any shape comes back.

Every kind of single-entry damage, in the primary grain table or its redundant copy, in
either grain directory, or to a whole table, is written into a small image with os.pwrite;
``check -r all`` must then bring back exactly the content the image had before the damage,
leave an image that both ``vmdk check`` and ``qemu-img check`` find clean, and say which copy
it kept.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import vmdk
from conftest import have, pattern, run
from vmdk._structs import SparseHeader
from vmdk.check import check
from vmdk.cli import main
from vmdk.resize import resize

MiB = 1 << 20
GRAIN = 65536
SIZE = 40 * MiB  # two grain tables of 32 MiB: table 1 is added by resize, past the overhead
# Grains written, in this order (so grain 7, written last, ends the file).
TABLE0 = [0, 1, 3, 5]
TABLE1 = [512 + 2, 512 + 9]
LAST = 7
HOLE = 2  # never written: stays unallocated

pytestmark = pytest.mark.skipif(not have("qemu-img"), reason="qemu-img is not installed")


def _grain_data(grain: int) -> bytes:
    return pattern(GRAIN, seed=1000 + grain, zero_every=0)


def _move_table_past_the_grains(path: Path, index: int) -> None:
    """Put both copies of a grain table after the grains, as resize used to and as tools
    that allocate tables on demand do: a table among the grains."""
    with open(path, "r+b") as f:
        header = SparseHeader.unpack(f.read(512))
        end = -(-os.path.getsize(path) // 512)
        for directory in (header.gd_offset, header.rgd_offset):
            f.seek(directory * 512 + index * 4)
            (table,) = struct.unpack("<I", f.read(4))
            f.seek(table * 512)
            raw = f.read(header.num_gtes_per_gt * 4)
            f.seek(end * 512)
            f.write(raw)
            f.seek(directory * 512 + index * 4)
            f.write(struct.pack("<I", end))
            end += -(-len(raw) // 512)
        f.truncate(-(-end * 512 // GRAIN) * GRAIN)  # grains after it stay grain-aligned


def _build(path: Path, zeroed: bool) -> None:
    with vmdk.create(path, 4 * MiB, zeroed_grain=zeroed) as disk:
        for g in TABLE0:
            disk.write_at(g * GRAIN, _grain_data(g))
    resize(path, SIZE)  # adds table 1 (both copies)
    _move_table_past_the_grains(path, 1)
    with vmdk.open(path, "r+") as disk:
        for g in [*TABLE1, LAST]:
            disk.write_at(g * GRAIN, _grain_data(g))


@dataclasses.dataclass
class Layout:
    header: SparseHeader
    gd: list[int]
    rgd: list[int]
    sectors: dict[int, int]  # grain -> sector, as both tables agree
    file_sectors: int

    def gte(self, grain: int, redundant: bool) -> int:
        """Byte offset of a grain's entry in the primary or the redundant table."""
        index, slot = divmod(grain, self.header.num_gtes_per_gt)
        table = (self.rgd if redundant else self.gd)[index]
        return table * 512 + slot * 4

    def gde(self, index: int, redundant: bool) -> int:
        return (self.header.rgd_offset if redundant else self.header.gd_offset) * 512 + index * 4

    def table(self, index: int, redundant: bool) -> int:
        return (self.rgd if redundant else self.gd)[index]


def _layout(path: Path) -> Layout:
    with open(path, "rb") as f:
        header = SparseHeader.unpack(f.read(512))
        entries = -(-header.capacity // (header.grain_size * header.num_gtes_per_gt))

        def u32s(sector: int, n: int) -> list[int]:
            f.seek(sector * 512)
            return list(struct.unpack(f"<{n}I", f.read(4 * n)))

        gd = u32s(header.gd_offset, entries)
        rgd = u32s(header.rgd_offset, entries)
        n = header.num_gtes_per_gt
        sectors: dict[int, int] = {}
        for index, (a, b) in enumerate(zip(gd, rgd)):
            primary, backup = u32s(a, n), u32s(b, n)
            assert primary == backup
            sectors.update({index * n + i: s for i, s in enumerate(primary) if s > 1})
    return Layout(header, gd, rgd, sectors, os.path.getsize(path) // 512)


@dataclasses.dataclass
class Base:
    path: Path
    raw: Path
    content: bytes = dataclasses.field(repr=False)
    layout: Layout


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Base]:
    out = {}
    for zeroed in (False, True):
        folder = tmp_path_factory.mktemp(f"base-{int(zeroed)}")
        path = folder / "base.vmdk"
        _build(path, zeroed)
        assert check(path).exit_code == 0
        run("qemu-img", "check", path)
        raw = folder / "base.raw"
        run("qemu-img", "convert", "-f", "vmdk", "-O", "raw", path, raw)
        with vmdk.open(path) as disk:
            content = disk.read()
        assert raw.read_bytes() == content
        for g in [*TABLE0, *TABLE1, LAST]:
            assert content[g * GRAIN:(g + 1) * GRAIN] == _grain_data(g)
        layout = _layout(path)
        assert layout.gd[1] >= layout.header.overhead  # table 1 lies among the grains
        assert max(layout.sectors.values()) == layout.sectors[LAST]
        out[zeroed] = Base(path, raw, content, layout)
    return out


Edit = tuple[int, bytes]  # (byte offset, new bytes)
Damage = Callable[[Base, bool], list[Edit]]


def _u32(offset: int, value: int) -> list[Edit]:
    return [(offset, struct.pack("<I", value))]


def entry(grain: int, value: Callable[[Layout], int]) -> Damage:
    """One grain table entry of the damaged copy set to ``value``."""
    return lambda b, redundant: _u32(b.layout.gte(grain, redundant), value(b.layout))


def directory(index: int, value: Callable[[Layout, bool], int]) -> Damage:
    """One entry of the damaged grain directory set to ``value``."""
    return lambda b, redundant: _u32(b.layout.gde(index, redundant), value(b.layout, redundant))


def whole_table(index: int, content: Callable[[Base, bool], bytes]) -> Damage:
    """A whole grain table of the damaged copy overwritten with ``content``."""
    return lambda b, redundant: [(b.layout.table(index, redundant) * 512, content(b, redundant))]


def _other_table(index: int) -> Callable[[Base, bool], bytes]:
    def content(base: Base, redundant: bool) -> bytes:
        with open(base.path, "rb") as f:
            f.seek(base.layout.table(index, redundant) * 512)
            return f.read(base.layout.header.num_gtes_per_gt * 4)
    return content


W = 3  # the other allocated grain damaged entries are pointed at
ENTRY_DAMAGE: dict[str, Damage] = {
    "zero": entry(1, lambda lay: 0),
    "zero-last-grain": entry(LAST, lambda lay: 0),
    "zero-table-1": entry(TABLE1[0], lambda lay: 0),
    "another-grain": entry(1, lambda lay: lay.sectors[W]),
    "another-grain-across-tables": entry(TABLE1[1], lambda lay: lay.sectors[W]),
    "hole-to-another-grain": entry(HOLE, lambda lay: lay.sectors[W]),
    "hole-to-last-grain": entry(HOLE, lambda lay: lay.sectors[LAST]),
    "past-the-end": entry(1, lambda lay: lay.file_sectors + 4096),
    "last-sector": entry(1, lambda lay: lay.file_sectors - 1),
    "u32-max": entry(LAST, lambda lay: 0xFFFFFFFF),
    "descriptor": entry(1, lambda lay: lay.header.descriptor_offset + 1),
    "directory": entry(1, lambda lay: lay.header.gd_offset),
    "redundant-directory": entry(1, lambda lay: lay.header.rgd_offset),
    "table": entry(1, lambda lay: lay.gd[0]),
    "redundant-table": entry(1, lambda lay: lay.rgd[0]),
    "table-past-overhead": entry(5, lambda lay: lay.gd[1]),
    "redundant-table-past-overhead": entry(TABLE1[0], lambda lay: lay.rgd[1]),
    "misaligned-in-another-grain": entry(1, lambda lay: lay.sectors[W] + 8),
    "misaligned-in-last-grain": entry(TABLE1[0], lambda lay: lay.sectors[LAST] + 64),
    "misaligned-in-own-grain": entry(5, lambda lay: lay.sectors[5] + 1),
}
DIRECTORY_DAMAGE: dict[str, Damage] = {
    **{f"dir{i}-zero": directory(i, lambda lay, r: 0) for i in (0, 1)},
    **{f"dir{i}-past-the-end": directory(i, lambda lay, r: lay.file_sectors + 100)
       for i in (0, 1)},
    **{f"dir{i}-descriptor": directory(i, lambda lay, r: lay.header.descriptor_offset)
       for i in (0, 1)},
    **{f"dir{i}-own-copy": directory(i, lambda lay, r, i=i: lay.table(i, not r))
       for i in (0, 1)},
    **{f"dir{i}-other-table": directory(i, lambda lay, r, i=i: lay.table(1 - i, r))
       for i in (0, 1)},
    **{f"dir{i}-other-copy-of-other-table": directory(
        i, lambda lay, r, i=i: lay.table(1 - i, not r)) for i in (0, 1)},
    **{f"dir{i}-misaligned-into-other-table": directory(
        i, lambda lay, r, i=i: lay.table(1 - i, r) + 1) for i in (0, 1)},
    "dir0-grain-of-other-table": directory(0, lambda lay, r: lay.sectors[TABLE1[0]]),
    "dir1-grain-of-other-table": directory(1, lambda lay, r: lay.sectors[W]),
    "dir0-grain-of-own-table": directory(0, lambda lay, r: lay.sectors[W]),
    "dir1-grain-of-own-table": directory(1, lambda lay, r: lay.sectors[TABLE1[1]]),
}
TABLE_DAMAGE: dict[str, Damage] = {
    **{f"table{i}-zeroed": whole_table(i, lambda b, r: bytes(2048)) for i in (0, 1)},
    **{f"table{i}-garbage": whole_table(i, lambda b, r: pattern(2048, seed=77))
       for i in (0, 1)},
    **{f"table{i}-other-table": whole_table(i, _other_table(1 - i)) for i in (0, 1)},
}
ALL_DAMAGE = {**ENTRY_DAMAGE, **DIRECTORY_DAMAGE, **TABLE_DAMAGE}
CASES = [pytest.param(name, copy, id=f"{copy}-{name}")
         for name in ALL_DAMAGE for copy in ("primary", "redundant")]


def _damage(base: Base, tmp_path: Path, edits: list[Edit]) -> Path:
    path = tmp_path / "d.vmdk"
    shutil.copyfile(base.path, path)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, data in edits:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return path


def _assert_repaired(base: Base, path: Path, name: str, copy: str) -> None:
    before = check(path)
    assert before.exit_code == 2, f"{copy} {name}: check did not report the damage"
    result = check(path, repair="all")
    chosen = [p.message for p in result.problems if p.kind == "corruption" and "kept" in p.message]
    with vmdk.open(path) as disk:
        content = disk.read()
    lost = [g for g in range(len(base.content) // GRAIN)
            if content[g * GRAIN:(g + 1) * GRAIN] != base.content[g * GRAIN:(g + 1) * GRAIN]]
    assert not lost, f"{copy} {name}: grains {lost} changed; the repair said {chosen}"
    assert chosen, f"{copy} {name}: the repair did not say what it kept: {result.problems}"
    assert result.exit_code == 0, f"{copy} {name}: {result.problems}"
    assert main(["check", str(path)]) == 0
    assert run("qemu-img", "check", path, check=False).returncode == 0, (
        f"{copy} {name}: {run('qemu-img', 'check', path, check=False).stdout}")
    compared = run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", path, base.raw, check=False)
    assert compared.returncode == 0, f"{copy} {name}: {compared.stdout}"


@pytest.mark.parametrize(("name", "copy"), CASES)
def test_single_damage_is_repaired_without_loss(bases: dict[bool, Base], tmp_path: Path,
                                                name: str, copy: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    base = bases[False]
    path = _damage(base, tmp_path, ALL_DAMAGE[name](base, copy == "redundant"))
    _assert_repaired(base, path, name, copy)


ZEROED_DAMAGE: dict[str, Damage] = {
    "zeroed-marker": entry(1, lambda lay: 1),
    "zeroed-marker-last-grain": entry(LAST, lambda lay: 1),
    "zero": entry(1, lambda lay: 0),
    "another-grain": entry(1, lambda lay: lay.sectors[W]),
    "descriptor": entry(1, lambda lay: lay.header.descriptor_offset + 1),
    "hole-to-another-grain": entry(HOLE, lambda lay: lay.sectors[W]),
}


@pytest.mark.parametrize(("name", "copy"), [
    pytest.param(name, copy, id=f"{copy}-{name}")
    for name in ZEROED_DAMAGE for copy in ("primary", "redundant")])
def test_zeroed_grain_image_damage_is_repaired_without_loss(
        bases: dict[bool, Base], tmp_path: Path, name: str, copy: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    base = bases[True]
    path = _damage(base, tmp_path, ZEROED_DAMAGE[name](base, copy == "redundant"))
    _assert_repaired(base, path, name, copy)


def _interesting_sectors(lay: Layout) -> list[int]:
    h = lay.header
    return [0, 1, 2, h.descriptor_offset, h.gd_offset, h.rgd_offset, h.overhead - 1,
            h.overhead, lay.file_sectors - 1, lay.file_sectors, 0xFFFFFFFF,
            *lay.sectors.values(), *lay.gd, *lay.rgd]


@settings(max_examples=int(os.environ.get("VMDK_REPAIR_EXAMPLES", "25")), deadline=None)
@given(data=st.data())
def test_random_single_damage_is_repaired_without_loss(bases: dict[bool, Base],
                                                       data: st.DataObject) -> None:
    """Any one directory or grain table entry, in either copy, set to any value: the
    content before the damage comes back and the image checks clean."""
    base = bases[data.draw(st.booleans(), label="zeroed")]
    lay = base.layout
    redundant = data.draw(st.booleans(), label="redundant")
    if data.draw(st.integers(0, 3), label="directory?") == 0:
        offset = lay.gde(data.draw(st.integers(0, len(lay.gd) - 1), label="index"), redundant)
    else:
        grain = data.draw(st.one_of(st.sampled_from([*TABLE0, *TABLE1, LAST, HOLE]),
                                    st.integers(0, 2 * lay.header.num_gtes_per_gt - 1)),
                          label="grain")
        offset = lay.gte(grain, redundant)
    near = st.builds(int.__add__, st.sampled_from(_interesting_sectors(lay)),
                     st.integers(-130, 130))
    value = data.draw(st.one_of(st.sampled_from(_interesting_sectors(lay)), near,
                                st.integers(0, 0xFFFFFFFF)).map(lambda v: v & 0xFFFFFFFF),
                      label="value")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.vmdk"
        shutil.copyfile(base.path, path)
        with open(path, "r+b") as f:
            f.seek(offset)
            assume(struct.unpack("<I", f.read(4))[0] != value)
            f.seek(offset)
            f.write(struct.pack("<I", value))
        result = check(path, repair="all")
        with vmdk.open(path) as disk:
            assert disk.read() == base.content, [p.message for p in result.problems]
        assert result.exit_code == 0 and check(path).exit_code == 0, result.problems


def test_repair_says_which_copy_it_kept_and_why(bases: dict[bool, Base], tmp_path: Path) -> None:
    base = bases[False]
    lay = base.layout
    path = _damage(base, tmp_path, _u32(lay.gte(1, False), 0))
    before = check(path)
    assert before.exit_code == 2
    assert any("1 grain table differs from its redundant copy" in p.message for p in before.problems)
    result = check(path, repair="all")
    assert result.exit_code == 0 and result.corruptions_fixed >= 1
    assert (f"grain table 0 entry 1: kept the redundant copy's grain at sector "
            f"{lay.sectors[1]} (the primary entry was 0)") in [p.message for p in result.problems]


def test_an_interrupted_move_keeps_the_primary(bases: dict[bool, Base], tmp_path: Path) -> None:
    """Both copies point at a valid grain nothing else holds: the primary, written first, wins
    and the other grain is given back."""
    base = bases[False]
    lay = base.layout
    path = _damage(base, tmp_path, [])
    end = lay.file_sectors
    with open(path, "r+b") as f:
        f.seek(end * 512)
        f.write(_grain_data(1))  # the move's copy, then the primary entry repointed at it
        f.seek(lay.gte(1, False))
        f.write(struct.pack("<I", end))
    assert check(path).exit_code == 2
    result = check(path, repair="all")
    assert result.exit_code == 0
    assert any(f"kept the primary copy's grain at sector {end}" in p.message
               for p in result.problems)
    assert os.path.getsize(path) == lay.file_sectors * 512  # the spare copy was given back
    with vmdk.open(path) as disk:
        assert disk.read() == base.content


def test_unclean_image_with_a_lost_primary_entry_keeps_the_data(
        bases: dict[bool, Base], tmp_path: Path) -> None:
    base = bases[False]
    lay = base.layout
    path = _damage(base, tmp_path, [*_u32(lay.gte(LAST, False), 0), (72, b"\x01")])
    found = check(path)
    assert found.exit_code == 0  # after a crash, stale copies are warnings
    assert any("1 grain table differs from its redundant copy" in p.message for p in found.problems)
    refused = check(path, repair="leaks")  # would give the last grain's space away
    assert any("not repaired" in p.message for p in refused.problems)
    assert os.path.getsize(path) == lay.file_sectors * 512
    result = check(path, repair="all")
    assert any("entry 7: kept the redundant copy's grain" in p.message for p in result.problems)
    with vmdk.open(path) as disk:
        assert disk.read() == base.content
    assert check(path).exit_code == 0 and not check(path).problems


# ---------------------------------------------------------------- leaked space


def _append_table(path: Path) -> int:
    """Grow the disk by one grain table the way resize lays it out: the table and its
    redundant copy appended at the end of the file (which then ends off a grain boundary),
    the directories, the header's capacity and the descriptor updated.  Returns the size."""
    lay = _layout(path)
    h = lay.header
    index, span = len(lay.gd), h.num_gtes_per_gt * 4 // 512
    old, new = h.capacity, (index + 1) * h.num_gtes_per_gt * h.grain_size
    with open(path, "r+b") as f:
        f.truncate((lay.file_sectors + 2 * span) * 512)
        for directory, table in ((h.gd_offset, lay.file_sectors),
                                 (h.rgd_offset, lay.file_sectors + span)):
            f.seek(directory * 512 + index * 4)
            f.write(struct.pack("<I", table))
        f.seek(h.descriptor_offset * 512)
        text = f.read(h.descriptor_size * 512)
        f.seek(h.descriptor_offset * 512)
        f.write(text.replace(f"RW {old} SPARSE".encode(), f"RW {new} SPARSE".encode())[:len(text)])
        f.seek(0)
        f.write(dataclasses.replace(h, capacity=new).pack())
    return new * 512


def _qemu_write(path: Path, offset: int, byte: int) -> None:
    run("qemu-io", "-f", "vmdk", "-c", f"write -P {byte:#x} {offset} 64k", path)


def _small_image(path: Path) -> None:
    with vmdk.create(path, 4 * MiB) as disk:
        for g in (0, 1, 3):
            disk.write_at(g * GRAIN, _grain_data(g))


def _assert_leaks_given_back(path: Path, tmp_path: Path, leaks: int | None) -> None:
    """-r leaks leaves a clean, grain-aligned file with the same content, and qemu's next
    grain leaves no new gap."""
    raw = tmp_path / "before.raw"
    run("qemu-img", "convert", "-f", "vmdk", "-O", "raw", path, raw)
    found = check(path)
    assert found.corruptions == 0
    if leaks is not None:  # (at least: the padding inside the overhead was once counted too)
        assert found.leaks >= leaks, found.problems
    result = check(path, repair="leaks")
    assert result.exit_code == 0, f"{found.problems} -> {result.problems}"
    assert result.leaks_fixed == found.leaks
    assert check(path).exit_code == 0
    assert run("qemu-img", "check", path, check=False).returncode == 0
    assert run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", path, raw,
               check=False).returncode == 0
    assert os.path.getsize(path) % GRAIN == 0
    _qemu_write(path, 9 * GRAIN, 0x33)
    assert check(path).exit_code == 0


needs_qemu_io = pytest.mark.skipif(not have("qemu-io"), reason="qemu-io is not installed")


@needs_qemu_io
@pytest.mark.parametrize(("tables", "leaks"), [(1, 0), (2, 1), (3, 2)])
def test_check_r_leaks_gives_back_gaps_smaller_than_a_grain(tmp_path: Path, tables: int,
                                                            leaks: int) -> None:
    """New tables end the file off a grain boundary; qemu puts its next grain at the next
    boundary, leaving a gap smaller than a grain before it.  Such gaps add up: whatever
    check counts as leaked, -r leaks gives back (it packs the tables after the grains)."""
    path = tmp_path / "l.vmdk"
    _small_image(path)
    for i in range(tables):
        size = _append_table(path)
        _qemu_write(path, size - 3 * GRAIN, 0x5A + i)  # a grain in the new table's range
    _assert_leaks_given_back(path, tmp_path, leaks)


@needs_qemu_io
def test_check_r_leaks_gives_back_an_unaligned_end(tmp_path: Path) -> None:
    path = tmp_path / "t.vmdk"
    _small_image(path)
    os.truncate(path, os.path.getsize(path) + 8 * 512)  # a few sectors nobody uses
    _qemu_write(path, 5 * GRAIN, 0x5A)
    _assert_leaks_given_back(path, tmp_path, 1)


@needs_qemu_io
def test_check_r_leaks_after_resizes_and_qemu_writes(tmp_path: Path) -> None:
    path = tmp_path / "r.vmdk"
    _small_image(path)
    for i, size in enumerate([40 * MiB, 72 * MiB, 140 * MiB]):
        resize(path, size)
        _qemu_write(path, size - 3 * GRAIN, 0x5A + i)
    _assert_leaks_given_back(path, tmp_path, None)


def test_leak_count_ignores_the_padding_inside_the_overhead(tmp_path: Path) -> None:
    """The sectors between the last table and the first grain belong to the header's
    overhead: no repair can give them back, so they are not leaked."""
    path = tmp_path / "p.vmdk"
    with vmdk.create(path, 4 * MiB) as disk:
        disk.write_at(0, _grain_data(0))
    lay = _layout(path)
    assert lay.header.overhead - (lay.gd[0] + 4) > 0  # there is padding
    with open(path, "ab") as f:
        f.write(bytes(120 * 512))  # less than a grain at the end: nothing to give back either
    assert check(path).exit_code == 0
