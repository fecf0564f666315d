"""vmdk measure: the bytes of files a conversion or creation makes, checked against the files
that convert and create really make, and against qemu-img measure for raw outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import vmdk
from conftest import pattern, run
from vmdk.chain import snapshot
from vmdk.cli import main
from vmdk.convert import convert
from vmdk.create import image_files
from vmdk.image import Image
from vmdk.measure import MEASURED_SUBFORMATS, measure

KiB, MiB = 1 << 10, 1 << 20
#: Not a whole number of grains: the last grain of the disk is a partial one.
SIZE = 5 * MiB + 3 * 512
SPARSE_KINDS = [s for s in MEASURED_SUBFORMATS if s != "streamOptimized"]


def files_length(path: Path) -> int:
    """What ``du --apparent-size -b`` counts for the image: every file's length, once."""
    with Image.open(path) as image:
        files = {os.path.realpath(f) for f in image_files(image)}
    return sum(os.path.getsize(f) for f in files)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A raw disk with data in a few places, some not grain-aligned, and holes between."""
    path = tmp_path / "source.raw"
    data = pattern(SIZE, seed=7, block=12 * KiB)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for start, end in ((4 * KiB, 8 * KiB), (200_000, 900_000), (3 * MiB + 5, 3 * MiB + 70_000),
                           (SIZE - 1000, SIZE)):
            f.seek(start)
            f.write(data[start:end])
    return path


@pytest.mark.parametrize("subformat", SPARSE_KINDS)
def test_create_sizes_are_exact(tmp_path: Path, subformat: str) -> None:
    got = measure(size=SIZE, subformat=subformat, target="new.vmdk", adapter_type="lsilogic",
                  comment="a comment makes the descriptor longer")
    target = tmp_path / "new.vmdk"
    vmdk.create(target, SIZE, subformat, adapter_type="lsilogic",
                comment="a comment makes the descriptor longer").close()
    assert got.required == files_length(target)


@pytest.mark.parametrize("subformat", SPARSE_KINDS)
@pytest.mark.parametrize("cluster", [64 * KiB, 16 * KiB])
def test_convert_sizes_are_exact(tmp_path: Path, source: Path, subformat: str,
                                 cluster: int) -> None:
    got = measure(source, subformat=subformat, target="out.vmdk", cluster_size=cluster)
    convert(source, tmp_path / "out.vmdk", subformat=subformat, cluster_size=cluster)
    assert got.required == files_length(tmp_path / "out.vmdk")


@pytest.mark.parametrize("subformat", SPARSE_KINDS)
def test_fully_allocated_is_every_byte_stored(tmp_path: Path, subformat: str) -> None:
    full = tmp_path / "full.raw"
    full.write_bytes(os.urandom(SIZE))
    got = measure(full, subformat=subformat, target="out.vmdk")
    convert(full, tmp_path / "out.vmdk", subformat=subformat)
    assert got.required == got.fully_allocated == files_length(tmp_path / "out.vmdk")
    assert measure(size=SIZE, subformat=subformat, target="out.vmdk").fully_allocated == \
        got.fully_allocated


def test_split_images_count_each_extent(tmp_path: Path) -> None:
    """Two extents of 2047 MiB and a third one: each has its own overhead and grains."""
    size = 4095 * MiB + 4096
    target = tmp_path / "split.vmdk"
    with vmdk.create(target, size, "twoGbMaxExtentSparse") as disk:
        for offset in (0, 2047 * MiB - 100, 4095 * MiB):  # the second crosses an extent end
            disk.write_at(offset, b"\xff" * 4096)
    got = measure(target, subformat="twoGbMaxExtentSparse", target="again.vmdk")
    convert(target, tmp_path / "again.vmdk", subformat="twoGbMaxExtentSparse")
    assert got.required == files_length(tmp_path / "again.vmdk")
    assert got.required == files_length(target)  # writes of the same grains, the same file sizes


def test_snapshot_chains_are_measured_flattened(tmp_path: Path) -> None:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    with vmdk.create(base, SIZE) as disk:
        disk.write_at(0, pattern(MiB, seed=1))
    snapshot(base, child)
    with vmdk.open(child, "r+") as disk:
        disk.write_at(3 * MiB, pattern(MiB, seed=2))
        disk.write_at(0, bytes(64 * KiB))  # zeros over data: no grain for them
    got = measure(child, target="flat.vmdk")
    convert(child, tmp_path / "flat.vmdk")
    assert got.required == files_length(tmp_path / "flat.vmdk")


def test_stream_required_is_an_upper_bound(tmp_path: Path, source: Path) -> None:
    got = measure(source, subformat="streamOptimized", target="s.vmdk", compression_level=0)
    convert(source, tmp_path / "s.vmdk", subformat="streamOptimized", compression_level=0)
    assert files_length(tmp_path / "s.vmdk") <= got.required
    # Random grains do not compress; ISA-L's level 0 would make them larger still.
    full = tmp_path / "random.raw"
    full.write_bytes(os.urandom(SIZE))
    for level in (0, 1, 9):
        got = measure(full, subformat="streamOptimized", target="r.vmdk",
                      compression_level=level)
        convert(full, tmp_path / "r.vmdk", subformat="streamOptimized", compression_level=level,
                overwrite=True)
        assert files_length(tmp_path / "r.vmdk") <= got.required <= got.fully_allocated


def test_stream_without_data_is_exact(tmp_path: Path) -> None:
    empty = tmp_path / "zeros.raw"
    empty.write_bytes(bytes(SIZE))
    got = measure(empty, subformat="streamOptimized", target="s.vmdk")
    convert(empty, tmp_path / "s.vmdk", subformat="streamOptimized")
    assert got.required == files_length(tmp_path / "s.vmdk")
    assert got.required == measure(size=SIZE, subformat="streamOptimized",
                                   target="s.vmdk").required


def test_raw_output_is_the_disk_length(tmp_path: Path, source: Path) -> None:
    got = measure(source, out_format="raw")
    convert(source, tmp_path / "out.raw", out_format="raw")
    assert got.required == got.fully_allocated == os.path.getsize(tmp_path / "out.raw")


@pytest.mark.parametrize("args", [["--size", "10G"], ["--size", "1000"], ["-f", "raw", "SOURCE"],
                                  ["-f", "vmdk", "IMAGE"]])
def test_raw_output_agrees_with_qemu_img(qemu_img: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         args: list[str]) -> None:
    raw = tmp_path / "source.raw"
    raw.write_bytes(pattern(2 * MiB, seed=3))
    image = tmp_path / "image.vmdk"
    convert(raw, image)
    args = [{"SOURCE": str(raw), "IMAGE": str(image)}.get(a, a) for a in args]
    for output in ("human", "json"):
        assert main(["measure", f"--output={output}", "-O", "raw", *args]) == 0
        ours = capsys.readouterr().out
        theirs = run(qemu_img, "measure", f"--output={output}", "-O", "raw", *args).stdout
        assert ours == theirs


def test_cli_prints_qemu_img_keys(tmp_path: Path, source: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", "--output=json", "-o", "subformat=twoGbMaxExtentSparse",
                 "--target", "t.vmdk", str(source)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["required", "fully-allocated"]
    assert printed["required"] == measure(source, subformat="twoGbMaxExtentSparse",
                                          target="t.vmdk").required
    assert main(["measure", "--size", "1G", "-o", "subformat=monolithicFlat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("required size: 10737") and lines[1].startswith(
        "fully allocated size: 10737")


@pytest.mark.parametrize("argv, words", [
    (["measure"], "either --size"),
    (["measure", "--size", "1G", "SOURCE"], "either --size"),
    (["measure", "--size", "1G", "-o", "subformat=vmfsSparse"], "measure knows the subformats"),
    (["measure", "--size", "1G", "-o", "backing_file=x.vmdk"], "does not apply to measure"),
    (["measure", "--size", "1G", "-o", "preallocation=full"], "preallocation applies to flat"),
    (["measure", "--size", "1G", "-o", "cluster_size=3000"], "cluster size"),
])
def test_cli_refusals(source: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                      words: str) -> None:
    argv = [str(source) if a == "SOURCE" else a for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmdk: error: ") and words in err, err
