"""Images read where they live: over HTTP from a local range server that counts what it
serves, and from S3 (moto's server on 127.0.0.1).  Every transfer is checked against
what the job needs: the stored bytes, a handful of requests for metadata."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmdk
from conftest import have, run
from vmdk.convert import convert
from remote_support import RangeServer, range_server, s3_server

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

GiB = 1 << 30
#: Metadata a job may fetch besides the stored data (header, descriptor, directory, tables).
METADATA = 1 << 20


def _vmdk(*args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "vmdk", *args, check=check)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 GiB monolithicSparse image with about 10% data (64 KiB of every 640 KiB, written
    front to back as a guest would fill it), its streamOptimized copy, and the raw disk."""
    return _images_in(tmp_path_factory.mktemp("remote"), GiB, seed=7)


def _images_in(root: Path, size: int, seed: int) -> Path:
    """disk.vmdk with 64 KiB of random data in every 640 KiB, stream.vmdk and disk.raw."""
    rnd = random.Random(seed)
    with vmdk.create(root / "disk.vmdk", size) as disk:
        for pos in range(0, size, 640 << 10):
            disk.write_at(pos, rnd.randbytes(64 << 10))
    _vmdk("convert", "-o", "subformat=streamOptimized", root / "disk.vmdk", root / "stream.vmdk")
    _vmdk("convert", "-O", "raw", root / "disk.vmdk", root / "disk.raw")
    return root


@pytest.fixture(scope="module")
def server(images: Path) -> Iterator[RangeServer]:
    with range_server(str(images)) as srv:
        yield srv


@pytest.fixture
def web(server: RangeServer) -> RangeServer:
    server.reset()
    server.fail = 0
    server.deny = set()
    return server


def test_importing_vmdk_loads_no_network_code() -> None:
    out = run(sys.executable, "-c", "import sys, vmdk; print(sorted(m for m in sys.modules "
              "if m.startswith(('fsspec', 'aiohttp', 'vmdk.remote'))))").stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", ["disk.vmdk", "stream.vmdk"])
def test_info_takes_a_handful_of_requests(web: RangeServer, images: Path, name: str) -> None:
    info = json.loads(_vmdk("info", "--output=json", web.url(name)).stdout)
    local = json.loads(_vmdk("info", "--output=json", images / name).stdout)
    assert info["virtual-size"] == local["virtual-size"] == GiB
    assert info["format-specific"] == {**local["format-specific"], "data": {
        **local["format-specific"]["data"], "extents": info["format-specific"]["data"]["extents"]}}
    assert info["filename"] == web.url(name)
    assert info["actual-size"] == (images / name).stat().st_size
    assert web.requests + web.heads <= 4, web.log
    assert web.bytes <= METADATA


def test_map_of_a_sparse_image_takes_a_handful_of_requests(web: RangeServer, images: Path) -> None:
    remote = json.loads(_vmdk("map", "--output=json", web.url("disk.vmdk")).stdout)
    local = json.loads(_vmdk("map", "--output=json", images / "disk.vmdk").stdout)
    for run_ in remote + local:
        run_.pop("filename", None)
    assert remote == local
    assert web.requests + web.heads <= 4, web.log
    assert web.bytes <= METADATA


def test_map_of_a_stream_fetches_its_tables_only(web: RangeServer, images: Path) -> None:
    remote = json.loads(_vmdk("map", "--output=json", web.url("stream.vmdk")).stdout)
    assert len(remote) == len(json.loads(_vmdk("map", "--output=json",
                                               images / "stream.vmdk").stdout))
    # One request per grain table (a stream writes each after its grains), side by side.
    assert web.requests <= 3 + GiB // (32 << 20), web.log
    assert web.bytes <= METADATA


@pytest.mark.parametrize("name", ["disk.vmdk", "stream.vmdk"])
def test_convert_from_a_url_fetches_the_stored_bytes_once(web: RangeServer, images: Path,
                                                          tmp_path: Path, name: str) -> None:
    _vmdk("convert", "-O", "raw", web.url(name), tmp_path / "out.raw")
    assert _same_file(tmp_path / "out.raw", images / "disk.raw")
    stored = (images / name).stat().st_size
    assert web.bytes <= 1.05 * stored + METADATA, (web.bytes, stored)
    # Neighbouring grains come in large ranges: far fewer requests than grains (1638).
    assert web.requests <= 300, web.requests


