"""The NBD server against the real clients: qemu-img, qemu-io, nbdinfo, nbdcopy.

Each test serves an in-memory device on 127.0.0.1 (port 0) or a Unix socket
from a thread of the test process, runs a client as a subprocess with a
timeout, and stops the server whatever happens.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmdk.errors import OutOfRangeError, ReadOnlyError
from vmdk.nbd import NbdServer, serve
from vmdk.nbd._wire import BlockState, Errno
from vmdk.nbd.server import block_states, nbd_errno

pytestmark = pytest.mark.interop

BLOCK = 64 << 10
SIZE = 4 << 20
TIMEOUT = 60
#: Blocks the test device starts with: runs of data, single blocks, the last one.
ALLOCATED = {0, 1, 2, 5, 17, 18, 40, 63}


@dataclasses.dataclass
class Run:
    start: int
    length: int
    data: bool
    zero: bool


class MemoryDevice:
    """A bytearray plus the set of allocated 64 KiB blocks; reads of the rest are zeros."""

    def __init__(self, size: int = SIZE, *, read_only: bool = False) -> None:
        self.size = size
        self.buf = bytearray(size)
        self.allocated: set[int] = set()
        self.read_only = read_only
        self.flushes = 0
        self.bad_range: tuple[int, int] | None = None  # reads here fail with EIO

    def writable(self) -> bool:
        return not self.read_only

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise OutOfRangeError(f"{offset}+{length} past {self.size}")

    def _blocks(self, offset: int, length: int) -> range:
        return range(offset // BLOCK, (offset + length - 1) // BLOCK + 1) if length else range(0)

    def read_at(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        if self.bad_range and offset < self.bad_range[1] and offset + length > self.bad_range[0]:
            raise OSError(errno.EIO, "simulated media error")
        return bytes(self.buf[offset : offset + length])

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        if self.read_only:
            raise ReadOnlyError("read-only device")
        self._check(offset, len(data))
        self.buf[offset : offset + len(data)] = data
        self.allocated.update(self._blocks(offset, len(data)))

    def write_zeroes_at(self, offset: int, length: int) -> None:
        self.write_at(offset, bytes(length))

    def discard_at(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        self.flushes += 1

    def map(self, offset: int, length: int) -> list[Run]:
        self._check(offset, length)
        runs: list[Run] = []
        for b in self._blocks(offset, length):
            start, end = max(offset, b * BLOCK), min(offset + length, (b + 1) * BLOCK)
            data = b in self.allocated
            if runs and runs[-1].data == data:
                runs[-1].length += end - start
            else:
                runs.append(Run(start, end - start, data, not data))
        return runs

    def allocation(self) -> list[tuple[int, int, bool]]:
        """(start, length, data) runs over the whole device, merged."""
        return [(r.start, r.length, r.data) for r in self.map(0, self.size)]


def patterned() -> MemoryDevice:
    dev = MemoryDevice()
    for b in sorted(ALLOCATED):
        dev.write_at(b * BLOCK, bytes([(b * 7 + i) % 256 for i in range(256)]) * (BLOCK // 256))
    return dev


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed")
    return path


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if check and result.returncode:
        pytest.fail(f"{args} failed ({result.returncode}): {result.stderr}")
    return result


@pytest.fixture
def device() -> MemoryDevice:
    return patterned()


@pytest.fixture
def server(device: MemoryDevice) -> Iterator[NbdServer]:
    with NbdServer(device, port=0) as srv:
        yield srv


@pytest.fixture
def unix_server(device: MemoryDevice, tmp_path: Path) -> Iterator[NbdServer]:
    with NbdServer(device, unix_socket=str(tmp_path / "nbd.sock")) as srv:
        yield srv


# -- pure helpers -----------------------------------------------------------------------------------


def test_block_states_fill_gaps_and_clip() -> None:
    runs = [Run(100, 50, True, False), Run(150, 100, False, True), Run(300, 10, False, False)]
    got = list(block_states(runs, 120, 200))
    hole_zero = BlockState.HOLE | BlockState.ZERO
    assert got == [(30, 0), (100, hole_zero), (50, 0), (10, BlockState.HOLE), (10, 0)]


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (ReadOnlyError("ro"), Errno.EPERM),
        (OutOfRangeError("far"), Errno.EINVAL),
        (OSError(errno.ENOSPC, "full"), Errno.ENOSPC),
        (OSError(errno.EIO, "bad"), Errno.EIO),
        (OSError("no errno"), Errno.EIO),
    ],
)
def test_device_errors_map_to_nbd_errors(exc: BaseException, error: Errno) -> None:
    assert nbd_errno(exc) == error


def test_port_zero_reports_the_chosen_port(server: NbdServer) -> None:
    host, port = server.address  # type: ignore[misc]
    assert host == "127.0.0.1" and port > 0
    assert server.uri == f"nbd://127.0.0.1:{port}/"


# -- qemu ----------------------------------------------------------------------------------------------


def test_qemu_img_info(server: NbdServer) -> None:
    info = json.loads(run(tool("qemu-img"), "info", "--output=json", server.uri).stdout)
    assert info["virtual-size"] == SIZE


def test_qemu_img_convert_reads_every_byte(
    server: NbdServer, device: MemoryDevice, tmp_path: Path
) -> None:
    out = tmp_path / "out.raw"
    run(tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", server.uri, str(out))
    assert out.read_bytes() == device.buf


def test_qemu_img_map_matches_allocation(server: NbdServer, device: MemoryDevice) -> None:
    runs = json.loads(run(tool("qemu-img"), "map", "--output=json", server.uri).stdout)
    got = [(r["start"], r["length"], r["data"]) for r in runs]
    assert got == device.allocation()
    assert all(r["zero"] != r["data"] for r in runs)


def test_qemu_io_write_and_flush(server: NbdServer, device: MemoryDevice) -> None:
    before = device.flushes
    run(tool("qemu-io"), "-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "flush", server.uri)
    assert device.buf[: 64 << 10] == b"\xab" * (64 << 10)
    assert device.flushes > before


def test_qemu_io_zero_discard_and_read(server: NbdServer, device: MemoryDevice) -> None:
    run(
        tool("qemu-io"),
        "-f",
        "raw",
        "-c",
        "write -z 0 4k",
        "-c",
        "discard 8k 4k",
        "-c",
        "write -z -u 12k 4k",
        server.uri,
    )
    assert device.buf[:4096] == bytes(4096) and device.buf[12288:16384] == bytes(4096)
    result = run(tool("qemu-io"), "-f", "raw", "-c", "read -P 0 192k 64k", server.uri)
    assert "read 65536/65536" in result.stdout


def test_device_error_is_an_nbd_error_not_a_disconnect(
    server: NbdServer, device: MemoryDevice
) -> None:
    device.bad_range = (BLOCK, 2 * BLOCK)
    result = run(
        tool("qemu-io"),
        "-f",
        "raw",
        "-c",
        "read 0 4k",
        "-c",
        "read 64k 4k",
        "-c",
        "read 128k 4k",
        server.uri,
        check=False,
    )
    assert "Input/output error" in result.stdout + result.stderr
    assert result.stdout.count("read 4096/4096") == 2  # before and after the failure


def test_read_past_end_is_refused(server: NbdServer) -> None:
    result = run(tool("qemu-io"), "-f", "raw", "-c", f"read {SIZE} 512", server.uri, check=False)
    assert "read 512/512" not in result.stdout


# -- libnbd ---------------------------------------------------------------------------------------------


def test_nbdinfo_json(server: NbdServer) -> None:
    info = json.loads(run(tool("nbdinfo"), "--json", server.uri).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == SIZE
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert "base:allocation" in export["contexts"]
    assert export["is_read_only"] is False and export["can_multi_conn"] is False
    assert export["can_trim"] and export["can_zero"] and export["can_fua"] and export["can_flush"]


def test_nbdinfo_map_matches_allocation(server: NbdServer, device: MemoryDevice) -> None:
    lines = run(tool("nbdinfo"), "--map", server.uri).stdout.splitlines()
    got = []
    for line in lines:
        start, length, state, *_ = line.split()
        got.append((int(start), int(length), int(state) == 0))
    want = device.allocation()
    assert got == want
    assert all(line.split()[2] in ("0", "3") for line in lines)


def test_nbdcopy_read_every_byte(server: NbdServer, device: MemoryDevice, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    run(tool("nbdcopy"), server.uri, str(out))
    assert out.read_bytes() == device.buf


def test_nbdcopy_write_every_byte(server: NbdServer, device: MemoryDevice, tmp_path: Path) -> None:
    src = tmp_path / "in.raw"
    data = bytes(range(256)) * (SIZE // 256 // 2) + bytes(SIZE // 2)  # data, then a zero half
    src.write_bytes(data)
    run(tool("nbdcopy"), str(src), server.uri)
    assert device.buf == data


def test_several_clients_at_once(server: NbdServer, device: MemoryDevice, tmp_path: Path) -> None:
    nbdcopy = tool("nbdcopy")
    procs = [
        subprocess.Popen(
            [nbdcopy, server.uri, str(tmp_path / f"out{i}.raw")], stderr=subprocess.PIPE
        )
        for i in range(4)
    ]
    try:
        for proc in procs:
            assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
    for i in range(4):
        assert (tmp_path / f"out{i}.raw").read_bytes() == device.buf


# -- read-only, Unix sockets, names, serve() ---------------------------------------------------------------


def test_read_only_export(tmp_path: Path) -> None:
    device = patterned()
    before = bytes(device.buf)
    with NbdServer(device, port=0, read_only=True) as srv:
        info = json.loads(run(tool("nbdinfo"), "--json", srv.uri).stdout)["exports"][0]
        assert info["is_read_only"] is True and info["can_multi_conn"] is True
        result = run(
            tool("qemu-io"), "-f", "raw", "-c", "write -P 0xab 0 64k", srv.uri, check=False
        )
        assert "wrote" not in result.stdout
        out = tmp_path / "out.raw"
        run(tool("nbdcopy"), srv.uri, str(out))
        assert out.read_bytes() == before
    assert device.buf == before


def test_unix_socket(unix_server: NbdServer, device: MemoryDevice, tmp_path: Path) -> None:
    path = unix_server.address
    assert isinstance(path, str) and Path(path).exists()
    assert unix_server.uri == f"nbd+unix:///?socket={path}"
    out = tmp_path / "out.raw"
    run(tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", unix_server.uri, str(out))
    assert out.read_bytes() == device.buf
    info = json.loads(run(tool("nbdinfo"), "--json", unix_server.uri).stdout)
    assert info["exports"][0]["export-size"] == SIZE
    run(tool("qemu-io"), "-f", "raw", "-c", "write -P 0xcd 1M 64k", "-c", "flush", unix_server.uri)
    assert device.buf[1 << 20 : (1 << 20) + BLOCK] == b"\xcd" * BLOCK
    src = tmp_path / "in.raw"
    src.write_bytes(bytes([0x5A]) * SIZE)
    run(tool("nbdcopy"), str(src), unix_server.uri)
    assert device.buf == src.read_bytes()


def test_unix_socket_is_removed_on_stop(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with NbdServer(MemoryDevice(), unix_socket=str(path)):
        assert path.exists()
    assert not path.exists()


def test_named_export(device: MemoryDevice) -> None:
    with NbdServer(device, port=0, export_name="disk one") as srv:
        assert srv.uri.endswith("/disk%20one")
        info = json.loads(run(tool("nbdinfo"), "--json", srv.uri).stdout)
        assert info["exports"][0]["export-name"] == "disk one"
        wrong = srv.uri.rsplit("/", 1)[0] + "/other"
        assert run(tool("nbdinfo"), "--json", wrong, check=False).returncode != 0


def test_serve_until_stop_event(device: MemoryDevice) -> None:
    stop = threading.Event()
    uris: list[str] = []
    ready = threading.Event()

    def on_ready(uri: str) -> None:
        uris.append(uri)
        ready.set()

    thread = threading.Thread(
        target=serve, args=(device,), kwargs={"port": 0, "ready": on_ready, "stop_event": stop}
    )
    thread.start()
    try:
        assert ready.wait(TIMEOUT)
        info = json.loads(run(tool("nbdinfo"), "--json", uris[0]).stdout)
        assert info["exports"][0]["export-size"] == SIZE
    finally:
        flushes = device.flushes
        stop.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert device.flushes > flushes


def test_hostile_client_is_dropped_and_others_still_served(server: NbdServer) -> None:
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:  # type: ignore[arg-type]
        assert sock.recv(18)[:8] == b"NBDMAGIC"
        sock.sendall(struct.pack(">I", 3))
        # an option announcing 4 GiB of data: refused at once, nothing buffered
        sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 0xFFFFFFFF))
        reply = sock.recv(20)
        assert struct.unpack(">QIII", reply)[2] == (1 << 31) | 9  # NBD_REP_ERR_TOO_BIG
        sock.sendall(bytes(1 << 20))  # part of the payload, dropped as it comes
        sock.sendall(b"garbage!" * 4)
    info = json.loads(run(tool("nbdinfo"), "--json", server.uri).stdout)
    assert info["exports"][0]["export-size"] == SIZE


def test_bad_magic_drops_the_client(server: NbdServer) -> None:
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:  # type: ignore[arg-type]
        sock.recv(18)
        sock.sendall(struct.pack(">I", 3) + b"not an option header")
        assert sock.recv(100) == b""  # closed by the server
    run(tool("nbdinfo"), "--json", server.uri)


def test_stop_disconnects_idle_clients(device: MemoryDevice) -> None:
    srv = NbdServer(device, port=0)
    srv.start()
    try:
        sock = socket.create_connection(srv.address, timeout=TIMEOUT)  # type: ignore[arg-type]
        assert sock.recv(18)[:8] == b"NBDMAGIC"
    finally:
        srv.stop()  # must not hang on the idle client
    assert sock.recv(1) == b""
    sock.close()
