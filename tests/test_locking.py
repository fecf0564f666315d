"""Racing openers: of any number of writers started together, exactly one holds the image.

Locks are taken before conflicts are tested (as qemu does with its permission
bytes), so two openers can no longer both pass the test before either has
locked; a loser backs off and tries again briefly, so a race is never lost by
everyone.
"""

from __future__ import annotations

import os
import random
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import have

import vmdk

MiB = 1 << 20


def _racers(path: Path, modes: list[str]) -> list[str]:
    """Fork one opener per mode, release them together; each reports "win" or "lose".

    A winner keeps the image open until every opener has reported: however slow the
    machine, a second "win" in one round can only mean two holders at once.
    """
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    done_r, done_w = os.pipe()
    pids = []
    for mode in modes:
        pid = os.fork()
        if pid == 0:  # the child: wait for the start signal, open, report, hold
            code = 0
            try:
                os.close(go_w)
                os.close(done_w)
                os.read(go_r, 1)
                try:
                    disk = vmdk.open(path, mode)
                except vmdk.ImageInUseError:
                    os.write(out_w, b"L")
                else:
                    os.write(out_w, b"W")
                    os.read(done_r, 1)  # until the parent has every report (EOF)
                    disk.close()
            except BaseException:  # noqa: BLE001 - a forked child must never return to pytest
                code = 1
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(go_r)
    os.close(out_w)
    os.close(done_r)
    os.write(go_w, b"x" * len(modes))  # every child wakes on the same write
    os.close(go_w)
    results = b""
    deadline = time.monotonic() + 30
    while len(results) < len(modes) and time.monotonic() < deadline:
        ready, _, _ = select.select([out_r], [], [], 1)
        if ready:
            chunk = os.read(out_r, 64)
            if not chunk:
                break
            results += chunk
    os.close(out_r)
    os.close(done_w)  # the winner may close now
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "an opener failed unexpectedly"
    return ["win" if c == ord("W") else "lose" for c in results]


def test_exactly_one_of_racing_writers_wins(tmp_path: Path,
                                           report_rounds: Callable[[str], None]) -> None:
    path = tmp_path / "race.vmdk"
    with vmdk.create(path, MiB):
        pass
    rng = random.Random(11)
    rounds, started = 0, time.monotonic()
    while rounds < 40 and time.monotonic() - started < 12:
        writers = rng.choice((2, 3, 4))
        results = _racers(path, ["r+"] * writers)
        rounds += 1
        assert len(results) == writers
        assert results.count("win") == 1, (
            f"round {rounds}: {results.count('win')} of {writers} racing writers opened the "
            "image")
    report_rounds(f"{rounds} rounds of 2-4 racing writers, one winner each")
    assert rounds >= 10


def test_a_racing_reader_and_writer_never_both_hold(
        tmp_path: Path, report_rounds: Callable[[str], None]) -> None:
    path = tmp_path / "race.vmdk"
    with vmdk.create(path, MiB):
        pass
    rounds, started = 0, time.monotonic()
    while rounds < 20 and time.monotonic() - started < 6:
        results = _racers(path, ["r+", "r"])
        rounds += 1
        writer, reader = results if len(results) == 2 else (None, None)
        # Readers share with readers only: never a writer and a consistent reader at once.
        assert results.count("win") >= 1, f"round {rounds}: both lost"
        assert not (writer == reader == "win"), f"round {rounds}: both opened"
    report_rounds(f"{rounds} rounds of a racing reader and writer")


def test_a_held_writer_is_still_refused_after_the_retries(tmp_path: Path) -> None:
    path = tmp_path / "held.vmdk"
    with vmdk.create(path, MiB):
        pass
    with vmdk.open(path, "r+"):
        started = time.monotonic()
        with pytest.raises(vmdk.ImageInUseError, match="in use"):
            vmdk.open(path, "r+")
        assert time.monotonic() - started < 2  # the back-off is short and bounded


