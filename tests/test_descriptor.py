"""Tests for vmdk.descriptor: exact round trips, one-line edits, and hostile input."""

from __future__ import annotations

import difflib
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmdk.descriptor import MAX_BYTES, MAX_LINES, Descriptor, ExtentLine, canonical_create_type
from vmdk.errors import DescriptorError, DescriptorSpaceError

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"

TEXT_SAMPLES = [
    "vmdk-rs/monolithicFlat.vmdk",
    "vmdk-rs/twoGbMaxExtentFlat.vmdk",
    "vmdk-rs/twoGbMaxExtentSparse.vmdk",
    "vmdk-rs/vmfs_thick.vmdk",
    "vmdk-rs/vmfs_thick-000001.vmdk",
    "vmdk-forensic/ms3-win.vmdk",
]
EMBEDDED_SAMPLES = [
    "vmdk-rs/monolithicSparse.vmdk",
    "vmdk-rs/streamOptimized.vmdk",
    "vmdk-rs/streamOptimizedWithMarkers.vmdk",  # comments between keys, no final newline
    "cot-e9366f3/blank.vmdk",  # trailing spaces after values
    "xo-vmdk-to-vhd/test.vmdk",  # VirtualBox style key="value" in the ddb
    "freebsd-mkimg/img-1x1-512-gpt.vmdk",  # empty file name, no blank lines
]

BASIC = (
    b"# Disk DescriptorFile\n"
    b"version=1\n"
    b"CID=0dc3c2a9\n"
    b"parentCID=ffffffff\n"
    b'createType="monolithicSparse"\n'
    b"\n"
    b"# Extent description\n"
    b'RW 20480 SPARSE "disk.vmdk"\n'
    b"\n"
    b"# The Disk Data Base \n"
    b"#DDB\n"
    b"\n"
    b'ddb.adapterType = "lsilogic"\n'
    b'ddb.virtualHWVersion = "4"\n'
)


def embedded_descriptor(path: Path) -> bytes:
    """The descriptor area of a hosted sparse extent, NULs stripped."""
    data = path.read_bytes()
    offset, size = struct.unpack_from("<QQ", data, 28)  # descriptorOffset, descriptorSize
    return data[offset * 512 : (offset + size) * 512].rstrip(b"\0")


def sample(name: str) -> Path:
    path = SAMPLES / name
    if not path.exists():
        pytest.skip(f"sample {name} not present")
    return path


def changed_lines(before: bytes, after: bytes) -> list[str]:
    """The diff opcodes between two descriptors, by whole lines (endings included)."""
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return [f"{tag} {a[i1:i2]} -> {b[j1:j2]}" for tag, i1, i2, j1, j2 in ops if tag != "equal"]


def assert_one_line_changed(before: bytes, after: bytes, tag: str = "replace") -> None:
    diff = changed_lines(before, after)
    assert len(diff) == 1 and diff[0].startswith(tag), diff
    # exactly one line on each side of a replacement, one line for an insert/delete
    a, b = before.splitlines(keepends=True), after.splitlines(keepends=True)
    assert abs(len(a) - len(b)) == (0 if tag == "replace" else 1)


# --------------------------------------------------------------------------- samples


@pytest.mark.parametrize("name", TEXT_SAMPLES)
def test_text_sample_round_trip(name: str) -> None:
    data = sample(name).read_bytes()
    desc = Descriptor.parse(data, name)
    assert desc.to_bytes() == data
    assert desc.extents and desc.create_type


@pytest.mark.parametrize("name", EMBEDDED_SAMPLES)
def test_embedded_sample_round_trip(name: str) -> None:
    data = embedded_descriptor(sample(name))
    desc = Descriptor.parse(data, name)
    assert desc.to_bytes() == data
    assert desc.extents and desc.create_type


def test_sample_values() -> None:
    desc = Descriptor.parse(sample("vmdk-rs/vmfs_thick-000001.vmdk").read_bytes())
    assert desc.cid == 0x8F67CA74
    assert desc.parent_cid == 0x0172E8A4
    assert desc.parent_file_name_hint == "vmfs_thick.vmdk"
    assert desc.encoding == "UTF-8"
    assert desc.extents == [
        ExtentLine("RW", 4096, "VMFSSPARSE", "vmfs_thick-000001-delta.vmdk", None)
    ]


