"""Shared test helpers: pattern data, peer tools, and the third-party samples."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# A shared 2-core CI host has slow moments: no per-example deadline, and in CI a fixed
# seed so that a red run can be replayed exactly.
settings.register_profile("vmdk", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          derandomize=bool(os.environ.get("CI")))
settings.load_profile("vmdk")

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
if not SAMPLES.is_dir():  # CI clones main with shared/ beside it
    SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "samples"


def pattern(size: int, seed: int = 0, zero_every: int = 3, block: int = 65536) -> bytes:
    """Deterministic test content: random-looking blocks with every Nth block zero."""
    out = bytearray(size)
    for i, pos in enumerate(range(0, size, block)):
        if zero_every and i % zero_every == zero_every - 1:
            continue
        n = min(block, size - pos)
        out[pos:pos + n] = hashlib.shake_256(f"{seed}:{i}".encode()).digest(n)
    return bytes(out)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(*args: str | os.PathLike[str], check: bool = True, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True,
                          check=check, timeout=timeout)


@pytest.fixture
def qemu_img() -> str:
    if not have("qemu-img"):
        pytest.skip("qemu-img is not installed")
    return "qemu-img"


@pytest.fixture
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip("shared/samples is not present")
    return SAMPLES


def covered(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join touching (start, length) ranges, so two tools' different splits compare equal."""
    out: list[list[int]] = []
    for start, length in sorted(runs):
        if out and out[-1][1] == start:
            out[-1][1] += length
        else:
            out.append([start, start + length])
    return [(a, b) for a, b in out]


def qemu_data_ranges(image: os.PathLike[str] | str) -> list[tuple[int, int]]:
    """(start, length) of every range ``qemu-img map`` reports as data."""
    import json

    mapped = json.loads(run("qemu-img", "map", "--output=json", "-f", "vmdk", image).stdout)
    return [(m["start"], m["length"]) for m in mapped if m["data"]]


@pytest.fixture
def report_rounds(record_property: Any) -> Callable[[str], None]:
    """Record how many rounds a race, kill or disk-full test ran; the run's summary lists them.

    (``record_property`` travels with the test's report, so it reaches the summary from
    pytest-xdist's workers as well.)
    """

    def report(text: str) -> None:
        record_property("rounds", text)

    return report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = []
    for report in terminalreporter.stats.get("passed", []):
        if report.when != "call":
            continue
        for key, value in getattr(report, "user_properties", ()):
            if key == "rounds":
                lines.append(f"{report.nodeid.split('::', 1)[-1]}: {value}")
    if lines:
        terminalreporter.section("rounds of the race, kill and disk-full tests")
        for line in sorted(lines):
            terminalreporter.write_line(line)