def test_a_bare_extent_does_not_conflict_with_itself(tmp_path: Path) -> None:
    """A COWD delta opened on its own is both the image and its extent: one file, one lock."""
    with vmdk.create(tmp_path / "base.vmdk", MiB):
        pass
    with vmdk.create(tmp_path / "snap.vmdk", None, "vmfsSparse", parent=tmp_path / "base.vmdk"):
        pass
    delta = tmp_path / "snap-delta.vmdk"
    before = delta.read_bytes()[:4]
    with vmdk.open(delta, "r+") as disk:
        disk.write_at(0, b"\x42" * 512)
    assert delta.read_bytes()[:4] == before == b"COWD"  # no descriptor text written over it
    with vmdk.open(delta) as disk:
        assert disk.read_at(0, 512) == b"\x42" * 512


@pytest.mark.interop
def test_racing_qemu_io_and_us_never_both_write(tmp_path: Path) -> None:
    if not have("qemu-io"):
        pytest.skip("qemu-io is not installed")
    path = tmp_path / "race.vmdk"
    with vmdk.create(path, MiB):
        pass
    rng = random.Random(5)
    for _ in range(8):
        proc = subprocess.Popen(["qemu-io", "-f", "vmdk", "-c", "sleep 400", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0, 0.08))
        try:
            disk = vmdk.open(path, "r+")
        except vmdk.ImageInUseError:
            ours = False
        else:
            ours = True
            time.sleep(0.5)  # past qemu-io's sleep: had it opened too, both held at once
            disk.close()
        _, err = proc.communicate(timeout=30)
        theirs = proc.returncode == 0 and "lock" not in err
        assert not (ours and theirs), "qemu-io and vmdk both opened the image for writing"
        assert ours or theirs, err


def _hard_linked_flat(tmp_path: Path, links: int) -> Path:
    """A descriptor whose flat extents are ``links`` names (hard links) of one file, each
    extent a different 1 MiB stretch of it."""
    vmdk.create(tmp_path / "one.vmdk", links * MiB, "monolithicFlat").close()
    lines = ["# Disk DescriptorFile", "version=1", "CID=fffffffe", "parentCID=ffffffff",
             'createType="monolithicFlat"', ""]
    for i in range(links):
        name = f"x{i}-flat.vmdk"
        os.link(tmp_path / "one-flat.vmdk", tmp_path / name)
        lines.append(f'RW 2048 FLAT "{name}" {i * 2048}')
    lines += ["", 'ddb.adapterType = "ide"', ""]
    path = tmp_path / "linked.vmdk"
    path.write_text("\n".join(lines))
    return path


def test_one_lock_per_file_however_many_names_it_has(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each more lock on a file makes every lock test and close on it slower: a descriptor
    naming one file 300 times took seconds to open (9,900 times: 18 s)."""
    import vmdk._lock

    path = _hard_linked_flat(tmp_path, 300)
    real = vmdk._lock.lock_image_file
    locked: list[str] = []

    def counting(fd: int, filename: str, *, write: bool) -> None:
        locked.append(filename)
        real(fd, filename, write=write)

    monkeypatch.setattr(vmdk._lock, "lock_image_file", counting)
    with vmdk.open(path) as disk:
        assert disk.size == 300 * MiB
    assert len(locked) == 2  # the descriptor and the one extent file


def test_an_image_whose_extents_are_hard_links_of_one_file_opens_for_writing(
        tmp_path: Path) -> None:
    """Two names of one file are one file: its own locks must not refuse each other."""
    path = _hard_linked_flat(tmp_path, 3)
    with vmdk.open(path, "r+") as disk:
        disk.write_at(2 * MiB, b"third")
    assert (tmp_path / "one-flat.vmdk").read_bytes()[2 * MiB:2 * MiB + 5] == b"third"
    with vmdk.open(path), pytest.raises(vmdk.ImageInUseError):
        vmdk.open(tmp_path / "one.vmdk", "r+")  # another descriptor of the same file
