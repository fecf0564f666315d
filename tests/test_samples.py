"""Third-party images (VMware, ESXi, VirtualBox, qemu, mkimg...) read back to their listed sha256."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import shutil
from pathlib import Path

import pytest

import vmdk

# (files to copy, file to open, virtual sha256) from shared/samples/README.md
CASES = [
    (["vmdk-rs/monolithicSparse.vmdk"], "monolithicSparse.vmdk",
     "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"),
    (["vmdk-rs/twoGbMaxExtentSparse.vmdk", "vmdk-rs/twoGbMaxExtentSparse-s001.vmdk"],
     "twoGbMaxExtentSparse.vmdk",
     "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"),
    (["vmdk-rs/twoGbMaxExtentSparse-s001.vmdk"], "twoGbMaxExtentSparse-s001.vmdk",
     "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"),
    (["vmdk-rs/monolithicFlat.vmdk", "vmdk-rs/monolithicFlat-flat.vmdk.bz2"],
     "monolithicFlat.vmdk", "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"),
    (["vmdk-rs/twoGbMaxExtentFlat.vmdk", "vmdk-rs/twoGbMaxExtentFlat-f001.vmdk.bz2"],
     "twoGbMaxExtentFlat.vmdk",
     "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"),
    (["vmdk-rs/streamOptimized.vmdk"], "streamOptimized.vmdk",
     "a3bcf05f07a1c06a3380eeca8571f0efb2b85afafa1e21662b8cad436d1f7727"),
    (["vmdk-rs/streamOptimizedWithMarkers.vmdk"], "streamOptimizedWithMarkers.vmdk",
     "92c0f8b4280377437056f57c51ef51a5f8aeb1462ac630ef0633febcbfc3db4e"),
    (["vmdk-rs/vmfs_thick.vmdk", "vmdk-rs/vmfs_thick-flat.vmdk"], "vmfs_thick.vmdk",
     "8d43c795d24bce01b49f92744f934c1072210dcac170bb1c83a5aa56df46ab7d"),
    (["cot/input.vmdk"], "input.vmdk",
     "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14"),
    (["cot/ubuntu.2.0-disk1.vmdk"], "ubuntu.2.0-disk1.vmdk",
     "ebfb4ef19ae410f190327b5ebd312711263bc7579970e87d9c1e2d84e06b3c25"),
    (["cot-e9366f3/blank.vmdk"], "blank.vmdk",
     "ebfb4ef19ae410f190327b5ebd312711263bc7579970e87d9c1e2d84e06b3c25"),
    (["xo-vmdk-to-vhd/test.vmdk"], "test.vmdk",
     "bb9f8df61474d25e71fa00722318cd387396ca1736605e1248821cc0de3d3af8"),
    (["go-vmdk-parser/vmdk-streamoptimized.img"], "vmdk-streamoptimized.img",
     "de2f256064a0af797747c2b97505dc0b9f3df0de4f489eac731c23ae9ca9cc31"),
    (["dfvfs/ext2.vmdk"], "ext2.vmdk",
     "a6c2f0e39afe6c6ab432ca5465349fcefe8dc944398e97b2d957d3f89dbb5d80"),
    (["vmdk-forensic/plaso_image.vmdk"], "plaso_image.vmdk",
     "854c3db1c4a07a241e2ed9fbd8892adf2adc662c7862a75deed26f3483f414c9"),
    (["freebsd-mkimg/img-1x1-512-gpt.vmdk"], "img-1x1-512-gpt.vmdk",
     "2000550d470f48fefaa7cbf68530f4e822bed59d907fcaa8059912ad83adfc48"),
    (["dissect.hypervisor/sesparse.vmdk.gz"], "sesparse.vmdk",
     "3afa48010241335528fe402f083fc9f3a1013a49485221443a78d9a8604e2f90"),
]


def stage(samples: Path, files: list[str], dest: Path) -> None:
    for rel in files:
        src = samples / rel
        if rel.endswith(".bz2"):
            (dest / src.name[:-4]).write_bytes(bz2.decompress(src.read_bytes()))
        elif rel.endswith(".gz"):
            with gzip.open(src) as f, open(dest / src.name[:-3], "wb") as out:
                shutil.copyfileobj(f, out)
        else:
            shutil.copyfile(src, dest / src.name)


def virtual_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with vmdk.open(path) as disk:
        while chunk := disk.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize(("files", "name", "sha"), CASES, ids=[c[1] for c in CASES])
def test_sample_reads_back(samples: Path, tmp_path: Path, files: list[str], name: str,
                           sha: str) -> None:
    stage(samples, files, tmp_path)
    assert virtual_sha256(tmp_path / name) == sha


def test_truncated_stream_is_a_clear_error(samples: Path, tmp_path: Path) -> None:
    stage(samples, ["govmomi/ttylinux-pc_i486-16.1-disk1.vmdk"], tmp_path)
    with pytest.raises(vmdk.CorruptImageError, match="ttylinux.*footer"):
        vmdk.open(tmp_path / "ttylinux-pc_i486-16.1-disk1.vmdk")


def test_blanked_descriptor_is_a_clear_error(samples: Path, tmp_path: Path) -> None:
    stage(samples, ["go-vmdk-parser/vmdk-invalid.img"], tmp_path)
    with pytest.raises(vmdk.VmdkError, match="vmdk-invalid.img"):
        vmdk.open(tmp_path / "vmdk-invalid.img")


def test_descriptor_only_samples_name_the_missing_extent(samples: Path, tmp_path: Path) -> None:
    stage(samples, ["vmdk-forensic/ms3-win.vmdk"], tmp_path)
    with pytest.raises(vmdk.MissingExtentError, match="disk-s001.vmdk"):
        vmdk.open(tmp_path / "ms3-win.vmdk")


def test_missing_parent_is_a_chain_error(samples: Path, tmp_path: Path) -> None:
    stage(samples, ["vmdk-rs/vmfs_thick-000001.vmdk"], tmp_path)
    with pytest.raises(vmdk.VmdkError, match="vmfs_thick-000001"):
        vmdk.open(tmp_path / "vmfs_thick-000001.vmdk")


def test_sample_info_reports_create_type(samples: Path, tmp_path: Path) -> None:
    stage(samples, ["cot/ubuntu.2.0-disk1.vmdk"], tmp_path)
    with vmdk.open(tmp_path / "ubuntu.2.0-disk1.vmdk") as disk:
        info = disk.info()
    assert info["virtual-size"] == 8 << 30
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert info["compressed"] is True


def test_truncated_stream_is_salvaged_with_recover(samples: Path, tmp_path: Path) -> None:
    from vmdk.convert import convert

    stage(samples, ["govmomi/ttylinux-pc_i486-16.1-disk1.vmdk"], tmp_path)
    out = tmp_path / "salvaged.raw"
    written = convert(tmp_path / "ttylinux-pc_i486-16.1-disk1.vmdk", out, out_format="raw",
                      recover=True)
    data = out.read_bytes()
    assert len(data) == 61440 * 512
    # 36 grain markers survive the cut, but the last one's data does not: 35 whole grains.
    assert written == 35 * 65536
    assert data[510:512] == b"\x55\xaa"  # the MBR of the exported VM