def test_virtualbox_style_sample() -> None:
    desc = Descriptor.parse(embedded_descriptor(sample("xo-vmdk-to-vhd/test.vmdk")))
    assert desc.ddb_get("adapterType") == "ide"
    assert desc.ddb_get("ddb.comment") == ""
    assert desc.ddb_items()["ddb.uuid.image"] == "fd9d3b48-5f27-4c8f-92aa-ed3f683ce09d"


def test_trailing_spaces_sample() -> None:
    desc = Descriptor.parse(embedded_descriptor(sample("cot-e9366f3/blank.vmdk")))
    assert desc.version == 1
    assert desc.cid == 0x0DC3C2A9
    assert desc.create_type == "streamOptimized"


def test_edit_keeps_other_sample_lines() -> None:
    data = embedded_descriptor(sample("vmdk-rs/streamOptimizedWithMarkers.vmdk"))
    desc = Descriptor.parse(data)
    desc.cid = 0x12345678
    assert_one_line_changed(data, desc.to_bytes())
    assert b"CID=12345678\n" in desc.to_bytes()


# --------------------------------------------------------------------------- line endings


def test_crlf_round_trip_and_new_lines_use_crlf() -> None:
    data = BASIC.replace(b"\n", b"\r\n")
    desc = Descriptor.parse(data)
    assert desc.to_bytes() == data
    desc.ddb_set("ddb.uuid", "60 00")
    assert desc.to_bytes().endswith(b'ddb.virtualHWVersion = "4"\r\nddb.uuid = "60 00"\r\n')


def test_mixed_endings_and_no_final_newline_round_trip() -> None:
    data = BASIC.replace(b"version=1\n", b"version=1\r\n").rstrip(b"\n")
    assert Descriptor.parse(data).to_bytes() == data


def test_append_to_file_without_final_newline() -> None:
    data = BASIC.rstrip(b"\n")
    desc = Descriptor.parse(data)
    desc.ddb_set("toolsVersion", "1")
    assert desc.to_bytes() == data + b'\nddb.toolsVersion = "1"'


def test_lone_cr_refused_with_line() -> None:
    data = BASIC.replace(b"CID=0dc3c2a9\n", b"CID=0dc3c2a9\rx\n")
    with pytest.raises(DescriptorError) as info:
        Descriptor.parse(data, "d.vmdk")
    assert info.value.line == 3 and info.value.filename == "d.vmdk"


def test_stops_at_first_nul() -> None:
    desc = Descriptor.parse(BASIC + b"\0\0garbage\xff")
    assert desc.to_bytes() == BASIC


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (BASIC.replace(b"#DDB\n", b'#DDB\nisNativeSnapshot="no"\n'), 12),
        (BASIC + b'RW 1 SPARSE "late.vmdk"\n', 15),
        (BASIC.replace(b"# Extent description\n", b'ddb.x = "1"\n'), 8),
        (BASIC.replace(b"\n\n# The", b'\nchangeTrackPath="c"\nRW 1 ZERO\n# The'), 10),
    ],
)
def test_out_of_order_refused_with_line(data: bytes, line: int) -> None:
    with pytest.raises(DescriptorError, match="out of order") as info:
        Descriptor.parse(data)
    assert info.value.line == line


def test_change_track_section_accepted() -> None:
    data = BASIC.replace(
        b"\n# The Disk", b'\n# Change Tracking File\nchangeTrackPath="d-ctk.vmdk"\n\n# The Disk'
    )
    desc = Descriptor.parse(data)
    assert desc.get("changeTrackPath") == "d-ctk.vmdk"
    assert desc.to_bytes() == data


def test_lenient_spacing_and_quoting() -> None:
    data = BASIC.replace(b'createType="monolithicSparse"', b"createType = monolithicSparse")
    data = data.replace(b"CID=0dc3c2a9", b'CID = "0dc3c2a9"')
    desc = Descriptor.parse(data)
    assert desc.create_type == "monolithicSparse"
    assert desc.cid == 0x0DC3C2A9
    assert desc.get("createtype") is None  # keys are case-sensitive


