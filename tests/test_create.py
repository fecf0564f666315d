"""Tests for vmdk.create: files, descriptors as VMware writes them, options, and content."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import vmdk
from conftest import pattern
from vmdk._structs import SparseHeader

MiB = 1 << 20
SIZE = 3 * MiB


def descriptor_of(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:4] == b"KDMV":
        h = SparseHeader.unpack(raw[:512])
        raw = raw[h.descriptor_offset * 512:(h.descriptor_offset + h.descriptor_size) * 512]
        raw = raw.split(b"\0", 1)[0]
    return raw.decode()


def extent_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if re.match(r"(RW|RDONLY|NOACCESS) \d+ [A-Z]+", line)]


def create_type(text: str) -> str:
    m = re.search(r'^createType="([^"]+)"$', text, re.MULTILINE)
    assert m, text
    return m.group(1)


def ddb(text: str) -> dict[str, str]:
    return dict(re.findall(r'^(ddb\.[\w.]+) = "([^"]*)"$', text, re.MULTILINE))


# name, expected data files, expected extent lines (for a SIZE-byte disk)
S = SIZE // 512
LAYOUTS = {
    "monolithicSparse": ([], [f'RW {S} SPARSE "d.vmdk"']),
    "monolithicFlat": (["d-flat.vmdk"], [f'RW {S} FLAT "d-flat.vmdk" 0']),
    "twoGbMaxExtentSparse": (["d-s001.vmdk"], [f'RW {S} SPARSE "d-s001.vmdk"']),
    "twoGbMaxExtentFlat": (["d-f001.vmdk"], [f'RW {S} FLAT "d-f001.vmdk" 0']),
    "vmfs": (["d-flat.vmdk"], [f'RW {S} VMFS "d-flat.vmdk"']),
}


@pytest.mark.parametrize("subformat", list(LAYOUTS))
def test_subformat_files_descriptor_and_content(tmp_path: Path, subformat: str) -> None:
    path = tmp_path / "d.vmdk"
    data = pattern(SIZE, seed=3)
    with vmdk.create(path, SIZE, subformat=subformat) as f:
        assert f.size == SIZE
        assert f.read_at(0, SIZE) == bytes(SIZE)
        f.write(data)
    files, lines = LAYOUTS[subformat]
    assert sorted(os.listdir(tmp_path)) == sorted(["d.vmdk", *files])
    text = descriptor_of(path)
    assert text.startswith("# Disk DescriptorFile\nversion=1\nCID=")
    assert re.search(r"^parentCID=ffffffff$", text, re.MULTILINE)
    assert create_type(text) == subformat
    assert extent_lines(text) == lines
    assert "# Extent description" in text and "# The Disk Data Base\n#DDB" in text
    with vmdk.open(path) as f:
        assert f.image.create_type == subformat
        assert f.read() == data
    for name in files:
        if "flat" in name or "-f0" in name:
            assert (tmp_path / name).stat().st_size == SIZE


def test_stream_optimized_creates(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    data = pattern(SIZE, seed=4)
    with vmdk.create(path, SIZE, subformat="streamOptimized") as f:
        f.write(data)
    assert os.listdir(tmp_path) == ["s.vmdk"]
    text = descriptor_of(path)
    assert create_type(text) == "streamOptimized"
    assert extent_lines(text) == [f'RW {S} SPARSE "s.vmdk"']
    with vmdk.open(path) as f:
        assert f.read() == data


def test_size_rounded_up_to_a_sector(tmp_path: Path) -> None:
    with vmdk.create(tmp_path / "d.vmdk", 1000) as f:
        assert f.size == 1024
        f.write_at(1000, b"x" * 24)
    with vmdk.open(tmp_path / "d.vmdk") as f:
        assert f.size == 1024 and f.read_at(1000, 24) == b"x" * 24
    vmdk.create(tmp_path / "f.vmdk", 513, subformat="monolithicFlat").close()
    assert (tmp_path / "f-flat.vmdk").stat().st_size == 1024
    assert extent_lines(descriptor_of(tmp_path / "f.vmdk")) == ['RW 2 FLAT "f-flat.vmdk" 0']


@pytest.mark.parametrize("subformat,kind,letter", [("twoGbMaxExtentSparse", "SPARSE", "s"),
                                                   ("twoGbMaxExtentFlat", "FLAT", "f")])
def test_two_gb_split_at_2047_mib(tmp_path: Path, subformat: str, kind: str, letter: str) -> None:
    size = 4608 * MiB  # 4.5 GiB; flat parts are sparse files, sparse parts are small
    path = tmp_path / "big.vmdk"
    with vmdk.create(path, size, subformat=subformat) as f:
        assert f.size == size
        # Around the first split point, in one write.
        split = 4192256 * 512
        f.write_at(split - 3, b"abcdef")
        f.write_at(size - 4, b"tail")
    offset = " 0" if kind == "FLAT" else ""
    assert extent_lines(descriptor_of(path)) == [
        f'RW 4192256 {kind} "big-{letter}001.vmdk"{offset}',
        f'RW 4192256 {kind} "big-{letter}002.vmdk"{offset}',
        f'RW {size // 512 - 2 * 4192256} {kind} "big-{letter}003.vmdk"{offset}',
    ]
    assert sorted(os.listdir(tmp_path)) == [f"big-{letter}00{i}.vmdk" for i in (1, 2, 3)] + [
        "big.vmdk"]
    with vmdk.open(path) as f:
        assert f.read_at(split - 3, 6) == b"abcdef"
        assert f.read_at(size - 4, 4) == b"tail"
        assert len(f.image.extents) == 3


def test_full_device_over_a_file(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "img").mkdir()
    device = tmp_path / "dev" / "device.raw"  # outside the image's folder: named absolutely
    content = pattern(2 * MiB, seed=5)
    device.write_bytes(content)
    path = tmp_path / "img" / "full.vmdk"
    with vmdk.create(path, subformat="fullDevice", raw_device=os.fspath(device),
                     allow_external=True) as f:
        assert f.size == 2 * MiB
        assert f.read() == content
    text = descriptor_of(path)
    assert create_type(text) == "fullDevice"
    lines = extent_lines(text)
    assert len(lines) == 1
    assert re.fullmatch(rf'RW {2 * MiB // 512} FLAT "[^"]*device\.raw" 0', lines[0])
    with pytest.raises(vmdk.UnsafePathError):
        vmdk.open(path)
    with vmdk.open(path, allow_external=True) as f:
        assert f.read() == content


def test_raw_device_names_resolve_from_the_callers_folder(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative device means the file the caller sees, written so the descriptor finds it."""
    (tmp_path / "out").mkdir()
    (tmp_path / "disk.img").write_bytes(b"\x11" * MiB)
    (tmp_path / "out" / "disk.img").write_bytes(b"\x22" * MiB)  # a decoy next to the image
    monkeypatch.chdir(tmp_path)
    with vmdk.create("out/full.vmdk", subformat="fullDevice", raw_device="disk.img",
                     allow_external=True) as f:
        assert f.read_at(0, 4) == b"\x11" * 4
    with vmdk.open(tmp_path / "out" / "full.vmdk", allow_external=True) as f:
        assert f.read_at(0, 4) == b"\x11" * 4
    vmdk.create("beside.vmdk", subformat="fullDevice", raw_device="disk.img").close()
    assert '"disk.img"' in (tmp_path / "beside.vmdk").read_text()  # in its folder: relative
    with vmdk.open(tmp_path / "beside.vmdk") as f:  # and so no allow_external needed
        assert f.read_at(0, 4) == b"\x11" * 4


