"""``vmdk ova fix``: each broken package it can repair comes out verifying clean, with the
same disk content (through our reader and qemu-img); what it cannot mend it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import pattern, run
from ova_support import (  # noqa: F401 - fixtures
    MiB,
    Compose,
    cli,
    lay_out,
    members,
    names,
    ova_compose,
    raw_disk,
    schema_errors,
    vmdk_convert_exe,
)
from test_ova_verify import CASES, Parts, key_and_certificate
from vmdk.convert import convert
from vmdk.ova import ova_disks
from vmdk.ova.fix import fix
from vmdk.ova.verify import verify


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Parts:
    return Parts(tmp_path_factory.mktemp("fix-parts"))


def contents(ova: Path, folder: Path) -> list[bytes]:
    """Every disk's virtual content, read out of the package by our reader."""
    out = []
    for n in range(1, len(ova_disks(str(ova))) + 1):
        raw = folder / f"{ova.stem}-{n}.raw"
        convert(ova, raw, out_format="raw", disk=str(n), durable=False)
        out.append(raw.read_bytes())
    return out


def same_in_qemu(before: Path, after: Path, folder: Path) -> None:
    """Each disk member of ``after`` holds what the one of ``before`` held, says qemu-img."""
    old, new = members(before), members(after)
    for (a_name, a), (b_name, b) in zip(
            [(n, d) for n, d in old.items() if n.endswith(".vmdk")],
            [(n, d) for n, d in new.items() if n.endswith(".vmdk")], strict=True):
        (folder / "a.vmdk").write_bytes(a)
        (folder / "b.vmdk").write_bytes(b)
        assert run("qemu-img", "compare", "-f", "vmdk", "-F", "vmdk", folder / "a.vmdk",
                   folder / "b.vmdk").returncode == 0, (a_name, b_name)


FIXABLE = ["ovf-after-disk", "pax", "path-names", "sha256sum-tag", "openssl3", "md5",
           "unlisted-disk", "size", "capacity", "version-1", "not-a-stream",
           "manifest-in-the-middle", "files-out-of-order"]


@pytest.mark.parametrize("case", FIXABLE)
def test_fix_repairs_and_keeps_the_disks(parts: Parts, tmp_path: Path, case: str,
                                         qemu_img: str) -> None:
    rule, make = CASES[case]
    broken = tmp_path / "broken.ova"
    broken.write_bytes(make(parts).read_bytes())
    report = fix(broken, tmp_path / "fixed.ova", "generic")
    assert report.written and not report.left, [f.line() for f in report.left]
    assert rule in {c.rule for c in report.changes}, [c.line() for c in report.changes]
    fixed = verify(tmp_path / "fixed.ova", target="generic")
    assert not fixed.findings, [f.line() for f in fixed.findings]
    assert contents(tmp_path / "fixed.ova", tmp_path) == [pattern(2 * MiB, seed=8)]
    same_in_qemu(broken, tmp_path / "fixed.ova", tmp_path)
    assert schema_errors(members(tmp_path / "fixed.ova")["vm.ovf"], tmp_path) is None


@pytest.mark.parametrize("case", ["schema", "missing-file"])
def test_what_fix_cannot_mend_is_left_and_said(parts: Parts, tmp_path: Path, case: str) -> None:
    rule, make = CASES[case]
    broken = tmp_path / "broken.ova"
    broken.write_bytes(make(parts).read_bytes())
    done = cli("ova", "fix", "--target", "generic", broken, tmp_path / "fixed.ova")
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"not fixed: ERROR [{rule}]" in done.stdout


def test_a_damaged_disk_is_not_fixed(parts: Parts, tmp_path: Path) -> None:
    broken = tmp_path / "broken.ova"
    broken.write_bytes(CASES["cut-disk"][1](parts).read_bytes())
    done = cli("ova", "fix", "--target", "generic", broken, tmp_path / "fixed.ova")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "fixed.ova").exists()


# -- targets ---------------------------------------------------------------------------------