def test_unknown_keys_and_missing_version() -> None:
    data = BASIC.replace(b"version=1\n", b'vendorKey="x y"\n')
    desc = Descriptor.parse(data)
    assert desc.version == 1
    assert desc.get("vendorKey") == "x y"


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (BASIC.replace(b"version=1", b"this is not valid"), 2),
        (BASIC.replace(b"version=1", b'key="open'), 2),
        (BASIC.replace(b"SPARSE", b"SPARSY"), 8),
        (BASIC.replace(b"SPARSE", b"sparse"), 8),  # types are case-sensitive, as in QEMU/VBox
        (BASIC.replace(b"20480", b"-5"), 8),
        (BASIC.replace(b"20480", b"12ab"), 8),
        (BASIC.replace(b"20480", b"9" * 40), 8),
        (BASIC.replace(b'"disk.vmdk"', b'"disk.vmdk" zero'), 8),
        (BASIC.replace(b'"disk.vmdk"', b"disk.vmdk"), 8),
        (BASIC.replace(b'"disk.vmdk"', b'"disk.vmdk'), 8),
        (BASIC.replace(b'"disk.vmdk"', b""), 8),
        (BASIC.replace(b"RW 20480", b"RW"), 8),
        (BASIC.replace(b"version=1\n", b'version=1\nencoding="UTF-8"\n')
         .replace(b"# Extent", "# Extent \u00e9".encode("latin-1")), 8),
    ],
)
def test_bad_lines_refused_with_line(data: bytes, line: int) -> None:
    with pytest.raises(DescriptorError) as info:
        Descriptor.parse(data)
    assert info.value.line == line


def test_required_parts() -> None:
    with pytest.raises(DescriptorError, match="no extent"):
        Descriptor.parse(BASIC.replace(b'RW 20480 SPARSE "disk.vmdk"\n', b""))
    with pytest.raises(DescriptorError, match="createType"):
        Descriptor.parse(BASIC.replace(b'createType="monolithicSparse"\n', b""))
    with pytest.raises(DescriptorError):
        Descriptor.parse(b"")


def test_size_limits() -> None:
    with pytest.raises(DescriptorError, match="larger"):
        Descriptor.parse(BASIC + b"#" * MAX_BYTES)
    with pytest.raises(DescriptorError, match="lines"):
        Descriptor.parse(BASIC + b"#\n" * MAX_LINES)


def test_lone_signature_variants_not_required() -> None:
    data = b"# made by some tool\n" + BASIC.split(b"\n", 1)[1]
    assert Descriptor.parse(data).to_bytes() == data


# --------------------------------------------------------------------------- extents


def test_extent_variants() -> None:
    data = BASIC.replace(
        b'RW 20480 SPARSE "disk.vmdk"\n',
        b'RW 100 FLAT "my disk  with spaces.vmdk" 0\n'
        b'RDONLY 200 VMFSRAW "/vmfs/devices/disks/vml.01" 63 uuid-1 dev-2\n'
        b"NOACCESS 300 ZERO\n"
        b'  RW   400  SESPARSE   "a \\"quoted\\" name.vmdk"  \n',
    )
    desc = Descriptor.parse(data)
    assert desc.to_bytes() == data
    assert desc.extents == [
        ExtentLine("RW", 100, "FLAT", "my disk  with spaces.vmdk", 0),
        ExtentLine("RDONLY", 200, "VMFSRAW", "/vmfs/devices/disks/vml.01", 63, ("uuid-1", "dev-2")),
        ExtentLine("NOACCESS", 300, "ZERO", None, None),
        ExtentLine("RW", 400, "SESPARSE", 'a \\"quoted\\" name.vmdk', None),
    ]


def test_extent_format() -> None:
    assert (
        ExtentLine("RW", 20480, "SPARSE", "name.vmdk", None).format()
        == 'RW 20480 SPARSE "name.vmdk"'
    )
    assert (
        ExtentLine("RW", 20480, "FLAT", "n-flat.vmdk", 0).format()
        == 'RW 20480 FLAT "n-flat.vmdk" 0'
    )
    assert ExtentLine("RW", 2048, "ZERO", None, None).format() == "RW 2048 ZERO"
    extra = ExtentLine("RW", 8, "VMFSRDM", "d", 0, ("p1", "dev"))
    assert extra.format() == 'RW 8 VMFSRDM "d" 0 p1 dev'


