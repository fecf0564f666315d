"""convert: zero detection, raw holes, the kernel-copy path and its fallback."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vmdk
from vmdk.convert import RawSource, convert, nonzero_runs
from conftest import pattern

MiB = 1 << 20


def test_nonzero_runs_finds_blocks_and_tails() -> None:
    data = bytearray(10 * 4096 + 100)
    data[4096:4097] = b"x"
    data[3 * 4096:5 * 4096] = b"y" * 8192
    data[-1:] = b"z"
    assert nonzero_runs(memoryview(data), 4096) == [(4096, 4096), (3 * 4096, 8192),
                                                    (10 * 4096, 100)]
    assert nonzero_runs(memoryview(bytes(8192)), 4096) == []


@given(st.lists(st.sampled_from(["zero", "data", "last-byte", "first-byte"]), max_size=24),
       st.sampled_from([512, 4096, 32768, 65536]), st.integers(0, 700))
@settings(max_examples=150, deadline=None)
def test_nonzero_runs_matches_a_byte_by_byte_model(kinds: list[str], block: int,
                                                   tail: int) -> None:
    """Both ways of finding runs (numpy for small blocks, one compare a block for large
    ones, which stream and sparse outputs use without loading numpy) against the model."""
    data = bytearray(len(kinds) * block + tail)
    for i, kind in enumerate(kinds):
        at = i * block
        if kind == "data":
            data[at:at + block] = bytes(range(1, 256)) * (block // 255) + b"\1" * (block % 255)
        elif kind == "last-byte":
            data[at + block - 1] = 7
        elif kind == "first-byte":
            data[at] = 7
    if tail:
        data[-1] = 9
    pieces = [(at, min(block, len(data) - at)) for at in range(0, len(data), block)]
    stored = [(at, n) for at, n in pieces if any(data[at:at + n])]
    model: list[tuple[int, int]] = []
    for at, n in stored:
        if model and sum(model[-1]) == at:
            model[-1] = (model[-1][0], model[-1][1] + n)
        else:
            model.append((at, n))
    assert nonzero_runs(memoryview(data), block) == model


def test_raw_source_skips_holes(tmp_path: Path) -> None:
    path = tmp_path / "holes.raw"
    with open(path, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(b"d" * MiB)
    source = RawSource(str(path))
    try:
        spans = list(source.spans())
    finally:
        source.close()
    assert sum(s.length for s in spans) == 8 * MiB
    assert [(s.start, s.length) for s in spans if s.data] == [(3 * MiB, MiB)]


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_vmdk_to_raw_keeps_every_byte_and_the_holes(tmp_path: Path, kernel_copy: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = pattern(6 * MiB, seed=21)
    src = tmp_path / "src.vmdk"
    with vmdk.create(src, 6 * MiB) as disk:
        disk.write(data)
    if not kernel_copy:
        def refuse(*args: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    out = tmp_path / "out.raw"
    convert(src, out, out_format="raw")
    assert out.read_bytes() == data
    # Every third 64 KiB block of the pattern is zero and never stored: a hole in the output.
    assert os.stat(out).st_blocks * 512 < len(data)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_short_flat_extent_converts_with_zeros_past_its_end_when_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool) -> None:
    from vmdk import convert as convert_module

    monkeypatch.setattr(convert_module, "CHUNK", MiB)  # the short read lands in a used buffer
    if not kernel_copy:
        monkeypatch.setattr(os, "copy_file_range", _no_kernel_copy)
    src = tmp_path / "flat.vmdk"
    with vmdk.create(src, 4 * MiB, subformat="monolithicFlat") as disk:
        disk.write(b"\x77" * (4 * MiB))
    os.truncate(tmp_path / "flat-flat.vmdk", 3 * MiB + 100)
    out = tmp_path / "out.raw"
    with pytest.raises(vmdk.CorruptImageError, match="missing"):  # by default, as a cut copy
        convert(src, out, out_format="raw")
    convert(src, out, out_format="raw", missing_as_zeros=True)
    assert out.read_bytes() == b"\x77" * (3 * MiB + 100) + bytes(MiB - 100)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_sparse_grain_past_the_file_end_is_an_error_naming_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool) -> None:
    if not kernel_copy:
        monkeypatch.setattr(os, "copy_file_range", _no_kernel_copy)
    src = tmp_path / "cut.vmdk"
    with vmdk.create(src, 4 * MiB) as disk:
        disk.write(b"\x55" * (4 * MiB))
    os.truncate(src, os.path.getsize(src) - 70000)  # the last grain is cut
    with pytest.raises(vmdk.VmdkError, match="cut.vmdk"):
        convert(src, tmp_path / "out.raw", out_format="raw")


def _no_kernel_copy(*args: object) -> int:
    raise OSError(errno.EXDEV, "cross-device")


def test_raw_to_every_subformat_and_back(tmp_path: Path) -> None:
    data = pattern(3 * MiB + 512, seed=22)
    raw = tmp_path / "in.raw"
    raw.write_bytes(data)
    for subformat in ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
                      "twoGbMaxExtentFlat", "streamOptimized", "vmfs"):
        out = tmp_path / f"{subformat}.vmdk"
        convert(raw, out, subformat=subformat, durable=False)
        with vmdk.open(out) as disk:
            assert disk.read() == data, subformat
        back = tmp_path / f"{subformat}.raw"
        convert(out, back, out_format="raw")
        assert back.read_bytes() == data, subformat


def test_convert_refuses_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "a.vmdk"
    with vmdk.create(path, MiB):
        pass
    with pytest.raises(vmdk.VmdkError, match="same file"):
        convert(path, path)


def test_streams_through_pipes(tmp_path: Path) -> None:
    import subprocess
    import sys

    data = pattern(3 * MiB + 4096, seed=23)
    (tmp_path / "in.raw").write_bytes(data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    made = subprocess.run([sys.executable, "-m", "vmdk", "convert", "-o",
                           "subformat=streamOptimized", str(tmp_path / "in.raw"), "-"],
                          capture_output=True, env=env, timeout=120, check=True)
    assert made.stdout[:4] == b"KDMV"
    (tmp_path / "piped.vmdk").write_bytes(made.stdout)
    with vmdk.open(tmp_path / "piped.vmdk") as disk:
        assert disk.read() == data
    back = subprocess.run([sys.executable, "-m", "vmdk", "convert", "-O", "raw", "-",
                           str(tmp_path / "back.raw")], input=made.stdout, capture_output=True,
                          env=env, timeout=120)
    assert back.returncode == 0, back.stderr
    assert (tmp_path / "back.raw").read_bytes() == data
    refused = subprocess.run([sys.executable, "-m", "vmdk", "convert", str(tmp_path / "in.raw"),
                              "-"], capture_output=True, env=env, timeout=120)
    assert refused.returncode == 1 and b"streamOptimized" in refused.stderr


def test_convert_never_replaces_a_file_the_source_reads(tmp_path: Path) -> None:
    """A raw output onto the source's own extent (or a VMDK output whose sibling it is)."""
    src = tmp_path / "fl.vmdk"
    with vmdk.create(src, MiB, subformat="monolithicFlat") as d:
        d.write_at(0, b"precious")
    with pytest.raises(vmdk.VmdkError, match="reads from"):
        convert(src, tmp_path / "fl-flat.vmdk", out_format="raw")
    # a descriptor renamed away from its flat file: a VMDK output of the old name would
    # write a new b-flat.vmdk over the one the source reads
    with vmdk.create(tmp_path / "b.vmdk", MiB, subformat="monolithicFlat") as d:
        d.write_at(0, b"precious")
    os.rename(tmp_path / "b.vmdk", tmp_path / "a.vmdk")
    with pytest.raises(vmdk.VmdkError, match="reads from"):
        convert(tmp_path / "a.vmdk", tmp_path / "b.vmdk", subformat="monolithicFlat")
    with vmdk.open(tmp_path / "a.vmdk") as d:
        assert d.read_at(0, 8) == b"precious"
    with vmdk.open(src) as d:
        assert d.read_at(0, 8) == b"precious"


