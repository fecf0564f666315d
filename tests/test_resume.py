"""Interrupted commit, rebase and resize: killed at any moment, the images read as before,
and running the same command again finishes the job.

Two ways of killing are used.  A real SIGKILL of a subprocess at a random
moment, and a sweep: a forked worker runs the operation and ends itself with
``os._exit`` (nothing flushed, nothing closed, as after a SIGKILL) just before
its Nth system call that changes a file, for N over the whole operation, so
every step in between is visited once.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vmdk
import vmdk.cli
import vmdk.resize
from conftest import pattern, run
from vmdk.chain import commit, rebase, snapshot
from vmdk.check import check
from vmdk.extents.sparse import SparseExtent
from vmdk.image import Image

SRC = Path(__file__).resolve().parents[1] / "src"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SPLIT = 2047 * MiB  # bytes in one twoGbMaxExtentSparse extent

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img is not installed")

# ------------------------------------------------------------------ killing

#: The system calls that change files; a swept worker dies just before the Nth of them.
MUTATING = ("open", "pwrite", "pwritev", "write", "ftruncate", "fsync", "fdatasync",
            "rename", "replace", "unlink", "posix_fallocate")
DIED = 99


def _instrument(die_at: int | None) -> list[int]:
    """Count (and at ``die_at`` end the process before) every mutating call; in the worker."""
    calls = [0]
    real_exit = os._exit

    def wrap(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            if name != "open" or (len(args) > 1 and args[1] & os.O_CREAT):
                calls[0] += 1
                if calls[0] == die_at:
                    real_exit(DIED)
            return real(*args, **kwargs)
        return call

    for name in MUTATING:
        setattr(os, name, wrap(name, getattr(os, name)))
    return calls


def run_forked(action: Callable[[], None], die_at: int | None = None) -> int:
    """Run ``action`` in a forked worker that dies before mutating call ``die_at``.

    Returns the number of mutating calls of a finished run, or 0 when it died.
    """
    read_end, write_end = os.pipe()
    real_write = os.write
    with warnings.catch_warnings():
        # Python 3.12 warns about forking with threads (pytest-xdist has some); the worker
        # only runs our code and ends with os._exit.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the worker never returns into pytest
        code = 1
        try:
            os.close(read_end)
            calls = _instrument(die_at)
            action()
            real_write(write_end, str(calls[0]).encode())
            code = 0
        except BaseException:  # noqa: BLE001 - reported through stderr and the exit code
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == DIED:
        return 0
    assert code == 0, f"the worker failed (exit {code}) before dying at call {die_at}"
    return int(report)


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=sparse_copy)
    return dst


def sparse_copy(src: str, dst: str) -> None:
    """Copy only the stored ranges: flat extents of 2 GiB are mostly holes."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                pos = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # nothing stored past pos
                break
            end = os.lseek(fin.fileno(), pos, os.SEEK_HOLE)
            fin.seek(pos)
            fout.seek(pos)
            fout.write(fin.read(end - pos))
            pos = end
        fout.truncate(size)


#: VMDK_TEST_EVERY_CALL=1 dies at every call of every sweep, without a time limit (slow).
EVERY_CALL = bool(os.environ.get("VMDK_TEST_EVERY_CALL"))


def death_points(total: int, points: int) -> list[int]:
    """Up to about ``points`` call numbers spread over 1..total, the first and last included."""
    step = 1 if EVERY_CALL else max(1, total // points)
    return sorted(set(range(1, total + 1, step)) | {total})


def sweep(template: Path, work: Path, action: Callable[[Path], None],
          verify: Callable[[Path, int], None], *, points: int, budget: float) -> tuple[int, int]:
    """Die at each of the chosen points on a fresh copy of ``template``; (points, total calls)."""
    total = run_forked(lambda: action(copy_folder(template, work / "count")))
    assert total > 3
    started = time.monotonic()
    done = 0
    chosen = death_points(total, points)
    for n in chosen:
        if time.monotonic() - started > budget and not EVERY_CALL:
            break
        folder = copy_folder(template, work / f"die{n}")
        assert run_forked(lambda folder=folder: action(folder), die_at=n) == 0
        verify(folder, n)
        shutil.rmtree(folder)
        done += 1
    # A slow machine may cut the sweep short, never below half of it.
    assert done >= (len(chosen) + 1) // 2, (
        f"only {done} of {len(chosen)} death points ran in {budget} s")
    return done, total


