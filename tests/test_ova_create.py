"""``vmdk ova create`` and ``export-ova``: what we write passes our verify, the DMTF schema,
and its disks read back exactly in qemu-img and in VMware's vmdk-convert."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import pattern, run
from ova_support import (  # noqa: F401 - fixtures
    MiB,
    cli,
    members,
    names,
    raw_disk,
    schema_errors,
    vmdk_convert_exe,
)
from test_ova_verify import key_and_certificate
from vmdk.ova import export_ova
from vmdk.ova.verify import verify

DESCRIPTION = """
name: appliance
cpus: 4
memory: 2048
firmware: efi
secure-boot: true
hardware-version: 17
os-type: ubuntu64Guest
controllers:
  - {id: boot, model: pvscsi}
  - {id: data, model: nvme}
disks:
  - {source: root.raw, controller: boot}
  - {source: data.vmdk, controller: data}
  - {source: stream.vmdk, controller: data}
networks:
  - {network: VM Network, adapter: vmxnet3}
  - {network: Backend, adapter: e1000e}
product:
  name: Example Appliance
  vendor: Example Inc.
  version: "2.0"
  properties: {guestinfo.hostname: example}
extra-config:
  disk.EnableUUID: true
  tools.syncTime: "FALSE"
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """A three-disk package: a raw disk, a monolithicSparse VMDK and a v3 stream."""
    from vmdk.convert import convert

    folder = tmp_path_factory.mktemp("create")
    contents = {"root.raw": raw_disk(folder / "root.raw", 3 * MiB, seed=20)}
    contents["data.vmdk"] = raw_disk(folder / "data.raw", 2 * MiB, seed=21)
    convert(folder / "data.raw", folder / "data.vmdk", durable=False)
    contents["stream.vmdk"] = raw_disk(folder / "stream.raw", 1 * MiB + 65536, seed=22)
    convert(folder / "stream.raw", folder / "stream.vmdk", subformat="streamOptimized",
            durable=False)
    (folder / "vm.yaml").write_text(DESCRIPTION)
    done = cli("ova", "create", "--config", folder / "vm.yaml", folder / "appliance.ova")
    assert done.returncode == 0, done.stderr
    return folder / "appliance.ova", contents


def test_created_package_verifies_and_validates(made: tuple[Path, dict[str, bytes]],
                                                tmp_path: Path) -> None:
    ova, _contents = made
    report = verify(ova)
    assert not report.findings, [f.line() for f in report.findings]
    assert report.disks_read == 3
    assert names(ova) == ["appliance.ovf", "appliance-disk1.vmdk", "appliance-disk2.vmdk",
                          "appliance-disk3.vmdk", "appliance.mf"]
    assert schema_errors(members(ova)["appliance.ovf"], tmp_path) is None
    with tarfile.open(ova) as tar:
        assert all(m.isreg() and not m.pax_headers for m in tar.getmembers())
    assert ova.read_bytes()[257:265] == b"ustar\x0000"


def test_created_settings_show_in_info(made: tuple[Path, dict[str, bytes]]) -> None:
    ova, _contents = made
    info = json.loads(cli("ova", "info", "--output=json", ova).stdout)
    (system,) = info["virtual-systems"]
    assert (system["cpus"], system["memory-mib"], system["firmware"], system["secure-boot"],
            system["hardware-version"], system["os-type"]) == (4, 2048, "efi", True, 17,
                                                                "ubuntu64Guest")
    assert [c["model"] for c in system["controllers"]] == ["pvscsi", "nvme"]
    assert [(d["file"], d["controller"].split()[0], d["slot"]) for d in system["disks"]] == [
        ("appliance-disk1.vmdk", "pvscsi", "0"), ("appliance-disk2.vmdk", "nvme", "0"),
        ("appliance-disk3.vmdk", "nvme", "1")]
    assert system["networks"] == [{"adapter": "VmxNet3", "network": "VM Network"},
                                  {"adapter": "E1000e", "network": "Backend"}]
    assert system["extra-config"] == {"disk.EnableUUID": "TRUE", "tools.syncTime": "FALSE"}
    assert system["products"][0]["properties"] == {"guestinfo.hostname": "example"}
    assert [n["name"] for n in info["networks"]] == ["VM Network", "Backend"]


def test_a_stream_source_goes_in_as_it_is(made: tuple[Path, dict[str, bytes]]) -> None:
    ova, _contents = made
    assert members(ova)["appliance-disk3.vmdk"] == (ova.parent / "stream.vmdk").read_bytes()