def test_convert_raw_output_honours_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "s.vmdk"
    vmdk.create(src, MiB).close()
    keep = tmp_path / "keep.raw"
    keep.write_bytes(b"KEEP ME" * 100)
    with pytest.raises(vmdk.VmdkError, match="exists"):
        convert(src, keep, out_format="raw", overwrite=False)
    assert keep.read_bytes() == b"KEEP ME" * 100


def test_other_formats_are_refused_not_copied_as_raw(tmp_path: Path) -> None:
    """A qcow2 (or VHDX, VDI...) would otherwise convert as its container's bytes."""
    qcow2 = tmp_path / "a.qcow2"
    qcow2.write_bytes(b"QFI\xfb\0\0\0\3" + bytes(4096))
    with pytest.raises(vmdk.UnsupportedFormatError, match="a.qcow2: a qcow2 image"):
        convert(qcow2, tmp_path / "a.vmdk")
    convert(qcow2, tmp_path / "b.vmdk", src_format="raw")  # asked for: its bytes as they are
    with vmdk.open(tmp_path / "b.vmdk") as d:
        assert d.read_at(0, 4) == b"QFI\xfb"
    vdi = tmp_path / "d.vdi"
    vdi.write_bytes(bytes(0x40) + b"\x7f\x10\xda\xbe" + bytes(4096))
    with pytest.raises(vmdk.UnsupportedFormatError, match="VDI"):
        convert(vdi, tmp_path / "d.vmdk")