@pytest.mark.parametrize(
    "extent",
    [
        ExtentLine("RW", 1, "FLAT", 'a"b', 0),
        ExtentLine("RW", 1, "FLAT", "a\nb", 0),
        ExtentLine("RW", 1, "FLAT", "a\0b", 0),
        ExtentLine("RW", -1, "FLAT", "a", 0),
        ExtentLine("RW", 1, "FLAT", "a", -3),
        ExtentLine("RW", 1, "FLAT", None, None),
        ExtentLine("RW", 1, "BOGUS", "a", None),
        ExtentLine("WRITE", 1, "FLAT", "a", None),
        ExtentLine("RW", 1, "ZERO", None, 5),
        ExtentLine("RW", 1, "FLAT", "a", 0, ("two words",)),
    ],
)
def test_extent_format_refuses_unwritable(extent: ExtentLine) -> None:
    with pytest.raises(DescriptorError):
        extent.format()


def test_set_extents_in_place() -> None:
    data = BASIC.replace(
        b'RW 20480 SPARSE "disk.vmdk"\n',
        b'RW 10 SPARSE "a.vmdk"\n# between\nRW 20 SPARSE "b.vmdk"\n',
    )
    desc = Descriptor.parse(data)
    first, _second = desc.extents
    desc.set_extents([first, ExtentLine("RW", 30, "SPARSE", "b.vmdk", None)])
    assert_one_line_changed(data, desc.to_bytes())
    assert b'# between\nRW 30 SPARSE "b.vmdk"\n' in desc.to_bytes()


def test_set_extents_grow_and_shrink() -> None:
    desc = Descriptor.parse(BASIC)
    extra = ExtentLine("RW", 5, "ZERO", None, None)
    desc.set_extents([*desc.extents, extra])
    assert_one_line_changed(BASIC, desc.to_bytes(), "insert")
    assert desc.extents[-1] == extra
    desc.set_extents(desc.extents[:1])
    assert desc.to_bytes() == BASIC
    with pytest.raises(DescriptorError):
        desc.set_extents([])


def test_add_extent() -> None:
    desc = Descriptor.parse(BASIC)
    desc.add_extent(ExtentLine("RW", 7, "FLAT", "x y.vmdk", 0))
    assert_one_line_changed(BASIC, desc.to_bytes(), "insert")
    assert b'"disk.vmdk"\nRW 7 FLAT "x y.vmdk" 0\n\n' in desc.to_bytes()
    assert Descriptor.parse(desc.to_bytes()).extents == desc.extents


def test_extents_is_a_copy() -> None:
    desc = Descriptor.parse(BASIC)
    desc.extents.clear()
    assert len(desc.extents) == 1


# --------------------------------------------------------------------------- edits


def test_each_edit_changes_one_line() -> None:
    edits: list[Callable[[Descriptor], object]] = [
        lambda d: d.set("CID", "00000001"),
        lambda d: setattr(d, "cid", 0xABCDEF),
        lambda d: setattr(d, "parent_cid", 0x1234),
        lambda d: setattr(d, "create_type", "monolithicFlat"),
        lambda d: setattr(d, "version", 3),
        lambda d: d.ddb_set("ddb.adapterType", "ide"),
        lambda d: d.ddb_set("virtualHWVersion", "7"),
    ]
    for edit in edits:
        desc = Descriptor.parse(BASIC)
        edit(desc)
        assert_one_line_changed(BASIC, desc.to_bytes())
        Descriptor.parse(desc.to_bytes())


def test_setter_keeps_quoting_and_spacing() -> None:
    data = BASIC.replace(b"CID=0dc3c2a9", b'CID = "0dc3c2a9"  ').replace(
        b'ddb.adapterType = "lsilogic"', b"ddb.adapterType=lsilogic"
    )
    desc = Descriptor.parse(data)
    desc.cid = 1
    desc.ddb_set("adapterType", "ide")
    text = desc.to_bytes()
    assert b'CID = "00000001"  \n' in text
    assert b"ddb.adapterType=ide\n" in text