DRIVER = r'''
import sys
import numpy  # loaded before READY: the kill times measure the operation, not imports
import time
import vmdk.chain
print("READY", flush=True)
started = time.monotonic()
verb, args = sys.argv[1], sys.argv[2:]
if verb == "commit":
    vmdk.chain.commit(args[0])
else:
    vmdk.chain.rebase(args[0], args[1])
print("DONE", time.monotonic() - started, flush=True)
'''


def sigkill_after(args: list[str], delay: float) -> tuple[bool, float]:
    """Run the driver and SIGKILL it ``delay`` s after READY (never, when infinite).

    Returns whether it finished and the seconds its operation took (when it did).
    """
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "READY", f"driver failed: {first!r} {proc.communicate()}"
        if delay != float("inf"):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), f"driver failed: {err[-3000:]}"
    words = out.split()
    done = "DONE" in words
    return done, float(words[words.index("DONE") + 1]) if done else 0.0


def sigkill_rounds(template: Path, work: Path, args: Callable[[Path], list[str]],
                   verify: Callable[[Path, int], None], *, rounds: int, budget: float,
                   seed: str) -> tuple[int, int]:
    """Kill the driver at random moments inside its running time; (rounds, finished first)."""
    rng = random.Random(seed)
    calibrate = copy_folder(template, work / "calibrate")
    done, took = sigkill_after(args(calibrate), float("inf"))
    assert done
    started = time.monotonic()
    count = finished = 0
    while count < rounds and time.monotonic() - started < budget:
        folder = copy_folder(template, work / f"kill{count}")
        done, _ = sigkill_after(args(folder), rng.uniform(0.0, 1.1) * took)
        verify(folder, count)
        finished += done
        count += 1
        shutil.rmtree(folder)
    return count, finished


# ------------------------------------------------------------------ helpers


def qemu_size(path: Path) -> int:
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "vmdk", path).stdout)
    return int(info["virtual-size"])


def our_size(path: Path) -> int:
    with vmdk.open(path) as disk:
        return int(disk.size)


def read_all(path: Path) -> bytes:
    with vmdk.open(path) as disk:
        return bytes(disk.read())


def assert_sound(path: Path) -> int:
    """No corruption in our check or qemu's; returns the leaked grains (a crash may leave them)."""
    result = check(path)
    assert result.corruptions == 0 and result.check_errors == 0, (
        f"{path.name}: {[p.message for p in result.problems]}")
    qemu = run("qemu-img", "check", "-f", "vmdk", path, check=False)
    assert qemu.returncode == 0, f"qemu-img check {path.name}: {qemu.stdout}{qemu.stderr}"
    return result.leaks


# ------------------------------------------------------------------ commit

COMMIT_SIZE = 12 * MiB


