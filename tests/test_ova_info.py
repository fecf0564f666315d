"""``vmdk ova info``, and reading packages that are broken at the tar level."""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import pytest

from conftest import pattern
from ova_support import (  # noqa: F401 - fixtures
    MiB,
    cli,
    lay_out,
    members,
    ova_compose,
    raw_disk,
    vmdk_convert_exe,
)
from vmdk.ova import export_ova, ova_info

TWO_DISKS = """
system: {name: twodisk, type: vmx-17, os_vmw: otherLinux64Guest, firmware: efi, secure_boot: true}
networks:
    vm_network: {name: "VM Network", description: "The VM Network"}
hardware:
    cpus: 2
    memory: {type: memory, size: 1024}
    scsi1: {type: scsi_controller, subtype: VirtualSCSI}
    sata1: {type: sata_controller}
    rootdisk: {type: hard_disk, parent: scsi1, raw_image: a.img}
    datadisk: {type: hard_disk, parent: sata1, raw_image: b.img}
    ethernet1: {type: ethernet, subtype: VmxNet3, network: vm_network}
extra_configs:
    disk.EnableUUID: {value: "TRUE", required: false}
product:
    product: An Appliance
    vendor: Example Inc.
    version: "1.2"
    properties:
        guestinfo.hostname: {type: string, value: appliance}
"""


@pytest.fixture(scope="module")
def composed(tmp_path_factory: pytest.TempPathFactory, ova_compose) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("composed")
    raw_disk(folder / "a.img", 3 * MiB, seed=1)
    raw_disk(folder / "b.img", 2 * MiB, seed=2)
    return ova_compose(folder, TWO_DISKS, "twodisk")


def test_info_of_an_ova_compose_package(composed: Path) -> None:
    done = cli("ova", "info", "--output=json", composed)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    stored = members(composed)
    assert info["members"][0] == "twodisk.ovf"
    details = {m["name"]: m for m in info["member-details"]}
    for name, data in stored.items():
        assert details[name]["size"] == len(data)
    import hashlib

    assert details["a.vmdk"]["digest"] == f"SHA256:{hashlib.sha256(stored['a.vmdk']).hexdigest()}"
    assert info["manifest-algorithm"] == ["SHA256"] and not info["signed"]
    (system,) = info["virtual-systems"]
    assert (system["cpus"], system["memory-mib"], system["firmware"], system["secure-boot"],
            system["hardware-version"]) == (2, 1024, "efi", True, 17)
    assert [(c["bus"], c["model"]) for c in system["controllers"]] == [("scsi", "pvscsi"),
                                                                      ("sata", "ahci")]
    disks = {d["file"]: d for d in system["disks"]}
    assert disks["a.vmdk"]["capacity"] == 3 * MiB and disks["b.vmdk"]["capacity"] == 2 * MiB
    assert disks["a.vmdk"]["controller"].startswith("pvscsi") and disks["a.vmdk"]["slot"] == "0"
    assert disks["b.vmdk"]["controller"].startswith("ahci")
    assert 0 < disks["a.vmdk"]["populated-size"] <= 3 * MiB
    assert system["networks"] == [{"adapter": "VmxNet3", "network": "VM Network"}]
    assert system["extra-config"] == {"disk.EnableUUID": "TRUE"}
    (product,) = system["products"]
    assert (product["product"], product["vendor"], product["version"]) == (
        "An Appliance", "Example Inc.", "1.2")
    assert product["properties"] == {"guestinfo.hostname": "appliance"}
    assert info["networks"] == [{"name": "VM Network", "description": "The VM Network Network"}]


def test_info_text_names_what_matters(composed: Path) -> None:
    done = cli("ova", "info", composed)
    assert done.returncode == 0, done.stderr
    for expected in ("twodisk.ovf", "vmx-17, 2 CPUs, 1024 MiB, firmware efi with secure boot",
                     "controller", "pvscsi", "disk.EnableUUID = TRUE",
                     "property guestinfo.hostname = appliance", "adapter VmxNet3 on VM Network"):
        assert expected in done.stdout, done.stdout


# -- what the CLI issue asks of broken packages ----------------------------------------------


@pytest.fixture
def package(tmp_path: Path) -> Path:
    (tmp_path / "src.raw").write_bytes(pattern(2 * MiB, seed=3))
    export_ova(tmp_path / "src.raw", tmp_path / "vm.ova")
    return tmp_path / "vm.ova"


def _one_error_line(done: object, *expected: str) -> None:
    err = done.stderr  # type: ignore[attr-defined]
    assert done.returncode == 1, (done.returncode, err)  # type: ignore[attr-defined]
    assert "Traceback" not in err and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("verb", [["info"], ["ova", "info"], ["convert", "-O", "raw"]])