def test_cat_and_compare_read_urls(web: RangeServer, images: Path, tmp_path: Path) -> None:
    with open(tmp_path / "cat.raw", "wb") as out:
        subprocess.run([sys.executable, "-m", "vmdk", "cat", web.url("stream.vmdk")],
                       stdout=out, check=True, timeout=120)
    assert _same_file(tmp_path / "cat.raw", images / "disk.raw")
    web.reset()
    assert _vmdk("compare", web.url("disk.vmdk"), images / "disk.raw").returncode == 0
    assert web.bytes <= 1.05 * (images / "disk.vmdk").stat().st_size + METADATA


@pytest.mark.parametrize("verb", ["compare", "convert"])
def test_sequential_jobs_read_ahead_from_a_url(web: RangeServer, images: Path, tmp_path: Path,
                                               verb: str) -> None:
    """Against a distant server (each range answered after 20 ms), the next ranges are
    asked for while the ones before are used: several requests at once, all data fetched
    once."""
    web.delay = 0.02
    try:
        args = ([web.url("disk.vmdk"), images / "disk.raw"] if verb == "compare" else
                ["-O", "raw", web.url("disk.vmdk"), tmp_path / "out.raw"])
        assert _vmdk(verb, *args).returncode == 0
    finally:
        web.delay = 0
    assert web.peak >= 3, web.peak
    assert web.bytes <= 1.05 * (images / "disk.vmdk").stat().st_size + METADATA


@pytest.mark.parametrize("where", [(640 << 10) * 700 + 4097, (640 << 10) * 900 + (100 << 10)])
def test_compare_from_a_url_finds_the_first_difference(web: RangeServer, images: Path,
                                                       tmp_path: Path, where: int) -> None:
    """Read ahead and in gathered ranges, the first differing byte is still the one found:
    inside stored data, and in a hole of the image that the other side fills."""
    changed = tmp_path / "changed.raw"
    shutil.copyfile(images / "disk.raw", changed)
    with open(changed, "r+b") as f:
        f.seek(where)
        old = f.read(1)
        f.seek(where)
        f.write(bytes([old[0] ^ 0xFF]))
        f.seek(where + (3 << 20))  # a later difference must not be the one reported
        f.write(b"\xAA")
    found = _vmdk("compare", web.url("disk.vmdk"), changed, check=False)
    assert found.returncode == 1
    assert f"offset {where}!" in found.stdout


def test_check_reads_a_url(web: RangeServer) -> None:
    out = _vmdk("check", web.url("disk.vmdk")).stdout
    assert "No errors were found" in out


def test_the_api_opens_urls_read_only(web: RangeServer, images: Path) -> None:
    with vmdk.open(web.url("disk.vmdk")) as disk, vmdk.open(images / "disk.vmdk") as local:
        assert disk.name == web.url("disk.vmdk")
        for offset in (0, 640 << 10, GiB - (640 << 10), 123456789):
            assert disk.read_at(offset, 100000) == local.read_at(offset, 100000)
    with pytest.raises(vmdk.UnsupportedFormatError, match="read-only"):
        vmdk.open(web.url("disk.vmdk"), "r+")


def test_serve_read_only_from_a_url(web: RangeServer, images: Path, tmp_path: Path) -> None:
    if not have("nbdcopy"):
        pytest.skip("nbdcopy is not installed")
    from vmdk.nbd.server import NbdServer

    with vmdk.open(web.url("stream.vmdk")) as disk, NbdServer(disk, port=0,
                                                              read_only=True) as server:
        run("nbdcopy", server.uri, tmp_path / "served.raw")
    assert _same_file(tmp_path / "served.raw", images / "disk.raw")


# ------------------------------------------------- files beside the image, and the rules


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[tuple[Path, RangeServer]]:
    (tmp_path / "vm").mkdir()
    with range_server(str(tmp_path)) as srv:
        yield tmp_path, srv