def make_commit_chain(folder: Path) -> bytes:
    """A parent and a child with about 5 MiB stored over it; the child's content."""
    folder.mkdir()
    base, child = folder / "base.vmdk", folder / "child.vmdk"
    with vmdk.create(base, COMMIT_SIZE) as disk:
        disk.write(pattern(COMMIT_SIZE, seed=11))
    snapshot(base, child)
    with vmdk.open(child, "r+") as disk:
        for i, start in enumerate(range(0, COMMIT_SIZE - 2 * MiB, 3 * MiB)):
            disk.write_at(start + 4096 * i + 100, pattern(MiB + 1000, seed=20 + i))
        disk.write_zeroes_at(COMMIT_SIZE - MiB, MiB // 2 + 512)  # zeros over the parent's data
    return read_all(child)


def commit_pending(folder: Path) -> bool:
    """Whether the parent already has another CID than the child's parentCID."""
    with Image.open(folder / "base.vmdk") as base, \
            Image.open(folder / "child.vmdk", open_parent=False) as child:
        return bool(base.cid != child.parent_cid)


def verify_commit(folder: Path, expected: bytes, raw: Path) -> int:
    """After a killed commit: the child reads as before; a second commit finishes the job."""
    base, child = folder / "base.vmdk", folder / "child.vmdk"
    assert read_all(child) == expected, "the child reads differently after the killed commit"
    run("qemu-img", "info", "-f", "vmdk", child)  # what the commit left in it qemu opens too
    commit(child)
    assert read_all(child) == expected
    assert read_all(base) == expected, "the parent does not hold the child's data"
    leaks = assert_sound(base) + assert_sound(child)
    if leaks:  # grains the killed commit wrote before its tables: check -r gives them back
        assert check(base, repair="leaks").exit_code == 0
        assert read_all(base) == expected
    chain = run("qemu-img", "info", "--backing-chain", "-f", "vmdk", child).stdout
    assert "base.vmdk" in chain
    assert run("qemu-img", "compare", "-f", "vmdk", "-F", "raw", child, raw,
               check=False).returncode == 0
    with vmdk.open(child) as disk:  # finished: nothing of the commit is left in the child
        assert disk.image.descriptor.ddb_get("ddb.pendingParentCID") is None
        assert disk.image.parent_cid == disk.image.parent.cid
    return leaks


@pytest.fixture
def commit_template(tmp_path: Path) -> tuple[Path, bytes, Path]:
    expected = make_commit_chain(tmp_path / "template")
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    return tmp_path / "template", expected, raw


def test_commit_killed_by_sigkill_can_be_finished(tmp_path: Path,
                                                  commit_template: tuple[Path, bytes, Path]
                                                  ) -> None:
    template, expected, raw = commit_template
    leaks: list[int] = []
    pending: list[bool] = []

    def verify(folder: Path, _round: int) -> None:
        pending.append(commit_pending(folder))
        leaks.append(verify_commit(folder, expected, raw))

    rounds, finished = sigkill_rounds(
        template, tmp_path, lambda f: ["commit", str(f / "child.vmdk")], verify,
        rounds=8, budget=5, seed="commit")
    print(f"commit: {rounds} SIGKILL rounds ({finished} finished first, {sum(pending)} killed "
          f"with the parent changed), leaked grains after the second commit: {leaks}")
    assert rounds >= 4 and finished < rounds


def test_commit_dying_at_every_step_can_be_finished(tmp_path: Path,
                                                    commit_template: tuple[Path, bytes, Path]
                                                    ) -> None:
    template, expected, raw = commit_template
    leaks: list[int] = []

    def verify(folder: Path, _n: int) -> None:
        leaks.append(verify_commit(folder, expected, raw))

    points, total = sweep(template, tmp_path, lambda f: commit(f / "child.vmdk"), verify,
                          points=10, budget=4)
    print(f"commit: died at {points} of its {total} file-changing calls; leaked grains "
          f"after the second commit: {leaks}")


def test_commit_growing_its_parent_dying_at_every_step_can_be_finished(tmp_path: Path) -> None:
    """The parent grows to the child's size first: with the CID the child names, too."""
    template = tmp_path / "template"
    template.mkdir()
    base, child = template / "base.vmdk", template / "child.vmdk"
    with vmdk.create(base, 2 * MiB) as disk:
        disk.write(pattern(2 * MiB, seed=12))
    snapshot(base, child)
    vmdk.resize.resize(child, 34 * MiB)  # the parent needs a second grain table for it
    with vmdk.open(child, "r+") as disk:
        disk.write_at(MiB, pattern(MiB, seed=13))
        disk.write_at(33 * MiB, pattern(MiB, seed=14))
    expected = read_all(child)
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)

    def verify(folder: Path, _n: int) -> None:
        verify_commit(folder, expected, raw)

    done, total = sweep(template, tmp_path, lambda f: commit(f / "child.vmdk"), verify,
                        points=8, budget=4)
    print(f"commit growing its parent: died at {done} of its {total} file-changing calls")


