"""``vmdk ova verify``: check a package against every rule of :mod:`vmdk.ova.rules`.

The tar layout, the descriptor (and the DMTF schema), the manifest's syntax,
coverage and digests, the signature, the sizes and capacities the descriptor
gives against the members and disks themselves, and every disk read through.
Each member is read once: its digests are taken from the bytes the disk
reader consumes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from ..errors import CorruptImageError, UnsupportedFormatError, VmdkError
from ..stream_read import StreamReader
from . import manifest, ovf
from .package import DiskRef, Package
from .rules import Finding
from .tar import Member

if TYPE_CHECKING:
    import hashlib

STREAM_VERSION = 3


@dataclass
class Report:
    """What ``verify`` found; clean when it holds no error."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    disks_read: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def exit_code(self) -> int:
        return 2 if self.errors else 0

    def to_json(self) -> dict[str, Any]:
        return {"package": self.path, "clean": not self.errors,
                "errors": len(self.errors),
                "warnings": sum(f.severity == "warning" for f in self.findings),
                "disks-read": self.disks_read,
                "findings": [f.to_json() for f in self.findings]}


def verify(path: str | os.PathLike[str], *, read_disks: bool = True,
           target: str | None = None) -> Report:
    """Check the package at ``path`` against every rule of :mod:`vmdk.ova.rules`; with
    ``target`` (see :mod:`vmdk.ova.targets`), also what that importer refuses."""
    report = Report(os.fspath(path))
    _Verifier(report, read_disks).run()
    if target is not None:
        from .fix import plan_for_target

        report.findings.extend(plan_for_target(report.path, target).findings())
    return report


class _Tap(io.RawIOBase):
    """Passes a member's bytes through, feeding each to the digests on the way."""

    def __init__(self, raw: IO[bytes], digests: list[hashlib._Hash]) -> None:
        self._raw = raw
        self._digests = digests

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(memoryview(buffer)))
        for digest in self._digests:
            digest.update(data)
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.readinto(bytearray(1 << 20)):
            pass


