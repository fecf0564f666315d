"""Crash consistency: a writer killed at random moments, and writes that fail with EIO/ENOSPC.

The workload is generated from a seed by ``WORKLOAD`` (source text shared by
the child process and this file), so the parent can recompute what the disk
held at every completed flush.  After each crash the image must open, check
without corruption (leaks and the unclean-shutdown warning are allowed), and
read back every grain untouched since the last completed flush exactly as it
was then; a grain written after it must hold one of the states it went
through (never a mix or garbage).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vmdk
import vmdk.check

SRC = Path(__file__).resolve().parents[1] / "src"
KiB, MiB = 1 << 10, 1 << 20
GRAIN = 64 * KiB
SPLIT = 2047 * MiB  # bytes in one twoGbMaxExtentSparse extent

#: Shared by the child writer and the checker: the operations of one round.
WORKLOAD = r'''
import random

def operations(seed, windows, count, grain):
    """(kind, offset, length, flush_after) for one round; kind is "data" or "zeros"."""
    rng = random.Random(seed)
    ops = []
    for _ in range(count):
        start, size = rng.choice(windows)
        shape = rng.random()
        if shape < 0.45:    # partial grain, maybe crossing a grain boundary
            length = rng.randrange(1, grain + grain // 2)
            offset = start + rng.randrange(size - length)
        elif shape < 0.75:  # whole grains
            length = grain * rng.randrange(1, 4)
            offset = start + rng.randrange((size - length) // grain + 1) * grain
        else:               # zeros, aligned or not
            length = rng.choice((grain, 2 * grain, rng.randrange(1, 3 * grain)))
            offset = start + rng.randrange(size - length)
            offset -= offset % (grain if rng.random() < 0.5 else 1)
        kind = "zeros" if shape >= 0.75 else "data"
        ops.append((kind, offset, length, rng.random() < 0.2))
    return ops

def payload(seed, index, length):
    return random.Random(f"{seed}:{index}").randbytes(length)
'''

CHILD = WORKLOAD + r'''
import os, sys, vmdk
import numpy  # writes load it on first use: load it before READY, so kills time writing only
path, seed, count, grain = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
windows = [tuple(map(int, w.split(":"))) for w in sys.argv[5].split(",")]
disk = vmdk.open(path, "r+")
print("READY", flush=True)
for i, (kind, offset, length, flush) in enumerate(operations(seed, windows, count, grain)):
    if kind == "data":
        disk.write_at(offset, payload(seed, i, length))
    else:
        disk.write_zeroes_at(offset, length)
    if flush:
        disk.flush()
        sys.stdout.write(f"FLUSHED {i + 1}\n")  # one write: a kill cannot split it
        sys.stdout.flush()
print("DONE", flush=True)
os._exit(0)  # no close: the last stretch after the final flush is a crash as well
'''

_ns: dict[str, Any] = {}
exec(WORKLOAD, _ns)
operations = _ns["operations"]
payload = _ns["payload"]


class Model:
    """What each window of the disk must read as, and what it may read as after a crash."""

    def __init__(self, windows: list[tuple[int, int]], contents: dict[int, bytes]) -> None:
        self.windows = windows
        self.data = {start: bytearray(contents[start]) for start, _ in windows}

    def _where(self, offset: int) -> tuple[int, int]:
        for start, size in self.windows:
            if start <= offset < start + size:
                return start, offset - start
        raise AssertionError(f"offset {offset} is outside every window")

    def apply(self, seed: int, index: int, op: tuple[str, int, int, bool]) -> None:
        kind, offset, length, _ = op
        start, rel = self._where(offset)
        data = payload(seed, index, length) if kind == "data" else bytes(length)
        self.data[start][rel:rel + length] = data

    def grains(self, op: tuple[str, int, int, bool]) -> range:
        _, offset, length, _ = op
        return range(offset // GRAIN, (offset + length - 1) // GRAIN + 1)

    def grain(self, g: int) -> bytes:
        start, rel = self._where(g * GRAIN)
        rel -= rel % GRAIN
        return bytes(self.data[start][rel:rel + GRAIN])


def read_windows(path: Path, windows: list[tuple[int, int]]) -> dict[int, bytes]:
    with vmdk.open(path) as disk:
        return {start: disk.read_at(start, size) for start, size in windows}


def verify(path: Path, windows: list[tuple[int, int]], before: dict[int, bytes], seed: int,
           ops: list[tuple[str, int, int, bool]], flushed: int, started: int) -> dict[int, bytes]:
    """Check the image after a crash; return its content as the next round's baseline.

    ``flushed`` ops were covered by a completed flush; ops ``flushed .. started``
    may or may not have reached the image.
    """
    result = vmdk.check.check(path)
    assert result.check_errors == 0 and result.corruptions == 0, (
        f"after a crash: {result.corruptions} corruptions, {result.check_errors} check errors: "
        f"{[p.message for p in result.problems if p.kind != 'leak']}")
    model = Model(windows, before)
    for i in range(flushed):
        model.apply(seed, i, ops[i])
    candidates: dict[int, list[bytes]] = {}
    for i in range(flushed, started):
        for g in model.grains(ops[i]):
            candidates.setdefault(g, [model.grain(g)])
        model.apply(seed, i, ops[i])
        for g in model.grains(ops[i]):
            candidates[g].append(model.grain(g))
    actual = read_windows(path, windows)
    after_flush = Model(windows, actual)
    reference = Model(windows, before)
    for i in range(flushed):
        reference.apply(seed, i, ops[i])
    for start, size in windows:
        for g in range(start // GRAIN, (start + size) // GRAIN):
            got = after_flush.grain(g)
            if g in candidates:
                assert got in candidates[g], (
                    f"grain {g} (byte {g * GRAIN}) written after the last flush holds none of "
                    f"its {len(candidates[g])} possible states")
            else:
                assert got == reference.grain(g), (
                    f"grain {g} (byte {g * GRAIN}) lost data flushed before the crash "
                    f"(op count at flush {flushed})")
    return actual


# ------------------------------------------------------------------- images

SCENARIOS = {
    # name: (windows as (start, size), disk size)
    "monolithicSparse": ([(0, 3 * MiB), (40 * MiB, 1 * MiB)], 48 * MiB),
    "twoGbMaxExtentSparse": ([(0, 2 * MiB), (SPLIT - 2 * MiB, 4 * MiB)], SPLIT + 8 * MiB),
    "child": ([(0, 3 * MiB)], 8 * MiB),
}


def make_image(folder: Path, scenario: str) -> Path:
    windows, size = SCENARIOS[scenario]
    path = folder / "disk.vmdk"
    if scenario == "child":
        base = folder / "base.vmdk"
        with vmdk.create(base, size) as disk:
            for i, pos in enumerate(range(0, size, 3 * GRAIN)):
                disk.write_at(pos, payload(99, i, GRAIN + 5000))
        vmdk.create(path, parent=base, zeroed_grain=True).close()
    else:
        vmdk.create(path, size, scenario).close()
    return path


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_and_kill(path: Path, seed: int, count: int, windows: list[tuple[int, int]],
                 delay: float) -> tuple[int, bool, float]:
    """Run the writer, SIGKILL it ``delay`` s after it is ready (never, when infinite).

    Returns (last flushed op, whether it finished, seconds from ready to its end).
    """
    arg = ",".join(f"{a}:{b}" for a, b in windows)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(seed), str(count), str(GRAIN), arg],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "READY", f"writer failed to start: {first!r} {proc.stderr.read()}"
        ready = time.monotonic()
        if delay != float("inf"):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - ready
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.split()
    flushed = 0
    for i, word in enumerate(lines[:-1]):
        if word == "FLUSHED" and lines[i + 1].isdigit():
            flushed = int(lines[i + 1])
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"writer failed ({proc.returncode}): {err[-3000:]}")
    return flushed, "DONE" in lines, took


ROUNDS = {"monolithicSparse": 10, "twoGbMaxExtentSparse": 10, "child": 10}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sigkill_during_random_writes(tmp_path: Path, scenario: str,
                                      report_rounds: Callable[[str], None]) -> None:
    windows, _ = SCENARIOS[scenario]
    path = make_image(tmp_path, scenario)
    baseline = read_windows(path, windows)
    rng = random.Random(f"crash:{scenario}")
    count = 250
    # One uninterrupted run first: kills then land inside the writer's own running time,
    # however fast or slow this machine is today.
    seed = rng.randrange(1 << 30)
    flushed, done, took = run_and_kill(path, seed, count, windows, float("inf"))
    assert done
    baseline = verify(path, windows, baseline, seed, operations(seed, windows, count, GRAIN),
                      flushed, count)
    killed = finished = 0
    for round_no in range(3 * ROUNDS[scenario]):
        if killed >= ROUNDS[scenario]:
            break
        seed = rng.randrange(1 << 30)
        ops = operations(seed, windows, count, GRAIN)
        delay = (rng.choice((0.0, 0.002)) if round_no % 4 == 0
                 else rng.uniform(0.02, 0.6) * took)
        flushed, done, run_took = run_and_kill(path, seed, count, windows, delay)
        baseline = verify(path, windows, baseline, seed, ops, flushed, count)
        if done:
            # Rewriting grains the first run allocated is faster than allocating them: the
            # kills aim inside the quickest whole run seen so far.
            finished += 1
            took = min(took, run_took)
        else:
            killed += 1
    # The image is still usable for writing after all those crashes.
    with vmdk.open(path, "r+") as disk:
        disk.write_at(0, b"after")
    assert vmdk.check.check(path).corruptions == 0
    report_rounds(f"{killed} writers killed mid-run and survived ({finished} finished first)")
    assert killed >= ROUNDS[scenario], "the writer is too fast: most kills came after its last op"


# --------------------------------------------------------------- I/O errors


class Faults:
    """Replaces os.pwrite / os.fdatasync / os.fsync; call number ``fail_at`` raises."""

    NAMES = ("pwrite", "fdatasync", "fsync")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int | None, code: int,
                 sticky: bool) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.code = code
        self.sticky = sticky
        self.injected = 0
        self.monkeypatch = monkeypatch
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real: Any) -> Any:
        def call(*args: Any) -> Any:
            self.calls += 1
            if self.fail_at is not None and (
                    self.calls == self.fail_at or (self.sticky and self.calls > self.fail_at)):
                self.injected += 1
                raise OSError(self.code, os.strerror(self.code))
            return real(*args)
        return call

    def remove(self) -> None:
        self.monkeypatch.undo()


def io_workload(path: Path, seed: int, windows: list[tuple[int, int]],
                ops: list[tuple[str, int, int, bool]], progress: list[int]) -> None:
    """Open, run the ops, flush where told, close; ``progress`` = [ops started, ops flushed]."""
    disk = vmdk.open(path, "r+")
    try:
        for i, (kind, offset, length, flush) in enumerate(ops):
            progress[0] = i + 1
            if kind == "data":
                disk.write_at(offset, payload(seed, i, length))
            else:
                disk.write_zeroes_at(offset, length)
            if flush:
                disk.flush()
                progress[1] = i + 1
        disk.flush()
        progress[1] = len(ops)
    except BaseException:
        try:
            disk.close()  # the fault may strike again here; the first error is the one reported
        except Exception:  # noqa: BLE001
            pass
        raise
    disk.close()


def names_file(exc: BaseException, files: list[str]) -> bool:
    name = getattr(exc, "filename", None)
    return bool(name) and any(os.path.basename(str(name)) == os.path.basename(f) or
                              str(name) == f for f in files)


IO_OPS = 24


@pytest.mark.parametrize("scenario", ["monolithicSparse", "twoGbMaxExtentSparse", "child"])
def test_io_errors_leave_a_consistent_image(tmp_path: Path, scenario: str,
                                            monkeypatch: pytest.MonkeyPatch,
                                            report_rounds: Callable[[str], None]) -> None:
    windows, _ = SCENARIOS[scenario]
    template = tmp_path / "template"
    template.mkdir()
    make_image(template, scenario)
    files = sorted(p.name for p in template.iterdir())
    seed = 4242
    ops = operations(seed, windows, IO_OPS, GRAIN)
    baseline = read_windows(template / "disk.vmdk", windows)

    # A clean run counts the system calls the workload makes.
    clean = tmp_path / "clean"
    clean.mkdir()
    for name in files:
        (clean / name).write_bytes((template / name).read_bytes())
    counter = Faults(monkeypatch, None, 0, False)
    io_workload(clean / "disk.vmdk", seed, windows, ops, [0, 0])
    counter.remove()
    total = counter.calls
    assert total > 10

    injected = runs = 0
    unnamed: list[str] = []
    broken: list[str] = []
    step = max(1, total // 25)
    for n in range(1, total + 1, step):
        work = tmp_path / f"run{n}"
        work.mkdir()
        runs += 1
        for name in files:
            (work / name).write_bytes((template / name).read_bytes())
        code = errno.EIO if n % 2 else errno.ENOSPC
        faults = Faults(monkeypatch, n, code, sticky=bool(n % 3 == 0))
        progress = [0, 0]
        error: BaseException | None = None
        try:
            io_workload(work / "disk.vmdk", seed, windows, ops, progress)
        except Exception as exc:  # noqa: BLE001 - what reaches the caller is under test
            error = exc
        finally:
            faults.remove()
        injected += faults.injected
        if faults.injected:
            assert error is not None, f"call {n}: an injected {errno.errorcode[code]} was swallowed"
            if not (isinstance(error, (vmdk.VmdkError, OSError)) and names_file(
                    error, [str(work / f) for f in files])):
                unnamed.append(f"call {n}: {type(error).__name__}: {error}")
        # Without the fault: the image opens, checks clean, and flushed data is intact.
        try:
            verify(work / "disk.vmdk", windows, baseline, seed, ops, progress[1], progress[0])
        except (AssertionError, vmdk.VmdkError) as exc:
            broken.append(f"call {n} ({errno.errorcode[code]}{', sticky' if n % 3 == 0 else ''}, "
                          f"after {error!r}): {type(exc).__name__}: {str(exc).splitlines()[0]}")
    report_rounds(f"{runs} runs, each failing one of the workload's {total} system calls "
                  f"(EIO or ENOSPC, some sticky): {injected} errors injected")
    assert not broken, (f"{len(broken)} of the faulted runs left a damaged image:\n"
                        + "\n".join(broken[:8]))
    assert not unnamed, ("I/O errors reached the caller without naming the image file:\n"
                         + "\n".join(unnamed[:5]))
