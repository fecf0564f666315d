"""Broken snapshot chains: info shows what it can, check reports the break.

A child whose parent is missing, whose parent changed (CID mismatch) or whose
parents loop back to it used to make ``info`` fail and ``check`` say "No
errors were found": the chain is part of what a snapshot is.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import vmdk
import vmdk.convert
from vmdk.check import check
from vmdk.chain import snapshot
from vmdk.cli import main

MiB = 1 << 20


def _chain(tmp_path: Path) -> tuple[Path, Path]:
    base, child = tmp_path / "base.vmdk", tmp_path / "child.vmdk"
    with vmdk.create(base, 4 * MiB) as disk:
        disk.write_at(0, b"base")
    snapshot(base, child)
    return base, child


def _loop(tmp_path: Path) -> Path:
    """a's parent is b and b's parent is a (each hint rewritten by hand)."""
    _base, child = _chain(tmp_path)
    a, b = tmp_path / "a.vmdk", tmp_path / "b.vmdk"
    child.rename(a)
    snapshot(a, b)
    with vmdk.open(a, "r+", ignore_cid=False) as disk:
        disk.image.descriptor.parent_file_name_hint = "b.vmdk"
        disk.image.descriptor.parent_cid = disk.image.parent.cid if disk.image.parent else 0
    return a


def test_info_of_a_snapshot_whose_parent_is_missing(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    base, child = _chain(tmp_path)
    base.unlink()
    assert main(["info", str(child)]) == 0
    out = capsys.readouterr().out
    assert f"image: {child}" in out and "backing file: base.vmdk" in out
    assert main(["info", "--output=json", str(child)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backing-filename"] == "base.vmdk"
    assert info["full-backing-filename"] == str(base)
    # The whole chain cannot be shown: that is an error naming the missing parent.
    assert main(["info", "--backing-chain", str(child)]) == 1
    assert "base.vmdk" in capsys.readouterr().err


def test_check_reports_a_missing_parent(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    base, child = _chain(tmp_path)
    base.unlink()
    result = check(child)
    assert result.exit_code == 2
    assert any(p.kind == "chain" and "base.vmdk" in p.message for p in result.problems)
    assert main(["check", str(child)]) == 2
    out = capsys.readouterr().out
    assert "No errors" not in out and "base.vmdk" in out
    assert main(["check", "--output=json", str(child)]) == 2
    assert json.loads(capsys.readouterr().out)["chain-errors"] == 1


def test_check_reports_a_cid_mismatch(tmp_path: Path) -> None:
    base, child = _chain(tmp_path)
    with vmdk.open(base, "r+") as disk:
        disk.write_at(0, b"changed")
    result = check(child)
    assert result.exit_code == 2
    assert any(p.kind == "chain" and "CID" in p.message for p in result.problems)


def test_check_reports_a_parent_loop(tmp_path: Path) -> None:
    a = _loop(tmp_path)
    with pytest.raises(vmdk.ChainError):
        vmdk.open(a)
    result = check(a)
    assert result.exit_code == 2
    assert any(p.kind == "chain" and "loop" in p.message for p in result.problems)


def test_a_whole_chain_checks_clean(tmp_path: Path) -> None:
    _base, child = _chain(tmp_path)
    result = check(child)
    assert result.exit_code == 0 and not result.problems


def test_check_repair_of_a_damaged_stream_points_at_what_works(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A streamOptimized image is never changed in place: neither -r leaks nor -r all may
    send the user to the other; both name convert --recover, which then works."""
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(5).randbytes(4 * MiB))  # incompressible: grain 0 is 64 KiB
    stream = tmp_path / "s.vmdk"
    vmdk.convert.convert(src, stream, subformat="streamOptimized")
    data = bytearray(stream.read_bytes())
    data[70000:70100] = b"\xff" * 100  # inside the first grain's compressed data
    stream.write_bytes(bytes(data))
    for mode in ("leaks", "all"):
        assert main(["check", "-r", mode, str(stream)]) == 2
        out = capsys.readouterr().out
        assert "convert --recover" in out and "check -r all" not in out, out
    assert main(["convert", "--recover", "-O", "raw", str(stream),
                 str(tmp_path / "saved.raw")]) == 0
    saved = (tmp_path / "saved.raw").read_bytes()
    assert saved[65536:] == src.read_bytes()[65536:]  # all but the damaged first grain
