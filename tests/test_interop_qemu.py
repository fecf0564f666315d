"""Interoperability with qemu-img / qemu-io: each side reads, checks and extends what the other wrote."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmdk
from conftest import pattern, run
from vmdk.convert import convert

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 3 * MiB + 64 * 1024  # a few MiB, not a multiple of a GT's coverage
QEMU_SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                   "twoGbMaxExtentFlat", "streamOptimized"]
WRITABLE = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
            "vmfs"]
SPARSE_KINDS = {"monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized"}


@pytest.fixture
def qemu_io(qemu_img: str) -> str:
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io is not installed")
    return "qemu-io"


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "pattern.raw"
    path.write_bytes(pattern(SIZE, seed=11))
    return path


def intervals(runs: list[dict], key: str) -> list[tuple[int, int]]:
    """Merged [start, end) ranges of the map entries whose ``key`` is true."""
    out: list[tuple[int, int]] = []
    for r in runs:
        if not r.get(key):
            continue
        start, end = r["start"], r["start"] + r["length"]
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def qemu_map(qemu_img: str, path: Path) -> list[dict]:
    return json.loads(run(qemu_img, "map", "-f", "vmdk", "--output=json", path).stdout)


def our_map(path: Path) -> list[dict]:
    with vmdk.open(path) as f:
        return [r.to_json() for r in f.map()]


def qemu_compare(qemu_img: str, image: Path, expected: Path) -> None:
    res = run(qemu_img, "compare", "-f", "vmdk", "-F", "raw", image, expected, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def qemu_check(qemu_img: str, image: Path, subformat: str) -> None:
    res = run(qemu_img, "check", "-f", "vmdk", image, check=False)
    if subformat in SPARSE_KINDS:
        assert res.returncode == 0, res.stdout + res.stderr
    else:  # qemu has no checks for flat images: 63 "not supported"
        assert res.returncode in (0, 63), res.stdout + res.stderr


def random_writes(f: vmdk.VmdkFile, model: bytearray, seed: int, count: int = 30) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        off = rng.randrange(0, SIZE)
        n = min(rng.choice([1, 511, 4096, 65536, 65536 * 3 + 17]), SIZE - off)
        if rng.random() < 0.2:
            f.write_zeroes_at(off, n)
            model[off:off + n] = bytes(n)
        else:
            data = rng.randbytes(n)
            f.write_at(off, data)
            model[off:off + n] = data


# -- (a) images qemu-img makes, read here -------------------------------------------------------


@pytest.mark.parametrize("subformat,options", [(s, f"subformat={s}") for s in QEMU_SUBFORMATS]
                         + [("monolithicSparse", "subformat=monolithicSparse,zeroed_grain=on")],
                         ids=QEMU_SUBFORMATS + ["zeroed_grain"])
def test_read_qemu_images(qemu_img: str, raw: Path, tmp_path: Path, subformat: str,
                          options: str) -> None:
    out = tmp_path / "out.vmdk"
    run(qemu_img, "convert", "-f", "raw", "-O", "vmdk", "-o", options, raw, out)
    with vmdk.open(out) as f:
        assert f.size == SIZE
        assert f.image.create_type == subformat
        assert f.read() == raw.read_bytes()
    theirs, ours = qemu_map(qemu_img, out), our_map(out)
    assert intervals(ours, "data") == intervals(theirs, "data")
    assert ours[-1]["start"] + ours[-1]["length"] == SIZE
    if subformat in SPARSE_KINDS:
        assert intervals(ours, "present") == intervals(theirs, "present")
        # Where qemu gives host offsets, ours agree.
        their_offsets = {(r["start"], r.get("offset")) for r in theirs if r["data"]}
        our_offsets = {(r["start"], r.get("offset")) for r in ours if r["data"]}
        if all(o is not None for _, o in their_offsets):
            for start, off in their_offsets:
                assert any(s <= start and o is not None for s, o in our_offsets)


def test_read_qemu_zeroed_grains(qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    """Grains qemu marks zero (GTE 1) read as zeros and map as zero, not data."""
    path = tmp_path / "z.vmdk"
    run(qemu_img, "create", "-f", "vmdk", "-o", "zeroed_grain=on", path, str(SIZE))
    run(qemu_io, "-f", "vmdk", "-c", "write -P 0x33 0 1M", "-c", "write -z 64k 128k", path)
    with vmdk.open(path) as f:
        data = f.read_at(0, MiB)
    assert data == b"\x33" * 65536 + bytes(131072) + b"\x33" * (MiB - 196608)
    theirs, ours = qemu_map(qemu_img, path), our_map(path)
    assert intervals(ours, "data") == intervals(theirs, "data")
    assert intervals(ours, "zero") == intervals(theirs, "zero")


# -- (b) images made here, checked by qemu ------------------------------------------------------


@pytest.mark.parametrize("subformat", WRITABLE)
def test_our_images_pass_qemu_check_and_compare(qemu_img: str, tmp_path: Path,
                                                subformat: str) -> None:
    path = tmp_path / "ours.vmdk"
    model = bytearray(SIZE)
    with vmdk.create(path, SIZE, subformat=subformat) as f:
        random_writes(f, model, seed=hash(subformat) & 0xFFFF)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    qemu_check(qemu_img, path, subformat)
    qemu_compare(qemu_img, path, expected)
    # Reopened and written again (grains now partly allocated).
    with vmdk.open(path, "r+") as f:
        random_writes(f, model, seed=7)
    expected.write_bytes(model)
    qemu_check(qemu_img, path, subformat)
    qemu_compare(qemu_img, path, expected)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse"])
def test_odd_sized_image_passes_qemu(qemu_img: str, qemu_io: str, tmp_path: Path,
                                     subformat: str) -> None:
    """Capacity not a grain multiple: the last grain is partial."""
    size = 2 * MiB + 7 * 512
    path = tmp_path / "odd.vmdk"
    model = bytearray(size)
    with vmdk.create(path, size, subformat=subformat) as f:
        f.write_at(size - 5000, b"\x5e" * 5000)
        f.write_at(100, b"\x11" * 300)
    model[size - 5000:] = b"\x5e" * 5000
    model[100:400] = b"\x11" * 300
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    qemu_check(qemu_img, path, subformat)
    qemu_compare(qemu_img, path, expected)
    run(qemu_io, "-f", "vmdk", "-c", f"write -P 0x77 {size - 512} 512", path)
    model[size - 512:] = b"\x77" * 512
    with vmdk.open(path) as f:
        assert f.size == size and f.read() == bytes(model)


def test_grain_table_allocated_here_reads_in_qemu(qemu_img: str, tmp_path: Path) -> None:
    """A GD entry of 0 (no grain table) gets a table at the end of the file when written."""
    import struct

    from vmdk._structs import SparseHeader

    size = 96 * MiB  # three grain tables of 32 MiB
    path = tmp_path / "gd.vmdk"
    vmdk.create(path, size).close()
    h = SparseHeader.unpack(path.read_bytes()[:512])
    with open(path, "r+b") as f:
        for sector in (h.gd_offset, h.rgd_offset):
            f.seek(sector * 512 + 4)
            f.write(struct.pack("<I", 0))
    model = {40 * MiB + 3: b"in the new table", 70 * MiB: b"\x99" * 70000}
    with vmdk.open(path, "r+") as f:
        for off, data in model.items():
            f.write_at(off, data)
    qemu_check(qemu_img, path, "monolithicSparse")
    out = tmp_path / "out.raw"
    run(qemu_img, "convert", "-f", "vmdk", "-O", "raw", path, out)
    with open(out, "rb") as f:
        for off, data in model.items():
            f.seek(off)
            assert f.read(len(data)) == data
    assert os.path.getsize(out) == size


def test_our_zeroed_grain_image_passes_qemu(qemu_img: str, tmp_path: Path) -> None:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    content = pattern(SIZE, seed=12, zero_every=0)
    with vmdk.create(base, SIZE) as f:
        f.write(content)
    model = bytearray(content)
    with vmdk.create(child, parent=base, zeroed_grain=True) as f:
        f.write_zeroes_at(65536, 4 * 65536)
        model[65536:5 * 65536] = bytes(4 * 65536)
        f.write_at(10 * 65536, bytes(65536))
        model[10 * 65536:11 * 65536] = bytes(65536)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    qemu_check(qemu_img, child, "monolithicSparse")
    qemu_compare(qemu_img, child, expected)


def test_our_stream_optimized_passes_qemu(qemu_img: str, raw: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    with vmdk.create(path, SIZE, subformat="streamOptimized") as f:
        f.write(raw.read_bytes())
    qemu_check(qemu_img, path, "streamOptimized")
    qemu_compare(qemu_img, path, raw)


# -- (c) convert, compared by qemu --------------------------------------------------------------


@pytest.mark.parametrize("subformat", WRITABLE + ["streamOptimized"])
def test_convert_raw_to_vmdk_and_back(qemu_img: str, raw: Path, tmp_path: Path,
                                      subformat: str) -> None:
    out = tmp_path / "conv.vmdk"
    convert(raw, out, src_format="raw", subformat=subformat)
    qemu_check(qemu_img, out, subformat)
    qemu_compare(qemu_img, out, raw)
    back = tmp_path / "back.raw"
    convert(out, back, out_format="raw")
    assert back.read_bytes() == raw.read_bytes()
    res = run(qemu_img, "compare", "-f", "raw", "-F", "raw", back, raw, check=False)
    assert res.returncode == 0, res.stdout


def test_convert_qemu_chain_to_raw(qemu_img: str, qemu_io: str, raw: Path,
                                   tmp_path: Path) -> None:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    run(qemu_img, "convert", "-f", "raw", "-O", "vmdk", raw, base)
    run(qemu_img, "create", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    run(qemu_io, "-f", "vmdk", "-c", "write -P 0x5a 1M 64k", child)
    flat = tmp_path / "flat.raw"
    convert(child, flat, out_format="raw")
    expected = tmp_path / "expected.raw"
    run(qemu_img, "convert", "-f", "vmdk", "-O", "raw", child, expected)
    assert flat.read_bytes() == expected.read_bytes()


# -- (d) snapshot chains ------------------------------------------------------------------------


def test_read_qemu_chain(qemu_img: str, qemu_io: str, raw: Path, tmp_path: Path) -> None:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    run(qemu_img, "convert", "-f", "raw", "-O", "vmdk", raw, base)
    run(qemu_img, "create", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    run(qemu_io, "-f", "vmdk", "-c", "write -P 0x5a 1M 64k", "-c", "write -P 0x6b 2000000 3000",
        child)
    expected = tmp_path / "expected.raw"
    run(qemu_img, "convert", "-f", "vmdk", "-O", "raw", child, expected)
    with vmdk.open(child) as f:
        assert f.image.parent is not None
        assert f.read() == expected.read_bytes()
    theirs, ours = qemu_map(qemu_img, child), our_map(child)
    assert intervals(ours, "data") == intervals(theirs, "data")
    depth0 = [(r["start"], r["length"]) for r in ours if r["depth"] == 0 and r["data"]]
    assert depth0 == [(r["start"], r["length"]) for r in theirs if r["depth"] == 0 and r["data"]]


def test_qemu_reads_our_chain(qemu_img: str, raw: Path, tmp_path: Path) -> None:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    model = bytearray(raw.read_bytes())
    with vmdk.create(base, SIZE) as f:
        f.write(model)
    with vmdk.create(child, parent=base) as f:
        random_writes(f, model, seed=3)
        f.write_at(65536 + 1000, b"partial grain over parent data")
        model[65536 + 1000:65536 + 1030] = b"partial grain over parent data"
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    info = json.loads(run(qemu_img, "info", "--output=json", child).stdout)
    assert info["backing-filename"] == "base.vmdk"
    qemu_check(qemu_img, child, "monolithicSparse")
    qemu_compare(qemu_img, child, expected)


def test_map_child_larger_than_parent_matches_qemu(qemu_img: str, tmp_path: Path) -> None:
    base, child = tmp_path / "p.vmdk", tmp_path / "c.vmdk"
    with vmdk.create(base, MiB) as f:
        f.write(b"\x07" * MiB)
    with vmdk.create(child, 2 * MiB, parent=base) as f:
        f.write_at(MiB - 2, b"abcd")
    theirs = qemu_map(qemu_img, child)
    ours = our_map(child)
    keys = ("start", "length", "depth", "present", "zero", "data")
    assert [{k: r[k] for k in keys} for r in ours] == [{k: r[k] for k in keys} for r in theirs]


def test_qemu_child_of_our_base(qemu_img: str, qemu_io: str, raw: Path, tmp_path: Path) -> None:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    with vmdk.create(base, SIZE, subformat="twoGbMaxExtentSparse") as f:
        f.write(raw.read_bytes())
    run(qemu_img, "create", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    run(qemu_io, "-f", "vmdk", "-c", "write -P 0x5a 100k 64k", child)
    model = bytearray(raw.read_bytes())
    model[100 * 1024:164 * 1024] = b"\x5a" * 65536
    with vmdk.open(child) as f:
        assert f.read() == bytes(model)


# -- (e) written alternately by both sides ------------------------------------------------------


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse",
                                       "monolithicFlat"])
def test_ours_then_qemu_io_then_ours(qemu_img: str, qemu_io: str, tmp_path: Path,
                                     subformat: str) -> None:
    path = tmp_path / "mixed.vmdk"
    model = bytearray(SIZE)
    with vmdk.create(path, SIZE, subformat=subformat) as f:
        random_writes(f, model, seed=21, count=15)
    run(qemu_io, "-f", "vmdk", "-c", "write -P 0xa1 0 70000", "-c", "write -P 0xb2 2M 1M",
        "-c", "write -P 0xc3 3100000 10000", path)
    model[0:70000] = b"\xa1" * 70000
    model[2 * MiB:3 * MiB] = b"\xb2" * MiB
    model[3100000:3110000] = b"\xc3" * 10000
    with vmdk.open(path) as f:
        assert f.read() == bytes(model)
    with vmdk.open(path, "r+") as f:
        random_writes(f, model, seed=22, count=15)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    qemu_check(qemu_img, path, subformat)
    qemu_compare(qemu_img, path, expected)


def test_qemu_image_written_here(qemu_img: str, raw: Path, tmp_path: Path) -> None:
    for subformat in ("monolithicSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        path = tmp_path / f"{subformat}.vmdk"
        run(qemu_img, "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
            raw, path)
        model = bytearray(raw.read_bytes())
        with vmdk.open(path, "r+") as f:
            random_writes(f, model, seed=31)
        expected = tmp_path / "expected.raw"
        expected.write_bytes(model)
        qemu_check(qemu_img, path, subformat)
        qemu_compare(qemu_img, path, expected)
        info = json.loads(run(qemu_img, "info", "--output=json", path).stdout)
        assert info["virtual-size"] == SIZE
        assert not info.get("dirty-flag", False)
        assert os.path.getsize(path) > 0


# -- locking: the same bytes as qemu ------------------------------------------------------------


def qemu_holds_write_lock(path: Path) -> bool:
    """Whether some process holds qemu's "write" permission lock (byte 101) on ``path``."""
    import fcntl
    import struct

    flock = struct.Struct("hhqqi4x")
    fd = os.open(path, os.O_RDONLY)
    try:
        out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, flock.pack(fcntl.F_WRLCK, os.SEEK_SET, 101, 1, 0))
    finally:
        os.close(fd)
    return flock.unpack(out)[0] != fcntl.F_UNLCK