def test_a_commit_pending_in_a_child_accepts_no_other_parent_change(
        tmp_path: Path, commit_template: tuple[Path, bytes, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    """The interrupted commit is accepted; a parent written by anyone else is not."""
    template, expected, _raw = commit_template
    folder = _commit_killed_after_the_parent_changed(template, tmp_path)
    with caplog.at_level("WARNING"):
        assert read_all(folder / "child.vmdk") == expected
    assert any("commit into its parent" in r.getMessage() and "interrupted" in r.getMessage()
               for r in caplog.records)
    pair = tmp_path / "pair"  # the child also takes writes meanwhile, and commit takes them
    copy_folder(folder, pair)
    with vmdk.open(pair / "child.vmdk", "r+") as disk:
        disk.write_at(5000, b"written meanwhile")
    commit(pair / "child.vmdk")
    assert read_all(pair / "base.vmdk")[5000:5017] == b"written meanwhile"
    with vmdk.open(folder / "base.vmdk", "r+") as disk:
        disk.write_at(0, b"someone else")
    for mode in ("r", "r+"):
        with pytest.raises(vmdk.ChainError, match="parentCID"):
            vmdk.open(folder / "child.vmdk", mode)


def _commit_killed_after_the_parent_changed(template: Path, work: Path) -> Path:
    """A copy of ``template`` whose commit died once the parent's CID had changed."""
    total = run_forked(lambda: commit(copy_folder(template, work / "count") / "child.vmdk"))
    for n in range(total // 2, total):
        folder = copy_folder(template, work / f"die{n}")
        assert run_forked(lambda folder=folder: commit(folder / "child.vmdk"), die_at=n) == 0
        if commit_pending(folder):
            return folder
    raise AssertionError("no death point left the parent with a new CID")


# ------------------------------------------------------------------ rebase


def make_rebase_chain(folder: Path) -> tuple[bytes, bytes]:
    """base <- mid <- top <- grand; the contents of top and grand."""
    folder.mkdir()
    paths = [folder / n for n in ("base.vmdk", "mid.vmdk", "top.vmdk", "grand.vmdk")]
    with vmdk.create(paths[0], COMMIT_SIZE) as disk:
        disk.write(pattern(COMMIT_SIZE, seed=31))
    for i, (lower, upper) in enumerate(itertools.pairwise(paths), 1):
        snapshot(lower, upper)
        with vmdk.open(upper, "r+") as disk:
            for j, start in enumerate(range(i * MiB, COMMIT_SIZE - MiB, 4 * MiB)):
                disk.write_at(start + 333 * j, pattern(MiB + 7000, seed=40 + 10 * i + j))
    return read_all(paths[2]), read_all(paths[3])


def verify_rebase(folder: Path, top_content: bytes, grand_content: bytes) -> None:
    top, grand = folder / "top.vmdk", folder / "grand.vmdk"
    assert read_all(top) == top_content, "the child reads differently after the killed rebase"
    assert read_all(grand) == grand_content, "its own snapshot reads differently"
    rebase(top, folder / "base.vmdk")
    with vmdk.open(top) as disk:
        assert Path(disk.image.parent.path).name == "base.vmdk"
        assert disk.read() == top_content
    assert read_all(grand) == grand_content
    for path in (top, grand):
        assert_sound(path)
    assert "base.vmdk" in run("qemu-img", "info", "--backing-chain", "-f", "vmdk", grand).stdout


@pytest.fixture
def rebase_template(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    top, grand = make_rebase_chain(tmp_path / "template")
    return tmp_path / "template", top, grand


def test_rebase_killed_by_sigkill_can_be_finished(tmp_path: Path,
                                                  rebase_template: tuple[Path, bytes, bytes]
                                                  ) -> None:
    template, top, grand = rebase_template
    rounds, finished = sigkill_rounds(
        template, tmp_path, lambda f: ["rebase", str(f / "top.vmdk"), str(f / "base.vmdk")],
        lambda f, _n: verify_rebase(f, top, grand), rounds=5, budget=4, seed="rebase")
    print(f"rebase: {rounds} SIGKILL rounds ({finished} finished first)")
    assert rounds >= 4 and finished < rounds


def test_rebase_dying_at_every_step_can_be_finished(tmp_path: Path,
                                                    rebase_template: tuple[Path, bytes, bytes]
                                                    ) -> None:
    template, top, grand = rebase_template
    points, total = sweep(template, tmp_path,
                          lambda f: rebase(f / "top.vmdk", f / "base.vmdk"),
                          lambda f, _n: verify_rebase(f, top, grand), points=8, budget=4)
    print(f"rebase: died at {points} of its {total} file-changing calls")


# ------------------------------------------------------------------ resize

SPLIT_SMALL = SPLIT + 64 * MiB  # two extents, the second one short
SPLIT_BIG = 3 * SPLIT + 100 * MiB  # four extents
WINDOWS = [(0, MiB), (SPLIT - 300 * KiB, 600 * KiB), (SPLIT_SMALL - MiB, MiB)]


def make_split(folder: Path, subformat: str = "twoGbMaxExtentSparse") -> Path:
    folder.mkdir()
    path = folder / "split.vmdk"
    with vmdk.create(path, SPLIT_SMALL, subformat) as disk:
        for i, (start, length) in enumerate(WINDOWS):
            disk.write_at(start, pattern(length, seed=60 + i))
    return path


def assert_windows(path: Path) -> None:
    with vmdk.open(path) as disk:
        for i, (start, length) in enumerate(WINDOWS):
            assert disk.read_at(start, length) == pattern(length, seed=60 + i), (
                f"{path.name}: the data at {start} changed")


def verify_resize(path: Path, before: int, target: int) -> None:
    """After a killed resize: one size for us and qemu, the data kept; a re-run finishes."""
    ours, theirs = our_size(path), qemu_size(path)
    assert ours == theirs, f"vmdk says {ours} bytes, qemu-img {theirs}"
    assert min(before, target) <= ours <= max(before, target)
    assert_windows(path)
    words = ["resize", "-q", *(["--shrink"] if target < before else []), str(path), str(target)]
    assert vmdk.cli.main(words) == 0
    assert our_size(path) == qemu_size(path) == target
    assert_windows(path)
    assert_sound(path)
    names = {p.name for p in path.parent.iterdir()}
    with vmdk.open(path) as disk:
        named = {path.name} | {Path(e.filename).name for e in disk.image.extents
                               if e.filename}
    assert names == named, f"files left behind: {sorted(names - named)}"
    if target < before:  # and what the shrink left behind does not stop a grow
        vmdk.resize.resize(path, before)
        assert our_size(path) == qemu_size(path) == before


@pytest.mark.parametrize(("subformat", "direction", "points"), [
    ("twoGbMaxExtentSparse", "grow", 12), ("twoGbMaxExtentSparse", "shrink", 8),
    ("twoGbMaxExtentFlat", "grow", 6), ("twoGbMaxExtentFlat", "shrink", 6)])
def test_split_resize_dying_at_every_step_can_be_finished(tmp_path: Path, subformat: str,
                                                          direction: str, points: int) -> None:
    path = make_split(tmp_path / "template", subformat)
    before, target = SPLIT_SMALL, SPLIT_BIG
    if direction == "shrink":
        vmdk.resize.resize(path, SPLIT_BIG)
        before, target = SPLIT_BIG, SPLIT_SMALL
    done, total = sweep(
        tmp_path / "template", tmp_path,
        lambda f: vmdk.resize.resize(f / path.name, target, shrink=True),
        lambda f, _n: verify_resize(f / path.name, before, target), points=points, budget=6)
    print(f"{subformat} {direction}: died at {done} of its {total} file-changing calls")


def test_split_grow_failing_after_the_new_extents_can_be_finished(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_split(tmp_path / "d")
    real = SparseExtent.create
    made: list[str] = []

    def create_then_fail(*args: Any, **kwargs: Any) -> SparseExtent:
        extent = real(*args, **kwargs)
        made.append(os.path.basename(args[0]))
        if len(made) == 2:  # the second (and last) new extent file of this grow
            extent.close()
            raise OSError(errno.EIO, "injected after the new extent files were made")
        return extent

    monkeypatch.setattr(SparseExtent, "create", create_then_fail)
    with pytest.raises((OSError, vmdk.VmdkError)):
        vmdk.resize.resize(path, SPLIT_BIG)
    monkeypatch.undo()
    assert [m[:15] for m in made] == ["split-s003.vmdk", "split-s004.vmdk"]
    verify_resize(path, SPLIT_SMALL, SPLIT_BIG)


def test_split_shrink_tells_qemu_the_new_size(tmp_path: Path) -> None:
    path = make_split(tmp_path / "d")
    vmdk.resize.resize(path, SPLIT_SMALL + 64 * MiB)
    vmdk.resize.resize(path, SPLIT_SMALL, shrink=True)  # the last extent gets shorter
    assert our_size(path) == qemu_size(path) == SPLIT_SMALL
    assert_windows(path)
    assert_sound(path)


def test_a_leftover_holding_data_is_never_replaced(tmp_path: Path) -> None:
    path = make_split(tmp_path / "d")
    leftover = tmp_path / "d" / "split-s003.vmdk"
    with vmdk.create(leftover, MiB, "monolithicSparse") as disk:
        disk.write_at(0, b"keep me")
    before = leftover.read_bytes()
    with pytest.raises(vmdk.VmdkError, match="split-s003.vmdk"):
        vmdk.resize.resize(path, SPLIT_BIG)
    assert leftover.read_bytes() == before
    assert our_size(path) == qemu_size(path) == SPLIT_SMALL


@pytest.mark.parametrize("grown", [30 * MiB, 100 * MiB, 40 * GiB],
                         ids=["same-tables", "in-place", "moved"])
def test_monolithic_grow_dying_at_every_step_can_be_finished(tmp_path: Path, grown: int
                                                             ) -> None:
    folder = tmp_path / "template"
    folder.mkdir()
    data = pattern(3 * MiB, seed=70)
    with vmdk.create(folder / "m.vmdk", 3 * MiB) as disk:
        disk.write(data)

    def verify(f: Path, _n: int) -> None:
        path = f / "m.vmdk"
        ours, theirs = our_size(path), qemu_size(path)
        assert ours == theirs, f"vmdk says {ours} bytes, qemu-img {theirs}"
        assert ours in (3 * MiB, grown)
        with vmdk.open(path) as disk:
            assert disk.read_at(0, 3 * MiB) == data
        assert vmdk.cli.main(["resize", "-q", str(path), str(grown)]) == 0
        assert our_size(path) == qemu_size(path) == grown
        assert_sound(path)

    points, total = sweep(folder, tmp_path, lambda f: vmdk.resize.resize(f / "m.vmdk", grown),
                          verify, points=10, budget=4)
    print(f"monolithic grow: died at {points} of its {total} file-changing calls")


# ------------------------------------------------------------------ part 9: no leak


@pytest.mark.parametrize(("subformat", "start", "steps"), [
    ("monolithicSparse", MiB, [(40 * GiB, [39 * GiB])]),    # the directory must move
    ("monolithicSparse", MiB, [(100 * MiB, [99 * MiB])]),   # entries added in place
    # one table at a time into s001 (qemu writing after each), then to full and into s002
    ("twoGbMaxExtentSparse", 100 * MiB, [(160 * MiB, [150 * MiB]), (192 * MiB, [190 * MiB]),
                                         (3 * GiB, [1600 * MiB, 2 * GiB + 5 * MiB])]),
], ids=["moved", "in-place", "split"])
def test_resize_then_a_qemu_write_leaves_no_leak(tmp_path: Path, subformat: str, start: int,
                                                 steps: list[tuple[int, list[int]]]) -> None:
    path = tmp_path / "g.vmdk"
    with vmdk.create(path, start, subformat) as disk:
        disk.write_at(0, pattern(MiB, seed=80))
    for grown, writes in steps:
        vmdk.resize.resize(path, grown)
        commands = [w for offset in writes for w in ("-c", f"write -P 0x5a {offset} 64k")]
        run("qemu-io", "-f", "vmdk", *commands, path)
        result = check(path)
        assert result.exit_code == 0, [p.message for p in result.problems]
        assert run("qemu-img", "check", "-f", "vmdk", path, check=False).returncode == 0
    with vmdk.open(path) as disk:
        for offset in (w for _grown, writes in steps for w in writes):
            assert disk.read_at(offset, 64 * KiB) == b"\x5a" * (64 * KiB)
        assert disk.read_at(0, MiB) == pattern(MiB, seed=80)