def test_ova_detection_reads_one_header(tmp_path: Path) -> None:
    import tarfile

    from vmdk.ova import is_ova

    zeros = tmp_path / "zeros.ova"
    with open(zeros, "wb") as f:
        f.truncate(64 * MiB)  # all zeros: tarfile.is_tarfile would scan it all and say yes
    assert not is_ova(str(zeros))
    real = tmp_path / "pack.ova"
    (tmp_path / "x.ovf").write_text("<Envelope/>")
    with tarfile.open(real, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(tmp_path / "x.ovf", arcname="x.ovf")
    assert is_ova(str(real))
    assert not is_ova(str(tmp_path / "pack.raw"))


def test_raw_output_fails_on_a_grain_past_the_end_like_every_other_reader(tmp_path: Path) -> None:
    import struct

    src = tmp_path / "g.vmdk"
    with vmdk.create(src, 4 * MiB) as d:
        d.write(pattern(2 * MiB, seed=3, zero_every=0))
    with vmdk.open(src) as d:
        ext = d.image.extents[0]
        gt, rgt = int(ext.gd[0]), int(ext.rgd[0])
    with open(src, "r+b") as f:
        for table in (gt, rgt):
            f.seek(table * 512 + 10 * 4)
            f.write(struct.pack("<I", os.path.getsize(src) // 512 - 64))  # half past the end
    with pytest.raises(vmdk.CorruptImageError, match="past the end"):
        convert(src, tmp_path / "g.raw", out_format="raw")
    assert not (tmp_path / "g.raw").exists()


def test_raw_output_of_a_short_flat_file_reads_zeros_past_its_end_when_asked(tmp_path: Path) -> None:
    src = tmp_path / "f.vmdk"
    with vmdk.create(src, 4 * MiB, subformat="monolithicFlat") as d:
        d.write(b"\x77" * MiB)
    os.truncate(tmp_path / "f-flat.vmdk", MiB + 1000)  # shorter than the descriptor says
    convert(src, tmp_path / "f.raw", out_format="raw", missing_as_zeros=True)
    out = (tmp_path / "f.raw").read_bytes()
    assert out[:MiB] == b"\x77" * MiB and out[MiB:] == bytes(3 * MiB)


def test_sparse_size_zero_allocates_raw_output_fully(tmp_path: Path) -> None:
    """qemu-img's -S 0: no zero detection, and every block of a raw output allocated."""
    src = tmp_path / "s.vmdk"
    with vmdk.create(src, 4 * MiB) as d:
        d.write_at(MiB, b"x")
    convert(src, tmp_path / "full.raw", out_format="raw", sparse_size=0)
    convert(src, tmp_path / "holes.raw", out_format="raw")
    full, holes = (tmp_path / "full.raw").stat(), (tmp_path / "holes.raw").stat()
    assert full.st_blocks * 512 >= 4 * MiB > holes.st_blocks * 512
    assert (tmp_path / "full.raw").read_bytes() == (tmp_path / "holes.raw").read_bytes()


def test_recover_never_writes_over_its_source(tmp_path: Path) -> None:
    src = tmp_path / "st.vmdk"
    with vmdk.create(src, 4 * MiB, "streamOptimized") as s:
        s.write(b"Q" * MiB)
    before = src.read_bytes()
    for fmt in ("raw", "vmdk"):
        with pytest.raises(vmdk.VmdkError, match="same file"):
            convert(src, src, out_format=fmt, recover=True)
    assert src.read_bytes() == before


def test_ovf_style_names_are_not_taken_for_extents(tmp_path: Path) -> None:
    """ubuntu-disk1.vmdk is not an extent a monolithicSparse ubuntu.vmdk would write."""
    src = tmp_path / "ubuntu-disk1.vmdk"
    with vmdk.create(src, MiB) as d:
        d.write(b"data")
    convert(src, tmp_path / "ubuntu.vmdk")
    vmdk.create(tmp_path / "ubuntu2.vmdk", parent=src).close()


def test_full_allocation_without_fallocate_writes_the_holes(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """-S 0 allocates a raw output fully; where the file system has no fallocate, the
    holes are written as zeros, and the bytes stay what they were."""
    import errno as errno_

    from vmdk import convert as convert_module

    path = tmp_path / "out.raw"
    with open(path, "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"data" * 1024)
    before = path.read_bytes()

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno_.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    fd = os.open(path, os.O_RDWR)
    try:
        convert_module._allocate_all(fd, 3 << 20)
    finally:
        os.close(fd)
    assert path.read_bytes() == before
    assert os.stat(path).st_blocks * 512 >= 3 << 20  # every hole has its blocks now