def test_locks_seen_by_qemu_and_back(qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    path = tmp_path / "locked.vmdk"
    vmdk.create(path, SIZE).close()
    with vmdk.open(path, "r+"):
        res = run(qemu_io, "-f", "vmdk", "-c", "write 0 512", path, check=False)
        assert res.returncode != 0 and "lock" in (res.stdout + res.stderr)
    with vmdk.open(path):
        res = run(qemu_io, "-f", "vmdk", "-c", "write 0 512", path, check=False)
        assert res.returncode != 0 and "lock" in (res.stdout + res.stderr)
        assert run(qemu_img, "info", "-f", "vmdk", path, check=False).returncode == 0
    holder = subprocess.Popen([qemu_io, "-f", "vmdk", os.fspath(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not qemu_holds_write_lock(path):  # probe without taking a lock (no race)
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline, "qemu-io never took its lock"
            time.sleep(0.05)
        with pytest.raises(vmdk.ImageInUseError):
            vmdk.open(path, "r+")
        with pytest.raises(vmdk.ImageInUseError):
            vmdk.open(path)
        with vmdk.open(path, force_share=True) as f:
            assert f.size == SIZE
    finally:
        holder.communicate("quit\n", timeout=30)
    vmdk.open(path, "r+").close()


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentFlat", "twoGbMaxExtentSparse"])
def test_qemu_split_images_across_extent_boundaries(qemu_img: str, qemu_io: str, tmp_path: Path,
                                                    subformat: str) -> None:
    """qemu splits at 2048 MiB (VMware at 2047): both read across either side's boundaries."""
    size = 4608 * MiB
    path = tmp_path / "split.vmdk"
    run(qemu_img, "create", "-f", "vmdk", "-o", f"subformat={subformat}", path, str(size))
    qemu_edge, vmware_edge = 2048 * MiB, 2047 * MiB
    run(qemu_io, "-f", "vmdk", "-c", f"write -P 0x21 {qemu_edge - 3} 6", path)
    with vmdk.open(path, "r+") as f:
        assert f.size == size
        assert len(f.image.extents) == 3
        assert f.read_at(qemu_edge - 4, 8) == b"\0" + b"\x21" * 6 + b"\0"
        f.write_at(2 * qemu_edge - 70000, b"\x43" * 140000)
        f.write_at(vmware_edge - 1, b"\x44\x44")
    run(qemu_io, "-f", "vmdk", "-c", f"read -P 0x43 {2 * qemu_edge - 70000} 140000",
        "-c", f"read -P 0x44 {vmware_edge - 1} 2", "-c", f"read -P 0x21 {qemu_edge - 3} 6", path)
    qemu_check(qemu_img, path, subformat)


def test_descriptor_with_qemu_leftover_after_nul(qemu_img: str, qemu_io: str,
                                                  tmp_path: Path) -> None:
    """qemu rewrites a shorter CID in place and leaves the old text's tail after the NUL."""
    path = tmp_path / "flat.vmdk"
    run(qemu_img, "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", path, "1M")
    text = path.read_bytes().decode()
    path.write_text("\n".join("CID=0000000000000001" if line.startswith("CID=") else line
                               for line in text.split("\n")))
    run(qemu_io, "-f", "vmdk", "-c", "write -P 0x5a 0 512", path)
    head, _, tail = path.read_bytes().partition(b"\0")
    assert tail.strip(b"\0"), "qemu left no tail: the case this test guards is gone"
    with vmdk.open(path) as f:
        assert f.read_at(0, 512) == b"\x5a" * 512
        assert f.image.cid == int(head.split(b"CID=")[1].split(b"\n")[0], 16)


def test_write_here_into_qemu_child(qemu_img: str, raw: Path, tmp_path: Path) -> None:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    run(qemu_img, "convert", "-f", "raw", "-O", "vmdk", raw, base)
    run(qemu_img, "create", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    model = bytearray(raw.read_bytes())
    with vmdk.open(child, "r+") as f:
        random_writes(f, model, seed=41)
        f.write_at(65536 * 5 + 3, b"partial")  # completed from the parent
        model[65536 * 5 + 3:65536 * 5 + 10] = b"partial"
    expected = tmp_path / "expected.raw"
    expected.write_bytes(model)
    qemu_check(qemu_img, child, "monolithicSparse")
    qemu_compare(qemu_img, child, expected)
    with vmdk.open(base) as f:  # the parent is untouched
        assert f.read() == raw.read_bytes()


def test_qemu_writes_into_our_child(qemu_img: str, qemu_io: str, raw: Path,
                                    tmp_path: Path) -> None:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    with vmdk.create(base, SIZE, subformat="monolithicFlat") as f:
        f.write(raw.read_bytes())
    vmdk.create(child, parent=base).close()
    run(qemu_io, "-f", "vmdk", "-c", "write -P 0x66 1000 2000", "-c", "write -P 0x67 1M 64k",
        child)
    model = bytearray(raw.read_bytes())
    model[1000:3000] = b"\x66" * 2000
    model[MiB:MiB + 65536] = b"\x67" * 65536
    with vmdk.open(child) as f:
        assert f.read() == bytes(model)
        assert f.image.parent is not None


# -- random operation sequences, checked by the other side --------------------------------------

HSIZE = MiB + 3 * 65536 + 1024  # the last grain is partial
h_ops = st.lists(st.tuples(st.sampled_from(["write", "write", "zero"]), st.integers(0, HSIZE - 1),
                           st.sampled_from([1, 512, 4096, 65535, 65536, 65537, 200000]),
                           st.integers(1, 255)), min_size=1, max_size=8)


@pytest.mark.parametrize("kind", ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat",
                                  "child", "zeroed-child"])
# qemu_img is a constant (the tool's name): sharing it between examples is harmless.
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=h_ops)
def test_random_ops_here_read_by_qemu(qemu_img: str, kind: str,
                                      ops: list[tuple[str, int, int, int]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "img.vmdk"
        if kind in ("child", "zeroed-child"):
            base_content = pattern(HSIZE, seed=5, block=65536)
            with vmdk.create(folder / "base.vmdk", HSIZE) as f:
                f.write(base_content)
            model = bytearray(base_content)
            f = vmdk.create(path, parent=folder / "base.vmdk", zeroed_grain=kind == "zeroed-child")
        else:
            model = bytearray(HSIZE)
            f = vmdk.create(path, HSIZE, subformat=kind)
        with f:
            for name, off, n, byte in ops:
                n = min(n, HSIZE - off)
                if name == "zero":
                    f.write_zeroes_at(off, n)
                    model[off:off + n] = bytes(n)
                else:
                    f.write_at(off, bytes([byte]) * n)
                    model[off:off + n] = bytes([byte]) * n
        expected = folder / "expected.raw"
        expected.write_bytes(model)
        qemu_check(qemu_img, path, "monolithicFlat" if kind == "monolithicFlat"
                   else "monolithicSparse")
        qemu_compare(qemu_img, path, expected)


@pytest.mark.parametrize("kind", ["monolithicSparse", "twoGbMaxExtentSparse", "zeroed"])
# qemu_img is a constant (the tool's name): sharing it between examples is harmless.
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=h_ops)
def test_random_qemu_io_ops_read_here(qemu_img: str, kind: str,
                                      ops: list[tuple[str, int, int, int]]) -> None:
    import tempfile

    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.vmdk"
        opts = "zeroed_grain=on" if kind == "zeroed" else f"subformat={kind}"
        run(qemu_img, "create", "-f", "vmdk", "-o", opts, path, str(HSIZE))
        model = bytearray(HSIZE)
        cmds: list[str] = []
        for name, off, n, byte in ops:
            off, n = off // 512 * 512, max(512, n // 512 * 512)  # qemu-io wants sectors
            n = min(n, HSIZE - off)
            if name == "zero":
                cmds += ["-c", f"write -z {off} {n}"]
                model[off:off + n] = bytes(n)
            else:
                cmds += ["-c", f"write -P {byte} {off} {n}"]
                model[off:off + n] = bytes([byte]) * n
        run("qemu-io", "-f", "vmdk", *cmds, path)
        with vmdk.open(path) as f:
            assert f.read() == bytes(model)
            theirs, ours = qemu_map(qemu_img, path), [r.to_json() for r in f.map()]
        assert intervals(ours, "data") == intervals(theirs, "data")