def test_extents_and_parents_resolve_beside_the_url(folder: tuple[Path, RangeServer]) -> None:
    root, srv = folder
    data = random.Random(1).randbytes(1 << 20)
    with vmdk.create(root / "vm" / "base.vmdk", 8 << 20, "twoGbMaxExtentFlat") as disk:
        disk.write_at(0, data)
    vmdk.create(root / "vm" / "child.vmdk", parent=root / "vm" / "base.vmdk").close()
    with vmdk.open(root / "vm" / "child.vmdk", "r+") as child:
        child.write_at(4 << 20, b"child" * 100)
    with vmdk.open(srv.url("vm/child.vmdk")) as disk:
        assert disk.read_at(0, len(data)) == data
        assert disk.read_at(4 << 20, 500) == b"child" * 100
        chain = disk.image.chain()
        assert [img.path for img in chain] == [srv.url("vm/child.vmdk"), srv.url("vm/base.vmdk")]
        assert chain[1].extents[0].filename == srv.url("vm/base-f001.vmdk")


def test_names_outside_the_folder_are_refused(folder: tuple[Path, RangeServer]) -> None:
    root, srv = folder
    vmdk.create(root / "vm" / "f.vmdk", 1 << 20, "monolithicFlat").close()
    shutil.move(root / "vm" / "f-flat.vmdk", root / "f-flat.vmdk")
    text = (root / "vm" / "f.vmdk").read_text().replace('"f-flat.vmdk"', '"../f-flat.vmdk"')
    (root / "vm" / "f.vmdk").write_text(text)
    with pytest.raises(vmdk.UnsafePathError, match="outside the image's folder"):
        vmdk.open(srv.url("vm/f.vmdk"))
    failed = _vmdk("info", srv.url("vm/f.vmdk"), check=False)
    assert failed.returncode == 1 and "--allow-external trusts it" in failed.stderr
    with vmdk.open(srv.url("vm/f.vmdk"), allow_external=True) as disk:
        assert disk.image.extents[0].filename == srv.url("f-flat.vmdk")


# --------------------------------------------------------------------------- errors


def test_a_missing_file_names_the_url_and_the_status(web: RangeServer) -> None:
    failed = _vmdk("info", web.url("nothing.vmdk"), check=False)
    assert failed.returncode == 1
    assert web.url("nothing.vmdk") in failed.stderr and "404" in failed.stderr
    with pytest.raises(vmdk.MissingExtentError):
        vmdk.open(web.url("nothing.vmdk"))


def test_a_refusal_names_the_url_and_the_status(web: RangeServer) -> None:
    from vmdk.errors import RemoteError

    web.deny = {"disk.vmdk"}
    with pytest.raises(RemoteError, match="403") as caught:
        vmdk.open(web.url("disk.vmdk"))
    assert caught.value.status == 403 and caught.value.filename == web.url("disk.vmdk")
    failed = _vmdk("map", web.url("disk.vmdk"), check=False)
    assert failed.returncode == 1 and "access denied" in failed.stderr


def test_a_server_without_range_support_is_refused_clearly(images: Path) -> None:
    from vmdk.errors import RemoteError

    with range_server(str(images), ranges=False) as srv:
        with pytest.raises(RemoteError, match="does not support range requests") as caught:
            vmdk.open(srv.url("disk.vmdk"))
        assert caught.value.filename == srv.url("disk.vmdk")
        assert srv.requests == 1  # no retries: it will not change its mind


def test_transient_faults_are_tried_again_a_bounded_number_of_times(web: RangeServer) -> None:
    from vmdk import remote
    from vmdk.errors import RemoteError

    web.fail = 2
    with vmdk.open(web.url("disk.vmdk")) as disk:
        assert disk.size == GiB
    web.fail = 100
    started = time.monotonic()
    with pytest.raises(RemoteError, match=r"503.*after 4 tries"):
        vmdk.open(web.url("disk.vmdk"))
    assert 100 - web.fail == remote.RETRIES + 1
    assert time.monotonic() - started < 10


#: Azurite's well-known development account (public, documented by Microsoft).
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
               "KBHBeksoGMGw==")


