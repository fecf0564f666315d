"""Tests for vmdk.Image through the file object: a bytearray model, the file protocol, CIDs, chains."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmdk
from conftest import pattern
from vmdk.extents.sparse import SparseExtent

SIZE = (1 << 20) + 3 * 512  # not a grain multiple: the last grain is partial
CLUSTER = 4096


def descriptor_text(create_type: str, extents: list[str], *, cid: int = 0x12345678,
                    parent_cid: int = 0xFFFFFFFF, hint: str | None = None) -> str:
    lines = ["# Disk DescriptorFile", "version=1", f"CID={cid:08x}", f"parentCID={parent_cid:08x}",
             f'createType="{create_type}"']
    if hint is not None:
        lines.append(f'parentFileNameHint="{hint}"')
    lines += ["", "# Extent description", *extents, "", "# The Disk Data Base", "#DDB", "",
              'ddb.adapterType = "ide"', ""]
    return "\n".join(lines)


def make_multi_extent(folder: Path) -> Path:
    """A hand-made split image: sparse, flat and sparse extents of uneven sizes."""
    sizes = [600, 700, SIZE // 512 - 1300]
    SparseExtent.create(os.fspath(folder / "m-s001.vmdk"), sizes[0], grain_size=8).close()
    with open(folder / "m-f002.vmdk", "wb") as f:
        f.truncate(sizes[1] * 512)
    SparseExtent.create(os.fspath(folder / "m-s003.vmdk"), sizes[2], grain_size=16,
                        num_gtes_per_gt=16).close()
    text = descriptor_text("custom", [f'RW {sizes[0]} SPARSE "m-s001.vmdk"',
                                      f'RW {sizes[1]} FLAT "m-f002.vmdk" 0',
                                      f'RW {sizes[2]} SPARSE "m-s003.vmdk"'])
    (folder / "m.vmdk").write_text(text)
    return folder / "m.vmdk"


def make_image(kind: str, folder: Path) -> tuple[Path, bytearray]:
    """An image of ``SIZE`` bytes and the model of its current contents."""
    path = folder / "disk.vmdk"
    if kind == "multi":
        return make_multi_extent(folder), bytearray(SIZE)
    if kind in ("child", "split-child", "zeroed-child"):
        base = folder / "base.vmdk"
        content = pattern(SIZE, seed=9, block=CLUSTER)
        with vmdk.create(base, SIZE, cluster_size=CLUSTER, subformat="monolithicFlat") as f:
            f.write(content)
        sub = "twoGbMaxExtentSparse" if kind == "split-child" else "monolithicSparse"
        vmdk.create(path, parent=base, cluster_size=CLUSTER, subformat=sub,
                    zeroed_grain=kind == "zeroed-child").close()
        return path, bytearray(content)
    extra = {"cluster_size": CLUSTER} if "Sparse" in kind else {}
    vmdk.create(path, SIZE, subformat=kind, **extra).close()
    return path, bytearray(SIZE)


KINDS = ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat", "multi", "child",
         "split-child", "zeroed-child"]

offsets = st.one_of(st.integers(0, SIZE), st.sampled_from(
    [0, CLUSTER - 1, CLUSTER, 600 * 512, 1300 * 512 - 7, SIZE - CLUSTER, SIZE - 1]))
op = st.tuples(st.sampled_from(["write", "write", "read", "zero", "reopen"]), offsets,
               st.integers(0, 3 * CLUSTER + 5), st.integers(0, 255))


def check_map(f: vmdk.VmdkFile) -> None:
    """map() runs are contiguous, cover the disk, and ranges said to be zero read as zeros."""
    pos = 0
    for run in f.map():
        assert run.start == pos and run.length > 0, f.map()
        if run.zero:
            assert not any(f.read_at(run.start, run.length))
        pos += run.length
    assert pos == f.size


def check_whole(f: vmdk.VmdkFile, model: bytearray) -> None:
    assert f.read_at(0, SIZE) == bytes(model)
    check_map(f)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=12))
def test_random_io_matches_model(kind: str, ops: list[tuple[str, int, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, model = make_image(kind, Path(tmp))
        f = vmdk.open(path, "r+")
        try:
            for name, offset, length, byte in ops:
                length = min(length, SIZE - offset)
                if name == "write":
                    data = bytes([byte]) * length if byte % 3 else os.urandom(length)
                    f.write_at(offset, data)
                    model[offset:offset + length] = data
                elif name == "zero":
                    f.write_zeroes_at(offset, length)
                    model[offset:offset + length] = bytes(length)
                elif name == "read":
                    assert f.read_at(offset, length) == model[offset:offset + length]
                else:
                    f.close()
                    f = vmdk.open(path, "r+")
                    check_whole(f, model)
            check_whole(f, model)
        finally:
            f.close()
        with vmdk.open(path) as f:
            assert f.size == SIZE
            check_whole(f, model)


# -- the file protocol -------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    with vmdk.create(path, SIZE, cluster_size=CLUSTER) as f:
        f.write(pattern(SIZE, seed=1, block=CLUSTER))
    return path


def test_io_past_the_end_raises(disk: Path) -> None:
    with vmdk.open(disk, "r+") as f:
        with pytest.raises(vmdk.OutOfRangeError):
            f.read_at(SIZE - 1, 2)
        with pytest.raises(vmdk.OutOfRangeError):
            f.write_at(SIZE, b"x")
        with pytest.raises(vmdk.OutOfRangeError):
            f.write_zeroes_at(SIZE - 512, 1024)
        f.seek(SIZE - 1)
        with pytest.raises(vmdk.OutOfRangeError):
            f.write(b"ab")
        f.seek(SIZE + 10)
        assert f.read(10) == b""  # like a file: reading at or past EOF gives nothing
    with vmdk.open(disk) as f:
        assert f.read_at(SIZE - 1, 1) == pattern(SIZE, seed=1, block=CLUSTER)[-1:]


def test_writes_on_read_only_open_raise(disk: Path) -> None:
    before = disk.read_bytes()
    with vmdk.open(disk) as f:
        assert not f.writable()
        with pytest.raises(vmdk.ReadOnlyError):
            f.write(b"x")
        with pytest.raises(vmdk.ReadOnlyError):
            f.write_at(0, b"x")
        with pytest.raises(vmdk.ReadOnlyError):
            f.write_zeroes_at(0, 4096)
        assert isinstance(vmdk.ReadOnlyError("x"), PermissionError)
    assert disk.read_bytes() == before


def test_seek_tell_readinto_like_a_file(disk: Path) -> None:
    content = pattern(SIZE, seed=1, block=CLUSTER)
    with vmdk.open(disk) as f:
        assert isinstance(f, io.RawIOBase) and f.readable() and f.seekable()
        assert f.tell() == 0
        assert f.seek(100) == 100 and f.read(5) == content[100:105] and f.tell() == 105
        assert f.seek(10, os.SEEK_CUR) == 115
        assert f.seek(-7, os.SEEK_END) == SIZE - 7
        assert f.read() == content[-7:] and f.tell() == SIZE
        f.seek(4000)
        buf = bytearray(200)
        assert f.readinto(buf) == 200 and bytes(buf) == content[4000:4200]
        f.seek(SIZE - 50)
        assert f.readinto(buf) == 50 and bytes(buf[:50]) == content[-50:]
        assert f.readinto(buf) == 0
        with pytest.raises(ValueError):
            f.seek(-1)
        f.seek(0)
        assert io.BufferedReader(f, 8192).read(9000) == content[:9000]  # type: ignore[arg-type]
    assert f.closed
    with pytest.raises(ValueError):
        f.read(1)


def test_cid_changes_on_first_write_only(disk: Path, tmp_path: Path) -> None:
    with vmdk.open(disk) as f:
        cid = f.image.cid
    before = disk.read_bytes()
    with vmdk.open(disk, "r+"):
        pass
    assert disk.read_bytes() == before
    with vmdk.open(disk, "r+") as f:
        f.write_at(0, b"new")
        first = f.image.cid
        assert first != cid
        f.write_at(10, b"again")
        assert f.image.cid == first
    with vmdk.open(disk) as f:
        assert f.image.cid == first


def test_open_close_leaves_flat_descriptor_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "flat.vmdk"
    vmdk.create(path, SIZE, subformat="monolithicFlat").close()
    before = path.read_bytes()
    stat = os.stat(path)
    with vmdk.open(path, "r+"):
        pass
    assert path.read_bytes() == before
    assert os.stat(path).st_ino == stat.st_ino  # not even rewritten in place of itself


def test_flush_persists_for_a_second_reader(disk: Path) -> None:
    with vmdk.open(disk, "r+") as w:
        w.write_at(3 * CLUSTER + 1, b"flushed")
        w.write_at(SIZE - 2 * CLUSTER, b"\x01" * CLUSTER)
        w.flush()
        # The writer holds the image's write lock; a reader has to ask to share it.
        with pytest.raises(vmdk.ImageInUseError):
            vmdk.open(disk)
        with vmdk.open(disk, force_share=True) as r:
            assert r.read_at(3 * CLUSTER + 1, 7) == b"flushed"
            assert r.read_at(SIZE - 2 * CLUSTER, CLUSTER) == b"\x01" * CLUSTER
            assert r.image.cid == w.image.cid


# -- chains ------------------------------------------------------------------------------------


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, bytes]:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    content = pattern(SIZE, seed=4, zero_every=0, block=CLUSTER)
    with vmdk.create(base, SIZE, cluster_size=CLUSTER) as f:
        f.write(content)
    vmdk.create(child, parent=base, cluster_size=CLUSTER).close()
    return base, child, content


def test_child_reads_fall_through_to_parent(chain: tuple[Path, Path, bytes]) -> None:
    _base, child, content = chain
    with vmdk.open(child) as f:
        assert f.size == SIZE
        assert f.read() == content
        assert f.image.parent is not None
        assert all(r.depth == 1 for r in f.map())


def test_partial_grain_write_keeps_parent_bytes(chain: tuple[Path, Path, bytes]) -> None:
    base, child, content = chain
    model = bytearray(content)
    with vmdk.open(child, "r+") as f:
        f.write_at(CLUSTER + 100, b"\xff" * 10)
        model[CLUSTER + 100:CLUSTER + 110] = b"\xff" * 10
        f.write_at(5 * CLUSTER - 3, b"\xee" * 6)  # straddles two grains
        model[5 * CLUSTER - 3:5 * CLUSTER + 3] = b"\xee" * 6
        f.write_zeroes_at(8 * CLUSTER, CLUSTER)  # a whole grain zeroed over parent data
        model[8 * CLUSTER:9 * CLUSTER] = bytes(CLUSTER)
        assert f.read_at(0, SIZE) == bytes(model)
    with vmdk.open(child) as f:
        assert f.read_at(0, SIZE) == bytes(model)
    with vmdk.open(base) as f:
        assert f.read_at(0, SIZE) == content


def test_parent_cid_mismatch(chain: tuple[Path, Path, bytes]) -> None:
    base, child, _content = chain
    with vmdk.open(base, "r+") as f:
        f.write_at(0, b"changed")  # the parent's CID changes
    with pytest.raises(vmdk.ChainError) as exc:
        vmdk.open(child)
    assert "child.vmdk" in str(exc.value)
    with vmdk.open(child, ignore_cid=True) as f:
        assert f.read_at(0, 7) == b"changed"


def test_chain_loop(tmp_path: Path) -> None:
    for name, other, cid, pcid in (("a", "b", 0xAAAA, 0xBBBB), ("b", "a", 0xBBBB, 0xAAAA)):
        with open(tmp_path / f"{name}-flat.vmdk", "wb") as f:
            f.truncate(SIZE)
        (tmp_path / f"{name}.vmdk").write_text(descriptor_text(
            "monolithicFlat", [f'RW {SIZE // 512} FLAT "{name}-flat.vmdk" 0'], cid=cid,
            parent_cid=pcid, hint=f"{other}.vmdk"))
    with pytest.raises(vmdk.ChainError):
        vmdk.open(tmp_path / "a.vmdk")
    with pytest.raises(vmdk.ChainError):
        vmdk.open(tmp_path / "b.vmdk", ignore_cid=True)


def test_self_parent_loop(tmp_path: Path) -> None:
    with open(tmp_path / "a-flat.vmdk", "wb") as f:
        f.truncate(SIZE)
    (tmp_path / "a.vmdk").write_text(descriptor_text(
        "monolithicFlat", [f'RW {SIZE // 512} FLAT "a-flat.vmdk" 0'], cid=5, parent_cid=5,
        hint="a.vmdk"))
    with pytest.raises(vmdk.ChainError):
        vmdk.open(tmp_path / "a.vmdk")


def test_parent_outside_the_folder(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    with vmdk.create(base, SIZE, cluster_size=CLUSTER) as f:
        f.write_at(0, b"parent")
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.vmdk"
    vmdk.create(child, parent=base, allow_external=True).close()
    with pytest.raises(vmdk.UnsafePathError) as exc:
        vmdk.open(child)
    assert "child.vmdk" in str(exc.value)
    with vmdk.open(child, allow_external=True) as f:
        assert f.read_at(0, 6) == b"parent"


def test_missing_parent(chain: tuple[Path, Path, bytes]) -> None:
    base, child, _ = chain
    base.unlink()
    with pytest.raises(vmdk.ChainError):
        vmdk.open(child)


def test_map_child_larger_than_parent(tmp_path: Path) -> None:
    base, child = tmp_path / "p.vmdk", tmp_path / "c.vmdk"
    with vmdk.create(base, 1 << 20) as f:
        f.write(b"\x07" * (1 << 20))
    with vmdk.create(child, 2 << 20, parent=base) as f:
        assert f.read_at((1 << 20) - 2, 4) == b"\x07\x07\0\0"
        check_map(f)
        f.write_at((1 << 20) - 2, b"abcd")  # the grain straddling the parent's end
        check_map(f)
    with vmdk.open(child) as f:
        assert f.read_at((1 << 20) - 4, 8) == b"\x07\x07abcd\0\0"
        assert f.read_at(3 << 19, 1 << 19) == bytes(1 << 19)
        check_map(f)
        assert f.map()[-1].start + f.map()[-1].length == 2 << 20


def test_write_zeroes_keeps_check_clean(tmp_path: Path) -> None:
    """Zeroing data through the API must not leave space our own check calls leaked."""
    from vmdk.check import check

    path = tmp_path / "z.vmdk"
    with vmdk.create(path, 4 << 20) as f:
        f.write_at(0, b"\x01" * (1 << 20))
        f.write_zeroes_at(0, 1 << 19)
        f.write_at(2 << 20, b"\x02" * 65536)
        f.write_at(2 << 20, bytes(65536))  # zeros written over an allocated grain
        assert f.read_at(0, 4 << 20) == bytes(1 << 19) + b"\x01" * (1 << 19) + bytes(3 << 20)
    result = check(path)
    assert result.exit_code == 0, result.problems


def test_write_changes_only_the_cid_line(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    vmdk.create(path, SIZE, subformat="monolithicFlat", comment="keep me").close()
    with open(path, "a") as f:
        f.write("# a comment VMware would keep\nddb.custom = \"x\"\n")
    before = path.read_text().splitlines()
    with vmdk.open(path, "r+") as f:
        f.write_at(0, b"data")
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after)
    assert len(changed) == 1 and changed[0][0].startswith("CID=") and changed[0][1].startswith("CID=")


def test_second_writer_is_refused(disk: Path) -> None:
    with vmdk.open(disk, "r+"), pytest.raises(vmdk.ImageInUseError):
        vmdk.open(disk, "r+")
    with vmdk.open(disk):
        with vmdk.open(disk):  # readers share
            pass
        with pytest.raises(vmdk.ImageInUseError):
            vmdk.open(disk, "r+")


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse", "vmfsSparse"])
def test_refused_writer_changes_nothing(tmp_path: Path, subformat: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """A second writer that is refused leaves the live writer's files (and unclean flag) alone."""
    if subformat == "vmfsSparse":
        vmdk.create(tmp_path / "base.vmdk", 4 << 20, subformat="vmfs").close()
        vmdk.create(tmp_path / "d.vmdk", subformat="vmfsSparse",
                    parent=tmp_path / "base.vmdk").close()
    else:
        vmdk.create(tmp_path / "d.vmdk", 4 << 20, subformat=subformat).close()
    files = sorted(p for p in tmp_path.iterdir() if p.name != "base.vmdk")
    with vmdk.open(tmp_path / "d.vmdk", "r+") as writer:
        writer.write_at(0, b"live")
        writer.flush()
        snapshot = {p: p.read_bytes() for p in files}
        for _ in range(2):
            with pytest.raises(vmdk.ImageInUseError):
                vmdk.open(tmp_path / "d.vmdk", "r+")
        with vmdk.open(tmp_path / "d.vmdk", force_share=True) as reader:
            assert reader.read_at(0, 4) == b"live"
        assert {p: p.read_bytes() for p in files} == snapshot
    # a writer still at work is "in use", not "not closed cleanly"
    assert not [r for r in caplog.records if "not closed cleanly" in r.getMessage()]