VIRTUALBOX_OVF = """<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
 xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="vbox-disk001.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="{capacity}" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" vbox:uuid="5c9d2b3e-0000-4000-8000-000000000001"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT">
      <Description>Logical network used by this appliance.</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="vbox">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>vbox</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:Caption>1 virtual CPU</rasd:Caption>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits>
        <rasd:Caption>1024 MB of memory</rasd:Caption>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>1024 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Caption>sataController0</rasd:Caption>
        <rasd:Description>SATA Controller</rasd:Description>
        <rasd:ElementName>sataController0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>AHCI</rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>3</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:Caption>sound</rasd:Caption>
        <rasd:Description>Sound Card</rasd:Description>
        <rasd:ElementName>sound</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>ensoniq1371</rasd:ResourceSubType>
        <rasd:ResourceType>35</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:Caption>disk1</rasd:Caption>
        <rasd:Description>Disk Image</rasd:Description>
        <rasd:ElementName>disk1</rasd:ElementName>
        <rasd:HostResource>/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def _virtualbox_package(parts: Parts, folder: Path) -> Path:
    ovf = VIRTUALBOX_OVF.replace("{capacity}", str(2 * MiB)).encode()
    import hashlib

    mf = "".join(f"SHA1({n})= {hashlib.sha1(d).hexdigest()}\n"
                 for n, d in (("vbox.ovf", ovf), ("vbox-disk001.vmdk", parts.disk))).encode()
    return lay_out(folder / "vbox.ova", [("vbox.ovf", ovf), ("vbox-disk001.vmdk", parts.disk),
                                         ("vbox.mf", mf)])


def test_a_virtualbox_export_is_fixed_for_esxi(parts: Parts, tmp_path: Path) -> None:
    vbox = _virtualbox_package(parts, tmp_path)
    assert not verify(vbox).errors  # a fine package, for VirtualBox
    refused = {f.rule for f in verify(vbox, target="esxi-8").errors}
    assert refused == {"system-type", "controller", "hardware-item"}
    check = cli("ova", "fix", "--check", "--target", "esxi-8", vbox)
    assert check.returncode == 2 and check.stdout.startswith("would fix"), check.stdout
    assert not (tmp_path / "esxi.ova").exists()
    done = cli("ova", "fix", "--target", "esxi-8", vbox, tmp_path / "esxi.ova")
    assert done.returncode == 0, done.stdout + done.stderr
    for expected in ("virtualbox-2.2 becomes vmx-14", "AHCI is spelled vmware.sata.ahci",
                     "refuses resource type 35", "written in SHA256", "ovf:size None becomes"):
        assert expected in done.stdout, done.stdout
    fixed = verify(tmp_path / "esxi.ova", target="esxi-8")
    assert not fixed.findings, [f.line() for f in fixed.findings]
    info = json.loads(cli("ova", "info", "--output=json", tmp_path / "esxi.ova").stdout)
    system = info["virtual-systems"][0]
    assert system["system-types"] == ["vmx-14"] and system["memory-mib"] == 1024
    assert [c["subtype"] for c in system["controllers"]] == ["vmware.sata.ahci"]
    ovf = members(tmp_path / "esxi.ova")["vbox.ovf"]
    assert b"vbox:OSType" in ovf and b'xml:lang="en-US"' in ovf  # the rest is kept
    assert schema_errors(ovf, tmp_path) is None
    assert contents(tmp_path / "esxi.ova", tmp_path) == [pattern(2 * MiB, seed=8)]
    assert members(tmp_path / "esxi.ova")["vbox-disk001.vmdk"] == parts.disk  # byte for byte


def test_vmware_nvram_is_dropped_for_virtualbox(parts: Parts, tmp_path: Path) -> None:
    ovf = parts.ovf.replace(b"</References>", b'<File ovf:href="vm.nvram" ovf:id="file2" '
                            b'ovf:size="8"/></References>')
    ovf = ovf.replace(b"</VirtualHardwareSection>", b"""<Item ovf:required="false">
        <rasd:ElementName>NVRAM</rasd:ElementName>
        <rasd:HostResource>ovf:/file/file2</rasd:HostResource>
        <rasd:InstanceID>9</rasd:InstanceID>
        <rasd:ResourceType>32768</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="nvram" vmw:value="ovf:/file/file2"/>
    </VirtualHardwareSection>""")
    package = parts.lay_out(ovf=ovf, extra={"vm.nvram": b"NVRAM..."},
                            order=("vm.ovf", "vm.mf", "vm-disk1.vmdk", "vm.nvram"))
    assert not verify(package).errors
    assert {f.rule for f in verify(package, target="virtualbox-7").errors} == {"hardware-item"}
    report = fix(package, tmp_path / "vbox.ova", "virtualbox-7")
    assert report.written and not report.left
    assert names(tmp_path / "vbox.ova") == ["vm.ovf", "vm-disk1.vmdk", "vm.mf"]
    fixed = verify(tmp_path / "vbox.ova", target="virtualbox-7")
    assert not fixed.findings, [f.line() for f in fixed.findings]
    assert b"nvram" not in members(tmp_path / "vbox.ova")["vm.ovf"]


@pytest.mark.parametrize("target, expected", [("esxi-6.7", "vmx-14"), ("esxi-7", "vmx-17"),
                                              ("workstation-17", "vmx-20")])
def test_the_hardware_version_is_clamped(tmp_path: Path, target: str, expected: str) -> None:
    from vmdk.ova.create import Appliance, Disk, create_ova

    (tmp_path / "d.raw").write_bytes(pattern(MiB, seed=30))
    create_ova(Appliance("new", [Disk(str(tmp_path / "d.raw"))], hardware_version=21),
               tmp_path / "new.ova")
    assert {f.rule for f in verify(tmp_path / "new.ova", target=target).errors} == {
        "hardware-version"}
    fix(tmp_path / "new.ova", tmp_path / "old.ova", target)
    assert f"<vssd:VirtualSystemType>{expected}</vssd:VirtualSystemType>".encode() in members(
        tmp_path / "old.ova")["new.ovf"]
    assert not verify(tmp_path / "old.ova", target=target).findings


def test_sha1_is_rewritten_for_esxi_8_and_pvscsi_mapped_for_workstation(tmp_path: Path) -> None:
    (tmp_path / "d.raw").write_bytes(pattern(MiB, seed=31))
    done = cli("ova", "create", "--disk", tmp_path / "d.raw", "--manifest", "sha1",
               "--controller", "s=pvscsi", tmp_path / "vm.ova")
    assert done.returncode == 0, done.stderr
    fix(tmp_path / "vm.ova", tmp_path / "esxi.ova", "esxi-8")
    assert members(tmp_path / "esxi.ova")["vm.mf"].startswith(b"SHA256(vm.ovf)= ")
    fix(tmp_path / "vm.ova", tmp_path / "ws.ova", "workstation-17")
    info = json.loads(cli("ova", "info", "--output=json", tmp_path / "ws.ova").stdout)
    assert [c["model"] for c in info["virtual-systems"][0]["controllers"]] == ["lsilogic"]
    assert members(tmp_path / "ws.ova")["vm.mf"].startswith(b"SHA1(")  # workstation takes it


def test_signatures_are_made_again_or_left_out(tmp_path: Path) -> None:
    (tmp_path / "d.raw").write_bytes(pattern(MiB, seed=32))
    key, cert = key_and_certificate(tmp_path)
    cli("ova", "create", "--disk", tmp_path / "d.raw", "--sign-key", key, "--sign-cert", cert,
        "--hardware-version", "21", tmp_path / "vm.ova")
    unsigned = fix(tmp_path / "vm.ova", tmp_path / "unsigned.ova", "esxi-7")
    assert "vm.cert" not in names(tmp_path / "unsigned.ova")
    assert any("left out" in c.message for c in unsigned.changes)
    done = cli("ova", "fix", "--target", "esxi-7", "--sign-key", key, "--sign-cert", cert,
               tmp_path / "vm.ova", tmp_path / "signed.ova")
    assert done.returncode == 0 and "signed again" in done.stdout, done.stdout
    assert names(tmp_path / "signed.ova")[-1] == "vm.cert"
    assert not verify(tmp_path / "signed.ova").findings


def test_a_package_needing_nothing_is_said_so(tmp_path: Path) -> None:
    (tmp_path / "d.raw").write_bytes(pattern(MiB, seed=33))
    cli("ova", "create", "--disk", tmp_path / "d.raw", tmp_path / "vm.ova")
    done = cli("ova", "fix", "--check", "--target", "generic", tmp_path / "vm.ova")
    assert done.returncode == 0 and "Nothing to change for generic." in done.stdout, done.stdout
    done = cli("ova", "fix", "--target", "nope", tmp_path / "vm.ova", tmp_path / "x.ova")
    assert done.returncode == 1 and "unknown target 'nope' (one of esxi-6.7" in done.stderr


def test_an_ova_compose_pax_package_with_two_families_is_fixed(
        tmp_path: Path, ova_compose: Compose, qemu_img: str) -> None:  # noqa: F811
    """ova-compose --tar-format posix writes a pax record before every member (vSphere
    refuses them); its system names vmx-14 and vmx-20, more than ESXi 6.7 runs."""
    content = raw_disk(tmp_path / "root.img", 2 * MiB, seed=34)
    ova = ova_compose(tmp_path, """
system: {name: pax, type: vmx-14 vmx-20, os_vmw: otherLinux64Guest, firmware: efi}
hardware:
    cpus: 1
    memory: {type: memory, size: 512}
    scsi1: {type: scsi_controller, subtype: VirtualSCSI}
    rootdisk: {type: hard_disk, parent: scsi1, raw_image: root.img}
networks:
    vm_network: {name: "VM Network", description: "The VM Network"}
""", "pax", "--tar-format", "posix")
    assert "tar-format" in {f.rule for f in verify(ova).errors}
    done = cli("ova", "fix", "--target", "esxi-6.7", ova, tmp_path / "fixed.ova")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vmx-14 vmx-20 becomes vmx-14" in done.stdout
    fixed = verify(tmp_path / "fixed.ova", target="esxi-6.7")
    assert not fixed.findings, [f.line() for f in fixed.findings]
    assert contents(tmp_path / "fixed.ova", tmp_path) == [content]
    same_in_qemu(ova, tmp_path / "fixed.ova", tmp_path)
    assert schema_errors(members(tmp_path / "fixed.ova")["pax.ovf"], tmp_path) is None
