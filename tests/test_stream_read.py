"""Reading a streamOptimized image front to back: pipes, downloads and OVA members.

A sequential reader cannot look at the end of the file, so it must see the
stream's end itself: the grain directory, footer and end-of-stream marker of
the spec layout (a), or every grain that the tables at the front promise in
the VMware (b) and qemu (c) layouts.  Each layout is made by the tool that
writes it (our writer, open-vmdk's vmdk-convert built here from
shared/reference, qemu-img), cut at every record boundary and inside records,
and fed through a reader that cannot seek: every cut must be refused with the
offset and a pointer to --recover, and --recover must keep exactly the
grains that arrived.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmdk
from vmdk.convert import convert

MiB = 1 << 20
GRAIN = 64 << 10
#: Bytes one grain table covers with 64 KiB grains.
RANGE = 512 * GRAIN
SIZE = 5 * RANGE
ROOT = Path(__file__).resolve().parents[1]
OPEN_VMDK = ROOT.parent / "shared" / "reference" / "open-vmdk" / "vmdk"
if not OPEN_VMDK.is_dir():
    OPEN_VMDK = Path(__file__).resolve().parents[2] / "shared" / "reference" / "open-vmdk" / "vmdk"


# -- the disk and its three layouts ------------------------------------------------------------


def _grains() -> dict[int, bytes]:
    """Grain index -> content: eight grains in each of four grain-table ranges (the third
    range is empty), most of them incompressible, a few that compress to a sector."""
    out = {}
    for r in (0, 1, 3, 4):
        for k, slot in enumerate((0, 1, 2, 57, 200, 201, 400, 511)):
            i = r * 512 + slot
            if k == 3:
                out[i] = bytes([i & 0xFF]) * GRAIN
            else:
                out[i] = hashlib.shake_256(f"grain {i}".encode()).digest(GRAIN)
    return out


GRAINS = _grains()


@pytest.fixture(scope="session")
def raw_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream-read") / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for i, data in GRAINS.items():
            os.pwrite(f.fileno(), data, i * GRAIN)
    return path


@pytest.fixture(scope="session")
def vmdk_convert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """open-vmdk's vmdk-convert, compiled for this session (it writes layout (b))."""
    if not (OPEN_VMDK / "Makefile").is_file():
        pytest.skip(f"open-vmdk sources not found at {OPEN_VMDK}")
    if not shutil.which("gcc") or not shutil.which("make"):
        pytest.skip("gcc and make are needed to build open-vmdk's vmdk-convert")
    out = tmp_path_factory.mktemp("open-vmdk")
    built = subprocess.run(["make", "-s", "-C", str(OPEN_VMDK), f"OUTPUTDIR={out}"], check=False,
                           capture_output=True, text=True, timeout=300)
    exe = out / "vmdk-convert"
    if built.returncode != 0 or not exe.is_file():
        pytest.skip(f"vmdk-convert did not build (zlib1g-dev missing?): {built.stderr[-500:]}")
    return str(exe)


@pytest.fixture(scope="session")
def layouts(raw_disk: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("layouts")
    made = {}
    convert(raw_disk, folder / "a.vmdk", subformat="streamOptimized", durable=False)
    made["a"] = (folder / "a.vmdk").read_bytes()
    return made


def _layout(name: str, request: pytest.FixtureRequest, raw_disk: Path,
            layouts: dict[str, bytes], tmp_path: Path) -> bytes:
    if name not in layouts:
        out = tmp_path / f"{name}.vmdk"
        if name == "b":
            exe = request.getfixturevalue("vmdk_convert")
            subprocess.run([exe, "-c", "1", str(raw_disk), str(out)], check=True,
                           capture_output=True, timeout=300)
        else:
            if not shutil.which("qemu-img"):
                pytest.skip("qemu-img is not installed")
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
                            "subformat=streamOptimized", str(raw_disk), str(out)],
                           check=True, capture_output=True, timeout=300)
        layouts[name] = out.read_bytes()
    return layouts[name]


@pytest.fixture(params=["a", "b", "c"])
def stream_layout(request: pytest.FixtureRequest, raw_disk: Path, layouts: dict[str, bytes],
                  tmp_path: Path) -> tuple[str, bytes]:
    return request.param, _layout(request.param, request, raw_disk, layouts, tmp_path)


# -- a walker that knows only the documented layout ---------------------------------------------