@pytest.mark.interop
def test_disks_read_back_in_qemu_and_vmdk_convert(made: tuple[Path, dict[str, bytes]],
                                                  tmp_path: Path, qemu_img: str,
                                                  vmdk_convert_exe: str) -> None:  # noqa: F811
    ova, contents = made
    stored = members(ova)
    for n, source in enumerate(("root.raw", "data.vmdk", "stream.vmdk"), 1):
        disk = tmp_path / f"d{n}.vmdk"
        disk.write_bytes(stored[f"appliance-disk{n}.vmdk"])
        expected = tmp_path / f"expected{n}.raw"
        expected.write_bytes(contents[source])
        assert run(qemu_img, "compare", "-f", "vmdk", "-F", "raw", disk, expected
                   ).returncode == 0
        out = tmp_path / f"vmware{n}.raw"
        subprocess.run([vmdk_convert_exe, str(disk), str(out)], check=True,
                       capture_output=True, timeout=300)
        assert out.read_bytes() == contents[source]
        info = json.loads(subprocess.run([vmdk_convert_exe, "-i", str(disk)], check=True,
                                         capture_output=True, text=True, timeout=60).stdout)
        assert info["capacity"] == len(contents[source])


@pytest.mark.parametrize("algorithm", ["sha1", "sha512"])
def test_manifest_algorithm_of_choice(tmp_path: Path, algorithm: str) -> None:
    raw_disk(tmp_path / "d.raw", MiB, seed=23)
    done = cli("ova", "create", "--disk", tmp_path / "d.raw", "--manifest", algorithm,
               tmp_path / "vm.ova")
    assert done.returncode == 0, done.stderr
    lines = members(tmp_path / "vm.ova")["vm.mf"].decode().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{algorithm.upper()}(") for line in lines)
    assert not verify(tmp_path / "vm.ova").findings


def test_signed_package_verifies_here_and_in_openssl(tmp_path: Path) -> None:
    import shutil

    raw_disk(tmp_path / "d.raw", MiB, seed=24)
    key, cert = key_and_certificate(tmp_path)
    done = cli("ova", "create", "--disk", tmp_path / "d.raw", "--sign-key", key, "--sign-cert",
               cert, tmp_path / "vm.ova")
    assert done.returncode == 0, done.stderr
    assert names(tmp_path / "vm.ova")[-1] == "vm.cert"
    assert not verify(tmp_path / "vm.ova").findings
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    parts = members(tmp_path / "vm.ova")
    sig_line, pem = parts["vm.cert"].split(b"\n", 1)
    assert sig_line.startswith(b"SHA256(vm.mf)= ")
    (tmp_path / "sig.bin").write_bytes(bytes.fromhex(sig_line.split(b"= ")[1].decode()))
    (tmp_path / "vm.mf").write_bytes(parts["vm.mf"])
    (tmp_path / "c.pem").write_bytes(pem)
    pub = run("openssl", "x509", "-pubkey", "-noout", "-in", tmp_path / "c.pem").stdout
    (tmp_path / "pub.pem").write_text(pub)
    checked = run("openssl", "dgst", "-sha256", "-verify", tmp_path / "pub.pem", "-signature",
                  tmp_path / "sig.bin", tmp_path / "vm.mf")
    assert "Verified OK" in checked.stdout


def test_export_ova_is_create_with_one_disk(tmp_path: Path) -> None:
    (tmp_path / "src.raw").write_bytes(pattern(2 * MiB, seed=25))
    export_ova(tmp_path / "src.raw", tmp_path / "vm.ova", cpus=2, memory_mb=512)
    assert not verify(tmp_path / "vm.ova").findings
    assert schema_errors(members(tmp_path / "vm.ova")["vm.ovf"], tmp_path) is None
    info = json.loads(cli("ova", "info", "--output=json", tmp_path / "vm.ova").stdout)
    assert (info["virtual-systems"][0]["cpus"], info["virtual-systems"][0]["memory-mib"]) == (
        2, 512)


@pytest.mark.parametrize("options, message", [
    (["--controller", "n=nvme", "--hardware-version", "10"], "nvme needs hardware version 13"),
    (["--secure-boot"], "secure boot needs EFI"),
    (["--controller", "x=floppy"], "unknown model 'floppy'"),
    (["--disk", "{d}/d.raw,controller=nope"], "no controller 'nope'"),
    (["--network", "LAN=tulip"], "unknown network adapter 'tulip'"),
])
def test_impossible_appliances_are_refused_before_work(tmp_path: Path, options: list[str],
                                                       message: str) -> None:
    raw_disk(tmp_path / "d.raw", MiB, seed=26)
    disk = [] if any("{d}" in o for o in options) else ["--disk", str(tmp_path / "d.raw")]
    done = cli("ova", "create", *disk, *[o.format(d=tmp_path) for o in options],
               tmp_path / "vm.ova")
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "vm.ova").exists()


