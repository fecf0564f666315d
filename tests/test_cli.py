"""Tests for the ``vmdk`` command (vmdk.cli.main), with qemu-img's spelling and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import vmdk
from conftest import pattern, run
from vmdk._structs import SparseHeader
from vmdk.cli import main

MiB = 1 << 20
SIZE = 2 * MiB
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.vmdk"
    with vmdk.create(path, SIZE) as f:
        f.write(pattern(SIZE, seed=2))
    return path


def out_err(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    captured = capsys.readouterr()
    return captured.out, captured.err


def assert_one_line_error(code: int, err: str) -> None:
    assert code == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vmdk: error: ")


# -- info --------------------------------------------------------------------------------------


def test_info_human(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", os.fspath(image)]) == 0
    out, err = out_err(capsys)
    lines = out.splitlines()
    assert lines[0] == f"image: {image}"
    assert "file format: vmdk" in lines
    assert f"virtual size: 2 MiB ({SIZE} bytes)" in lines
    assert "cluster_size: 65536" in lines
    assert "dirty flag: no" in lines
    assert "    create type: monolithicSparse" in lines
    assert err == ""


def test_info_json(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--output=json", os.fspath(image)]) == 0
    info = json.loads(out_err(capsys)[0])
    assert info["virtual-size"] == SIZE
    assert info["actual-size"] > 0
    assert info["cluster-size"] == 65536
    assert info["format"] == "vmdk"
    assert info["dirty-flag"] is False
    data = info["format-specific"]["data"]
    assert info["format-specific"]["type"] == "vmdk"
    assert data["create-type"] == "monolithicSparse"
    with vmdk.open(image) as f:
        assert data["cid"] == f.image.cid
    assert data["parent-cid"] == 0xFFFFFFFF
    assert len(data["extents"]) == 1
    assert data["extents"][0]["virtual-size"] == SIZE


def test_info_json_matches_qemu_keys(qemu_img: str, image: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    theirs = json.loads(run(qemu_img, "info", "--output=json", image).stdout)
    assert main(["info", "--output=json", os.fspath(image)]) == 0
    ours = json.loads(out_err(capsys)[0])
    for key in ("virtual-size", "cluster-size", "format", "dirty-flag"):
        assert ours[key] == theirs[key], key
    their_data = theirs["format-specific"]["data"]
    for key in ("cid", "parent-cid", "create-type"):
        assert ours["format-specific"]["data"][key] == their_data[key], key


def test_info_backing_chain(tmp_path: Path, image: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    child = tmp_path / "child.vmdk"
    vmdk.create(child, parent=image).close()
    assert main(["info", "--output=json", "--backing-chain", os.fspath(child)]) == 0
    infos = json.loads(out_err(capsys)[0])
    assert [i["filename"] for i in infos] == [os.fspath(child), os.fspath(image)]
    assert infos[0]["backing-filename"] == "disk.vmdk"
    assert infos[0]["backing-filename-format"] == "vmdk"  # as qemu-img info prints it
    assert os.path.samefile(infos[0]["full-backing-filename"], image)
    assert infos[0]["format-specific"]["data"]["parent-cid"] == \
        infos[1]["format-specific"]["data"]["cid"]


# -- create ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,size", [("10M", 10 * MiB), ("1G", 1 << 30), ("512k", 512 * 1024),
                                       ("1536", 1536), ("1000", 1024)])
def test_create_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                      size: int) -> None:
    path = tmp_path / "new.vmdk"
    assert main(["create", "-f", "vmdk", os.fspath(path), text]) == 0
    out, _ = out_err(capsys)
    assert out.startswith(f"Formatting '{path}', fmt=vmdk")
    with vmdk.open(path) as f:
        assert f.size == size


def test_create_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "opt.vmdk"
    code = main(["create", "-o", "subformat=twoGbMaxExtentSparse,adapter_type=lsilogic",
                 "-o", "hwversion=6,zeroed_grain=on,cluster_size=16k", os.fspath(path), "4M"])
    assert code == 0
    with vmdk.open(path) as f:
        info = f.info()
        assert f.image.create_type == "twoGbMaxExtentSparse"
        assert info["adapter-type"] == "lsilogic"
        assert info["hardware-version"] == "6"
        assert info["cluster-size"] == 16384
    assert (tmp_path / "opt-s001.vmdk").exists()
    header = SparseHeader.unpack((tmp_path / "opt-s001.vmdk").read_bytes()[:512])
    assert header.flags & 4 and header.grain_size == 32


def test_create_with_backing(tmp_path: Path, image: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    child = tmp_path / "snap.vmdk"
    assert main(["create", "-q", "-b", os.fspath(image), os.fspath(child)]) == 0
    assert out_err(capsys)[0] == ""
    other = tmp_path / "snap2.vmdk"
    assert main(["create", "-b", os.fspath(image), os.fspath(other)]) == 0
    assert f"size={SIZE}" in out_err(capsys)[0]  # as qemu-img prints it: the parent's size
    with vmdk.open(child) as f:
        assert f.size == SIZE
        assert f.read() == pattern(SIZE, seed=2)


def test_create_backing_relative_to_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """qemu-img looks a relative backing file up in the folder of the new image, not the CWD."""
    (tmp_path / "sub").mkdir()
    with vmdk.create(tmp_path / "sub" / "base.vmdk", SIZE) as f:
        f.write_at(0, b"inner")
    with vmdk.create(tmp_path / "base.vmdk", SIZE) as f:
        f.write_at(0, b"outer")
    monkeypatch.chdir(tmp_path)
    assert main(["create", "-q", "-b", "base.vmdk", os.fspath(Path("sub") / "child.vmdk")]) == 0
    with vmdk.open(tmp_path / "sub" / "child.vmdk") as f:
        assert f.image.descriptor.parent_file_name_hint == "base.vmdk"
        assert f.read_at(0, 5) == b"inner"


def test_failed_create_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    vmdk.create(tmp_path / "base.vmdk", SIZE).close()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    # The parent lies outside the child's folder: refused without --allow-external.
    code = main(["create", "-q", "-b", os.fspath(tmp_path / "base.vmdk"), "child.vmdk"])
    if code != 0:
        assert_one_line_error(code, out_err(capsys)[1])
        assert os.listdir(tmp_path / "sub") == []
    assert main(["create", "-q", "--allow-external", "-b", os.fspath(tmp_path / "base.vmdk"),
                 "child2.vmdk"]) == 0
    assert "child2.vmdk" in os.listdir(tmp_path / "sub")


# -- convert, compare, cat ---------------------------------------------------------------------


def test_convert_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "in.raw"
    raw.write_bytes(pattern(SIZE, seed=5))
    out = tmp_path / "out.vmdk"
    assert main(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                 os.fspath(raw), os.fspath(out)]) == 0
    assert (tmp_path / "out-flat.vmdk").read_bytes() == raw.read_bytes()
    back = tmp_path / "back.raw"
    assert main(["convert", "-O", "raw", os.fspath(out), os.fspath(back)]) == 0
    assert back.read_bytes() == raw.read_bytes()
    sparse = tmp_path / "sparse.vmdk"
    assert main(["convert", "-p", "-S", "4k", os.fspath(raw), os.fspath(sparse)]) == 0
    with vmdk.open(sparse) as f:
        assert f.image.create_type == "monolithicSparse"
        assert f.read() == raw.read_bytes()
    assert main(["compare", os.fspath(sparse), os.fspath(raw)]) == 0


def test_compare(tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "same.raw"
    raw.write_bytes(pattern(SIZE, seed=2))
    assert main(["compare", os.fspath(image), os.fspath(raw)]) == 0
    assert "Images are identical." in out_err(capsys)[0]
    content = bytearray(raw.read_bytes())
    content[123457] ^= 0xFF
    raw.write_bytes(content)
    assert main(["compare", "-f", "vmdk", "-F", "raw", os.fspath(image), os.fspath(raw)]) == 1
    assert "Content mismatch at offset 123457!" in out_err(capsys)[0]
    # A longer raw file with zeros past the end is equal except in strict mode.
    raw.write_bytes(pattern(SIZE, seed=2) + bytes(4096))
    assert main(["compare", os.fspath(image), os.fspath(raw)]) == 0
    out_err(capsys)
    assert main(["compare", "-s", os.fspath(image), os.fspath(raw)]) == 1
    assert "size mismatch" in out_err(capsys)[0].lower()


def test_compare_agrees_with_qemu(qemu_img: str, tmp_path: Path, image: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "diff.raw"
    content = bytearray(pattern(SIZE, seed=2))
    content[SIZE - 5] ^= 1
    raw.write_bytes(content)
    theirs = run(qemu_img, "compare", "-f", "vmdk", "-F", "raw", image, raw, check=False)
    assert main(["compare", os.fspath(image), os.fspath(raw)]) == theirs.returncode == 1
    ours = out_err(capsys)[0].strip()
    assert ours.startswith("Content mismatch at offset ")
    # qemu-img reports the sector the first difference is in; we report the byte.
    assert int(ours.split()[-1].rstrip("!")) == SIZE - 5
    assert theirs.stdout.strip() == f"Content mismatch at offset {(SIZE - 5) // 512 * 512}!"


def test_cat(image: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["cat", os.fspath(image)]) == 0
    out = capfdbinary.readouterr().out
    assert out == pattern(SIZE, seed=2)


# -- check -------------------------------------------------------------------------------------


def gt_entry_offset(path: Path, grain: int = 0) -> int:
    raw = path.read_bytes()
    h = SparseHeader.unpack(raw[:512])
    index, slot = divmod(grain, h.num_gtes_per_gt)
    gt = struct.unpack_from("<I", raw, h.gd_offset * 512 + 4 * index)[0]
    return gt * 512 + 4 * slot


def test_check_clean(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", os.fspath(image)]) == 0
    assert "No errors were found on the image." in out_err(capsys)[0]
    assert main(["check", "--output=json", os.fspath(image)]) == 0
    report = json.loads(out_err(capsys)[0])
    assert report["check-errors"] == 0 and "corruptions" not in report and "leaks" not in report
    assert report["total-clusters"] == SIZE // 65536


def test_check_corruption_exit_2(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = gt_entry_offset(image, 0)
    past = os.path.getsize(image) // 512 + 1000
    with open(image, "r+b") as f:
        f.seek(where)
        f.write(struct.pack("<I", past))
    assert main(["check", os.fspath(image)]) == 2
    out, _ = out_err(capsys)
    assert "ERROR" in out
    assert main(["check", "--output=json", os.fspath(image)]) == 2
    assert json.loads(out_err(capsys)[0])["corruptions"] >= 1
    from vmdk.check import check

    result = check(image)
    assert result.exit_code == 2 and result.corruptions >= 1


def test_check_leaks_exit_3(image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with open(image, "ab") as f:
        f.write(b"\x99" * (3 * 65536))
    assert main(["check", os.fspath(image)]) == 3
    assert "leaked clusters" in out_err(capsys)[0]
    assert main(["check", "--output=json", os.fspath(image)]) == 3
    assert json.loads(out_err(capsys)[0])["leaks"] == 3


def test_check_exit_codes_match_qemu(qemu_img: str, image: Path) -> None:
    theirs = run(qemu_img, "check", "-f", "vmdk", image, check=False)
    assert main(["check", os.fspath(image)]) == theirs.returncode == 0
    with open(image, "r+b") as f:
        f.seek(gt_entry_offset(image, 3))
        f.write(struct.pack("<I", os.path.getsize(image) // 512 + 4096))
    theirs = run(qemu_img, "check", "-f", "vmdk", image, check=False)
    assert "points after EOF" in theirs.stderr
    # qemu 7.2 stops at the first such entry ("Check failed", exit 1); we count it as a
    # corruption (exit 2).  qemu looks for no leaks in VMDK files, so exit 3 has no counterpart.
    assert main(["check", os.fspath(image)]) == 2


# -- map ---------------------------------------------------------------------------------------


def test_map_json_matches_qemu(qemu_img: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.vmdk"
    with vmdk.create(path, 4 * MiB) as f:
        f.write_at(0, b"\x01" * 100000)
        f.write_at(3 * MiB, b"\x02" * 65536)
        f.write_at(MiB + 1, b"\x03")
    assert main(["map", "--output=json", os.fspath(path)]) == 0
    ours = json.loads(out_err(capsys)[0])
    theirs = json.loads(run(qemu_img, "map", "-f", "vmdk", "--output=json", path).stdout)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert set(b) <= set(a)
        assert {k: a[k] for k in b} == b
    assert main(["map", os.fspath(path)]) == 0
    human = out_err(capsys)[0].splitlines()
    assert human[0].split() == ["Offset", "Length", "Mapped", "to", "File"]
    assert len(human) == 1 + sum(1 for r in ours if r["data"])


# -- errors ------------------------------------------------------------------------------------


def test_error_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothere.vmdk"
    for verb in (["info"], ["check"], ["map"], ["cat"]):
        code = main([*verb, os.fspath(missing)])
        _out, err = out_err(capsys)
        assert_one_line_error(code, err)
        assert "nothere.vmdk" in err


def test_error_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """qemu-img answers "Invalid image size specified" on one line with exit 1."""
    try:
        code = main(["create", os.fspath(tmp_path / "x.vmdk"), "10X"])
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    assert_one_line_error(code, out_err(capsys)[1])
    assert not (tmp_path / "x.vmdk").exists()


def test_error_unknown_subformat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["create", "-o", "subformat=monolithicSpares", os.fspath(tmp_path / "x.vmdk"),
                 "1M"])
    _out, err = out_err(capsys)
    assert_one_line_error(code, err)
    assert "monolithicSpares" in err
    assert not (tmp_path / "x.vmdk").exists()


def test_error_unknown_option_and_corrupt_image(tmp_path: Path, image: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["create", "-o", "colour=blue", os.fspath(tmp_path / "x.vmdk"), "1M"])
    assert_one_line_error(code, out_err(capsys)[1])
    with open(image, "r+b") as f:
        f.seek(20)
        f.write(struct.pack("<Q", 3))  # grain size 3 sectors
    code = main(["info", os.fspath(image)])
    err = out_err(capsys)[1]
    assert_one_line_error(code, err)
    assert "disk.vmdk" in err


def test_python_m_vmdk_help() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.fspath(SRC), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "vmdk", "--help"], capture_output=True, text=True,
                         env=env, timeout=60, check=False)
    assert res.returncode == 0
    assert res.stdout.startswith("usage: vmdk")
    for verb in ("info", "create", "convert", "check", "map", "compare", "cat"):
        assert verb in res.stdout


def test_compare_exit_codes_follow_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(4096))
    assert main(["compare", os.fspath(raw), os.fspath(tmp_path / "missing.raw")]) == 2
    assert "missing.raw" in capsys.readouterr().err


@pytest.mark.parametrize(("option", "message"), [
    ("preallocation=bogus", "preallocation"), ("zeroed_grain=maybe", "zeroed_grain"),
    ("compression_level=abc", "compression_level"), ("geometry=1/2", "geometry"),
    ("adapter_type=scsi", "adapter type"), ("nonsense=1", "unknown option")])
def test_create_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    option: str, message: str) -> None:
    code = main(["create", "-o", option, os.fspath(tmp_path / "o.vmdk"), "1M"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "o.vmdk").exists()


def test_create_geometry_comment_and_full_device(tmp_path: Path) -> None:
    path = tmp_path / "g.vmdk"
    assert main(["create", "-q", "-o", "geometry=100/16/63,comment=hello", os.fspath(path),
                 "1M"]) == 0
    with vmdk.open(path) as disk:
        assert disk.image.geometry == (100, 16, 63) and disk.image.comment == "hello"
    (tmp_path / "dev.bin").write_bytes(pattern(MiB, seed=9))
    dev = tmp_path / "dev.vmdk"
    assert main(["create", "-q", "--allow-external", "-o",
                 f"subformat=fullDevice,device={tmp_path / 'dev.bin'}", os.fspath(dev)]) == 0
    with vmdk.open(dev, allow_external=True) as disk:
        assert disk.read() == pattern(MiB, seed=9)


# -- refusals found by review ---------------------------------------------------------------


def test_resize_takes_relative_sizes_as_qemu_img(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "r.vmdk"
    with vmdk.create(image, SIZE) as d:
        d.write(b"data")
    assert main(["resize", "-q", "--shrink", str(image), "-1M"]) == 0
    with vmdk.open(image) as d:
        assert d.size == SIZE - MiB
    assert main(["resize", "-q", str(image), "+3M"]) == 0
    with vmdk.open(image) as d:
        assert d.size == SIZE + 2 * MiB
    capsys.readouterr()
    assert_one_line_error(main(["resize", "--shrink", str(image), "-100M"]), out_err(capsys)[1])
    assert_one_line_error(main(["resize", str(image), "20E"]), out_err(capsys)[1])


@pytest.mark.parametrize("argv", [
    ["create", "-o", "compat6=on,hwversion=10", "{d}/x.vmdk", "1M"],
    ["create", "-o", "preallocation=full", "{d}/x.vmdk", "1M"],
    ["create", "-o", "subformat=fullDevice,device={d}/dev.img", "{d}/fd.vmdk", "5M"],
    ["export-ova", "--name", 'my "vm"', "{d}/disk.vmdk", "{d}/x.ova"],
    ["export-ova", "--name", "a/b", "{d}/disk.vmdk", "{d}/x.ova"],
    ["export-ova", "--cpus", "0", "{d}/disk.vmdk", "{d}/x.ova"],
])
def test_nonsense_options_are_one_line_errors(image: Path, capsys: pytest.CaptureFixture[str],
                                              argv: list[str]) -> None:
    (image.parent / "dev.img").write_bytes(bytes(2 * MiB))
    code = main([a.format(d=image.parent) for a in argv])
    assert_one_line_error(code, out_err(capsys)[1])
    assert not (image.parent / "x.vmdk").exists() and not (image.parent / "fd.vmdk").exists()
    assert not (image.parent / "x.ova").exists()


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_serve_checks_its_port(image: Path, capsys: pytest.CaptureFixture[str], port: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", port, str(image)])
    assert exit_info.value.code == 1  # a usage error, as every error
    assert "not a port number" in out_err(capsys)[1]


def test_options_may_follow_a_negative_size(tmp_path: Path) -> None:
    image = tmp_path / "r.vmdk"
    vmdk.create(image, SIZE).close()
    assert main(["resize", str(image), "-1M", "--shrink", "-q"]) == 0
    with vmdk.open(image) as d:
        assert d.size == SIZE - MiB


def test_one_verb_parsers_match_the_whole_parser() -> None:
    """main() builds only the named verb's parser: each must parse as the full one does."""
    from vmdk import cli

    full = cli.build_parser()
    subparsers = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == cli._VERB_NAMES
    for name in cli._VERB_NAMES:
        one = cli.build_parser(name)
        assert one.format_usage() == full.format_usage().replace(
            "{" + ",".join(subparsers.choices) + "}", "{" + name + "}")
        assert (subparsers.choices[name].format_help()
                == next(a for a in one._actions if isinstance(a, argparse._SubParsersAction)
                        ).choices[name].format_help())


@pytest.mark.parametrize("argv, verb", [
    (["-v", "convert", "a", "b"], "convert"), (["--debug", "info", "x"], "info"),
    (["--help"], None), (["nonsense", "x"], None), ([], None), (["map"], "map"),
    (["-h", "info"], "info"), (["info", "-h"], "info"), (["--help", "convert"], "convert")])
def test_verb_of(argv: list[str], verb: str | None) -> None:
    from vmdk import cli

    assert cli._verb_of(argv) == verb