def test_new_keys_use_canonical_style() -> None:
    desc = Descriptor.parse(BASIC)
    desc.set("parentFileNameHint", "base.vmdk")
    assert_one_line_changed(BASIC, desc.to_bytes(), "insert")
    assert b'createType="monolithicSparse"\nparentFileNameHint="base.vmdk"\n\n' in desc.to_bytes()
    desc = Descriptor.parse(BASIC.replace(b"version=1\n", b""))
    desc.version = 1
    assert b'createType="monolithicSparse"\nversion=1\n' in desc.to_bytes()
    desc.ddb_set("ddb.uuid", "60 00 C2")
    assert desc.to_bytes().endswith(b'ddb.virtualHWVersion = "4"\nddb.uuid = "60 00 C2"\n')


def test_ddb_section_created_when_missing() -> None:
    data = BASIC.split(b"\n\n# The Disk")[0] + b"\n"
    desc = Descriptor.parse(data)
    desc.ddb_set("adapterType", "ide")
    assert desc.to_bytes() == data + b'\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "ide"\n'
    assert Descriptor.parse(desc.to_bytes()).ddb_items() == {"ddb.adapterType": "ide"}


def test_ddb_key_goes_after_existing_marker() -> None:
    desc = Descriptor.new(
        "monolithicSparse", [ExtentLine("RW", 8, "SPARSE", "a.vmdk", None)], cid=1
    )
    before = desc.to_bytes()
    desc.ddb_set("adapterType", "ide")
    assert desc.to_bytes() == before + b'ddb.adapterType = "ide"\n'


def test_remove() -> None:
    desc = Descriptor.parse(BASIC)
    assert desc.remove("parentCID")
    assert_one_line_changed(BASIC, desc.to_bytes(), "delete")
    assert desc.parent_cid == 0xFFFFFFFF  # absent means no parent
    assert not desc.remove("parentCID")
    assert desc.ddb_remove("adapterType")
    assert desc.ddb_get("adapterType") is None
    desc.parent_file_name_hint = None  # removing an absent key is harmless


def test_refuses_unwritable_values() -> None:
    desc = Descriptor.parse(BASIC, "d.vmdk")
    for bad in ('a"b', "a\nb", "a\0b"):
        with pytest.raises(DescriptorError) as info:
            desc.set("createType", bad)
        assert info.value.filename == "d.vmdk"
        with pytest.raises(DescriptorError):
            desc.ddb_set("comment", bad)
    with pytest.raises(DescriptorError):
        desc.set("ddb.adapterType", "ide")
    with pytest.raises(DescriptorError):
        desc.set("bad key", "x")
    with pytest.raises(DescriptorError):
        desc.cid = 1 << 32
    assert desc.to_bytes() == BASIC


def test_bad_cid_reported_on_access() -> None:
    desc = Descriptor.parse(BASIC.replace(b"CID=0dc3c2a9", b"CID=xyz"))
    with pytest.raises(DescriptorError, match="CID"):
        _ = desc.cid
    desc = Descriptor.parse(BASIC.replace(b"version=1", b"version=one"))
    with pytest.raises(DescriptorError, match="version"):
        _ = desc.version


def test_copy_is_independent() -> None:
    desc = Descriptor.parse(BASIC)
    twin = desc.copy()
    twin.cid = 5
    twin.ddb_set("x", "y")
    assert desc.to_bytes() == BASIC
    assert twin.cid == 5


def test_canonical_create_type() -> None:
    assert canonical_create_type("MONOLITHICSPARSE") == "monolithicSparse"
    assert canonical_create_type("2GbMaxExtentFlat") == "twoGbMaxExtentFlat"
    assert canonical_create_type("streamoptimized") == "streamOptimized"
    assert canonical_create_type("nonsense") is None


# --------------------------------------------------------------------------- encodings


def test_windows_1252_round_trip() -> None:
    comment = "# Erstellt f\u00fcr M\u00fcller \u2013 \u20ac\n".encode("windows-1252")
    data = BASIC.replace(b"version=1\n", b'version=1\nencoding="windows-1252"\n' + comment)
    desc = Descriptor.parse(data)
    assert desc.to_bytes() == data
    assert desc.encoding == "windows-1252"
    desc.set("parentFileNameHint", "Gr\u00f6\u00dfe.vmdk")
    assert 'parentFileNameHint="Gr\u00f6\u00dfe.vmdk"'.encode("windows-1252") in desc.to_bytes()
    assert "f\u00fcr" in str(desc)


