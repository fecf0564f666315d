"""Images with changed block tracking (``changeTrackPath``, a ``-ctk.vmdk`` file).

VMware records every changed block in the tracking file; incremental backups
trust it.  We cannot update it, so writing such an image would hide the change
from the next backup: writes are refused unless the caller accepts dropping the
tracking, and then the descriptor stops claiming it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from tests.conftest import run

import vmdk
from vmdk.cli import main

MiB = 1 << 20


def _tracked_image(folder: Path, subformat: str = "monolithicSparse") -> Path:
    """An image as VMware leaves it with CBT on: version 3 header, changeTrackPath, -ctk file."""
    path = folder / "disk.vmdk"
    with vmdk.create(path, 4 * MiB, subformat) as disk:
        disk.write(b"\x11" * MiB)
    with vmdk.open(path, "r+") as disk:
        disk.image.descriptor.set("changeTrackPath", "disk-ctk.vmdk")
    if subformat == "monolithicSparse":
        with open(path, "r+b") as f:  # VMware writes version 3 with change tracking
            f.seek(4)
            f.write(struct.pack("<I", 3))
    (folder / "disk-ctk.vmdk").write_bytes(b"\0" * 4096)  # stands in for VMware's tracking file
    return path


@pytest.mark.parametrize("subformat", ["monolithicSparse", "monolithicFlat"])
def test_writing_a_tracked_image_is_refused(tmp_path: Path, subformat: str) -> None:
    path = _tracked_image(tmp_path, subformat)
    before = path.read_bytes()
    with pytest.raises(vmdk.UnsupportedFormatError, match="disk-ctk.vmdk") as caught:
        vmdk.open(path, "r+")
    assert "drop_change_tracking" in str(caught.value)
    assert path.read_bytes() == before  # the refusal changed nothing, not even the flags
    with vmdk.open(path) as disk:  # reading is fine
        assert disk.read_at(0, 4) == b"\x11" * 4


def test_dropping_the_tracking_is_explicit_and_recorded(tmp_path: Path) -> None:
    path = _tracked_image(tmp_path)
    with vmdk.open(path, "r+", drop_change_tracking=True) as disk:
        assert disk.image.descriptor.get("changeTrackPath") == "disk-ctk.vmdk"  # not yet
        disk.write_at(0, b"\x22" * 512)
        # Before the written bytes could reach a backup, the claim is gone from the file.
        with vmdk.open(path, force_share=True) as other:
            assert other.image.descriptor.get("changeTrackPath") is None
    with vmdk.open(path, "r+") as disk:  # no tracking claimed any more: an ordinary image
        assert disk.read_at(0, 512) == b"\x22" * 512


def test_opening_for_writing_without_a_write_keeps_the_tracking(tmp_path: Path) -> None:
    path = _tracked_image(tmp_path)
    with vmdk.open(path, "r+", drop_change_tracking=True):
        pass
    with vmdk.open(path) as disk:
        assert disk.image.descriptor.get("changeTrackPath") == "disk-ctk.vmdk"


def test_cli_write_verbs_explain_what_to_do(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = _tracked_image(tmp_path)
    assert main(["resize", str(path), "+1M"]) == 1
    err = capsys.readouterr().err
    assert "disk-ctk.vmdk" in err and "Traceback" not in err


@pytest.mark.interop
def test_qemu_agrees_it_is_read_only(tmp_path: Path, qemu_img: str) -> None:
    path = _tracked_image(tmp_path)
    theirs = run("qemu-io", "-f", "vmdk", "-c", "write 0 512", path, check=False)
    assert theirs.returncode != 0 or "read only" in theirs.stderr + theirs.stdout
