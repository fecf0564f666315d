"""Hints name only what can be used: on the command line, the verb's own options in their
spelling; in Python, the keyword arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmdk
from vmdk.chain import snapshot
from vmdk.cli import main

MiB = 1 << 20


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("vmdk: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "d.vmdk"
    with vmdk.create(path, 4 * MiB) as disk:
        disk.write_at(0, b"data")
    return path


def test_an_image_in_use_is_hinted_per_verb(image: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with vmdk.open(image, "r+"):
        assert main(["info", str(image)]) == 1
        assert "-U reads it anyway" in error_line(capsys)  # info has -U
        assert main(["resize", str(image), "8M"]) == 1
        err = error_line(capsys)  # a writer waits: nothing to share
        assert "-U" not in err and "force_share" not in err and "wait for it" in err
        with pytest.raises(vmdk.ImageInUseError, match="force_share=True reads it anyway"):
            vmdk.open(image)


def test_serve_never_suggests_an_option_it_lacks(image: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with vmdk.open(image):  # a reader: a writer (serve without --read-only) is refused
        assert main(["serve", "--port", "0", str(image)]) == 1
        err = error_line(capsys)
        assert "-U" not in err and "force_share" not in err
        assert "--read-only serves it" in err


def test_a_cid_mismatch_names_ignore_cid_where_the_verb_has_it(
        tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    child = tmp_path / "child.vmdk"
    snapshot(image, child)
    with vmdk.open(image, "r+") as disk:
        disk.write_at(0, b"changed")
    assert main(["convert", "-O", "raw", str(child), str(tmp_path / "out.raw")]) == 1
    err = error_line(capsys)
    assert "--ignore-cid opens it anyway" in err and "ignore_cid" not in err
    assert main(["resize", str(child), "8M"]) == 1
    err = error_line(capsys)  # resize writes: reading around the mismatch is no way out
    assert "ignore" not in err and "CID" in err
    with pytest.raises(vmdk.ChainError, match="ignore_cid=True opens it anyway"):
        vmdk.open(child)


def test_shrink_is_hinted_as_the_flag(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["resize", str(image), "1M"]) == 1
    assert "--shrink allows it" in error_line(capsys)


def test_a_tracked_image_is_served_read_only(image: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with vmdk.open(image, "r+") as disk:
        disk.image.descriptor.set("changeTrackPath", "d-ctk.vmdk")
    assert main(["serve", "--port", "0", str(image)]) == 1
    err = error_line(capsys)
    assert "--read-only serves it" in err and "drop_change_tracking" not in err


def test_partitions_are_hinted_as_the_create_option(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """It spoke of RawRange, which the command line has no way to give."""
    assert main(["create", "--allow-external", "-o",
                 "subformat=partitionedDevice,device=/dev/null", str(tmp_path / "p.vmdk")]) == 1
    err = error_line(capsys)
    assert "-o partitions=" in err and "RawRange" not in err
