"""Benchmark vmdk against qemu-img, qemu-io and pyvmdk on workloads it makes itself.

Every measured command runs in its own child process, so that its peak memory
(``ru_maxrss``, read by GNU time or by a small launcher calling
:func:`os.wait4`) belongs to it alone. The contenders of a
case run alternately, round after round (ours first in odd rounds, last in
even ones), after the page cache holds every input and after ``sync``. The
table gives medians and the ratio of ours to the reference in time, where
lower is better. Nothing is asserted: this is a benchmark, not a test.

    python -m bench                          # 1 GiB disk, 3 rounds
    python -m bench --size 256M --rounds 1   # quick look
    python -m bench --only raw-to-stream --only open-2t
"""

from __future__ import annotations

import argparse
import dataclasses
import filecmp
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
SEED = 20240601

#: The working tree's ``src`` folder, put first on the children's PYTHONPATH so
#: that the code under test is the checkout, installed or not.
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

# ------------------------------------------------------------------ children
#
# Scripts for ``python -c``. Each times only its own loop and prints
# {"seconds": ...}; the parent reads that instead of the wall clock.

RANDOM_IO = r"""
import json, sys, time, vmdk
path, mode, offsets_file = sys.argv[1:4]
offsets = [int(x) for x in open(offsets_file).read().split()]
buf = bytes([0x5A]) * 4096
disk = vmdk.open(path, "r+" if mode == "write" else "r")
t0 = time.perf_counter()
if mode == "write":
    for off in offsets:
        disk.write_at(off, buf)
else:
    for off in offsets:
        disk.read_at(off, 4096)
disk.close()
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

SEQ_READ = r"""
import json, mmap, sys, time, vmdk
path, block, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
disk = vmdk.open(path)
size = disk.size
ends = range(0, size - size % block, block)
t0 = time.perf_counter()
if mode == "bytes":  # a new bytes object per read, as pyvmdk returns
    for off in ends:
        disk.read_at(off, block)