class _Verifier:
    def __init__(self, report: Report, read_disks: bool) -> None:
        self.report = report
        self.path = report.path
        self.read_disks = read_disks
        self.members: list[Member] = []
        self.env: ovf.Envelope | None = None
        self.ovf_name: str | None = None
        self.entries: list[manifest.Entry] = []
        self.manifest_bytes: bytes | None = None

    def add(self, rule: str, message: str, member: str | None = None,
            severity: str = "error") -> None:
        self.report.findings.append(Finding(rule, message, member, severity))

    def run(self) -> None:
        try:
            package = Package(self.path)
        except UnsupportedFormatError as exc:
            self.add("tar-format", exc.reason)
            return
        with package:
            self._layout(package)
            self._descriptor(package)
            self._manifest(package)
            self._read_members(package)
            self._signature(package)
            if self.env is not None:
                self._references()
                self._order()

    # -- the tar layout -------------------------------------------------------------------

    def _layout(self, package: Package) -> None:
        try:
            for m in package.members():
                self.members.append(m)
        except CorruptImageError as exc:
            self.add("tar-end", exc.reason)
        else:
            if not package.end_marker:
                self.add("tar-end", "the archive ends without its end-of-archive blocks "
                         "(cut short at a member's end?)", severity="warning")
        seen: set[str] = set()
        for m in self.members:
            self._member_layout(m, seen)

    def _member_layout(self, m: Member, seen: set[str]) -> None:
        if m.extensions:
            self.add("tar-format", f"comes after {' and '.join(m.extensions)} records "
                     "(vSphere refuses pax; write plain ustar)", m.name)
        if m.format == "v7":
            self.add("tar-format", "its header has no ustar magic (an old v7 tar)", m.name)
        if m.base256_size and m.size <= 8 ** 11 - 1:
            self.add("tar-format", "its size is written in base-256 though octal holds it",
                     m.name, "warning")
        if not m.is_file:
            self.add("tar-members", f"is no regular file (tar type {m.typeflag!r})", m.name)
        elif "/" in m.name or m.name.startswith("."):
            self.add("tar-members", "has a path, not a plain name: importers look members up "
                     "by the name the OVF references", m.name)
        if m.name in seen:
            self.add("tar-members", "is in the archive twice", m.name)
        seen.add(m.name)

    # -- the descriptor -------------------------------------------------------------------

    def _descriptor(self, package: Package) -> None:
        descriptors = [m for m in self.members if m.is_file and m.name.lower().endswith(".ovf")]
        if not descriptors:
            self.add("ovf-first", "the package holds no .ovf descriptor")
            return
        first = descriptors[0]
        self.ovf_name = first.name
        if self.members[0] is not first:
            self.add("ovf-first", f"the descriptor comes after {self.members[0].name}: "
                     "importers read the archive as a stream, the OVF first", first.name)
        for extra in descriptors[1:]:
            self.add("ovf-first", "a second descriptor", extra.name)
        try:
            data = package.read(first, ovf.MAX_OVF_SIZE)
            self.env = ovf.parse(data, first.name)
        except VmdkError as exc:
            self.add("ovf-xml", exc.reason, first.name)
            return
        self._schema(data, first.name)

    def _schema(self, data: bytes, name: str) -> None:
        from .schema import SchemaUnavailable, validate

        try:
            problems = validate(data)
        except SchemaUnavailable as exc:
            self.add("ovf-schema", f"not checked: {exc}", name, "note")
            return
        for problem in problems:
            self.add("ovf-schema", problem, name)

    # -- the manifest ---------------------------------------------------------------------

    def _manifest(self, package: Package) -> None:
        manifests = [m for m in self.members if m.is_file and m.name.lower().endswith(".mf")]
        if not manifests:
            self.add("manifest-coverage", "the package has no manifest: nothing vouches for its "
                     "members", severity="warning")
            return
        mf = manifests[0]
        for extra in manifests[1:]:
            self.add("manifest-coverage", "a second manifest", extra.name)
        self._named_after_ovf(mf.name)
        try:
            self.manifest_bytes = package.read(mf, manifest.MAX_SIZE)
        except VmdkError as exc:
            self.add("manifest-syntax", exc.reason, mf.name)
            return
        self._manifest_lines(mf.name, self.manifest_bytes)

    def _named_after_ovf(self, name: str) -> None:
        if self.ovf_name and os.path.splitext(name)[0] != os.path.splitext(self.ovf_name)[0]:
            self.add("manifest-name", f"is not named after the descriptor "
                     f"{self.ovf_name}: importers look for the same name", name)

    def _manifest_lines(self, name: str, data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self.add("manifest-syntax", "is not UTF-8 text", name)
            text = data.decode("utf-8", "replace")
        entries, junk = manifest.parse(text)
        for number, line in junk:
            self.add("manifest-syntax", f"line {number} is no digest line: {line[:80]!r}", name)
        for e in entries:
            if e.problem:
                self.add("manifest-syntax", f"line {e.line} ({e.name}): {e.problem}", name)
            if e.algorithm is None:
                self.add("manifest-algorithm", f"line {e.line} ({e.name}): an algorithm "
                         "importers do not take", name)
        algorithms = sorted({e.algorithm for e in entries if e.algorithm})
        if len(algorithms) > 1:
            self.add("manifest-algorithm", f"mixes {', '.join(algorithms)}: use one", name,
                     "warning")
        self.entries = [e for e in entries if e.algorithm]
        self._coverage(name, entries)

    def _coverage(self, name: str, entries: list[manifest.Entry]) -> None:
        listed: dict[str, int] = {}
        for e in entries:
            listed[e.name] = listed.get(e.name, 0) + 1
        present = {m.name for m in self.members if m.is_file}
        for m in self.members:
            if not m.is_file or m.name.lower().endswith((".mf", ".cert")):
                continue
            if m.name not in listed:
                self.add("manifest-coverage", f"{m.name} is not listed", name)
        for listed_name, count in listed.items():
            if listed_name not in present:
                self.add("manifest-coverage", f"lists {listed_name}, which the package does "
                         "not hold", name)
            elif count > 1:
                self.add("manifest-coverage", f"lists {listed_name} {count} times", name)

    # -- every member read once: digests, and the disks read through ----------------------

    def _read_members(self, package: Package) -> None:
        disks = self._disk_refs(package)
        for m in self.members:
            wanted = [e for e in self.entries if e.name == m.name]
            ref = disks.get(m.name)
            if not m.is_file or (not wanted and (ref is None or not self.read_disks)):
                continue
            hashers = {e.algorithm: manifest.hasher(e.algorithm) for e in wanted
                       if e.algorithm}
            tap = _Tap(package.open(m), list(hashers.values()))
            if ref is not None and self.read_disks:
                self._read_disk(package, ref, m, tap)
            tap.drain()
            if m.data_offset + m.size > os.fstat(package.fd).st_size:
                continue  # cut: tar-end says so, and every digest would differ
            for e in wanted:
                got = hashers[e.algorithm or ""].hexdigest()
                if got != e.digest:
                    self.add("digest", f"its {e.algorithm} is {got}, the manifest says "
                             f"{e.digest}", m.name)

    def _disk_refs(self, package: Package) -> dict[str, DiskRef]:
        """member name -> the disk it holds (the OVF's disks; any .vmdk without an OVF)."""
        if self.env is None:
            return {m.name: DiskRef(n, m.name) for n, m in enumerate(
                (m for m in self.members if m.name.lower().endswith(".vmdk")), 1)}
        refs = {}
        for n, d in enumerate(self.env.disks, 1):
            f = self.env.disk_file(d)
            if f is not None:
                refs[f.href] = DiskRef(n, f.href, d.disk_id, f.compression)
        return refs

    def _read_disk(self, package: Package, ref: DiskRef, m: Member, tap: _Tap) -> None:
        self.report.disks_read += 1
        try:
            reader = StreamReader(package.open_disk(ref, m, raw=io.BufferedReader(tap, 1 << 20)),
                                  m.name)
        except UnsupportedFormatError as exc:
            self.add("disk-format", exc.reason, m.name)
            return
        except VmdkError as exc:
            self.add("disk-format" if "KDMV" in exc.reason else "disk-stream", exc.reason,
                     m.name)
            return
        if reader.header.version != STREAM_VERSION:
            self.add("disk-version", f"its header has version {reader.header.version}, not 3 "
                     "(ESXi: 'sparse VMDK version too old')", m.name)
        try:
            populated = sum(len(data) for _offset, data in reader.grains())
        except VmdkError as exc:
            self.add("disk-stream", exc.reason, m.name)
            return
        self._disk_sizes(ref, m, reader.capacity, populated)

    def _disk_sizes(self, ref: DiskRef, m: Member, capacity: int, populated: int) -> None:
        disk = self.env.disk(ref.disk_id) if self.env is not None and ref.disk_id else None
        if disk is None:
            return
        if disk.format and disk.format != ovf.STREAM_OPTIMIZED:
            self.add("disk-format", f"ovf:format is {disk.format}, not streamOptimized", m.name)
        if disk.capacity is None:
            self.add("capacity", f"disk {disk.disk_id} has no readable ovf:capacity (units "
                     f"{disk.capacity_units!r})", m.name)
        elif disk.capacity != capacity:
            self.add("capacity", f"disk {disk.disk_id}: ovf:capacity says {disk.capacity} "
                     f"bytes, the disk holds {capacity}", m.name)
        if disk.populated_size is not None and disk.populated_size != populated:
            self.add("populated-size", f"disk {disk.disk_id}: ovf:populatedSize says "
                     f"{disk.populated_size} bytes, the disk stores {populated}", m.name,
                     "warning")

    # -- the signature --------------------------------------------------------------------

    def _signature(self, package: Package) -> None:
        certs = [m for m in self.members if m.is_file and m.name.lower().endswith(".cert")]
        if not certs:
            return
        cert = certs[0]
        self._named_after_ovf(cert.name)
        try:
            sig = manifest.parse_cert_file(package.read(cert, manifest.MAX_SIZE))
        except (ValueError, VmdkError) as exc:
            self.add("signature", f"cannot be read: {exc}", cert.name)
            return
        mf = next((m for m in self.members if m.name.lower().endswith(".mf")), None)
        if mf is None or sig.manifest_name != mf.name or self.manifest_bytes is None:
            self.add("signature", f"signs {sig.manifest_name}, which is not the package's "
                     "manifest", cert.name)
            return
        try:
            problems = manifest.check_signature(sig, self.manifest_bytes)
        except VmdkError as exc:
            self.add("signature", f"not checked: {exc.reason}", cert.name, "note")
            return
        for problem in problems:
            self.add("signature", problem, cert.name)
        if not problems:
            self._certificate_dates(sig, cert.name)

    def _certificate_dates(self, sig: manifest.Signature, name: str) -> None:
        import datetime

        start, end = manifest.certificate_dates(sig)
        now = datetime.datetime.now(datetime.UTC)
        if not start <= now <= end:
            self.add("certificate", f"the certificate is valid from {start:%Y-%m-%d} to "
                     f"{end:%Y-%m-%d} only: importers warn or refuse", name, "warning")

    # -- what the descriptor references ---------------------------------------------------

    def _references(self) -> None:
        assert self.env is not None
        by_name = {m.name: m for m in self.members if m.is_file}
        for f in self.env.files:
            m = by_name.get(f.href)
            if m is None:
                self.add("references", f"the OVF references {f.href} (file {f.id}), which the "
                         "package does not hold")
            elif f.size is None:
                self.add("file-size", f"file {f.id} has no ovf:size", f.href, "warning")
            elif f.size != m.size:
                self.add("file-size", f"ovf:size says {f.size} bytes, the member has {m.size}",
                         f.href)
            if f.chunk_size:
                self.add("disk-format", "is stored in chunks (ovf:chunkSize), which are not "
                         "read here", f.href, "note")
        for d in self.env.disks:
            if d.file_ref and self.env.file(d.file_ref) is None:
                self.add("references", f"disk {d.disk_id} names file {d.file_ref}, which the "
                         "References section does not list")
        for system in self.env.systems:
            self._item_references(system)

    def _item_references(self, system: ovf.VirtualSystem) -> None:
        assert self.env is not None
        ids = {i.instance_id for i in system.items}
        for item in system.items:
            if item.parent is not None and item.parent not in ids:
                self.add("references", f"{system.id}: item {item.instance_id} ({item.name}) "
                         f"names parent {item.parent}, which is no item")
            for resource in item.host_resources:
                found = ovf.host_resource_id(resource)
                if found and ((found[0] == "disk" and self.env.disk(found[1]) is None)
                              or (found[0] == "file" and self.env.file(found[1]) is None)):
                    self.add("references", f"{system.id}: item {item.instance_id} "
                             f"({item.name}) names {resource}, which the OVF does not have")

    def _order(self) -> None:
        assert self.env is not None
        names = [m.name for m in self.members if m.is_file]
        listed = [f.href for f in self.env.files if f.href in names]
        stored = [n for n in names if n in set(listed)]
        if stored != listed:
            self.add("member-order", f"files are stored as {', '.join(stored)}, the OVF lists "
                     f"them as {', '.join(listed)}")
        mf = next((i for i, n in enumerate(names) if n.lower().endswith(".mf")), None)
        cert = next((i for i, n in enumerate(names) if n.lower().endswith(".cert")), None)
        end = len(names) - (1 if cert is not None else 0)  # where the manifest may end
        if mf is not None and mf not in (1, end - 1):
            self.add("member-order", "the manifest is neither right after the OVF nor at the "
                     "end", names[mf])
        if cert is not None and cert != len(names) - 1:
            self.add("member-order", "the certificate is not the last member", names[cert])


def iter_lines(report: Report) -> Iterator[str]:
    """``verify``'s text output: a line per finding, then a summary."""
    for f in report.findings:
        yield f.line()
    errors, warnings = len(report.errors), sum(f.severity == "warning" for f in report.findings)
    if errors:
        yield f"{errors} error(s), {warnings} warning(s): importers will refuse this package."
    else:
        yield (f"No errors found ({report.disks_read} disk(s) read through"
               + (f", {warnings} warning(s))." if warnings else ")."))


__all__ = ["Report", "iter_lines", "verify"]