def test_full_device_needs_a_device(tmp_path: Path) -> None:
    with pytest.raises((ValueError, vmdk.VmdkError)):
        vmdk.create(tmp_path / "full.vmdk", MiB, subformat="fullDevice")


def test_partitioned_device(tmp_path: Path) -> None:
    device = tmp_path / "part.raw"
    dev_content = pattern(MiB, seed=6, zero_every=0)
    device.write_bytes(dev_content)
    mbr = b"\xeb\x3c\x90" + b"M" * 440 + b"\x55\xaa"
    path = tmp_path / "pd.vmdk"
    size = 2 * MiB
    ranges = [
        vmdk.RawRange(0, 4096, data=mbr),
        vmdk.RawRange(64 * 1024, 256 * 1024, device=os.fspath(device), device_offset=128 * 1024),
        vmdk.RawRange(512 * 1024, 64 * 1024),  # an explicit zero range
        vmdk.RawRange(1024 * 1024, 4096, data=b"GPT backup"),
    ]
    expected = bytearray(size)
    expected[0:len(mbr)] = mbr
    expected[64 * 1024:320 * 1024] = dev_content[128 * 1024:384 * 1024]
    expected[1024 * 1024:1024 * 1024 + 10] = b"GPT backup"
    with vmdk.create(path, size, subformat="partitionedDevice", partitions=ranges,
                     allow_external=True) as f:
        assert f.read() == bytes(expected)
    assert sorted(os.listdir(tmp_path)) == ["part.raw", "pd-pt.vmdk", "pd.vmdk"]
    assert (tmp_path / "pd-pt.vmdk").stat().st_size == 2 * 4096
    text = descriptor_of(path)
    assert create_type(text) == "partitionedDevice"
    lines = extent_lines(text)
    assert lines[0] == 'RW 8 FLAT "pd-pt.vmdk" 0'
    assert lines[1] == "RW 120 ZERO"
    assert re.fullmatch(r'RW 512 FLAT "[^"]*part\.raw" 256', lines[2])
    assert sum(int(line.split()[1]) for line in lines) == size // 512
    assert any(line == 'RW 8 FLAT "pd-pt.vmdk" 8' for line in lines)
    with vmdk.open(path, allow_external=True) as f:
        assert f.read() == bytes(expected)