else:  # one reused buffer: a bytearray, or page-aligned memory
    buf = bytearray(block) if mode == "bytearray" else memoryview(mmap.mmap(-1, block))
    for off in ends:
        disk.readinto_at(off, buf)
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": size - size % block}))
disk.close()
"""

SEQ_READ_PYVMDK = r"""
import json, sys, time, pyvmdk
path, block = sys.argv[1], int(sys.argv[2])
h = pyvmdk.handle()
h.open(path)
h.open_extent_data_files()
size = h.get_media_size()
t0 = time.perf_counter()
for off in range(0, size - size % block, block):
    h.read_buffer_at_offset(block, off)
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": size - size % block}))
h.close()
"""

MOUNT_READ = r"""
import json, os, subprocess, sys, tempfile, time
image = sys.argv[1]
with tempfile.TemporaryDirectory() as point:
    mount = subprocess.Popen([sys.executable, "-m", "vmdk", "mount", "-f", image, point],
                             stdout=subprocess.PIPE, text=True)
    try:
        if not mount.stdout.readline().startswith("mounted"):  # the line once it is up
            sys.exit("vmdk mount failed")
        t0 = time.perf_counter()
        subprocess.run(["sh", "-c", 'exec cat "$1" > /dev/null', "sh",
                        os.path.join(point, "disk")], check=True)
        seconds = time.perf_counter() - t0
        with open(f"/proc/{mount.pid}/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    finally:
        subprocess.run([sys.executable, "-m", "vmdk", "umount", point], check=True)
        mount.wait(timeout=60)
print(json.dumps({"seconds": seconds, "mount_rss": peak * 1024}))
"""

OPEN_INFO = r"""
import json, sys, time
t0 = time.perf_counter()
import vmdk
t1 = time.perf_counter()
with vmdk.open(sys.argv[1]) as disk:
    disk.info()
t2 = time.perf_counter()
print(json.dumps({"open_info": t2 - t1, "import": t1 - t0}))  # the case measures the wall
"""

MAKE_CHILD = r"""
import random, sys, vmdk
child, parent, seed, fraction = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
rng = random.Random(seed)
with vmdk.create(child, parent=parent) as disk:
    budget = int(disk.size * fraction)
    while budget > 0:
        length = rng.randint(1, 64) * 4096
        off = rng.randrange(0, (disk.size - length) // 4096) * 4096
        disk.write_at(off, rng.randbytes(length))
        budget -= length
"""

#: Serve an image over NBD (``vmdk serve`` or qemu-nbd) on a Unix socket, run one client
#: against it, stop the server: the client's time alone is reported.
NBD_READ = r"""
import json, os, subprocess, sys, tempfile, time
server, image, client = sys.argv[1], sys.argv[2], sys.argv[3:]
folder = tempfile.mkdtemp()
sock = os.path.join(folder, "nbd.sock")
uri = "nbd+unix:///?socket=" + sock
if server == "ours":
    argv = [sys.executable, "-m", "vmdk", "serve", "--read-only", "--socket", sock, image]
else:
    argv = ["qemu-nbd", "--read-only", "--format=vmdk", "--shared=16", "--persistent",
            "--socket=" + sock, image]
proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
try:
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("the NBD server did not start")
        time.sleep(0.01)
    t0 = time.perf_counter()
    subprocess.run([a.replace("URI", uri) for a in client], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
finally:
    proc.terminate()
    proc.wait()
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)
print(json.dumps({"seconds": seconds}))
"""

#: The least any stream writer must do: compress every data grain with the same engine and
#: level, on one core, and write the compressed bytes (no markers, tables or zero detection
#: of interest: all-zero grains are skipped with one compare).
STREAM_CEILING = r"""
import json, os, sys, time
import numpy as np
from isal import isal_zlib
path, out = sys.argv[1], sys.argv[2]
grain = 65536
# Which grains hold data is found first, untimed: the ceiling is the compression and the
# writing that no stream writer can avoid.
disk = np.memmap(path, dtype=np.uint64, mode="r")
data = np.flatnonzero(disk[: disk.size - disk.size % 8192].reshape(-1, 8192).any(axis=1))
del disk
t0 = time.perf_counter()
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
with open(path, "rb", buffering=0) as f:
    buf = bytearray(grain)
    parts = []
    for g in data.tolist():
        f.seek(g * grain)
        f.readinto(buf)
        parts.append(isal_zlib.compress(buf, 1))
        if len(parts) == 64:
            os.writev(fd, parts)
            parts = []
    if parts:
        os.writev(fd, parts)
os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

VERSIONS = r"""
import json, importlib
out = {}
for name in ("vmdk", "numpy", "isal", "pyvmdk"):
    try:
        mod = importlib.import_module(name)
    except ImportError:
        out[name] = "not installed"
        continue
    out[name] = getattr(mod, "__version__", None) or (mod.get_version() if name == "pyvmdk" else "?")
print(json.dumps(out))
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Users' installs carry compiled bytecode; a sandbox that forbids writing it would
    # make every run recompile the package and time the compiler instead.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if os.path.isdir(SRC):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


# ---------------------------------------------------------------- measuring


@dataclasses.dataclass
class Sample:
    seconds: float          # what the case measures (wall clock, or what the child reports)
    wall: float             # wall clock of the whole child process
    maxrss: int             # peak resident set of the child, bytes
    report: dict[str, Any]  # the child's JSON line, if it printed one


class ChildFailed(Exception):
    pass


#: Runs a command and writes its peak RSS (KiB) to a file. The measuring
#: process must be small: on Linux a child's ru_maxrss starts at the RSS of the
#: process it was forked from, so wait4 from this (numpy-sized) parent would
#: report at least the parent's size. GNU time is used when installed.
LAUNCH = r"""
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def spawn(argv: list[str], parse: Callable[[str], float] | None = None) -> Sample:
    """Run ``argv`` to completion: its wall time, peak RSS and JSON report."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        if GNU_TIME:
            wrapped = [GNU_TIME, "-f", "%M", "-o", rss.name, *argv]
        else:
            wrapped = [sys.executable, "-S", "-c", LAUNCH, rss.name, *argv]
        t0 = time.perf_counter()
        done = subprocess.run(wrapped, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                              env=child_env())
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        maxrss = int((rss.read().split() or ["0"])[-1]) * 1024
    if done.returncode != 0:
        tail = (errors.strip() or text.strip()).splitlines()[-1:] or [""]
        raise ChildFailed(f"{os.path.basename(argv[0])} exited {done.returncode}: {tail[0][:200]}")
    report: dict[str, Any] = {}
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            report = json.loads(line)
            break
    seconds = parse(text) if parse else float(report.get("seconds", wall))
    return Sample(seconds, wall, maxrss, report)


def run_checked(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   env=child_env())


def warm(paths: Iterable[str]) -> None:
    """Read every input once so that all contenders start from the page cache."""
    buf = bytearray(8 * MiB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def remove(*paths: str) -> None:
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)


# ------------------------------------------------------------------- cases


@dataclasses.dataclass
class Contender:
    label: str
    command: Callable[[], list[str]]
    prepare: Callable[[], None] = lambda: None
    baseline: Callable[[], list[str]] | None = None  # startup cost to subtract (qemu-io)
    parse: Callable[[str], float] | None = None      # seconds from the child's output
    output: str | None = None                        # file whose size is reported


@dataclasses.dataclass
class Case:
    name: str
    title: str
    inputs: Callable[[], list[str]]   # builds (once) and names the files to warm
    contenders: list[Contender]       # the first is ours (or the only one, for ceilings)
    unit: str = "s"                   # "s", "ops/s" or "MB/s"
    work: float = 0.0                 # ops or bytes per run, for the rate units
    ceiling: str | None = None        # name of the ceiling case this one is compared with
    verify: Callable[[], str] | None = None


@dataclasses.dataclass
class Result:
    case: Case
    samples: dict[str, list[Sample]]
    sizes: dict[str, int]
    errors: dict[str, str]
    check: str = ""

    def median(self, label: str) -> float | None:
        got = self.samples.get(label)
        return statistics.median(s.seconds for s in got) if got else None

    def maxrss(self, label: str) -> int | None:
        got = self.samples.get(label)
        return max(s.maxrss for s in got) if got else None


#: Pause after each run that wrote an output (see ``measure``).
SETTLE_SECONDS = 2.0


def measure(case: Case, rounds: int, log: Callable[[str], None]) -> Result:
    warm(case.inputs())
    result = Result(case, {c.label: [] for c in case.contenders}, {}, {})
    for r in range(rounds):
        order = case.contenders if r % 2 == 0 else case.contenders[::-1]
        for contender in order:
            if contender.label in result.errors:
                continue
            contender.prepare()
            os.sync()
            try:
                sample = spawn(contender.command(), contender.parse)
                if contender.baseline is not None:
                    base = spawn(contender.baseline())
                    sample.seconds = max(sample.wall - base.wall, 1e-9)
            except ChildFailed as exc:
                result.errors[contender.label] = str(exc)
                log(f"  {case.name}: {contender.label} failed: {exc}")
                continue
            result.samples[contender.label].append(sample)
            if contender.output and os.path.exists(contender.output):
                result.sizes[contender.label] = os.path.getsize(contender.output)
                # Flush this output now and give the host time to absorb it: otherwise the
                # next run (the other tool's) starts while the disk drains the bytes just
                # written, and whoever ran second in a round was 20-60% slower.
                os.sync()
                time.sleep(SETTLE_SECONDS)
            log(f"  {case.name} round {r + 1}: {contender.label:21} {sample.seconds:8.3f} s"
                f"  {sample.maxrss / MiB:7.1f} MiB")
    if case.verify is not None and not result.errors:
        result.check = case.verify()
    return result


class Workloads:
    """The input files, each made on first use inside ``workdir``."""

    def __init__(self, workdir: str, size: int, ops: int, log: Callable[[str], None]) -> None:
        self.dir = workdir
        self.size = size
        self.ops = ops
        self.log = log
        self._made: set[str] = set()
        self.http = HttpServer(workdir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _once(self, name: str, make: Callable[[str], None]) -> str:
        path = self.path(name)
        if name not in self._made:
            t0 = time.perf_counter()
            make(path)
            self._made.add(name)
            self.log(f"  made {name} in {time.perf_counter() - t0:.1f} s")
        return path

    def raw(self) -> str:
        return self._once("source.raw", lambda p: make_raw(p, self.size, SEED))

    def sparse(self) -> str:
        """The raw source as monolithicSparse, written by qemu-img (a neutral third party)."""
        src = self.raw()
        return self._once("source-sparse.vmdk", lambda p: run_checked(
            ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
             src, p]))

    def stream(self) -> str:
        src = self.raw()
        return self._once("source-stream.vmdk", lambda p: run_checked(
            ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
             src, p]))

    def big(self) -> str:
        return self._once("empty-2t.vmdk", lambda p: run_checked(
            ["qemu-img", "create", "-q", "-f", "vmdk", p, str(2 << 40)]))

    def empty_pair(self) -> list[str]:
        """Two empty 16 GiB monolithicSparse images made by qemu-img."""
        return [self._once(name, lambda p: run_checked(
            ["qemu-img", "create", "-q", "-f", "vmdk", p, str(16 * GiB)]))
            for name in ("empty-16g-a.vmdk", "empty-16g-b.vmdk")]

    def big_holding_raw(self) -> str:
        """A 64 GiB monolithicSparse whose first ``size`` bytes are the raw source, by qemu-img."""
        def make(path: str) -> None:
            run_checked(["qemu-img", "create", "-q", "-f", "vmdk", path, str(64 * GiB)])
            run_checked(["qemu-img", "convert", "-n", "-f", "raw", "-O", "vmdk", self.raw(),
                         path])
        return self._once("raw-in-64g.vmdk", make)

    def empty_10t(self) -> str:
        return self._once("empty-10t.vmdk", lambda p: run_checked(
            ["qemu-img", "create", "-q", "-f", "vmdk", p, str(10 << 40)]))

    def chain(self) -> list[str]:
        """A base with the source's data and four children, each writing 2% of the disk."""
        def make(top: str) -> None:
            prev = self.path("chain0.vmdk")
            shutil.copyfile(self.sparse(), prev)
            for i in range(1, 5):
                child = top if i == 4 else self.path(f"chain{i}.vmdk")
                run_checked(py("-c", MAKE_CHILD, child, prev, str(SEED + i), "0.02"))
                prev = child
        top = self._once("chain4.vmdk", make)
        return [self.path(f"chain{i}.vmdk") for i in range(4)] + [top]

    def offsets(self) -> str:
        """``ops`` random 4 KiB-aligned offsets, shared by every random I/O contender."""
        def make(path: str) -> None:
            rng = random.Random(SEED)
            with open(path, "w") as f:
                f.write("\n".join(str(rng.randrange(self.size // 4096) * 4096)
                                  for _ in range(self.ops)))
        return self._once("offsets.txt", make)

    def offset_list(self) -> list[int]:
        with open(self.offsets()) as f:
            return [int(x) for x in f.read().split()]


def make_raw(path: str, size: int, seed: int) -> None:
    """About half data, half zeros, in alternating runs of 1 to 4 MiB.

    A quarter of the data runs are compressible text (16 letters) and the rest
    random bytes; some runs end inside a grain (a 4 KiB step). Half of the
    zero runs are holes and half are written zeros.
    """
    rng = random.Random(seed)
    try:
        import numpy as np
        gen = np.random.default_rng(seed)
        noise = gen.bytes
        text = lambda n: (gen.integers(0, 16, n, dtype=np.uint8) + 97).tobytes()  # noqa: E731
    except ImportError:
        noise = rng.randbytes
        text = lambda n: bytes(97 + b % 16 for b in rng.randbytes(n))  # noqa: E731
    with open(path, "wb") as f:
        f.truncate(size)
        pos, data = 0, True
        while pos < size:
            run = rng.randint(1, 4) * MiB
            if rng.random() < 0.25:
                run += rng.randint(-15, 15) * 4096
            run = min(run, size - pos)
            if data:
                f.seek(pos)
                f.write(text(run) if rng.random() < 0.25 else noise(run))
            elif rng.random() < 0.5:
                f.seek(pos)
                f.write(bytes(run))
            pos += run
            data = not data


def bench_seconds(text: str) -> float:
    """The time from ``qemu-img bench``: "Run completed in 0.036 seconds."."""
    for line in text.splitlines():
        if line.startswith("Run completed in"):
            return float(line.split()[3])
    raise ChildFailed(f"no time in qemu-img bench output: {text[-200:]!r}")


def qemu_compare(a: str, b: str) -> str:
    done = subprocess.run(["qemu-img", "compare", "-q", a, b], stdin=subprocess.DEVNULL,
                          capture_output=True)
    return "same" if done.returncode == 0 else "DIFFERS"


def raw_equal(a: str, b: str) -> str:
    return "same" if filecmp.cmp(a, b, shallow=False) else "DIFFERS"


class HttpServer:
    """The tests' range server (tests/remote_support.py) serving the work folder on
    127.0.0.1, started on first use; it counts requests and bytes (``stats``)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._proc: subprocess.Popen[str] | None = None
        self.base = ""

    def url(self, path: str) -> str:
        if self._proc is None:
            script = os.path.join(os.path.dirname(SRC), "tests", "remote_support.py")
            self._proc = subprocess.Popen([sys.executable, script, self.folder],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True, env=child_env())
            assert self._proc.stdout is not None
            self.base = self._proc.stdout.readline().strip()
        return self.base + os.path.relpath(path, self.folder)

    def stats(self, reset: bool = False) -> dict[str, int]:
        import urllib.request

        with urllib.request.urlopen(self.base + (".reset" if reset else ".stats"),
                                    timeout=30) as answer:
            counts: dict[str, int] = json.load(answer)
        return counts

    def stop(self) -> None:
        if self._proc is not None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(30)
            self._proc = None


def build_cases(w: Workloads) -> list[Case]:
    out = w.path
    vmdk_cli = lambda *a: py("-m", "vmdk", "convert", *a)  # noqa: E731
    qemu_img = lambda *a: ["qemu-img", "convert", *a]      # noqa: E731
    fresh = lambda *paths: (lambda: remove(*paths))          # noqa: E731
    cases: list[Case] = []

    def conversion(name: str, title: str, source: Callable[[], str], src_fmt: str,
                   ours_args: list[str], qemu_args: list[str], ext: str, check: str,
                   synced: bool = True, ceiling: str = "cp-sparse") -> None:
        mine, theirs = out(f"{name}.ours.{ext}"), out(f"{name}.qemu.{ext}")
        verify = {
            "raw": lambda: raw_equal(mine, theirs),
            "vmdk": lambda: qemu_compare(w.raw(), mine),
        }[check]
        # qemu-img convert never flushes its target by default (-t unsafe); ours syncs
        # unless told -t unsafe. Each pair is timed like for like: both unsafe, and
        # (where flushing matters) both syncing with -t writeback.
        contenders = [
            Contender("ours -t unsafe",
                      lambda: vmdk_cli("-t", "unsafe", *ours_args, source(), mine),
                      fresh(mine), output=mine),
            Contender("qemu-img", lambda: qemu_img("-f", src_fmt, *qemu_args, source(), theirs),
                      fresh(theirs), output=theirs)]
        cases.append(Case(name, title, lambda: [source()], contenders, ceiling=ceiling,
                          verify=verify))
        if synced:
            synced_pair = [
                Contender("ours", lambda: vmdk_cli(*ours_args, source(), mine), fresh(mine),
                          output=mine),
                Contender("qemu-img -t writeback",
                          lambda: qemu_img("-t", "writeback", "-f", src_fmt, *qemu_args,
                                           source(), theirs),
                          fresh(theirs), output=theirs)]
            cases.append(Case(f"{name}-sync", f"{title} (both sync)", lambda: [source()],
                              synced_pair, ceiling="cp-sparse", verify=verify))

    conversion("raw-to-sparse", "raw → monolithicSparse", w.raw, "raw",
               ["-f", "raw", "-o", "subformat=monolithicSparse"],
               ["-O", "vmdk", "-o", "subformat=monolithicSparse"], "vmdk", "vmdk")
    conversion("raw-to-stream", "raw → streamOptimized", w.raw, "raw",
               ["-f", "raw", "-o", "subformat=streamOptimized"],
               ["-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk", "vmdk", synced=False,
               ceiling="stream-ceiling")
    conversion("sparse-to-raw", "monolithicSparse → raw", w.sparse, "vmdk",
               ["-O", "raw"], ["-O", "raw"], "raw", "raw")
    conversion("stream-to-raw", "streamOptimized → raw", w.stream, "vmdk",
               ["-O", "raw"], ["-O", "raw"], "raw", "raw")
    conversion("sparse-to-stream", "monolithicSparse → streamOptimized", w.sparse, "vmdk",
               ["-o", "subformat=streamOptimized"],
               ["-O", "vmdk", "-o", "subformat=streamOptimized"], "vmdk", "vmdk", synced=False,
               ceiling="stream-ceiling")

    # A package is a stream plus a tar: ours (converted straight into the tar, digested on the
    # way, synced) against the same stream made by convert, put in a tar and synced.
    ova_mine, ova_stream, ova_tar = out("export.ours.ova"), out("export-disk.vmdk"), out(
        "export.tar.ova")
    convert_then_tar = ('"$0" -m vmdk convert -o subformat=streamOptimized "$1" "$2" && '
                        'tar cf "$3" -C "$(dirname "$2")" "$(basename "$2")" && sync "$3"')

    def ova_check() -> str:
        same = subprocess.run(py("-m", "vmdk", "compare", w.raw(), ova_mine), env=child_env(),
                              stdin=subprocess.DEVNULL, capture_output=True).returncode == 0
        sound = subprocess.run(py("-m", "vmdk", "ova", "verify", ova_mine), env=child_env(),
                               stdin=subprocess.DEVNULL, capture_output=True).returncode == 0
        return f"disk {'same' if same else 'DIFFERS'}; ova verify {'passes' if sound else 'FAILS'}"

    cases.append(Case(
        "export-ova", "raw → OVA (export-ova, synced)", lambda: [w.raw()],
        [Contender("ours", lambda: py("-m", "vmdk", "export-ova", w.raw(), ova_mine),
                   fresh(ova_mine), output=ova_mine),
         Contender("convert + tar", lambda: ["sh", "-c", convert_then_tar, sys.executable,
                                             w.raw(), ova_stream, ova_tar],
                   fresh(ova_stream, ova_tar), output=ova_tar)],
        ceiling="stream-ceiling", verify=ova_check))

    # Random 4 KiB I/O at queue depth 1. qemu-io gets one -c per operation and
    # the cost of a run with a single operation is subtracted (start-up, open, close).
    def qemu_io(write: bool, image: Callable[[], str], cache: str = "writeback"
                ) -> Callable[[], list[str]]:
        def argv() -> list[str]:
            cmd = "write -q -P 0x5a {} 4k" if write else "read -q {} 4k"
            base = ["qemu-io", "-f", "vmdk", "-t", cache] + ([] if write else ["-r"])
            return base + [a for off in w.offset_list() for a in ("-c", cmd.format(off))] + [image()]
        return argv

    def qemu_io_baseline(write: bool, image: Callable[[], str], cache: str = "writeback"
                         ) -> Callable[[], list[str]]:
        cmd = "write -q -P 0x5a 0 4k" if write else "read -q 0 4k"
        return lambda: (["qemu-io", "-f", "vmdk", "-t", cache] + ([] if write else ["-r"])
                        + ["-c", cmd, image()])

    cases.append(Case(
        "rand-read-4k", "random 4 KiB reads, QD1 (monolithicSparse)",
        lambda: [w.sparse(), w.offsets()],
        [Contender("ours", lambda: py("-c", RANDOM_IO, w.sparse(), "read", w.offsets())),
         Contender("qemu-io", qemu_io(False, w.sparse), baseline=qemu_io_baseline(False, w.sparse))],
        unit="ops/s", work=w.ops))

    mine_rw, theirs_rw = out("rw.ours.vmdk"), out("rw.qemu.vmdk")
    copy_fresh = lambda dst: (lambda: shutil.copyfile(w.sparse(), dst))  # noqa: E731
    cases.append(Case(
        "rand-write-4k", "random 4 KiB writes, QD1 (monolithicSparse)",
        lambda: [w.sparse(), w.offsets()],
        [Contender("ours", lambda: py("-c", RANDOM_IO, mine_rw, "write", w.offsets()),
                   copy_fresh(mine_rw)),
         Contender("qemu-io", qemu_io(True, lambda: theirs_rw), copy_fresh(theirs_rw),
                   baseline=qemu_io_baseline(True, lambda: theirs_rw)),
         # qemu's vmdk driver flushes while it allocates grains; -t unsafe drops those flushes.
         Contender("qemu-io -t unsafe", qemu_io(True, lambda: theirs_rw, "unsafe"),
                   copy_fresh(theirs_rw),
                   baseline=qemu_io_baseline(True, lambda: theirs_rw, "unsafe"))],
        unit="ops/s", work=w.ops))

    def qemu_img_bench() -> list[str]:
        return ["qemu-img", "bench", "-f", "vmdk", "-t", "writeback", "-d", "1", "-s", "1M",
                "-c", str(w.size // MiB), w.sparse()]

    for name, mode, what in (("seq-read-1m", "bytearray", "readinto a bytearray"),
                             ("seq-read-1m-aligned", "aligned", "readinto page-aligned memory"),
                             ("seq-read-1m-bytes", "bytes", "read_at returning bytes")):
        cases.append(Case(
            name, f"sequential 1 MiB reads, {what} (monolithicSparse)", lambda: [w.sparse()],
            [Contender("ours", lambda mode=mode: py("-c", SEQ_READ, w.sparse(), str(MiB), mode)),
             Contender("pyvmdk", lambda: py("-c", SEQ_READ_PYVMDK, w.sparse(), str(MiB))),
             Contender("qemu-img", qemu_img_bench, parse=bench_seconds)],
            unit="MB/s", work=w.size - w.size % MiB, ceiling="cat"))

    # Each run mounts anew, so the mounted file's pages are not in the page cache yet.
    cat_to_null = 'exec "$0" -m vmdk cat "$1" > /dev/null'
    cases.append(Case(
        "mount-read", "sequential read of the mounted disk, cat DIR/disk (monolithicSparse)",
        lambda: [w.sparse()],
        [Contender("ours", lambda: py("-c", MOUNT_READ, w.sparse())),
         Contender("vmdk cat", lambda: ["sh", "-c", cat_to_null, sys.executable, w.sparse()])],
        unit="MB/s", work=w.size, ceiling="cat"))

    cases.append(Case(
        "open-2t", "open a 2 TiB monolithicSparse + info (whole process)", lambda: [w.big()],
        [Contender("ours", lambda: py("-c", OPEN_INFO, w.big())),
         Contender("qemu-img", lambda: ["qemu-img", "info", w.big()])]))

    chain_mine, chain_theirs = out("chain.ours.raw"), out("chain.qemu.raw")
    cases.append(Case(
        "chain5-to-raw", "5-deep snapshot chain → raw", w.chain,
        # Like for like: qemu-img convert does not flush its target, so ours runs -t unsafe.
        [Contender("ours -t unsafe",
                   lambda: vmdk_cli("-t", "unsafe", "-O", "raw", w.chain()[-1], chain_mine),
                   fresh(chain_mine)),
         Contender("qemu-img", lambda: qemu_img("-f", "vmdk", "-O", "raw", w.chain()[-1],
                                                chain_theirs), fresh(chain_theirs))],
        ceiling="cp-sparse", verify=lambda: raw_equal(chain_mine, chain_theirs)))

    # Work that follows the data present, not the virtual size: each tool's whole process.
    vmdk_verb = lambda *a: py("-m", "vmdk", *a)  # noqa: E731
    cases.append(Case(
        "compare-16g-empty", "compare two empty 16 GiB monolithicSparse", w.empty_pair,
        [Contender("ours", lambda: vmdk_verb("compare", *w.empty_pair())),
         Contender("qemu-img", lambda: ["qemu-img", "compare", *w.empty_pair()])]))
    cases.append(Case(
        "compare-64g-raw", "compare a 64 GiB monolithicSparse holding the raw source with it",
        lambda: [w.big_holding_raw(), w.raw()],
        [Contender("ours", lambda: vmdk_verb("compare", w.big_holding_raw(), w.raw())),
         Contender("qemu-img", lambda: ["qemu-img", "compare", "-f", "vmdk", "-F", "raw",
                                        w.big_holding_raw(), w.raw()])]))
    cases.append(Case(
        "check-10t-empty", "check an empty 10 TiB monolithicSparse", lambda: [w.empty_10t()],
        [Contender("ours", lambda: vmdk_verb("check", w.empty_10t())),
         Contender("qemu-img", lambda: ["qemu-img", "check", w.empty_10t()])]))

    # NBD: the same image served by each server, read by the same clients; client time only.
    nbd = lambda server, *client: py("-c", NBD_READ, server, w.sparse(), *client)  # noqa: E731
    for name, title, client in (
            ("nbdcopy", "nbdcopy (multi-conn)", ["nbdcopy", "URI", "null:"]),
            ("nbdcopy-1", "nbdcopy -C 1 -R 1", ["nbdcopy", "-C", "1", "-R", "1", "URI", "null:"]),
            ("qemu-img", "qemu-img convert from nbd://",
             ["qemu-img", "convert", "-f", "raw", "-O", "raw", "URI", out("nbd.raw")])):
        cases.append(Case(
            f"nbd-{name}", f"serve monolithicSparse over NBD, read with {title}",
            lambda: [w.sparse()],
            [Contender("vmdk serve", lambda c=client: nbd("ours", *c), fresh(out("nbd.raw"))),
             Contender("qemu-nbd", lambda c=client: nbd("qemu", *c), fresh(out("nbd.raw")))],
            unit="MB/s", work=w.size, ceiling="cat"))

    stream_floor = out("ceiling.deflate")
    cases.append(Case(
        "stream-ceiling", "ceiling: deflate every data grain on one core (ISA-L, level 1)",
        lambda: [w.raw()],
        [Contender("one core", lambda: py("-c", STREAM_CEILING, w.raw(), stream_floor),
                   fresh(stream_floor), output=stream_floor)]))
    cases.append(Case(
        "start-info", "vmdk info, whole process (against python -c pass)", lambda: [w.sparse()],
        [Contender("ours", lambda: vmdk_verb("info", w.sparse())),
         Contender("python -c pass", lambda: py("-c", "pass")),
         Contender("qemu-img", lambda: ["qemu-img", "info", w.sparse()])]))

    # An image read over HTTP (a local server with range support) against fetching the whole
    # file: what a job costs in time, and in requests and bytes (the check column).
    for name, title, image in (("http-sparse-to-raw", "monolithicSparse → raw over HTTP",
                                w.sparse),
                               ("http-stream-to-raw", "streamOptimized → raw over HTTP",
                                w.stream)):
        mine_http, whole = out(f"{name}.ours.raw"), out(f"{name}.curl.vmdk")

        def fetched(image: Callable[[], str] = image, mine_http: str = mine_http) -> str:
            w.http.stats(reset=True)
            run_checked(vmdk_cli("-t", "unsafe", "-O", "raw", w.http.url(image()), mine_http))
            got = w.http.stats()
            size = os.path.getsize(image())
            return (f"{raw_equal(mine_http, w.raw())}; a job: {got['requests'] + got['heads']} "
                    f"requests, {got['bytes'] / MiB:,.1f} MiB of the {size / MiB:,.1f} MiB file")

        cases.append(Case(
            name, title, lambda image=image: [image()],
            [Contender("ours -t unsafe", lambda image=image, mine_http=mine_http: vmdk_cli(
                "-t", "unsafe", "-O", "raw", w.http.url(image()), mine_http),
                fresh(mine_http), output=mine_http),
             Contender("curl (whole file)", lambda image=image, whole=whole: [
                 "curl", "-sS", "-o", whole, w.http.url(image())], fresh(whole))],
            verify=fetched))

    cp_out = out("ceiling.raw")
    cases.append(Case(
        "cat", "ceiling: cat raw > /dev/null", lambda: [w.raw()],
        [Contender("cat", lambda: ["sh", "-c", 'exec cat "$1" > /dev/null', "sh", w.raw()])],
        unit="MB/s", work=w.size))
    cases.append(Case(
        "cp-sparse", "ceiling: cp --sparse=always raw", lambda: [w.raw()],
        [Contender("cp", lambda: ["cp", "--sparse=always", w.raw(), cp_out], fresh(cp_out),
                   output=cp_out)]))
    return cases


CEILINGS = ("cat", "cp-sparse", "stream-ceiling")


# ------------------------------------------------------------------- report


def fmt_value(case: Case, seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if case.unit == "ops/s":
        return f"{case.work / seconds:,.0f} ops/s"
    if case.unit == "MB/s":
        return f"{case.work / seconds / 1e6:,.0f} MB/s"
    return f"{seconds * 1000:,.0f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def fmt_mib(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / MiB:.1f} MiB" if n < 100 * MiB else f"{n / MiB:,.0f} MiB"


def table(results: list[Result]) -> str:
    lines = ["| case | ours | reference | ref | ours/ref (time) | ours / ceiling "
             "| ours max RSS | ref max RSS | notes |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    medians = {r.case.name: r.median(r.case.contenders[0].label) for r in results}
    for r in results:
        case, first = r.case, r.case.contenders[0].label
        mine = r.median(first)
        refs = case.contenders[1:] or [None]
        for ref in refs:
            theirs = r.median(ref.label) if ref else None
            ratio = f"**{mine / theirs:.2f}**" if mine and theirs else "—"
            ceil = medians.get(case.ceiling or "")
            vs_ceiling = f"{mine / ceil:.1f}×" if mine and ceil else "—"
            notes = notes_for(r, ref)
            lines.append(
                f"| {case.title} | {fmt_value(case, mine)} | {ref.label if ref else '—'} "
                f"| {fmt_value(case, theirs) if ref else '—'} | {ratio} | {vs_ceiling} "
                f"| {fmt_mib(r.maxrss(first))} | {fmt_mib(r.maxrss(ref.label)) if ref else '—'} "
                f"| {notes} |")
    return "\n".join(lines)


def notes_for(r: Result, ref: Contender | None) -> str:
    notes = []
    first = r.case.contenders[0].label
    for label in (first, ref.label if ref else None):
        if label in r.errors:
            notes.append(f"{label} FAILED: {r.errors[label]}")
    if first in r.sizes and ref and ref.label in r.sizes:
        a, b = r.sizes[first], r.sizes[ref.label]
        notes.append(f"output {a / MiB:,.1f} vs {b / MiB:,.1f} MiB ({(a - b) / b:+.1%})")
    elif first in r.sizes and not ref:
        notes.append(f"output {r.sizes[first] / MiB:,.1f} MiB")
    if r.case.name == "open-2t" and r.samples.get(first):
        inner = statistics.median(s.report.get("open_info", 0.0) for s in r.samples[first])
        imp = statistics.median(s.report.get("import", 0.0) for s in r.samples[first])
        notes.append(f"in-process open+info {inner * 1000:.1f} ms, import vmdk {imp * 1000:.0f} ms")
    if r.case.name == "mount-read" and r.samples.get(first):
        rss = max(s.report.get("mount_rss", 0) for s in r.samples[first])
        notes.append(f"read only (mounting and unmounting not timed; 'vmdk cat' is the whole "
                     f"process); the mount process's peak RSS {fmt_mib(rss)}")
    if r.check:
        notes.append(f"output check: {r.check}")
    return "; ".join(notes)


def machine() -> list[str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    ram = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        ram = f"{kib / (1 << 20):.1f} GiB"
    except (OSError, StopIteration):
        pass
    try:
        versions = json.loads(subprocess.run(py("-c", VERSIONS), capture_output=True, text=True,
                                             env=child_env(), check=True).stdout)
    except (subprocess.CalledProcessError, ValueError):
        versions = {}
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; RAM {ram}",
        f"- OS: {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()} ({sys.executable})",
        "- " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- {(qemu.splitlines() or ['qemu-img: not found'])[0]}",
        f"- peak RSS read with {'GNU time' if GNU_TIME else 'a Python wait4 launcher'}; "
        f"floor (RSS of `true`): {spawn(['true']).maxrss / MiB:.1f} MiB",
    ]


# --------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=GiB,
                        help="virtual size of the test disk (default 1G)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each contender (default 3)")
    parser.add_argument("--ops", type=int, default=20000,
                        help="operations in the random 4 KiB cases (default 20000)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this case (repeat, or separate with commas)")
    parser.add_argument("--workdir", default=None,
                        help="where the scratch folder goes (default the system temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", metavar="FILE", help="also write the medians as JSON")
    args = parser.parse_args(argv)
    if args.size < 64 * MiB or args.size % MiB:
        parser.error("--size must be a whole number of MiB, at least 64M")
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: apt-get install qemu-utils)")

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    workdir = tempfile.mkdtemp(prefix="vmdk-bench-", dir=args.workdir)
    try:
        work = Workloads(workdir, args.size, args.ops, log)
        cases = build_cases(work)
        names = [c.name for c in cases]
        wanted = [n for item in args.only for n in item.split(",") if n]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            parser.error(f"unknown case {', '.join(unknown)}; choose from {', '.join(names)}")
        chosen = [c for c in cases if not wanted or c.name in wanted]
        print(f"# vmdk benchmark: {args.size / MiB:,.0f} MiB disk, {args.rounds} rounds, "
              f"{args.ops} random ops\n")
        print("\n".join(machine()) + "\n", flush=True)
        results = []
        t0 = time.perf_counter()
        for case in chosen:
            log(f"{case.name}: {case.title}")
            results.append(measure(case, args.rounds, log))
        print(table(results))
        print(f"\n(medians of {args.rounds} rounds; total {time.perf_counter() - t0:.0f} s)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({r.case.name: {label: {"median_s": r.median(label),
                                                  "max_rss": r.maxrss(label),
                                                  "size": r.sizes.get(label),
                                                  "error": r.errors.get(label)}
                                         for label in r.samples} | {"check": r.check}
                           for r in results}, f, indent=1)
    finally:
        if "work" in locals():
            work.http.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