def records(data: bytes) -> list[tuple[int, int, int, int | None]]:
    """(start, payload end, end, disk byte offset or None for metadata) of every record."""
    overhead = struct.unpack_from("<Q", data, 64)[0]
    pos, out = overhead * 512, []
    while pos + 512 <= len(data):
        lba, size, kind = struct.unpack_from("<QII", data, pos)
        if size:
            end = pos + 12 + size
            out.append((pos, end, min(len(data), -(-end // 512) * 512), lba * 512))
        else:
            end = pos + 512 + lba * 512
            out.append((pos, end, end, None))
            if kind == 0:
                break
        pos = out[-1][2]
    return out


def layout_kind(data: bytes) -> str:
    """The layout, told from the header and what follows the last grain."""
    gd = struct.unpack_from("<Q", data, 56)[0]
    if gd == 0xFFFFFFFFFFFFFFFF:
        return "a"
    return "b" if records(data)[-1][3] is None else "c"


def cut_points(data: bytes, rng: random.Random, per_record: int = 2) -> list[int]:
    """Every record boundary, and ``per_record`` offsets inside each record, below the end."""
    recs = records(data)
    cuts = {0, 100, 511, 512, recs[0][0] - 512, recs[0][0]}
    for start, payload_end, end, _disk in recs:
        cuts.update((start, end))
        for _ in range(per_record):
            cuts.add(rng.randrange(start, end))
        cuts.add(min(start + 12, end - 1))  # just past a grain marker
    return sorted(c for c in cuts if 0 <= c < len(data))


def complete_at(data: bytes) -> int:
    """The shortest prefix that still holds the whole disk.

    Layout (a) needs its EOS marker.  In (b) and (c) the tables at the front promise
    every grain, so the stream is whole once the last grain's payload arrived (b's
    EOS marker adds nothing).
    """
    if layout_kind(data) == "a":
        return len(data)
    return max(payload_end for _s, payload_end, _e, disk in records(data) if disk is not None)


def kept_grains(data: bytes, cut: int) -> dict[int, bytes]:
    """The grains whose records arrived whole in the first ``cut`` bytes."""
    return {disk // GRAIN: GRAINS[disk // GRAIN] for _s, payload_end, _e, disk in records(data)
            if disk is not None and payload_end <= cut}


# -- feeding a pipe ---------------------------------------------------------------------------


class PipeReader(io.RawIOBase):
    """A non-seekable reader that hands out at most ``chunk`` bytes per call, as pipes do."""

    def __init__(self, data: bytes, chunk: int = 1 << 16) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._chunk = chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._chunk, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


class FakeStdin:
    def __init__(self, data: bytes, chunk: int = 1 << 16) -> None:
        self.buffer = io.BufferedReader(PipeReader(data, chunk))

    def isatty(self) -> bool:
        return False  # a pipe


def convert_from_pipe(data: bytes, out: Path, monkeypatch: pytest.MonkeyPatch, *,
                      recover: bool = False, chunk: int = 1 << 16) -> int:
    monkeypatch.setattr(sys, "stdin", FakeStdin(data, chunk))
    return convert("-", out, out_format="raw", durable=False, recover=recover)


def stored_grains(path: Path) -> dict[int, bytes]:
    """The non-zero grains of a sparse raw file, found through its data extents."""
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for g in range(start // GRAIN, -(-end // GRAIN)):
                chunk = os.pread(fd, GRAIN, g * GRAIN)
                if chunk.strip(b"\0"):
                    out[g] = chunk
            pos = -(-end // GRAIN) * GRAIN
    finally:
        os.close(fd)
    return out


def _check_refusal(exc: vmdk.CorruptImageError, cut: int, name: str = "<stdin>") -> None:
    text = str(exc)
    assert text.startswith(f"{name}: "), text
    if cut >= 512:  # with the header, --recover has a disk to write the grains into
        assert "--recover" in text, text
    assert "\n" not in text, text
    numbers = [int(w.rstrip(",.;:)")) for w in text.replace("(", " ").split()
               if w.rstrip(",.;:)").isdigit()]
    assert cut in numbers, f"the cut at byte {cut} is not named: {text}"


# -- the tests ---------------------------------------------------------------------------------


def test_layout_fixtures_are_what_they_claim(stream_layout: tuple[str, bytes]) -> None:
    name, data = stream_layout
    assert layout_kind(data) == name
    grains = [disk // GRAIN for _s, _p, _e, disk in records(data) if disk is not None]
    assert sorted(grains) == sorted(GRAINS)
    if name == "a":  # several grain tables, one per range with data
        tables = [s for s, _p, _e, disk in records(data) if disk is None]
        assert len(tables) >= 4 + 3


def test_whole_stream_converts_exactly(stream_layout: tuple[str, bytes], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _name, data = stream_layout
    out = tmp_path / "out.raw"
    convert_from_pipe(data, out, monkeypatch, chunk=4096 + 7)
    assert out.stat().st_size == SIZE
    assert stored_grains(out) == GRAINS


def test_every_cut_is_refused(stream_layout: tuple[str, bytes], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every record boundary and two places inside each record: refused, nothing left."""
    name, data = stream_layout
    whole = complete_at(data)
    cuts = cut_points(data, random.Random(name))
    out = tmp_path / "out.raw"
    accepted = []
    for cut in cuts:
        try:
            convert_from_pipe(data[:cut], out, monkeypatch)
        except vmdk.CorruptImageError as exc:
            if cut >= whole:
                pytest.fail(f"layout {name}: the whole disk had arrived at byte {cut}: {exc}")
            _check_refusal(exc, cut)
            assert not out.exists(), f"layout {name}: cut at {cut} left {out}"
        else:
            accepted.append(cut)
            assert stored_grains(out) == GRAINS, f"layout {name}: cut at {cut}"
            out.unlink()
    wrongly = [c for c in accepted if c < whole]
    print(f"layout {name}: {len(cuts)} cuts, {len(accepted)} of them past the last grain")
    assert not wrongly, (f"layout {name}: {len(wrongly)} of {len(cuts)} cuts converted with "
                         f"exit 0, first at bytes {wrongly[:8]}")


def test_recover_keeps_the_grains_that_arrived(stream_layout: tuple[str, bytes],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    name, data = stream_layout
    out = tmp_path / "out.raw"
    cuts = [c for c in cut_points(data, random.Random(f"r{name}"), per_record=1) if c >= 512]
    for cut in cuts:
        caplog.clear()
        convert_from_pipe(data[:cut], out, monkeypatch, recover=True)
        assert out.stat().st_size == SIZE
        assert stored_grains(out) == kept_grains(data, cut), f"layout {name}: cut at {cut}"
        if cut < complete_at(data):
            assert any("--recover" not in r.getMessage() and str(cut) in r.getMessage()
                       for r in caplog.records), (cut, [r.getMessage() for r in caplog.records])
        out.unlink()
    print(f"layout {name}: {len(cuts)} cuts recovered")


def test_recover_loses_only_the_damaged_grains(stream_layout: tuple[str, bytes],
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Each grain is compressed on its own, with its own checksum: a damaged one is lost
    alone.  --recover used to stop at the first, so a bad first grain lost the whole disk."""
    name, data = stream_layout
    grains = [(start, payload_end, disk) for start, payload_end, _e, disk in records(data)
              if disk is not None and payload_end - start > 200]
    damaged = {grains[0][2] // GRAIN, grains[len(grains) // 2][2] // GRAIN}
    bad = bytearray(data)
    for start, payload_end, disk in grains:
        if disk // GRAIN in damaged:
            middle = (start + 12 + payload_end) // 2
            bad[middle:middle + 16] = bytes(b ^ 0x5A for b in bad[middle:middle + 16])
    out = tmp_path / "out.raw"
    with pytest.raises(vmdk.CorruptImageError):
        convert_from_pipe(bytes(bad), out, monkeypatch)
    convert_from_pipe(bytes(bad), out, monkeypatch, recover=True)
    expected = {g: d for g, d in GRAINS.items() if g not in damaged}
    assert stored_grains(out) == expected, f"layout {name}"
    lost = [r.getMessage() for r in caplog.records if "reads as zeros" in r.getMessage()]
    assert len(lost) == 2, [r.getMessage() for r in caplog.records]


def test_header_cut_is_refused_even_with_recover(tmp_path: Path, layouts: dict[str, bytes],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.raw"
    for cut in (0, 1, 300, 511):
        with pytest.raises(vmdk.CorruptImageError):
            convert_from_pipe(layouts["a"][:cut], out, monkeypatch, recover=True)
        assert not out.exists()


def _cli(*args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "vmdk", *args], input=data, check=False,
                          capture_output=True, env=env, timeout=120)


def test_cli_refuses_a_cut_pipe(stream_layout: tuple[str, bytes], tmp_path: Path) -> None:
    name, data = stream_layout
    recs = records(data)
    grain_ends = [end for _s, _p, end, disk in recs if disk is not None]
    out = tmp_path / "out.raw"
    for cut in (grain_ends[len(grain_ends) // 2], grain_ends[-1] - 1000, recs[0][0]):
        done = _cli("convert", "-O", "raw", "-", str(out), data=data[:cut])
        err = done.stderr.decode()
        assert done.returncode == 1, f"layout {name}: cut at {cut}: exit {done.returncode}"
        assert err.count("\n") == 1 and err.startswith("vmdk: error: <stdin>: "), err
        assert str(cut) in err and "--recover" in err, err
        assert not out.exists()
    done = _cli("convert", "-O", "raw", "--recover", "-", str(out),
                data=data[:grain_ends[len(grain_ends) // 2]])
    assert done.returncode == 0, done.stderr
    assert b"warning" in done.stderr
    assert stored_grains(out) == kept_grains(data, grain_ends[len(grain_ends) // 2])


# -- OVA packages ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ova(raw_disk: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vmdk.ova import export_ova

    path = tmp_path_factory.mktemp("ova") / "vm.ova"
    export_ova(raw_disk, path)
    return path


def _member_span(path: Path, name: str) -> tuple[int, int]:
    with tarfile.open(path) as tar:
        m = tar.getmember(name)
        return m.offset_data, m.size


def ova_cuts(path: Path) -> Iterator[int]:
    data_at, size = _member_span(path, "vm-disk1.vmdk")
    disk = path.read_bytes()[data_at:data_at + size]
    yield data_at - 512  # at the member's header
    yield data_at  # right after it
    for start, _p, end, _disk in records(disk)[::3]:
        yield data_at + start
        yield data_at + (start + end) // 2
    yield data_at + size - 512  # before the EOS marker


def test_cut_ova_is_refused(ova: Path, tmp_path: Path) -> None:
    from vmdk.ova import copy_from_ova, ova_disks, ova_info

    data = ova.read_bytes()
    out = tmp_path / "out.raw"
    for cut in ova_cuts(ova):
        cut_ova = tmp_path / "cut.ova"
        cut_ova.write_bytes(data[:cut])
        try:
            ova_info(str(cut_ova))
            ova_disks(str(cut_ova))
        except vmdk.VmdkError as exc:
            assert str(exc).startswith(str(cut_ova)), exc
        with pytest.raises(vmdk.VmdkError) as caught:
            convert(cut_ova, out, out_format="raw", durable=False)
        assert str(caught.value).startswith(str(cut_ova)), caught.value
        assert not out.exists()
        with pytest.raises(vmdk.VmdkError):
            copy_from_ova(str(cut_ova), lambda _o, _d: None)
    # Cut after the disk member (its padding, the manifest and the tar's end are lost):
    # the disk itself is whole, and reads so.
    data_at, size = _member_span(ova, "vm-disk1.vmdk")
    (tmp_path / "cut.ova").write_bytes(data[:data_at + size])
    convert(tmp_path / "cut.ova", out, out_format="raw", durable=False)
    assert stored_grains(out) == GRAINS


def test_cut_ova_cli_exits_1_without_traceback(ova: Path, tmp_path: Path) -> None:
    data = ova.read_bytes()
    data_at, size = _member_span(ova, "vm-disk1.vmdk")
    out = tmp_path / "out.raw"
    for cut in (data_at + size // 2, data_at + size - 512, data_at):
        (tmp_path / "cut.ova").write_bytes(data[:cut])
        done = _cli("convert", "-O", "raw", str(tmp_path / "cut.ova"), str(out), data=b"")
        err = done.stderr.decode()
        assert done.returncode == 1 and "Traceback" not in err, err
        assert err.startswith(f"vmdk: error: {tmp_path / 'cut.ova'}"), err
        assert err.count("\n") == 1, err
        assert not out.exists()


def test_cut_ova_recovers(ova: Path, tmp_path: Path) -> None:
    data = ova.read_bytes()
    data_at, size = _member_span(ova, "vm-disk1.vmdk")
    disk = data[data_at:data_at + size]
    cut = data_at + records(disk)[20][0]
    (tmp_path / "cut.ova").write_bytes(data[:cut])
    out = tmp_path / "out.raw"
    convert(tmp_path / "cut.ova", out, out_format="raw", recover=True, durable=False)
    assert stored_grains(out) == kept_grains(disk, cut - data_at)


# -- damage that is not a cut ------------------------------------------------------------------


def read_all(data: bytes) -> dict[int, bytes]:
    from vmdk.stream_read import StreamReader

    reader = StreamReader(io.BufferedReader(PipeReader(data)), "<pipe>")
    return {offset // GRAIN: grain for offset, grain in reader.grains()}


def recover_all(data: bytes) -> tuple[dict[int, bytes], vmdk.VmdkError | None]:
    """The grains --recover keeps, and the error it warns of (None for a whole stream)."""
    from vmdk.stream_read import StreamReader

    reader = StreamReader(io.BufferedReader(PipeReader(data)), "<pipe>", recover=True)
    kept = {}
    try:
        for offset, grain in reader.grains():
            kept[offset // GRAIN] = grain
    except vmdk.VmdkError as exc:
        return kept, exc
    return kept, None


def _metadata(data: bytes, kind: int) -> list[int]:
    """Byte offsets of the blocks behind the metadata markers of ``kind``."""
    return [start + 512 for start, _p, _e, disk in records(data)
            if disk is None and struct.unpack_from("<I", data, start + 12)[0] == kind]


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _tables_first(data: bytes) -> tuple[int, int]:
    """(byte offset of the GD, byte offset of the first GT) of a layout (b) or (c) stream."""
    gd = struct.unpack_from("<Q", data, 56)[0] * 512
    return gd, struct.unpack_from("<I", data, gd)[0] * 512


def test_spec_layout_cross_checks(layouts: dict[str, bytes]) -> None:
    from vmdk.stream_read import TruncatedStreamError

    data = layouts["a"]
    gt, gd, footer = (_metadata(data, k)[0] for k in (1, 2, 3))
    first_grain = records(data)[0][0] // 512
    damaged = {
        "grain table": _patch(data, gt + 4, "<I", first_grain + 1),  # slot 1 names slot 0's
        "grain table ": _patch(data, gt + 4 * 300, "<I", first_grain),  # lists an absent grain
        "grain directory": _patch(data, gd, "<I", 12345),
        "footer": _patch(data, footer + 12, "<Q", SIZE // 512 * 2),  # capacity
        "footer ": _patch(data, footer + 56, "<Q", 77),  # gdOffset
        "comes before": data[:footer - 512] + bytes(512),  # EOS in place of the footer
    }
    for what, bad in damaged.items():
        with pytest.raises(vmdk.CorruptImageError, match=what.strip()) as caught:
            read_all(bad)
        assert not isinstance(caught.value, TruncatedStreamError), caught.value
    assert read_all(data) == GRAINS


def test_tables_first_cross_checks(request: pytest.FixtureRequest, raw_disk: Path,
                                   layouts: dict[str, bytes], tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    from vmdk.stream_read import TruncatedStreamError

    for name in ("b", "c"):
        data = _layout(name, request, raw_disk, layouts, tmp_path)
        gd, gt = _tables_first(data)
        recs = [r for r in records(data) if r[3] is not None]
        second = recs[1][0] // 512
        damaged = {
            # The first grain's entry names the second record: that record is not its grain.
            "the grain table gives sector": _patch(data, gt, "<I", second),
            # An entry for an absent grain, at a sector the stream passes inside a record.
            "passed without one": _patch(data, gt + 4 * 300, "<I", recs[2][0] // 512 + 1),
            # A table outside the metadata in front of the grains.
            "does not lie before the first grain": _patch(data, gd, "<I", 1 << 30),
        }
        if name == "b":  # EOS where the tables promise the last grain
            damaged[f"record at sector {recs[-1][0] // 512}, which the stream passed"] = (
                data[:recs[-1][0]] + bytes(512))
        for what, bad in damaged.items():
            with pytest.raises(vmdk.CorruptImageError, match=what) as caught:
                read_all(bad)
            assert not isinstance(caught.value, TruncatedStreamError), (name, caught.value)
        # --recover sets tables it cannot use aside and takes the grains from their markers.
        # Without the tables, qemu's stream (no EOS) cannot be told from a cut at its end.
        caplog.clear()
        kept, error = recover_all(damaged["does not lie before the first grain"])
        assert kept == GRAINS
        assert "taken from their markers" in caplog.text
        assert (error is None) is (name == "b"), error


def test_unordered_vmware_stream_converts(vmdk_convert: str, raw_disk: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """vmdk-convert --noreorder writes grains as its threads finish: the tables say where."""
    stream = tmp_path / "unordered.vmdk"
    subprocess.run([vmdk_convert, "--noreorder", "-n", "4", "-c", "1", str(raw_disk),
                    str(stream)], check=True, capture_output=True, timeout=300)
    data = stream.read_bytes()
    order = [disk for _s, _p, _e, disk in records(data) if disk is not None]
    out = tmp_path / "out.raw"
    convert_from_pipe(data, out, monkeypatch)
    assert stored_grains(out) == GRAINS, f"grains in the order {order}"