@pytest.mark.parametrize("codec", ["GBK", "Big5", "Shift_JIS"])
def test_cjk_encodings(codec: str) -> None:
    name = "\u4e2d\u6587.vmdk" if codec != "Shift_JIS" else "\u65e5\u672c\u8a9e.vmdk"
    data = BASIC.replace(b"version=1\n", f'version=1\nencoding="{codec}"\n'.encode()).replace(
        b'"disk.vmdk"', f'"{name}"'.encode(codec)
    )
    desc = Descriptor.parse(data)
    assert desc.to_bytes() == data
    assert desc.extents[0].filename == name


def test_encoding_change_recodes_all_lines() -> None:
    data = BASIC.replace(b'"disk.vmdk"', '"d\u00e9j\u00e0.vmdk"'.encode())
    desc = Descriptor.parse(data)
    desc.encoding = "windows-1252"
    out = desc.to_bytes()
    assert '"d\u00e9j\u00e0.vmdk"'.encode("windows-1252") in out
    assert Descriptor.parse(out).extents[0].filename == "d\u00e9j\u00e0.vmdk"
    desc.remove("encoding")
    assert desc.to_bytes() == data


@pytest.mark.parametrize("name", ["klingon", "UTF-16", "rot13", "hex", "../../x", "utf-7"])
def test_unusable_encoding_refused(name: str) -> None:
    data = BASIC.replace(b"version=1\n", f'version=1\nencoding="{name}"\n'.encode())
    with pytest.raises(DescriptorError, match="encoding") as info:
        Descriptor.parse(data)
    assert info.value.line == 3


def test_undecodable_bytes_refused_when_utf8_is_declared() -> None:
    data = BASIC.replace(b"version=1\n", b'version=1\nencoding="UTF-8"\n').replace(
        b"# Extent description", b"# Extent \xff\xfe")
    with pytest.raises(DescriptorError, match="UTF-8") as info:
        Descriptor.parse(data)
    assert info.value.line == 8


def test_undeclared_legacy_bytes_read_as_latin1_and_round_trip() -> None:
    # Old Windows tools wrote their code page without saying so; qemu and VMware open these.
    data = BASIC.replace(b'ddb.adapterType = "lsilogic"', b'ddb.comment = "caf\xe9"\n'
                         b'ddb.adapterType = "lsilogic"')
    desc = Descriptor.parse(data)
    assert desc.ddb_get("ddb.comment") == "caf\u00e9"
    assert desc.to_bytes() == data


def test_unencodable_value_refused() -> None:
    data = BASIC.replace(b"version=1\n", b'version=1\nencoding="windows-1252"\n')
    desc = Descriptor.parse(data)
    with pytest.raises(DescriptorError):
        desc.set("parentFileNameHint", "\u4e2d.vmdk")
    assert desc.to_bytes() == data


# --------------------------------------------------------------------------- padding and new


def test_to_bytes_padded() -> None:
    desc = Descriptor.parse(BASIC, "disk.vmdk")
    padded = desc.to_bytes_padded(1024)
    assert len(padded) == 1024 and padded.rstrip(b"\0") == BASIC
    assert desc.to_bytes_padded(len(BASIC)) == BASIC
    with pytest.raises(DescriptorSpaceError) as info:
        desc.to_bytes_padded(100)
    message = str(info.value)
    assert "disk.vmdk" in message and str(len(BASIC)) in message and "100" in message


def test_new_layout() -> None:
    extents = [
        ExtentLine("RW", 4192256, "SPARSE", "t-s001.vmdk", None),
        ExtentLine("RW", 2048, "ZERO", None, None),
    ]
    desc = Descriptor.new(
        "twoGbMaxExtentSparse", extents, cid=0x1A2B3C4D,
        ddb={"ddb.adapterType": "lsilogic", "virtualHWVersion": "4"},
    )  # fmt: skip
    assert desc.to_bytes() == (
        b"# Disk DescriptorFile\nversion=1\nCID=1a2b3c4d\nparentCID=ffffffff\n"
        b'createType="twoGbMaxExtentSparse"\n\n# Extent description\n'
        b'RW 4192256 SPARSE "t-s001.vmdk"\nRW 2048 ZERO\n\n'
        b'# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\nddb.virtualHWVersion = "4"\n'
    )


