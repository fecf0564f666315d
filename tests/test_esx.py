"""ESX descriptor kinds: vmfs, VMFSRDM/VMFSRAW extents, and where raw-disk extents may point."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmdk
from conftest import pattern

MiB = 1 << 20


def write_descriptor(path: Path, create_type: str, lines: list[str]) -> None:
    path.write_text("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
                    f'createType="{create_type}"\n\n# Extent description\n'
                    + "\n".join(lines) + '\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n')


@pytest.mark.parametrize(("create_type", "kind"), [("vmfsRawDeviceMap", "VMFSRDM"),
                                                   ("vmfsPassthroughRawDeviceMap", "VMFSRDM"),
                                                   ("vmfsRaw", "VMFSRAW")])
def test_rdm_extents_read_their_target(tmp_path: Path, create_type: str, kind: str) -> None:
    data = pattern(2 * MiB, seed=31)
    (tmp_path / "lun.bin").write_bytes(data)
    write_descriptor(tmp_path / "rdm.vmdk", create_type, [f'RW {2 * MiB // 512} {kind} "lun.bin"'])
    with vmdk.open(tmp_path / "rdm.vmdk", "r+") as disk:
        assert disk.read() == data
        disk.seek(4096)
        disk.write(b"written")
    assert (tmp_path / "lun.bin").read_bytes()[4096:4103] == b"written"


def test_device_paths_need_allow_external(tmp_path: Path) -> None:
    write_descriptor(tmp_path / "dev.vmdk", "fullDevice", ['RW 2048 FLAT "/dev/zero" 0'])
    with pytest.raises(vmdk.UnsafePathError, match="dev.vmdk.*allow_external"):
        vmdk.open(tmp_path / "dev.vmdk")
    with vmdk.open(tmp_path / "dev.vmdk", allow_external=True, force_share=True) as disk:
        assert disk.read(4096) == bytes(4096)


def test_extent_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "outside.bin").write_bytes(bytes(MiB))
    (tmp_path / "sub").mkdir()
    write_descriptor(tmp_path / "sub" / "x.vmdk", "monolithicFlat",
                     ['RW 2048 FLAT "../outside.bin" 0'])
    with pytest.raises(vmdk.UnsafePathError, match="outside the image's folder"):
        vmdk.open(tmp_path / "sub" / "x.vmdk")
    (tmp_path / "sub" / "link.bin").symlink_to(tmp_path / "outside.bin")
    write_descriptor(tmp_path / "sub" / "y.vmdk", "monolithicFlat", ['RW 2048 FLAT "link.bin" 0'])
    with pytest.raises(vmdk.UnsafePathError):
        vmdk.open(tmp_path / "sub" / "y.vmdk")
    with vmdk.open(tmp_path / "sub" / "y.vmdk", allow_external=True) as disk:
        assert disk.size == MiB


def test_vmfs_create_writes_esx_descriptor(tmp_path: Path) -> None:
    with vmdk.create(tmp_path / "esx.vmdk", MiB, "vmfs", adapter_type="lsilogic") as disk:
        disk.write(b"esx")
    text = (tmp_path / "esx.vmdk").read_text()
    assert 'createType="vmfs"' in text
    assert 'RW 2048 VMFS "esx-flat.vmdk"\n' in text  # ESX lines carry no offset
    assert (tmp_path / "esx-flat.vmdk").read_bytes()[:3] == b"esx"


def test_pipes_and_folders_are_refused_without_blocking(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.vmdk")
    with pytest.raises(vmdk.UnsupportedFormatError, match="pipe"):
        vmdk.open(tmp_path / "pipe.vmdk")
    with pytest.raises(vmdk.UnsupportedFormatError, match="folder"):
        vmdk.open(tmp_path)
    os.mkfifo(tmp_path / "data.bin")  # an extent that is a pipe would hang a reader
    write_descriptor(tmp_path / "x.vmdk", "monolithicFlat", ['RW 2048 FLAT "data.bin" 0'])
    with pytest.raises(vmdk.UnsafePathError, match="not a regular file"):
        vmdk.open(tmp_path / "x.vmdk")
