"""Fuzzing every parser: a short run of the harness in ``fuzz/``, the saved regressions,
and hand-made headers that claim huge tables.

Malformed input must end in a ``vmdk.VmdkError`` subclass (or be read fine)
within 2 s and 64 MiB of traced memory.  The runs happen in child processes
with a capped address space, so a runaway allocation cannot take the machine
down.  ``python -m fuzz --seconds 600`` is the long run; its findings land in
``tests/fuzz_regressions`` and are replayed here.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fuzz  # noqa: E402

REGRESSIONS = ROOT / "tests" / "fuzz_regressions"
#: Inputs per worker; two workers run side by side (the test machines have 2 cores).
INPUTS_PER_WORKER = int(os.environ.get("VMDK_FUZZ_INPUTS", "2000"))
FUZZ_SEED = int(os.environ.get("VMDK_FUZZ_SEED", "20240611"))
WORKER_TARGETS = [
    ["sparse", "stream", "split", "child", "pipe-stream"],
    ["cowd", "sesparse", "descriptor", "flat", "sample", "ova"],
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_fuzz(args: list[str], timeout: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fuzz", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- the harness


@pytest.fixture(scope="module")
def seeds() -> list[fuzz.Seed]:
    return fuzz.make_seeds()


def test_seed_corpus_covers_every_target(seeds: list[fuzz.Seed]) -> None:
    assert {s.target for s in seeds} >= set(fuzz.TARGETS) - ({"sample"} if not
                                                            fuzz.SAMPLES.is_dir() else set())
    for s in seeds:
        data = s.files[s.entry]
        if data[:4] in (b"KDMV", b"COWD") or data[:8] == struct.pack("<Q", 0xCAFEBABE):
            fields = fuzz.field_offsets(data)
            assert len(fields) > 10, s.name
    stream = next(s for s in seeds if s.name == "stream").files["disk.vmdk"]
    offsets = {o for o, _ in fuzz.field_offsets(stream)}
    assert len(stream) - 1536 in offsets  # footer marker
    assert len(stream) - 1024 + 56 in offsets  # footer gdOffset


def test_unmodified_seeds_pass_the_oracle(seeds: list[fuzz.Seed], tmp_path: Path) -> None:
    for s in seeds:
        sig, detail = fuzz.run_input(tmp_path, s.files, s.entry, random.Random(0), write=True,
                                     target=s.target)
        assert sig is None, f"seed {s.name}: {sig}\n{detail}"
        if s.target != "sample" and not s.name.startswith("pipe-sample-"):
            assert detail == "ok", f"generated seed {s.name} is refused: {detail}"


def test_mutator_is_deterministic_and_damages(seeds: list[fuzz.Seed]) -> None:
    s = next(s for s in seeds if s.name == "sparse-64k")
    a = [fuzz.Mutator(random.Random(7)).mutate(s) for _ in range(3)]
    b = [fuzz.Mutator(random.Random(7)).mutate(s) for _ in range(3)]
    assert a == b
    changed = sum(fuzz.Mutator(random.Random(i)).mutate(s)[0] != s.files for i in range(50))
    assert changed >= 45


def test_saved_input_round_trip() -> None:
    files = {"a.vmdk": b"version=1\n", "b.vmdk": bytes(1000)}
    assert fuzz.unpack_input(fuzz.pack_input(files, "a.vmdk", "note")) == (files, "a.vmdk")
    assert fuzz.load_input(fuzz.pack_input(files, "a.vmdk", "", "ova")) == (files, "a.vmdk",
                                                                              "ova")


def test_table_stream_seeds_are_the_layouts_they_claim(tmp_path: Path) -> None:
    """The hand-built VMware and qemu layouts read back through the random-access reader."""
    import vmdk

    grains = {0: b"\x01" * 65536, 513: b"\x02" * 100}
    for qemu in (False, True):
        data = fuzz.table_stream(grains, 1024 * 128, qemu=qemu)
        head = struct.unpack_from("<4sIIQQQQIQQQ", data)
        assert head[9] < head[10]  # the grain directory lies before the first grain
        assert (data[-512:] == bytes(512)) is not qemu  # EOS for VMware's, none for qemu's
        (tmp_path / "t.vmdk").write_bytes(data)
        with vmdk.open(tmp_path / "t.vmdk") as disk:
            assert disk.read_at(0, 65536) == grains[0]
            assert disk.read_at(513 * 65536, 200) == grains[513] + bytes(100)


def test_default_memory_cap_catches_a_runaway_allocation() -> None:
    """Honest seeds need about 240 MiB of address space; a 1 GiB buffer must fail."""
    code = ("import fuzz, numpy\n"
            "fuzz.limit_memory(fuzz.DEFAULT_MEMORY_MB)\n"
            "try:\n"
            "    numpy.ones(1 << 30, dtype=numpy.uint8)\n"
            "except MemoryError:\n"
            "    print('caught')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "caught", done.stdout + done.stderr


def test_short_fuzz_run(tmp_path: Path) -> None:
    """A few thousand mutated inputs over every parser, on two cores."""
    procs = []
    for i, targets in enumerate(WORKER_TARGETS):
        report = tmp_path / f"worker{i}.json"
        args = ["--max-inputs", str(INPUTS_PER_WORKER), "--seed", str(FUZZ_SEED + i),
                "--json", str(report), "--save-dir", str(tmp_path / "findings")]
        for t in targets:
            args += ["--target", t]
        procs.append((_run_fuzz(args, 300), report))
    reports = []
    for proc, report in procs:
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"fuzz worker hung:\n{err[-3000:]}")
        assert report.exists(), f"fuzz worker crashed ({proc.returncode}):\n{err[-3000:]}"
        reports.append(json.loads(report.read_text()))
    total = sum(r["inputs"] for r in reports)
    findings = [f for r in reports for f in r["findings"]]
    print(f"fuzzed {total} inputs ({sum(r['refused'] for r in reports)} refused), "
          f"{len(findings)} distinct findings")
    assert total >= len(WORKER_TARGETS) * INPUTS_PER_WORKER
    assert not findings, "\n\n".join(
        f"{f['signature']} ({f['count']}x; seed {f['seed']}: {f['mutation']}; saved {f['saved']})"
        f"\n{f['detail'][-1500:]}" for f in findings)


# ---------------------------------------------------------------- regressions


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str | None]]:
    """Every saved regression input, run once in a memory-capped child process."""
    if not any(REGRESSIONS.glob("*.tar.gz")):
        return {}
    report = tmp_path_factory.mktemp("replay") / "replay.json"
    proc = subprocess.run([sys.executable, "-m", "fuzz", "--replay", str(REGRESSIONS),
                           "--json", str(report)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert report.exists(), f"replay crashed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    results: dict[str, dict[str, str | None]] = json.loads(report.read_text())
    return results


@pytest.mark.parametrize("name", sorted(p.name for p in REGRESSIONS.glob("*.tar.gz")))
def test_fuzz_regression(name: str, replayed: dict[str, dict[str, str | None]]) -> None:
    assert (REGRESSIONS / name).stat().st_size < fuzz.MAX_SAVED_BYTES
    result = replayed[name]
    assert result["signature"] is None, f"{result['signature']}\n{result['detail']}"


# ------------------------------------------------ headers claiming huge tables


def _kdmv(capacity: int, grain: int, gtes: int, gd: int, *, rgd: int = 0, flags: int = 1,
          version: int = 1, desc: tuple[int, int] = (0, 0), compress: int = 0) -> bytes:
    return struct.pack("<4sIIQQQQIQQQB4sH433x", b"KDMV", version, flags, capacity, grain,
                       desc[0], desc[1], gtes, rgd, gd, 128, 0, b"\n \r\n", compress)


def _cowd(num_sectors: int, grain: int, gd_entries: int, gd: int = 4) -> bytes:
    head = struct.pack("<4sIIIIIII", b"COWD", 1, 3, num_sectors, grain, gd, gd_entries, gd + 8)
    return head.ljust(2048, b"\0")


def _sesparse(capacity: int, gd: tuple[int, int], gts: tuple[int, int],
              grains: tuple[int, int]) -> bytes:
    const = struct.pack("<6Q32x16Q304x", 0xCAFEBABE, 0x0000000200000001, capacity, 8, 64, 0,
                        1, 1, 0, 0, 0, 0, gd[0], gd[1], gts[0], gts[1], 0, 0, 0, 0,
                        grains[0], grains[1])
    return const + struct.pack("<4Q480x", 0xCAFECAFE, 0, 0, 0)


def _stream_with_footer(capacity: int, grain: int, gtes: int, gd: int) -> bytes:
    header = _kdmv(capacity, grain, gtes, 0xFFFFFFFFFFFFFFFF, flags=0x30001, version=3,
                   compress=1)
    footer = _kdmv(capacity, grain, gtes, gd, flags=0x30001, version=3, compress=1)
    marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    return header.ljust(64 * 1024, b"\0") + marker + footer + bytes(512)


HUGE = {
    # The grain directory would be 2^40 entries.
    "sparse-gd-2^40": _kdmv((1 << 47) - 1, 1, 1, 1),
    # Capacity beyond any plausible disk.
    "sparse-capacity-2^63": _kdmv(1 << 63, 128, 512, 1),
    # Grain tables of 2^32-1 entries, and of 2^16 entries of one sector each.
    "sparse-gt-2^32": _kdmv(1 << 20, 128, (1 << 32) - 1, 1),
    "sparse-gt-65536": _kdmv(1 << 32, 1, 65536, 1),
    # Grains of 2^63 sectors.
    "sparse-grain-2^63": _kdmv(1 << 20, 1 << 63, 512, 1),
    # An embedded descriptor of 2^32 sectors.
    "sparse-descriptor-2^32": _kdmv(1 << 20, 128, 512, 1, desc=(1, (1 << 32) - 1)),
    # A valid GD of 2^15 empty slots in front of 2^31 grains: map() must not allocate per grain.
    "sparse-huge-map": _kdmv((1 << 47) - 1, 65536, 65536, 1).ljust(300 * 1024, b"\0"),
    # Stream footer naming a GD past the end / of 2^32 entries.
    "stream-footer-gd-past-end": _stream_with_footer(1 << 20, 128, 512, (1 << 40)),
    "stream-footer-gd-2^32": _stream_with_footer((1 << 47) - 1, 1, 1, 130),
    "cowd-gd-2^32": _cowd((1 << 32) - 1, 1, (1 << 32) - 1),
    "cowd-gd-2^20": _cowd((1 << 32) - 1, 1, 1 << 20),
    "cowd-grain-2^31": _cowd(1 << 20, 1 << 31, 1),
    "sesparse-gd-2^48": _sesparse((64 << 40) // 512 - 1, (2, (1 << 48) - 1), (3, 1 << 40),
                                  (4, 1 << 40)),
    "sesparse-capacity-2^63": _sesparse(1 << 63, (2, 8), (3, 64), (4, 8)),
}


def _pipe_stream(capacity: int, grain: int, gd: int, overhead: int, tail: bytes = b"") -> bytes:
    """A stream header (with gdOffset and overHead as given) and what follows it."""
    header = struct.pack("<4sIIQQQQIQQQB4sH433x", b"KDMV", 3, 0x30001, capacity, grain, 1, 1,
                         512, 0, gd, overhead, 0, b"\n \r\n", 1)
    return header + bytes(512) + tail


#: Streams read front to back (the pipe oracle) whose numbers claim huge blocks.
HUGE_PIPE = {
    # Tables in front: a GD of 2^30 entries; one of 2^23 entries (32 MiB) before 2^30 sectors.
    "pipe-gd-2^30": _pipe_stream((1 << 46) - 1, 128, 2, 1 << 40),
    "pipe-gd-2^23": _pipe_stream((1 << 23) * 512 * 128, 128, 2, 1 << 30),
    # Spec layout: a grain table marker announcing 2^16 sectors, and one announcing 2^60.
    "pipe-marker-2^16": _pipe_stream(1 << 20, 128, 0xFFFFFFFFFFFFFFFF, 2,
                                     struct.pack("<QII", 1 << 16, 0, 1).ljust(512, b"\0")),
    "pipe-marker-2^60": _pipe_stream(1 << 20, 128, 0xFFFFFFFFFFFFFFFF, 2,
                                     struct.pack("<QII", 1 << 60, 0, 1).ljust(512, b"\0")),
    # 32 MiB grains, and a grain record claiming 64 MiB of compressed data.
    "pipe-grain-64MiB": _pipe_stream(1 << 20, 1 << 16, 0xFFFFFFFFFFFFFFFF, 2,
                                     struct.pack("<QI", 0, 1 << 26).ljust(512, b"\x78")),
    # An overhead of 2^60 sectors to skip.
    "pipe-overhead-2^60": _pipe_stream(1 << 20, 128, 0xFFFFFFFFFFFFFFFF, 1 << 60),
}


@pytest.fixture(scope="module")
def huge_replayed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("huge")
    for name, data in HUGE.items():
        (folder / f"{name}.tar.gz").write_bytes(fuzz.pack_input({"disk.vmdk": data}, "disk.vmdk",
                                                                name))
    for name, data in HUGE_PIPE.items():
        (folder / f"{name}.tar.gz").write_bytes(
            fuzz.pack_input({"disk.vmdk": data}, "disk.vmdk", name, "pipe-stream"))
    report = folder / "out.json"
    proc = subprocess.run([sys.executable, "-m", "fuzz", "--replay", str(folder), "--json",
                           str(report)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert report.exists(), f"replay crashed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    results: dict[str, dict[str, str | None]] = json.loads(report.read_text())
    return results


@pytest.mark.parametrize("name", list(HUGE) + list(HUGE_PIPE))
def test_huge_claims_stay_bounded(name: str, huge_replayed: dict[str, dict[str, str | None]]
                                  ) -> None:
    """Refused (or read) within 2 s and 64 MiB of traced memory, in a memory-capped child."""
    result = huge_replayed[f"{name}.tar.gz"]
    assert result["signature"] is None, f"{result['signature']}\n{result['detail']}"


def test_memory_the_tracer_cannot_see_is_a_finding(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory held in a memory map escapes tracemalloc: the resident peak catches an
    input that makes us touch far more memory than it holds."""
    import mmap

    def touches_memory(path: Path, rng: random.Random, *, write: bool) -> str:
        block = mmap.mmap(-1, 2 * fuzz.RESIDENT_LIMIT,
                          flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for at in range(0, len(block), 4096):
            block[at] = 1
        block.close()
        return "accepted"

    monkeypatch.setitem(fuzz.ORACLES, "mapped", touches_memory)
    sig, detail = fuzz.run_input(tmp_path, {"x.vmdk": b"x"}, "x.vmdk", random.Random(0),
                                 target="mapped")
    assert sig == "MemoryPeak" and "resident" in detail