def test_a_cut_download_is_one_error_line(package: Path, tmp_path: Path, verb: list[str]) -> None:
    cut = tmp_path / "cut.ova"
    cut.write_bytes(package.read_bytes()[:1500])
    args = [*verb, cut] + ([tmp_path / "o.raw"] if "convert" in verb else [])
    _one_error_line(cli(*args), str(cut), "cut short")


def test_a_tiny_disk_member_is_one_error_line(tmp_path: Path) -> None:
    ova = lay_out(tmp_path / "small.ova", [("small.vmdk", b"KDMV" + bytes(96))])
    _one_error_line(cli("convert", "-O", "raw", ova, tmp_path / "o.raw"), "small.vmdk")
    assert cli("ova", "info", ova).returncode == 0  # info shows it for what it is


@pytest.mark.parametrize("content", ["gzip", "text"])
def test_an_ova_that_is_no_plain_tar_is_refused(package: Path, tmp_path: Path,
                                                content: str) -> None:
    """Before, such a .ova was converted as a raw disk, exit 0."""
    bad = tmp_path / "bad.ova"
    bad.write_bytes(gzip.compress(package.read_bytes()) if content == "gzip" else b"hello\n" * 99)
    out = tmp_path / "o.raw"
    for verb in (["convert", "-O", "raw", bad, out], ["convert", "-f", "ova", bad, out],
                 ["info", bad], ["ova", "info", bad]):
        done = cli(*verb)
        _one_error_line(done, str(bad), "gunzip it first" if content == "gzip" else "not a tar")
        assert not out.exists()


def _two_disk_package(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    from vmdk.ova.create import build_ovf

    first, second = pattern(MiB, seed=4), pattern(2 * MiB, seed=5)
    for name, data in (("a.raw", first), ("b.raw", second)):
        (tmp_path / name).write_bytes(data)
        export_ova(tmp_path / name, tmp_path / f"{name}.ova")
    disks = [members(tmp_path / f"{n}.ova")[f"{n}-disk1.vmdk"] for n in ("a.raw", "b.raw")]
    ovf = build_ovf("two", "x", 0, 0, 0).replace(b"x\"", b"first.vmdk\"")
    ovf = ovf.replace(b'<File ovf:href="first.vmdk" ovf:id="file1" ovf:size="0"/>',
                      b'<File ovf:href="first.vmdk" ovf:id="file1"/>'
                      b'<File ovf:href="second.vmdk" ovf:id="file2"/>')
    ovf = ovf.replace(b'ovf:diskId="vmdisk1" ovf:fileRef="file1"', b'ovf:diskId="root" '
                      b'ovf:fileRef="file1"')
    ovf = ovf.replace(b"</DiskSection>", b'<Disk ovf:capacity="0" ovf:diskId="data" '
                      b'ovf:fileRef="file2"/></DiskSection>')
    ova = lay_out(tmp_path / "two.ova", [("two.ovf", ovf), ("first.vmdk", disks[0]),
                                         ("second.vmdk", disks[1])])
    return ova, first, second


@pytest.mark.parametrize("selector", ["second.vmdk", "data", "2"])
def test_convert_disk_takes_name_id_or_index(tmp_path: Path, selector: str) -> None:
    ova, first, second = _two_disk_package(tmp_path)
    out = tmp_path / "o.raw"
    done = cli("convert", "-O", "raw", "--disk", selector, ova, out)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == second
    assert cli("convert", "-O", "raw", ova, out).returncode == 0
    assert out.read_bytes() == first  # the first disk by default


def test_a_wrong_disk_lists_the_disks(tmp_path: Path) -> None:
    ova, _first, _second = _two_disk_package(tmp_path)
    done = cli("convert", "-O", "raw", "--disk", "3", ova, tmp_path / "o.raw")
    _one_error_line(done, "no disk '3'", "1: first.vmdk (disk id root)",
                    "2: second.vmdk (disk id data)")


def test_ova_info_of_an_old_style_listing_stays(package: Path) -> None:
    info = ova_info(str(package))
    assert info["members"] == ["vm.ovf", "vm-disk1.vmdk", "vm.mf"]
    assert info["disks"][0]["virtual-size"] == 2 * MiB


def test_pax_and_gnu_members_still_read(package: Path, tmp_path: Path) -> None:
    """Reading is lenient (verify is the strict one): pax and GNU long names resolve."""
    stored = members(package)
    long_name = "a" * 120 + ".vmdk"
    ovf = stored["vm.ovf"].replace(b"vm-disk1.vmdk", long_name.encode())
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        ova = lay_out(tmp_path / f"{fmt}.ova", [("vm.ovf", ovf), (long_name, stored[
            "vm-disk1.vmdk"])], fmt=fmt)
        out = tmp_path / "o.raw"
        assert cli("convert", "-O", "raw", ova, out).returncode == 0
        assert out.read_bytes() == pattern(2 * MiB, seed=3)