def test_new_parses_back() -> None:
    extents = [ExtentLine("RW", 100, "FLAT", "child with space-flat.vmdk", 0)]
    desc = Descriptor.new(
        "monolithicFlat", extents, cid=0xDEADBEEF, parent_cid=0x00000001,
        parent_file_name_hint="base \u00e9.vmdk", ddb={"uuid": "60 00"}, encoding="windows-1252",
    )  # fmt: skip
    back = Descriptor.parse(desc.to_bytes())
    assert back.to_bytes() == desc.to_bytes()
    assert (back.cid, back.parent_cid, back.version) == (0xDEADBEEF, 1, 1)
    assert back.create_type == "monolithicFlat"
    assert back.parent_file_name_hint == "base \u00e9.vmdk"
    assert back.encoding == "windows-1252"
    assert back.extents == extents
    assert back.ddb_items() == {"ddb.uuid": "60 00"}
    assert b"\xe9" in desc.to_bytes()


def test_new_refuses_bad_input() -> None:
    extent = [ExtentLine("RW", 1, "FLAT", "a", 0)]
    with pytest.raises(DescriptorError):
        Descriptor.new('mono"lithic', extent, cid=1)
    with pytest.raises(DescriptorError):
        Descriptor.new("monolithicFlat", [ExtentLine("RW", 1, "FLAT", 'a"', 0)], cid=1)
    with pytest.raises(DescriptorError):
        Descriptor.new("monolithicFlat", extent, cid=-1)
    with pytest.raises(DescriptorError):
        Descriptor.new("monolithicFlat", extent, cid=1, encoding="nope")
    with pytest.raises(DescriptorError):
        Descriptor.new("monolithicFlat", [], cid=1)
    with pytest.raises(DescriptorError):
        Descriptor.new("monolithicFlat", extent, cid=1, ddb={"comment": "two\nlines"})
    with pytest.raises(DescriptorError):
        Descriptor.new("monolithicFlat", extent, cid=1, ddb={"bad key": "x"})


# --------------------------------------------------------------------------- hostile input


def parse_or_descriptor_error(data: bytes) -> Descriptor | None:
    try:
        desc = Descriptor.parse(data)
    except DescriptorError:
        return None
    # Whatever parses must write back exactly what was read (up to the first NUL).
    assert desc.to_bytes() == data.split(b"\0", 1)[0]
    return desc


def exercise(desc: Descriptor) -> None:
    """Read every typed value; only DescriptorError may come out."""
    reads: list[Callable[[], int]] = [
        lambda: desc.cid,
        lambda: desc.parent_cid,
        lambda: desc.version,
    ]
    for read in reads:
        try:
            read()
        except DescriptorError:
            pass
    _ = desc.create_type, desc.parent_file_name_hint, desc.encoding, desc.extents, desc.ddb_items()
    str(desc)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_only_raise_descriptor_error(data: bytes) -> None:
    desc = parse_or_descriptor_error(data)
    if desc is not None:
        exercise(desc)


_ALPHABET = b' \t\r\n"=#.\0\xff\xe9RWZEROFLAT0123456789abcdefCIDddb'


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([BASIC, BASIC.replace(b"\n", b"\r\n")])))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from(_ALPHABET))
        if action == "insert":
            data.insert(pos, byte)
        elif pos < len(data):
            if action == "delete":
                del data[pos]
            else:
                data[pos] = byte
    return bytes(data)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_only_raise_descriptor_error(data: bytes) -> None:
    desc = parse_or_descriptor_error(data)
    if desc is not None:
        exercise(desc)
        try:
            desc.cid = 7
            desc.ddb_set("adapterType", "ide")
            desc.add_extent(ExtentLine("RW", 1, "ZERO", None, None))
        except DescriptorError:
            return
        reparsed = parse_or_descriptor_error(desc.to_bytes())
        assert reparsed is not None and reparsed.cid == 7


@settings(max_examples=200)
@given(
    st.text(alphabet=st.characters(exclude_characters='"\n\r\0', exclude_categories=["Cs"])),
    st.integers(0, 2**64 - 1),
)
def test_any_writable_name_round_trips(name: str, sectors: int) -> None:
    extent = ExtentLine("RW", sectors, "FLAT", name, 0)
    desc = Descriptor.new("monolithicFlat", [extent], cid=1, ddb={"comment": name})
    back = Descriptor.parse(desc.to_bytes())
    assert back.extents == [extent]
    assert back.ddb_get("comment") == name
