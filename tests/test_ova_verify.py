"""``vmdk ova verify``: packages of VMware's ova-compose pass, and each rule broken once is
reported with the rule it breaks."""

from __future__ import annotations

import datetime
import hashlib
import json
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import pattern
from ova_support import (  # noqa: F401 - fixtures
    MiB,
    Compose,
    cli,
    lay_out,
    members,
    ova_compose,
    raw_disk,
    vmdk_convert_exe,
)
from vmdk.ova import export_ova
from vmdk.ova.verify import verify

ONE_DISK = """
system: {name: appliance, type: vmx-14, os_vmw: otherLinux64Guest, firmware: bios}
hardware:
    cpus: 1
    memory: {type: memory, size: 512}
    scsi1: {type: scsi_controller}
    rootdisk: {type: hard_disk, parent: scsi1, raw_image: root.img}
networks:
    vm_network: {name: "VM Network", description: "The VM Network"}
"""


def key_and_certificate(folder: Path, days: int = 30) -> tuple[Path, Path]:
    """A self-signed RSA key and certificate (PEM), valid from yesterday for ``days``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vmdk test signer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.mark.parametrize("options", [(), ("--checksum-type", "sha1"),
                                     ("--checksum-type", "sha512"), ("sign",)])
def test_ova_compose_packages_verify(tmp_path: Path, ova_compose: Compose,  # noqa: F811
                                     options: tuple[str, ...]) -> None:
    raw_disk(tmp_path / "root.img", 3 * MiB, seed=6)
    if options == ("sign",):
        key, cert = key_and_certificate(tmp_path)
        (tmp_path / "both.pem").write_bytes(key.read_bytes() + cert.read_bytes())
        options = ("--sign", "both.pem")
    ova = ova_compose(tmp_path, ONE_DISK, "appliance", *options)
    done = cli("ova", "verify", ova)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No errors found (1 disk(s) read through" in done.stdout
    report = verify(ova)
    assert not report.findings, [f.line() for f in report.findings]


def test_a_tampered_signature_is_found(tmp_path: Path, ova_compose: Compose) -> None:  # noqa: F811
    raw_disk(tmp_path / "root.img", 2 * MiB, seed=7)
    key, cert = key_and_certificate(tmp_path)
    (tmp_path / "both.pem").write_bytes(key.read_bytes() + cert.read_bytes())
    ova = ova_compose(tmp_path, ONE_DISK, "appliance", "--sign", "both.pem")
    parts = members(ova)
    sig_line, rest = parts["appliance.cert"].split(b"\n", 1)
    flipped = sig_line[:-1] + (b"0" if sig_line[-1:] != b"0" else b"1")
    parts["appliance.cert"] = flipped + b"\n" + rest
    broken = lay_out(tmp_path / "broken.ova", list(parts.items()))
    assert _rules(verify(broken)) == {"signature"}


# -- each rule broken once -----------------------------------------------------------------


class Parts:
    """A good package taken apart: descriptor, disk and manifest, to break one at a time."""

    def __init__(self, folder: Path) -> None:
        (folder / "src.raw").write_bytes(pattern(2 * MiB, seed=8))
        export_ova(folder / "src.raw", folder / "vm.ova")
        parts = members(folder / "vm.ova")
        self.folder = folder
        self.ovf = parts["vm.ovf"]
        self.disk = parts["vm-disk1.vmdk"]

    def lay_out(self, *, ovf: bytes | None = None, disk: bytes | None = None,
                order: tuple[str, ...] = ("vm.ovf", "vm.mf", "vm-disk1.vmdk"),
                manifest: Callable[[str, bytes], str] | None = None,
                fmt: int = tarfile.USTAR_FORMAT, names: dict[str, str] | None = None,
                extra: dict[str, bytes] | None = None) -> Path:
        """The package with the parts given, its manifest made for them (by ``manifest``)."""
        ovf = self.ovf if ovf is None else ovf
        disk = self.disk if disk is None else disk
        ovf = ovf.replace(f'ovf:size="{len(self.disk)}"'.encode(), f'ovf:size="{len(disk)}"'
                          .encode()) if disk is not self.disk else ovf
        line = manifest or (lambda n, d: f"SHA256({n})= {hashlib.sha256(d).hexdigest()}\n")
        files = {"vm.ovf": ovf, "vm-disk1.vmdk": disk, **(extra or {})}
        files["vm.mf"] = "".join(line(n, d) for n, d in files.items()).encode()
        names = names or {}
        return lay_out(self.folder / "case.ova", [(names.get(n, n), files[n]) for n in order],
                       fmt=fmt)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Parts:
    return Parts(tmp_path_factory.mktemp("parts"))


def _rules(report: object, severity: str = "error") -> set[str]:
    return {f.rule for f in report.findings if f.severity == severity}  # type: ignore[attr-defined]


def _header_version(disk: bytes, version: int) -> bytes:
    return disk[:4] + struct.pack("<I", version) + disk[8:]


def _monolithic_sparse(folder: Path) -> bytes:
    from vmdk.convert import convert

    convert(folder / "src.raw", folder / "sparse.vmdk", durable=False)
    return (folder / "sparse.vmdk").read_bytes()


CASES: dict[str, tuple[str, Callable[[Parts], Path]]] = {
    "ovf-after-disk": ("ovf-first", lambda p: p.lay_out(order=("vm-disk1.vmdk", "vm.ovf",
                                                                "vm.mf"))),
    "pax": ("tar-format", lambda p: p.lay_out(fmt=tarfile.PAX_FORMAT)),
    "path-names": ("tar-members", lambda p: p.lay_out(
        ovf=p.ovf.replace(b'"vm-disk1.vmdk"', b'"./vm-disk1.vmdk"'),
        names={"vm-disk1.vmdk": "./vm-disk1.vmdk"},
        manifest=lambda n, d: f"SHA256({'./' + n if n.endswith('vmdk') else n})= "
                              f"{hashlib.sha256(d).hexdigest()}\n")),
    "sha256sum-tag": ("manifest-syntax", lambda p: p.lay_out(
        manifest=lambda n, d: f"SHA256 ({n}) = {hashlib.sha256(d).hexdigest()}\n")),
    "openssl3": ("manifest-syntax", lambda p: p.lay_out(
        manifest=lambda n, d: f"SHA2-256({n})= {hashlib.sha256(d).hexdigest()}\n")),
    "md5": ("manifest-algorithm", lambda p: p.lay_out(
        manifest=lambda n, d: f"MD5({n})= {hashlib.md5(d).hexdigest()}\n")),
    "unlisted-disk": ("manifest-coverage", lambda p: p.lay_out(
        manifest=lambda n, d: "" if n.endswith(".vmdk") else
        f"SHA256({n})= {hashlib.sha256(d).hexdigest()}\n")),
    "wrong-digest": ("digest", lambda p: p.lay_out(
        manifest=lambda n, d: f"SHA256({n})= {hashlib.sha256(d + b'x').hexdigest()}\n")),
    "size": ("file-size", lambda p: p.lay_out(ovf=p.ovf.replace(
        f'ovf:size="{len(p.disk)}"'.encode(), f'ovf:size="{len(p.disk) + 512}"'.encode()))),
    "capacity": ("capacity", lambda p: p.lay_out(ovf=p.ovf.replace(
        f'ovf:capacity="{2 * MiB}"'.encode(), f'ovf:capacity="{4 * MiB}"'.encode()))),
    "version-1": ("disk-version", lambda p: p.lay_out(disk=_header_version(p.disk, 1))),
    "not-a-stream": ("disk-format", lambda p: p.lay_out(disk=_monolithic_sparse(p.folder))),
    "cut-disk": ("disk-stream", lambda p: p.lay_out(disk=p.disk[:len(p.disk) // 2])),
    "schema": ("ovf-schema", lambda p: p.lay_out(ovf=p.ovf.replace(
        b"<Info>Virtual disk information</Info>", b""))),
    "not-xml": ("ovf-xml", lambda p: p.lay_out(ovf=p.ovf[:200])),
    "missing-file": ("references", lambda p: p.lay_out(ovf=p.ovf.replace(
        b"</References>", b'<File ovf:href="gone.iso" ovf:id="file2" ovf:size="1"/>'
                          b"</References>"))),
    "manifest-in-the-middle": ("member-order", lambda p: p.lay_out(
        ovf=p.ovf.replace(b"</References>", b'<File ovf:href="notes.txt" ovf:id="f9" '
                          b'ovf:size="5"/></References>'), extra={"notes.txt": b"notes"},
        order=("vm.ovf", "vm-disk1.vmdk", "vm.mf", "notes.txt"))),
    "files-out-of-order": ("member-order", lambda p: p.lay_out(
        ovf=p.ovf.replace(b"</References>", b'<File ovf:href="notes.txt" ovf:id="f9" '
                          b'ovf:size="5"/></References>'), extra={"notes.txt": b"notes"},
        order=("vm.ovf", "vm.mf", "notes.txt", "vm-disk1.vmdk"))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_broken_rule_is_named(parts: Parts, case: str) -> None:
    rule, make = CASES[case]
    report = verify(make(parts))
    assert _rules(report) == {rule}, [f.line() for f in report.findings]
    assert report.exit_code == 2


def test_the_base_package_is_clean(parts: Parts) -> None:
    report = verify(parts.lay_out())
    assert not report.findings, [f.line() for f in report.findings]


def test_populated_size_is_a_warning(parts: Parts) -> None:
    report = verify(parts.lay_out(ovf=parts.ovf.replace(b'ovf:populatedSize="', b'ovf:populatedSize="1')))
    assert _rules(report) == set() and _rules(report, "warning") == {"populated-size"}
    assert report.exit_code == 0


def test_a_cut_package_is_found(parts: Parts, tmp_path: Path) -> None:
    good = parts.lay_out(order=("vm.ovf", "vm-disk1.vmdk", "vm.mf"))
    data = good.read_bytes()
    cut = tmp_path / "cut.ova"
    cut.write_bytes(data[:len(data) // 2])
    assert {"tar-end", "disk-stream"} <= _rules(verify(cut))
    no_end = tmp_path / "no-end.ova"
    no_end.write_bytes(data.rstrip(b"\0"))  # what remains is whole up to the manifest's bytes
    assert "tar-end" in _rules(verify(no_end)) | _rules(verify(no_end), "warning")


def test_cli_prints_one_line_per_finding_and_json(parts: Parts) -> None:
    bad = CASES["wrong-digest"][1](parts)
    done = cli("ova", "verify", bad)
    assert done.returncode == 2, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["[digest]", "[digest]"]
    assert "vm-disk1.vmdk" in done.stdout and "vm.ovf" in done.stdout
    done = cli("ova", "verify", "--output=json", bad)
    report = json.loads(done.stdout)
    assert done.returncode == 2 and not report["clean"] and report["errors"] == 2
    assert report["findings"][0]["demand"].startswith("every member's digest")


def test_a_gzipped_ova_is_a_finding_not_a_traceback(parts: Parts, tmp_path: Path) -> None:
    import gzip

    bad = tmp_path / "gz.ova"
    bad.write_bytes(gzip.compress(parts.lay_out().read_bytes()))
    done = cli("ova", "verify", bad)
    assert done.returncode == 2 and "[tar-format]" in done.stdout and "gunzip" in done.stdout


def test_the_schema_check_falls_back_on_xmllint(parts: Parts,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from vmdk.ova import schema

    if not shutil.which("xmllint"):
        pytest.skip("xmllint is not installed (Debian: libxml2-utils)")

    def no_lxml(ovf: bytes) -> list[str]:
        raise ImportError("lxml")

    monkeypatch.setattr(schema, "_with_lxml", no_lxml)
    assert schema.validate(parts.ovf) == []
    problems = schema.validate(parts.ovf.replace(b"<Info>Virtual disk information</Info>", b""))
    assert len(problems) == 1 and problems[0].startswith("line ") and "Info" in problems[0]
