"""The metadata API: geometry, translation, adapter, UUIDs, CIDs, comment, hardware version."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import vmdk
from vmdk.image import compute_geometry, decode_comment, encode_comment

MiB = 1 << 20


def test_geometry_is_computed_like_qemu_when_absent(tmp_path: Path) -> None:
    assert compute_geometry(10 * 1024 * MiB, "ide") == (20805, 16, 63)
    assert compute_geometry(10 * 1024 * MiB, "lsilogic") == (1305, 255, 63)
    path = tmp_path / "g.vmdk"
    with vmdk.create(path, 64 * MiB, adapter_type="lsilogic") as disk:
        disk.image.descriptor.ddb_remove("ddb.geometry.cylinders")
        assert disk.image.geometry == compute_geometry(64 * MiB, "lsilogic")


def test_metadata_round_trips_through_the_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "m.vmdk"
    with vmdk.create(path, 8 * MiB, adapter_type="buslogic", hwversion="7",
                     geometry=(100, 4, 17), comment="made\nby tests") as disk:
        image = disk.image
        assert (image.adapter_type, image.hardware_version) == ("buslogic", "7")
        assert image.geometry == (100, 4, 17)
        assert image.bios_translation == "lba"  # heads != 16
        assert image.comment == "made\nby tests"
        assert isinstance(image.uuid, uuid.UUID)
        new = uuid.uuid4()
        image.uuid = new
        image.adapter_type = "lsilogic"
        image.hardware_version = "14"
        image.set_geometry(1000, 16, 63)
        image.comment = "second"
        image.set_metadata("toolsInstallType", "4")
    with vmdk.open(path) as disk:
        image = disk.image
        assert image.uuid == new
        assert (image.adapter_type, image.hardware_version) == ("lsilogic", "14")
        assert image.geometry == (1000, 16, 63)
        assert image.bios_translation == "none"
        assert image.comment == "second"
        assert image.descriptor.ddb_get("ddb.toolsInstallType") == "4"
        assert image.parent_cid == 0xFFFFFFFF
        info = disk.info()
        assert info["adapter-type"] == "lsilogic" and info["comment"] == "second"


def test_metadata_is_read_only_on_a_read_only_open(tmp_path: Path) -> None:
    path = tmp_path / "r.vmdk"
    with vmdk.create(path, MiB):
        pass
    with vmdk.open(path) as disk, pytest.raises(vmdk.ReadOnlyError):
        disk.image.adapter_type = "lsilogic"


def test_comment_escapes_as_virtualbox_does() -> None:
    for text in ("plain", "two\nlines\r\n", "back\\slash", "\\n literally", ""):
        assert decode_comment(encode_comment(text)) == text
    assert encode_comment("a\nb\\") == "a\\nb\\\\"


def test_setters_refuse_bad_values_and_oversized_descriptors(tmp_path: Path) -> None:
    path = tmp_path / "m.vmdk"
    vmdk.create(path, MiB).close()
    with vmdk.open(path, "r+") as disk:
        image = disk.image
        before = image.descriptor.to_bytes()
        with pytest.raises(ValueError):
            image.uuid = "not-a-uuid"  # type: ignore[assignment]
        with pytest.raises(ValueError, match="adapter type"):
            image.adapter_type = "bogus"
        with pytest.raises(ValueError, match="out of range"):
            image.set_geometry(-5, 0, 99)
        with pytest.raises(ValueError, match="not a number"):
            image.hardware_version = "x7"
        # the embedded area holds 10 KiB: refused at once, the descriptor left as it was
        with pytest.raises(vmdk.DescriptorSpaceError, match="m.vmdk"):
            image.comment = "x" * 20000
        assert image.descriptor.to_bytes() == before
        disk.write_at(0, b"new")  # the CID change still reaches the file on close
        cid = image.cid
    with vmdk.open(path) as disk:
        assert disk.image.cid == cid and disk.image.cid != 0


def test_set_many_metadata_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.vmdk"
    vmdk.create(path, MiB).close()
    with vmdk.open(path, "r+") as disk:
        with pytest.raises(vmdk.VmdkError):
            disk.image.set_many_metadata({"ddb.comment": "changed", "ddb.bad": "x\ny"})
        assert disk.image.comment is None
