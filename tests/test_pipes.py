"""Pipes both ways for raw disks, and no binary sent to (or awaited from) a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

import vmdk
from conftest import pattern

MiB = 1 << 20
SRC = Path(__file__).resolve().parents[1] / "src"
ENV = dict(os.environ, PYTHONPATH=str(SRC))


def vmdk_cli(*args: str | Path, stdin: bytes | int | None = None,
             stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    feed = stdin if isinstance(stdin, bytes) else None
    return subprocess.run([sys.executable, "-m", "vmdk", *map(str, args)], env=ENV,
                          input=feed, stdin=stdin if isinstance(stdin, int) else None,
                          stdout=stdout, stderr=subprocess.PIPE, check=False, timeout=120)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized",
                                       "twoGbMaxExtentFlat"])
def test_raw_from_a_pipe(tmp_path: Path, subformat: str) -> None:
    """`convert -f raw - out.vmdk` read the pipe as a VMDK stream and failed."""
    data = pattern(5 * MiB + 4096, seed=3)
    out = tmp_path / "out.vmdk"
    res = vmdk_cli("convert", "-f", "raw", "-o", f"subformat={subformat}", "-", out, stdin=data)
    assert res.returncode == 0, res.stderr
    with vmdk.open(out) as disk:
        assert disk.size == len(data)
        assert disk.read_at(0, len(data)) == data
    assert sorted(os.listdir(tmp_path))[0].startswith("out")  # no spool left behind


def test_raw_to_standard_output(tmp_path: Path) -> None:
    data = pattern(3 * MiB, seed=4)
    image = tmp_path / "d.vmdk"
    with vmdk.create(image, 4 * MiB) as disk:
        disk.write_at(0, data)
    res = vmdk_cli("convert", "-O", "raw", image, "-")
    assert res.returncode == 0, res.stderr
    assert res.stdout == data + bytes(MiB)


def test_raw_through_two_pipes(tmp_path: Path) -> None:
    data = pattern(2 * MiB, seed=5)
    res = vmdk_cli("convert", "-f", "raw", "-O", "raw", "-", "-", stdin=data)
    assert res.returncode == 0, res.stderr
    assert res.stdout == data


def _terminal() -> tuple[int, int]:
    try:
        return pty.openpty()
    except OSError as exc:
        pytest.skip(f"no pseudo-terminal here: {exc}")


def test_cat_refuses_to_write_binary_to_a_terminal(tmp_path: Path) -> None:
    image = tmp_path / "d.vmdk"
    vmdk.create(image, MiB).close()
    leader, follower = _terminal()
    try:
        res = vmdk_cli("cat", image, stdout=follower)
    finally:
        os.close(follower)
        os.close(leader)
    assert res.returncode == 1
    assert b"terminal" in res.stderr and b"Traceback" not in res.stderr


def test_a_terminal_on_standard_input_is_not_waited_on(tmp_path: Path) -> None:
    """`vmdk convert - out.vmdk` typed by hand used to sit waiting for a stream."""
    leader, follower = _terminal()
    try:
        res = vmdk_cli("convert", "-", tmp_path / "out.vmdk", stdin=follower)
    finally:
        os.close(follower)
        os.close(leader)
    assert res.returncode == 1
    assert b"standard input is a terminal" in res.stderr
    assert not (tmp_path / "out.vmdk").exists()
