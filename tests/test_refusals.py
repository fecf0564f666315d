"""Requests that would do something else than asked are refused with one clear line.

Each used to be accepted without a word: options silently ignored, a size read
as something else, a setting that changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import vmdk
from vmdk.cli import main, parse_size

MiB = 1 << 20


def one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vmdk: error: ") and "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def test_raw_output_refuses_vmdk_options(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"x" * MiB)
    out = tmp_path / "out.raw"
    assert main(["convert", "-f", "raw", "-O", "raw", "-o", "subformat=streamOptimized",
                 str(src), str(out)]) == 1
    one_line_error(capsys, "subformat", "raw")
    assert not out.exists()
    with pytest.raises(vmdk.VmdkError, match="raw"):
        vmdk.convert.convert(src, out, out_format="raw", adapter_type="lsilogic")


@pytest.mark.parametrize("text", ["1.5", "0.5", "1.5b"])
def test_a_fraction_of_a_byte_is_not_a_size(text: str) -> None:
    """qemu-img: "Invalid image size specified"; it used to make a 512-byte disk."""
    with pytest.raises(ValueError, match="whole number of bytes"):
        parse_size(text)


@pytest.mark.parametrize(("text", "size"), [("1.5k", 1536), ("1.1k", 1126), ("0.5G", 1 << 29),
                                            ("2M", 2 * MiB), ("512", 512)])
def test_fractions_with_a_unit_are_truncated_to_bytes_as_qemu_img(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_create_refuses_a_fraction_of_a_byte(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", str(tmp_path / "x.vmdk"), "1.5"]) == 1
    one_line_error(capsys, "1.5")
    assert not (tmp_path / "x.vmdk").exists()


def test_zeroed_grain_needs_a_sparse_image(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "z.vmdk"
    assert main(["create", "-o", "subformat=monolithicFlat,zeroed_grain=on", str(path),
                 "1M"]) == 1
    one_line_error(capsys, "zeroed_grain", "sparse")
    assert not path.exists()


@pytest.mark.parametrize("subformat", ["monolithicFlat", "streamOptimized"])
def test_metadata_preallocation_needs_grain_tables(tmp_path: Path, subformat: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Sparse images always have their tables preallocated (what 'metadata' asks for);
    a flat image or a stream has none to preallocate."""
    path = tmp_path / "m.vmdk"
    assert main(["create", "-o", f"subformat={subformat},preallocation=metadata", str(path),
                 "1M"]) == 1
    one_line_error(capsys, "preallocation=metadata")
    assert not path.exists()
    assert main(["create", "-o", "preallocation=metadata", str(tmp_path / "s.vmdk"), "1M"]) == 0


def test_a_snapshot_is_not_smaller_than_its_parent(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    parent = tmp_path / "base.vmdk"
    vmdk.create(parent, 10 * MiB).close()
    child = tmp_path / "child.vmdk"
    assert main(["create", "-b", str(parent), str(child), "1M"]) == 1
    one_line_error(capsys, "smaller than its parent")
    assert not child.exists()
    assert main(["create", "-b", str(parent), str(child), "20M"]) == 0  # larger is fine


def _foreign(tmp_path: Path) -> dict[str, Path]:
    """Files of other disk formats, made by their magic numbers."""
    made = {}
    for name, offset, magic in (("qcow2", 0, b"QFI\xfb"), ("VHDX", 0, b"vhdxfile"),
                                ("VDI", 0x40, b"\x7f\x10\xda\xbe"), ("QED", 0, b"QED\0")):
        path = tmp_path / f"disk.{name.lower()}"
        data = bytearray(4096)
        data[offset:offset + len(magic)] = magic
        path.write_bytes(bytes(data))
        made[name] = path
    return made


@pytest.mark.parametrize("verb", ["info", "check", "map", "convert", "compare", "cat"])
def test_every_verb_names_another_format(tmp_path: Path, verb: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """info, check and map used to call a qcow2 file "not a VMDK image" where convert
    named its format: one sniffing path for every verb."""
    for name, path in _foreign(tmp_path).items():
        args = {"convert": [str(path), str(tmp_path / "out.vmdk")],
                "compare": [str(path), str(path)]}.get(verb, [str(path)])
        assert main([verb, *args]) in (1, 2), (verb, name)
        one_line_error(capsys, f"a {name} image", "qemu-img")


def test_an_empty_vmdk_is_not_converted_as_a_raw_disk(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cut.vmdk"
    path.write_bytes(b"")
    out = tmp_path / "out.raw"
    assert main(["convert", "-O", "raw", str(path), str(out)]) == 1
    one_line_error(capsys, "empty")
    assert not out.exists()
    assert main(["info", str(path)]) == 1
    one_line_error(capsys, "empty")
    assert main(["convert", "-f", "raw", "-O", "raw", str(path), str(out)]) == 0  # when asked