def _dead_server_url(protocol: str, port: int) -> tuple[str, dict[str, Any]]:
    endpoint = f"http://127.0.0.1:{port}"
    if protocol == "http":
        return f"{endpoint}/slow.vmdk", {"client_kwargs": {}}
    if protocol == "s3":
        pytest.importorskip("s3fs")
        return "s3://bucket/slow.vmdk", {"client_kwargs": {"endpoint_url": endpoint},
                                         "key": "testing", "secret": "testing"}
    if protocol == "gs":
        pytest.importorskip("gcsfs")
        return "gs://bucket/slow.vmdk", {"endpoint_url": endpoint, "token": "anon"}
    pytest.importorskip("adlfs")
    return "az://container/slow.vmdk", {"connection_string": (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint}/devstoreaccount1;")}


@pytest.mark.parametrize("protocol", ["http", "s3", "gs", "az"])
def test_a_dead_server_is_an_error_not_a_hang(protocol: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes connections and never answers: each backend's own retries and
    lookups (gcsfs asks for a bucket's layout over gRPC, the Azure SDK retries ten times)
    are bounded too, not only each socket wait."""
    from vmdk import remote
    from vmdk.errors import RemoteError

    monkeypatch.setattr(remote, "TIMEOUT", 1.0)
    monkeypatch.setattr(remote, "RETRIES", 1)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections are taken by the kernel and never answered
    url, options = _dead_server_url(protocol, silent.getsockname()[1])
    outcome: list[BaseException | None] = []

    def open_it() -> None:
        try:
            vmdk.open(url, storage_options=options)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    started = time.monotonic()
    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(60)
    silent.close()
    assert not opener.is_alive(), f"{protocol}:// still waiting after 60 s"
    assert isinstance(outcome[0], RemoteError) and "slow.vmdk" in str(outcome[0])
    assert time.monotonic() - started < 20


def test_without_fsspec_a_url_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "fsspec.py").write_text("raise ImportError('no fsspec here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    failed = subprocess.run([sys.executable, "-m", "vmdk", "info", "https://example.invalid/x"],
                            check=False,
                            capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 1 and "pip install 'vmdk[remote]'" in failed.stderr


def test_storage_options_are_parsed_as_fsspec_takes_them() -> None:
    from vmdk.cli import parse_storage_options

    assert parse_storage_options(["anon=true", "client_kwargs.endpoint_url=http://h:1",
                                  "client_kwargs.region_name=x", "block_size=5"]) == {
        "anon": True, "block_size": 5,
        "client_kwargs": {"endpoint_url": "http://h:1", "region_name": "x"}}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_storage_options(["anon"])


# ------------------------------------------------------------------------------ S3
#: S3 tests use a smaller disk: moto serves ranges slowly, and what is fetched is
#: measured over HTTP above.
SMALL = 64 << 20


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB monolithicSparse image with 10% data, its stream copy and the raw disk."""
    return _images_in(tmp_path_factory.mktemp("small"), SMALL, seed=8)



@pytest.fixture(scope="module")
def s3(small: Path) -> Iterator[str]:
    """A bucket with both images under vm/, on moto's S3 server; yields its endpoint."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        with s3_server() as endpoint:
            import s3fs

            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
            fs.mkdir("images")
            for name in ("disk.vmdk", "stream.vmdk"):
                fs.put_file(str(small / name), f"images/vm/{name}")
            yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_s3_urls_read_through_the_api_and_the_command_line(s3: str, small: Path,
                                                           tmp_path: Path) -> None:
    options = {"client_kwargs": {"endpoint_url": s3}}
    with vmdk.open("s3://images/vm/stream.vmdk", storage_options=options) as disk, \
            vmdk.open(small / "disk.vmdk") as local:
        assert disk.map() != [] and disk.read_at(1 << 20, 1 << 20) == local.read_at(1 << 20,
                                                                                     1 << 20)
    _vmdk("convert", "-O", "raw", "--storage-option", f"client_kwargs.endpoint_url={s3}",
          "--connections", "4", "s3://images/vm/disk.vmdk", tmp_path / "out.raw")
    assert _same_file(tmp_path / "out.raw", small / "disk.raw")
    failed = _vmdk("info", "--storage-option", f"client_kwargs.endpoint_url={s3}",
                   "s3://images/vm/absent.vmdk", check=False)
    assert failed.returncode == 1 and "s3://images/vm/absent.vmdk" in failed.stderr


def _same_file(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 << 20), fb.read(8 << 20)
            if x != y:
                return False
            if not x:
                return True


# ------------------------------------------------------------------ writing streams


def test_convert_streams_to_s3_as_a_multipart_upload(s3: str, small: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from vmdk import remote

    monkeypatch.setattr(remote, "UPLOAD_PART", 5 << 20)  # S3's smallest: several parts
    options = {"client_kwargs": {"endpoint_url": s3}}
    data = random.Random(9).randbytes(16 << 20)  # incompressible: a 16 MiB stream
    (tmp_path / "in.raw").write_bytes(data)
    assert convert(tmp_path / "in.raw", "s3://images/out/new.vmdk",
                   subformat="streamOptimized", storage_options=options) == len(data)
    fs = s3fs.S3FileSystem(**options)
    etag = fs.info("images/out/new.vmdk")["ETag"].strip('"')
    assert etag.partition("-")[2].isdigit() and int(etag.partition("-")[2]) > 1  # multipart
    with vmdk.open("s3://images/out/new.vmdk", storage_options=options) as disk:
        assert disk.image.descriptor.extents[0].filename == "new.vmdk"
        assert disk.image.create_type == "streamOptimized"
        assert disk.read() == data
    with pytest.raises(vmdk.ImageExistsError):
        convert(tmp_path / "in.raw", "s3://images/out/new.vmdk", subformat="streamOptimized",
                storage_options=options)


def test_the_command_line_uploads_a_stream_and_a_failure_leaves_nothing(
        s3: str, small: Path, tmp_path: Path) -> None:
    import s3fs

    endpoint = f"client_kwargs.endpoint_url={s3}"
    _vmdk("convert", "-o", "subformat=streamOptimized", "--storage-option", endpoint,
          small / "disk.vmdk", "s3://images/out/cli.vmdk")
    info = json.loads(_vmdk("info", "--output=json", "--storage-option", endpoint,
                            "s3://images/out/cli.vmdk").stdout)
    assert info["virtual-size"] == SMALL
    # A source cut short fails halfway: the upload is aborted, no object appears.
    data = (small / "stream.vmdk").read_bytes()
    (tmp_path / "cut.vmdk").write_bytes(data[:len(data) // 2])
    with open(tmp_path / "cut.vmdk", "rb") as cut:
        failed = subprocess.run(
            [sys.executable, "-m", "vmdk", "convert", "-o", "subformat=streamOptimized",
             "--storage-option", endpoint, "-", "s3://images/out/cut.vmdk"],
            stdin=cut, capture_output=True, text=True, timeout=120, check=False)
    assert failed.returncode == 1, failed.stderr
    assert not s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3}).exists(
        "images/out/cut.vmdk")


def test_only_what_is_written_front_to_back_goes_to_a_url(web: RangeServer,
                                                          images: Path) -> None:
    refused = _vmdk("convert", images / "disk.vmdk", web.url("x.vmdk"), check=False)
    assert refused.returncode == 1 and "front to back" in refused.stderr
    refused = _vmdk("convert", "-o", "subformat=streamOptimized", images / "disk.vmdk",
                    web.url("x.vmdk"), check=False)
    assert refused.returncode == 1 and "cannot write to http:// URLs" in refused.stderr


def test_ova_create_uploads_the_package(s3: str, small: Path, tmp_path: Path) -> None:
    import s3fs

    endpoint = f"client_kwargs.endpoint_url={s3}"
    _vmdk("ova", "create", "--disk", small / "stream.vmdk", "--storage-option", endpoint,
          "s3://images/out/app.ova")
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3}).get_file(
        "images/out/app.ova", str(tmp_path / "app.ova"))
    assert _vmdk("ova", "verify", tmp_path / "app.ova", check=False).returncode == 0
    _vmdk("convert", "-O", "raw", tmp_path / "app.ova", tmp_path / "disk.raw")
    assert _same_file(tmp_path / "disk.raw", small / "disk.raw")


def test_ova_create_to_a_url_makes_no_local_copy(s3: str, small: Path, tmp_path: Path) -> None:
    """Disks that must be converted are streamed into the upload: the command runs with no
    temporary folder to use, and the package is whole and exact."""
    import s3fs

    no_temp = ("import sys, tempfile; tempfile.tempdir = sys.argv.pop(1); "
               "from vmdk.cli import main; sys.exit(main(sys.argv[1:]))")
    run(sys.executable, "-c", no_temp, tmp_path / "no-such-folder", "ova", "create",
        "--disk", f"{small / 'disk.raw'},format=raw", "--disk", small / "disk.vmdk",
        "--disk", small / "stream.vmdk", "--storage-option", f"client_kwargs.endpoint_url={s3}",
        "s3://images/out/streamed.ova")
    got = tmp_path / "streamed.ova"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3}).get_file("images/out/streamed.ova",
                                                                   str(got))
    assert _vmdk("ova", "verify", got, check=False).returncode == 0
    for disk in ("1", "2", "3"):
        _vmdk("convert", "-O", "raw", "--disk", disk, got, tmp_path / f"{disk}.raw")
        assert _same_file(tmp_path / f"{disk}.raw", small / "disk.raw")


def test_a_disk_changed_between_the_two_passes_uploads_nothing(
        s3: str, small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from vmdk import convert as convert_module, remote
    from vmdk.ova.create import Appliance, Disk, create_ova

    source = tmp_path / "changing.raw"
    shutil.copyfile(small / "disk.raw", source)
    real = convert_module.convert_to_stream
    calls = []

    def then_change(*args: object, **kwargs: object) -> object:
        made = real(*args, **kwargs)  # type: ignore[arg-type]
        if not calls:  # a guest writes to the disk after the measuring pass
            with open(source, "r+b") as f:
                f.seek(SMALL // 2)
                f.write(random.Random(3).randbytes(1 << 20))
        calls.append(made)
        return made

    monkeypatch.setattr(convert_module, "convert_to_stream", then_change)
    monkeypatch.setattr(remote.settings, "storage_options", {"client_kwargs": {"endpoint_url": s3}})
    with pytest.raises(vmdk.VmdkError, match="changed while the package was made") as caught:
        create_ova(Appliance("app", [Disk(str(source), format="raw")]), "s3://images/out/ch.ova")
    assert caught.value.filename == str(source)
    assert len(calls) == 1  # the second pass stopped where it outgrew the first
    assert not s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3}).exists("images/out/ch.ova")


@pytest.fixture(scope="module")
def gcs(small: Path) -> Iterator[str]:
    """A GCS emulator on 127.0.0.1 holding the small image as images/vm/disk.vmdk; yields
    its endpoint."""
    pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    import urllib.request

    server = emulator.create_server("127.0.0.1", 0, in_memory=True, default_bucket="images")
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._api._httpd.server_address[1]}"
        upload = urllib.request.Request(
            f"{endpoint}/upload/storage/v1/b/images/o?uploadType=media&name=vm/disk.vmdk",
            data=(small / "disk.vmdk").read_bytes(), method="POST",
            headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(upload, timeout=60).close()
        yield endpoint
    finally:
        server.stop()


def test_gs_urls_read_in_place(gcs: str, small: Path, tmp_path: Path) -> None:
    """gs:// through gcsfs, against an emulator. gcsfs asks Google's gRPC service for each
    bucket's layout first, which an emulator does not answer for a minute: the variable
    below turns that off, as users of emulators and gateways must."""
    env = {**os.environ, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    options = ["--storage-option", f"endpoint_url={gcs}", "--storage-option", "token=anon"]
    info = subprocess.run([sys.executable, "-m", "vmdk", "info", "--output=json", *options,
                           "gs://images/vm/disk.vmdk"], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert json.loads(info.stdout)["virtual-size"] == SMALL
    subprocess.run([sys.executable, "-m", "vmdk", "convert", "-O", "raw", *options,
                    "gs://images/vm/disk.vmdk", tmp_path / "out.raw"], env=env,
                   capture_output=True, timeout=120, check=True)
    assert _same_file(tmp_path / "out.raw", small / "disk.raw")


def test_serve_without_read_only_says_how_to_serve_a_url(web: RangeServer) -> None:
    failed = _vmdk("serve", "--socket", "/nonexistent/x.sock", web.url("disk.vmdk"), check=False)
    assert failed.returncode == 1
    assert "opens read-only" in failed.stderr and "--read-only serves it" in failed.stderr
