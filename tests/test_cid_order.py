"""The content ID changes durably before the first byte of new content reaches a file.

A child records its parent's CID; a parent written without a new CID on disk
lets its children open as if nothing changed and read the new bytes through
their holes.  A writer killed at any moment must leave either the old content
or a CID that tells the children their parent changed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import pattern

import vmdk
import vmdk.chain

SRC = Path(__file__).resolve().parents[1] / "src"
MiB = 1 << 20
SIZE = 4 * MiB

WRITER = r'''
import os, sys, vmdk
import numpy  # loaded before READY: the kill times measure writing, not the import
path, seed = sys.argv[1], int(sys.argv[2])
disk = vmdk.open(path, "r+")
print("READY", flush=True)
rng = __import__("random").Random(seed)
while True:  # never flushes: every byte written stays the page cache's to keep
    offset = rng.randrange(0, disk.size - 4096) & ~511
    disk.write_at(offset, rng.randbytes(4096))
'''


def _kill_writer(path: Path, seed: int, delay: float) -> None:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(seed)],
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"READY\n"
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("subformat", ["monolithicSparse", "twoGbMaxExtentSparse",
                                       "monolithicFlat"])
def test_a_parent_killed_mid_write_never_shows_children_new_bytes(
        tmp_path: Path, subformat: str, report_rounds: Callable[[str], None]) -> None:
    content = pattern(SIZE, seed=3, zero_every=0)
    rng = random.Random(subformat)
    rounds = 0
    started = time.monotonic()
    while rounds < 12 and time.monotonic() - started < 20:
        folder = tmp_path / f"r{rounds}"
        folder.mkdir()
        base, child = folder / "base.vmdk", folder / "child.vmdk"
        with vmdk.create(base, SIZE, subformat) as disk:
            disk.write(content)
        vmdk.chain.snapshot(base, child)
        # Kill at once (before or during the first write) or a little later.
        _kill_writer(base, rounds, rng.choice((0.0, 0.0005, 0.002, 0.01, 0.05)))
        rounds += 1
        try:
            opened = vmdk.open(child)
        except vmdk.ChainError as exc:
            assert "parentCID" in str(exc)
            continue  # the parent changed, and the child knows it
        with opened:
            assert opened.read_at(0, SIZE) == content, (
                f"round {rounds}: the child opened without a CID mismatch but its parent's "
                "content changed under it")
    report_rounds(f"{rounds} parent writers killed, children never misled")


def test_the_new_cid_is_on_disk_before_the_first_write_returns(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    with vmdk.create(base, MiB):
        pass
    with vmdk.open(base) as disk:
        before = disk.image.cid
    with vmdk.open(base, "r+") as disk:
        disk.write_at(0, b"x" * 512)
        # Another reader of the file (force_share: we hold the write lock) sees the new CID
        # already, without any flush.
        with vmdk.open(base, force_share=True) as other:
            assert other.image.cid != before
            assert other.image.cid == disk.image.cid
        cid = disk.image.cid
        disk.write_at(4096, b"y" * 512)
        assert disk.image.cid == cid  # once per open, as qemu does


def test_a_refused_write_changes_no_cid(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    with vmdk.create(base, MiB):
        pass
    with vmdk.open(base, "r+") as disk:
        cid = disk.image.cid
        with pytest.raises(vmdk.OutOfRangeError):
            disk.write_at(MiB, b"x")
        assert disk.image.cid == cid
    with vmdk.open(base) as disk:
        assert disk.image.cid == cid
