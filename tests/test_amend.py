"""vmdk amend: metadata changed in place, all or nothing, never the content or the CID."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest

import vmdk
from conftest import pattern, run
from vmdk.amend import amend
from vmdk.chain import snapshot
from vmdk.cli import main
from vmdk.errors import ImageInUseError, UnsupportedFormatError
from vmdk.image import Image

MiB = 1 << 20
SIZE = 4 * MiB
KINDS = ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat", "vmfs"]


def make(path: Path, subformat: str = "monolithicSparse") -> Path:
    with vmdk.create(path, SIZE, subformat) as disk:
        disk.write(pattern(SIZE, seed=4))
    return path


def digest(path: Path) -> str:
    with vmdk.open(path) as disk:
        return hashlib.sha256(disk.read()).hexdigest()


def descriptor_text(path: Path) -> list[str]:
    with Image.open(path, open_parent=False) as image:
        return image.descriptor.to_bytes().decode().splitlines()


@pytest.mark.parametrize("subformat", KINDS)
def test_cli_changes_metadata_only(qemu_img: str, tmp_path: Path, subformat: str) -> None:
    path = make(tmp_path / "disk.vmdk", subformat)
    content, before = digest(path), descriptor_text(path)
    with Image.open(path) as image:
        cid = image.cid
    new_uuid = "12345678-1234-5678-1234-567812345678"
    assert main(["amend", "-o", "adapter_type=lsilogic,hwversion=7,geometry=520/255/63",
                 "-o", f"uuid={new_uuid},comment=moved to the new host,toolsversion=12352",
                 str(path)]) == 0
    with Image.open(path) as image:
        assert (image.adapter_type, image.hardware_version) == ("lsilogic", "7")
        assert image.geometry == (520, 255, 63)
        assert str(image.uuid) == new_uuid
        assert image.comment == "moved to the new host"
        assert image.descriptor.ddb_get("toolsVersion") == "12352"
        assert image.cid == cid
    assert digest(path) == content
    after = descriptor_text(path)
    changed = {line.split("=")[0].strip() for line in set(after) ^ set(before)}
    assert changed == {"ddb.adapterType", "ddb.virtualHWVersion", "ddb.geometry.cylinders",
                       "ddb.geometry.heads", "ddb.uuid.image", "ddb.comment", "ddb.toolsVersion"}
    assert "No errors were found" in run(qemu_img, "check", path).stdout
    info = json.loads(run(qemu_img, "info", "--output=json", path).stdout)
    assert info["virtual-size"] == SIZE


def test_new_uuid(tmp_path: Path) -> None:
    path = make(tmp_path / "disk.vmdk")
    with Image.open(path) as image:
        old = image.uuid
    amend(path, uuid="new")
    with Image.open(path) as image:
        assert image.uuid is not None and image.uuid != old and image.uuid.version == 4


def test_children_keep_matching(tmp_path: Path) -> None:
    base = make(tmp_path / "base.vmdk")
    child = tmp_path / "child.vmdk"
    snapshot(base, child)
    assert main(["amend", "-o", "adapter_type=pvscsi,comment=base of child", str(base)]) == 0
    with vmdk.open(child, "r+") as disk:  # a changed CID would refuse writing (CID mismatch)
        disk.write_at(0, b"still a snapshot of its parent")


@pytest.mark.parametrize("options, words", [
    ("adapter_type=lsilogic,geometry=10/300/63", "geometry 10/300/63 is out of range"),
    ("hwversion=7,adapter_type=scsi", "adapter type 'scsi' is not one of"),
    ("comment=ok,uuid=not-a-uuid", "is not a UUID"),
    ('hwversion=8,comment=say "hi"', "contains a quote"),
    ("toolsversion=x", "tools version 'x' is not a number"),
])
def test_all_or_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str], options: str,
                        words: str) -> None:
    path = make(tmp_path / "disk.vmdk")
    before = path.read_bytes()
    assert main(["amend", "-o", options, str(path)]) == 1
    assert words in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("options, words", [
    ("nonsense=1", "unknown option 'nonsense': amend changes adapter_type, hwversion"),
    ("subformat=monolithicFlat", "vmdk convert -o subformat="),
    ("size=10G", "vmdk resize"),
    ("compat6=on,hwversion=7", "cannot be used with hwversion"),
])
def test_refused_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], options: str,
                         words: str) -> None:
    path = make(tmp_path / "disk.vmdk")
    before = path.read_bytes()
    assert main(["amend", "-o", options, str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vmdk: error: ") and words in err, err
    assert path.read_bytes() == before


def test_stream_images_are_written_once(tmp_path: Path) -> None:
    path = make(tmp_path / "stream.vmdk", "streamOptimized")
    before = path.read_bytes()
    with pytest.raises(UnsupportedFormatError, match="written once.*convert"):
        amend(path, comment="x")
    assert path.read_bytes() == before


def test_image_in_use_is_refused(tmp_path: Path) -> None:
    path = make(tmp_path / "disk.vmdk")
    # A reader elsewhere: its view must not change under it
    with vmdk.open(path), pytest.raises(ImageInUseError, match="image is in use"):
        amend(path, adapter_type="lsilogic")
    base, child = make(tmp_path / "base.vmdk"), tmp_path / "child.vmdk"
    snapshot(base, child)
    # The parent is read through its snapshot
    with vmdk.open(child), pytest.raises(ImageInUseError, match="image is in use"):
        amend(base, comment="x")


def test_qemu_in_use_is_refused(qemu_img: str, tmp_path: Path) -> None:
    """qemu's locks are seen too (qemu-io holds the image open while it waits)."""
    import shutil
    import subprocess

    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed")
    path = make(tmp_path / "disk.vmdk")
    proc = subprocess.Popen(["qemu-io", "-f", "vmdk", str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        proc.stdout.readline()  # it has the image open now
        with pytest.raises(ImageInUseError, match="image is in use"):
            amend(path, comment="x")
    finally:
        proc.communicate("quit\n", timeout=30)


def test_change_tracking_is_kept(tmp_path: Path) -> None:
    """No content changes, so the tracking file stays valid and its name stays."""
    path = make(tmp_path / "disk.vmdk", "monolithicFlat")
    with Image.open(path, "r+", drop_change_tracking=True) as image:
        image.descriptor.set("changeTrackPath", "disk-ctk.vmdk")
    amend(path, comment="tracked")
    with Image.open(path) as image:
        assert image.descriptor.get("changeTrackPath") == "disk-ctk.vmdk"
        assert image.comment == "tracked"


def test_amended_parent_in_qemu_chain(qemu_img: str, tmp_path: Path) -> None:
    base = make(tmp_path / "base.vmdk")
    child = tmp_path / "child.vmdk"
    snapshot(base, child)
    amend(base, hardware_version=10, geometry=(100, 16, 63), uuid=uuid.uuid4())
    chain = json.loads(run(qemu_img, "info", "--output=json", "--backing-chain", child).stdout)
    assert [c["filename"] for c in chain] == [str(child), str(base)]
    assert run(qemu_img, "compare", child, base).returncode == 0