@pytest.mark.parametrize("shift", [0, 1, 16, 31, 48, 2048, 4095])
@pytest.mark.parametrize("file_offset", [0, 16, 4096 + 7])
def test_pread_exact_at_any_alignment(tmp_path: Path, shift: int, file_offset: int) -> None:
    """Reads bigger than the bounce buffer land intact wherever the caller's buffer sits."""
    from vmdk.extents.base import BOUNCE_SIZE, pread_exact

    data = pattern(3 * BOUNCE_SIZE + 12345, seed=5, zero_every=0)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    length = len(data) - file_offset + 999  # runs past the end: the rest reads as zeros
    area = bytearray(length + 8192)
    view = memoryview(area)[shift:shift + length]
    view[:] = b"\xee" * length
    fd = os.open(path, os.O_RDONLY)
    try:
        got = pread_exact(fd, view, file_offset, str(path))
    finally:
        os.close(fd)
    assert got == len(data) - file_offset
    assert view[:got] == data[file_offset:]
    assert view[got:] == bytes(999)


def test_open_disks_cannot_be_pickled_or_copied(disk: Path) -> None:
    """A copy would share file descriptors the original closes: refused, as for files."""
    import copy
    import pickle

    with vmdk.open(disk) as f:
        for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match="cannot pickle"):
                attempt(f)
            with pytest.raises(TypeError, match="cannot pickle"):
                attempt(f.image)


def test_closed_disk_behaves_like_a_closed_file(disk: Path) -> None:
    f = vmdk.open(disk, "r+")
    with pytest.raises(TypeError):
        f.seek(1.5)  # type: ignore[arg-type]
    f.close()
    for call in (lambda: f.read_at(0, 1), lambda: f.write_at(0, b"x"), f.map, f.info, f.flush,
                 lambda: f.readinto_at(0, bytearray(1)), lambda: f.write_zeroes_at(0, 512),
                 lambda: f.discard_at(0, 512)):
        with pytest.raises(ValueError, match="closed file"):
            call()


def test_failed_opens_leave_no_file_descriptors(tmp_path: Path) -> None:
    path = tmp_path / "u.vmdk"
    vmdk.create(path, 1 << 20).close()
    data = path.read_bytes().replace(b'createType="monolithicSparse"', b'createType="monolithicSpars2"')
    path.write_bytes(data)
    before = len(os.listdir("/proc/self/fd"))
    for mode in ("r", "r+") * 3:
        with pytest.raises(vmdk.UnsupportedFormatError, match="createType"):
            vmdk.open(path, mode)
    assert len(os.listdir("/proc/self/fd")) == before