def test_a_member_over_8_gib_gets_a_base256_size() -> None:
    from vmdk.ova.tar import USTAR_MAX_SIZE, header

    big = 9 << 30
    info = tarfile.TarInfo.frombuf(header("big.vmdk", big), "utf-8", "strict")
    assert info.size == big and info.name == "big.vmdk"
    small = tarfile.TarInfo.frombuf(header("small.vmdk", USTAR_MAX_SIZE), "utf-8", "strict")
    assert small.size == USTAR_MAX_SIZE
    assert header("small.vmdk", 1)[257:265] == b"ustar\x0000"


THIRD_PARTY_STREAMS = {  # shared/samples: streamOptimized disks of other writers, and sha256
    "cot/input.vmdk": "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14",
    "cot/ubuntu.2.0-disk1.vmdk": "ebfb4ef19ae410f190327b5ebd312711263bc7579970e87d9c1e2d84e06b3c25",
    "cot-e9366f3/blank.vmdk": "ebfb4ef19ae410f190327b5ebd312711263bc7579970e87d9c1e2d84e06b3c25",
    "xo-vmdk-to-vhd/test.vmdk": "bb9f8df61474d25e71fa00722318cd387396ca1736605e1248821cc0de3d3af8",
    "vmdk-rs/streamOptimizedWithMarkers.vmdk":
        "92c0f8b4280377437056f57c51ef51a5f8aeb1462ac630ef0633febcbfc3db4e",
}


#: The published content hashes that are those of N zero bytes (shared/samples/README.md).
ALL_ZEROS = {"49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14": 1 << 30,
             "ebfb4ef19ae410f190327b5ebd312711263bc7579970e87d9c1e2d84e06b3c25": 8 << 30}


@pytest.mark.parametrize("sample", sorted(THIRD_PARTY_STREAMS))
def test_third_party_streams_are_packaged_as_they_are(samples: Path, tmp_path: Path,
                                                      sample: str) -> None:
    """vmdktool's, VirtualBox's and VMware's streams go in byte for byte, verify, and read
    back to their published content (through the in-place reader: a sparse 8 GiB is cheap)."""
    import hashlib

    from vmdk.ova.create import is_stream_v3
    from vmdk.ova.disk import OvaDisk

    source = samples / sample
    if not is_stream_v3(str(source)):
        pytest.skip(f"{sample} is no version 3 stream")
    done = cli("ova", "create", "--disk", source, tmp_path / "vm.ova")
    assert done.returncode == 0, done.stderr
    assert members(tmp_path / "vm.ova")["vm-disk1.vmdk"] == source.read_bytes()
    report = verify(tmp_path / "vm.ova")
    assert not report.findings, [f.line() for f in report.findings]
    with OvaDisk(str(tmp_path / "vm.ova")) as disk:
        if THIRD_PARTY_STREAMS[sample] in ALL_ZEROS:  # 1 and 8 GiB: hashing zeros takes long
            assert disk.size == ALL_ZEROS[THIRD_PARTY_STREAMS[sample]]
            assert not any(r.data for r in disk.map())
            return
        digest = hashlib.sha256(disk.read_at(0, disk.size))
    assert digest.hexdigest() == THIRD_PARTY_STREAMS[sample]


def test_a_truncated_vmware_export_is_refused(samples: Path, tmp_path: Path) -> None:
    """govmomi's sample is a real VMware export cut at 1 MiB: create will not package it,
    and verify names the cut when it arrives inside a package."""
    source = samples / "govmomi" / "ttylinux-pc_i486-16.1-disk1.vmdk"
    done = cli("ova", "create", "--disk", source, tmp_path / "vm.ova")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "vm.ova").exists()
    from ova_support import lay_out

    ovf = build_ovf_for(source)
    ova = lay_out(tmp_path / "cut.ova", [("vm.ovf", ovf), ("vm-disk1.vmdk", source.read_bytes())])
    assert {f.rule for f in verify(ova).errors} == {"disk-stream"}


def build_ovf_for(source: Path) -> bytes:
    from vmdk.ova.create import build_ovf

    return build_ovf("vm", "vm-disk1.vmdk", source.stat().st_size, 61440 * 512, 0)