def test_options_land_in_the_ddb(tmp_path: Path) -> None:
    path = tmp_path / "o.vmdk"
    vmdk.create(path, SIZE, adapter_type="lsilogic", hwversion="6", geometry=(100, 8, 32),
                comment="made by the tests").close()
    d = ddb(descriptor_of(path))
    assert d["ddb.adapterType"] == "lsilogic"
    assert d["ddb.virtualHWVersion"] == "6"
    assert (d["ddb.geometry.cylinders"], d["ddb.geometry.heads"],
            d["ddb.geometry.sectors"]) == ("100", "8", "32")
    assert d["ddb.comment"] == "made by the tests"
    with vmdk.open(path) as f:
        info = f.info()
        assert info["adapter-type"] == "lsilogic"
        assert info["hardware-version"] == "6"
        assert info["comment"] == "made by the tests"
        assert f.image.geometry == (100, 8, 32)


def test_default_ddb_as_qemu_writes_it(tmp_path: Path) -> None:
    path = tmp_path / "d.vmdk"
    vmdk.create(path, 100 * MiB, subformat="monolithicFlat").close()
    d = ddb(descriptor_of(path))
    assert d["ddb.adapterType"] == "ide"
    assert d["ddb.virtualHWVersion"] == "4"
    assert d["ddb.toolsVersion"] == "2147483647"
    assert (d["ddb.geometry.heads"], d["ddb.geometry.sectors"]) == ("16", "63")
    assert d["ddb.geometry.cylinders"] == str(100 * MiB // (16 * 63 * 512))
    vmdk.create(tmp_path / "s.vmdk", 100 * MiB, adapter_type="buslogic").close()
    assert ddb(descriptor_of(tmp_path / "s.vmdk"))["ddb.geometry.heads"] == "255"


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        vmdk.create(tmp_path / "a.vmdk", MiB, adapter_type="floppy")
    with pytest.raises(ValueError):
        vmdk.create(tmp_path / "b.vmdk", MiB, cluster_size=3000)
    with pytest.raises(vmdk.UnsupportedFormatError):
        vmdk.create(tmp_path / "c.vmdk", MiB, subformat="monolithicSpares")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("subformat", ["monolithicSparse", "monolithicFlat",
                                       "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_existing_files_refused_unless_overwrite(tmp_path: Path, subformat: str) -> None:
    path = tmp_path / "d.vmdk"
    with vmdk.create(path, MiB, subformat=subformat) as f:
        f.write_at(0, b"old")
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(FileExistsError):
        vmdk.create(path, MiB, subformat=subformat)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    with vmdk.create(path, 2 * MiB, subformat=subformat, overwrite=True) as f:
        assert f.size == 2 * MiB
        assert f.read_at(0, 3) == bytes(3)


def test_existing_extent_file_refused(tmp_path: Path) -> None:
    (tmp_path / "d-flat.vmdk").write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        vmdk.create(tmp_path / "d.vmdk", MiB, subformat="monolithicFlat")
    assert (tmp_path / "d-flat.vmdk").read_bytes() == b"precious"
    assert not (tmp_path / "d.vmdk").exists()


def test_zeroed_grain_and_cluster_size(tmp_path: Path) -> None:
    path = tmp_path / "z.vmdk"
    with vmdk.create(path, SIZE, zeroed_grain=True, cluster_size=16384) as f:
        f.write_at(0, b"x" * 20000)
    h = SparseHeader.unpack(path.read_bytes()[:512])
    assert h.grain_size == 32 and h.version == 2 and h.flags & 4
    with vmdk.open(path) as f:
        assert f.info()["cluster-size"] == 16384
        assert f.read_at(0, 20001) == b"x" * 20000 + b"\0"


def test_child_descriptor(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    vmdk.create(base, SIZE).close()
    with vmdk.open(base) as f:
        cid = f.image.cid
    with vmdk.create(tmp_path / "child.vmdk", parent=base) as f:
        assert f.size == SIZE
    text = descriptor_of(tmp_path / "child.vmdk")
    assert re.search(rf"^parentCID={cid:08x}$", text, re.MULTILINE)
    assert 'parentFileNameHint="base.vmdk"' in text.splitlines()
    with pytest.raises(vmdk.UnsupportedFormatError):
        vmdk.create(tmp_path / "flatchild.vmdk", parent=base, subformat="monolithicFlat")


@pytest.mark.parametrize("subformat", ["monolithicSparse", "monolithicFlat",
                                       "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "vmfs"])
def test_refused_name_leaves_nothing(tmp_path: Path, subformat: str) -> None:
    """A descriptor has no escape for '"' or newlines: such names are refused, and nothing is left."""
    for name in ('a"b.vmdk', "new\nline.vmdk"):
        with pytest.raises((vmdk.VmdkError, ValueError)):
            vmdk.create(tmp_path / name, MiB, subformat=subformat)
    assert os.listdir(tmp_path) == []


def test_names_with_spaces_and_unicode(tmp_path: Path) -> None:
    for name, subformat in (("my disk.vmdk", "monolithicFlat"), ("dïsk✓.vmdk", "twoGbMaxExtentSparse")):
        with vmdk.create(tmp_path / name, MiB, subformat=subformat) as f:
            f.write_at(0, b"hi")
        with vmdk.open(tmp_path / name) as f:
            assert f.read_at(0, 2) == b"hi"
    assert (tmp_path / "my disk-flat.vmdk").exists()
    assert (tmp_path / "dïsk✓-s001.vmdk").exists()


def test_create_never_replaces_its_parent_chain(tmp_path: Path) -> None:
    from vmdk.chain import snapshot

    a, c = tmp_path / "A.vmdk", tmp_path / "c.vmdk"
    with vmdk.create(a, 4 << 20) as d:
        d.write_at(0, b"keep")
    with pytest.raises(vmdk.VmdkError, match="reads from"):
        vmdk.create(a, parent=a, overwrite=True)
    snapshot(a, c)
    with pytest.raises(vmdk.VmdkError, match="reads from"):
        snapshot(c, a, overwrite=True)  # a grandchild named like the base
    with vmdk.open(c) as d:
        assert d.read_at(0, 4) == b"keep"


def test_create_and_convert_refuse_to_replace_an_image_in_use(tmp_path: Path) -> None:
    from vmdk.convert import convert

    a, raw = tmp_path / "A.vmdk", tmp_path / "s.raw"
    raw.write_bytes(b"x" * 4096)
    vmdk.create(a, 1 << 20).close()
    with vmdk.open(a, "r+") as busy:
        busy.write_at(0, b"live")
        with pytest.raises(vmdk.ImageInUseError, match="A.vmdk"):
            vmdk.create(a, 1 << 20, overwrite=True)
        with pytest.raises(vmdk.ImageInUseError, match="A.vmdk"):
            convert(raw, a, overwrite=True)
        with pytest.raises(vmdk.ImageInUseError, match="A.vmdk"):
            convert(raw, a, out_format="raw", overwrite=True)
    with vmdk.open(a) as d:
        assert d.read_at(0, 4) == b"live"
