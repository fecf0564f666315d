"""``vmdk ova fix PKG OUT --target NAME``: rewrite a package so that one importer takes it.

What is wrong is found by :func:`vmdk.ova.verify.verify` and by the target's
table (:mod:`vmdk.ova.targets`); the package is then written anew: ustar, the
OVF first, files in References order, the manifest in an algorithm the target
takes, and the certificate re-made (or dropped, when the manifest changed and
no key was given).  The descriptor is edited in place (hardware version,
system family, controllers, refused items, sizes and capacities) and keeps
everything else.  Disks are copied byte for byte; one that is not a version 3
streamOptimized VMDK is converted, which changes its container, never its
content.  Every change is reported with the rule it is about.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from ..errors import VmdkError
from ..stream_read import StreamReader
from . import manifest, ovf
from .create import DEFAULT_HARDWARE_VERSION, DigestingWriter, Signer, measure
from .ovf import RASD_NS, VMW_NS
from .package import DiskRef, Package
from .rules import Finding
from .targets import Target, target
from .verify import verify

#: Findings that writing the package anew repairs by itself.
_REWRITTEN = {"tar-format", "tar-end", "ovf-first", "member-order", "manifest-syntax",
              "manifest-algorithm", "manifest-coverage", "manifest-name", "digest",
              "signature"}
#: Findings mended by editing the descriptor or converting a disk (reported as they are made).
_MENDED = {"tar-members", "file-size", "capacity", "populated-size", "disk-format",
           "disk-version"}


@dataclass(frozen=True)
class Change:
    rule: str
    message: str
    member: str | None = None

    def line(self) -> str:
        return f"[{self.rule}] " + (f"{self.member}: " if self.member else "") + self.message

    def to_json(self) -> dict[str, str | None]:
        return {"rule": self.rule, "member": self.member, "message": self.message}


@dataclass
class FixReport:
    package: str
    target: str
    changes: list[Change] = field(default_factory=list)
    left: list[Finding] = field(default_factory=list)  # what fixing cannot mend
    written: str | None = None

    def findings(self) -> list[Finding]:
        """The changes the target needs, as findings of ``verify --target``."""
        return [Finding(c.rule, c.message, c.member) for c in self.changes]

    @property
    def exit_code(self) -> int:
        """0 when the package needs nothing (or was fixed), 2 when something is left."""
        if self.left or (self.written is None and self.changes):
            return 2
        return 0

    def to_json(self) -> dict[str, object]:
        return {"package": self.package, "target": self.target, "written": self.written,
                "changes": [c.to_json() for c in self.changes],
                "not-fixed": [f.to_json() for f in self.left]}


# -------------------------------------------------------------------- the descriptor


class _Editor:
    """Edits a parsed descriptor for a target, noting each change."""

    def __init__(self, env: ovf.Envelope, tgt: Target, changes: list[Change]) -> None:
        self.env = env
        self.tgt = tgt
        self.changes = changes
        self.edited = False
        self.dropped_files: set[str] = set()  # ids
        self.dropped_members: set[str] = set()  # their hrefs

    def change(self, rule: str, message: str, member: str | None = None) -> None:
        self.changes.append(Change(rule, message, member))
        self.edited = True

    def for_target(self) -> None:
        for system in self.env.systems:
            self._system_type(system)
            for item in system.items:
                if self.tgt.refuses_item(item.resource_type):
                    self._drop_item(system, item)
                elif item.controller is not None:
                    self._controller(system, item)
        self._drop_file_references()

    def _system_type(self, system: ovf.VirtualSystem) -> None:
        tgt = self.tgt

        def refused(family: str) -> bool:
            return any(family.startswith(prefix) for prefix in tgt.refused_families)

        for element in system.system_type_elements:
            types = (element.text or "").split()
            kept = [t for t in types if not refused(t) and _fits(t, tgt.max_hardware)]
            if kept == types:
                continue
            newest = tgt.max_hardware or DEFAULT_HARDWARE_VERSION
            kept = kept or [f"vmx-{min(newest, _highest(types) or DEFAULT_HARDWARE_VERSION):02d}"]
            rule = "system-type" if any(refused(t) for t in types) else "hardware-version"
            self.change(rule, f"{system.id}: VirtualSystemType {' '.join(types)} becomes "
                        f"{' '.join(kept)} ({tgt.name} runs "
                        + (f"up to vmx-{tgt.max_hardware})" if tgt.max_hardware else
                           "no such family)"))
            element.text = " ".join(kept)

    def _controller(self, system: ovf.VirtualSystem, item: ovf.Item) -> None:
        kind = item.controller
        assert kind is not None and item.element is not None
        new = ovf.CONTROLLER_MODELS[self.tgt.controllers.get(kind.model, kind.model)]
        spelling = new.vmware if self.tgt.family == "vmware" else new.virtualbox
        if new is kind and item.subtype == spelling and item.resource_type == new.resource_type:
            return
        what = (f"{kind.model} becomes {new.model} ({self.tgt.name} has no {kind.model})"
                if new is not kind else f"subtype {item.subtype or '(none)'} is spelled "
                f"{spelling or '(none)'} for {self.tgt.name}")
        self.change("controller", f"{system.id}: controller {item.instance_id}: {what}")
        _set_rasd(item.element, "ResourceSubType", spelling or None)
        _set_rasd(item.element, "ResourceType", str(new.resource_type))

    def _drop_item(self, system: ovf.VirtualSystem, item: ovf.Item) -> None:
        assert system.hardware is not None and item.element is not None
        system.hardware.remove(item.element)
        for resource in item.host_resources:
            found = ovf.host_resource_id(resource)
            if found and found[0] == "file":
                self.dropped_files.add(found[1])
        self.change("hardware-item", f"{system.id}: item {item.instance_id} ({item.name or 'type '}"
                    f"{'' if item.name else item.resource_type}) dropped: {self.tgt.name} "
                    f"refuses resource type {item.resource_type}")

    def _drop_file_references(self) -> None:
        """Files only a dropped item used (an NVRAM file) go too, with the settings naming
        them."""
        if not self.dropped_files or self.env.root is None:
            return
        q = f"{{{self.env.namespace}}}"
        refs = self.env.root.find(f"{q}References")
        for f in self.env.files:
            if f.id in self.dropped_files and refs is not None:
                for element in refs.findall(f"{q}File"):
                    if element.get(f"{q}id") == f.id:
                        refs.remove(element)
        for parent in self.env.root.iter():
            for c in list(parent.findall(f"{{{VMW_NS}}}Config")):
                value = c.get(f"{{{VMW_NS}}}value", "")
                if any(value == f"ovf:/file/{i}" for i in self.dropped_files):
                    parent.remove(c)
        self.dropped_members = {f.href for f in self.env.files if f.id in self.dropped_files}
        self.env.files = [f for f in self.env.files if f.id not in self.dropped_files]

    def set_disk(self, disk: ovf.DiskDef, capacity: int, populated: int, member: str) -> None:
        assert disk.element is not None
        q = f"{{{self.env.namespace}}}"
        if disk.capacity != capacity:
            self.change("capacity", f"disk {disk.disk_id}: ovf:capacity {disk.capacity} "
                        f"becomes the disk's {capacity} bytes", member)
            disk.element.set(f"{q}capacity", str(capacity))
            disk.element.set(f"{q}capacityAllocationUnits", "byte")
        if disk.populated_size is not None and disk.populated_size != populated:
            self.change("populated-size", f"disk {disk.disk_id}: ovf:populatedSize "
                        f"{disk.populated_size} becomes {populated}", member)
            disk.element.set(f"{q}populatedSize", str(populated))
        if disk.format != ovf.STREAM_OPTIMIZED:
            self.change("disk-format", f"disk {disk.disk_id}: ovf:format becomes "
                        "streamOptimized", member)
            disk.element.set(f"{q}format", ovf.STREAM_OPTIMIZED)

    def set_file(self, file: ovf.FileRef, href: str, size: int,
                 compression: str | None) -> None:
        """The References entry of a file as it is written now."""
        if self.env.root is None:
            return
        q = f"{{{self.env.namespace}}}"
        element = next(e for e in self.env.root.iter(f"{q}File") if e.get(f"{q}id") == file.id)
        if file.href != href:
            self.change("tar-members", f"{file.href} is stored as {href}", href)
            element.set(f"{q}href", href)
        if file.size != size:
            self.change("file-size", f"ovf:size {file.size} becomes {size}", href)
            element.set(f"{q}size", str(size))
        if file.compression and not compression:
            self.change("disk-format", "stored uncompressed now (ovf:compression removed)",
                        href)
            element.attrib.pop(f"{q}compression", None)


def _fits(system_type: str, max_hardware: int | None) -> bool:
    m = re.fullmatch(r"vmx-0*(\d+)", system_type)
    return max_hardware is None or m is None or int(m.group(1)) <= max_hardware


def _highest(types: list[str]) -> int | None:
    found = [int(m.group(1)) for t in types if (m := re.fullmatch(r"vmx-0*(\d+)", t))]
    return max(found) if found else None


def _set_rasd(item: ET.Element, local: str, value: str | None) -> None:
    """Set (or with None remove) a rasd element, kept in the schema's alphabetical order."""
    tag = f"{{{RASD_NS}}}{local}"
    element = item.find(tag)
    if value is None:
        if element is not None:
            item.remove(element)
        return
    if element is None:
        element = ET.Element(tag)
        children = list(item)
        at = next((i for i, c in enumerate(children) if c.tag.startswith(f"{{{RASD_NS}}}")
                   and c.tag > tag), len([c for c in children
                                          if c.tag.startswith(f"{{{RASD_NS}}}")]))
        if children:
            element.tail = children[0].tail if at < len(children) else children[-1].tail
        item.insert(at, element)
    element.text = value


# -------------------------------------------------------------------------- disks


@dataclass
class _Disk:
    ref: DiskRef
    capacity: int = 0
    populated: int = 0
    convert_because: str | None = None  # why it is converted; None: it goes in as it is
    path: str | None = None  # the converted file


def _read_disk(package: Package, ref: DiskRef) -> _Disk:
    """A disk member read through: its sizes, and whether it must be converted."""
    _ref, member = package.find_disk(ref.member)
    try:
        reader = StreamReader(package.open_disk(ref, member), f"{package.path}:{member.name}")
    except VmdkError as exc:
        if "KDMV" in exc.reason or "sequentially" in exc.reason:
            return _Disk(ref, convert_because="it is no streamOptimized VMDK")
        raise
    populated = sum(len(d) for _o, d in reader.grains())  # a damaged stream raises: no fix
    version = reader.header.version
    return _Disk(ref, reader.capacity, populated,
                 None if version == 3 else f"its header has version {version}")


def _convert_member(package: Package, ref: DiskRef, folder: str) -> str:
    """The disk converted to a version 3 streamOptimized file in ``folder``."""
    from ..convert import convert

    _ref, member = package.find_disk(ref.member)
    extracted = os.path.join(folder, f".extracted-{ref.index}.vmdk")
    with open(extracted, "wb") as out, package.open_disk(ref, member) as src:
        while chunk := src.read(4 << 20):
            out.write(chunk)
    done = os.path.join(folder, f".converted-{ref.index}.vmdk")
    convert(extracted, done, src_format="vmdk", subformat="streamOptimized",
            adapter_type="lsilogic", durable=False)
    os.unlink(extracted)
    return done


# -------------------------------------------------------------------------- the fix


def fix(src: str | os.PathLike[str], out: str | os.PathLike[str] | None, target_name: str, *,
        signer: Signer | None = None, check_only: bool = False,
        progress: Callable[[int], None] | None = None) -> FixReport:
    """Fix ``src`` for ``target_name`` into ``out`` (with ``check_only``, only report)."""
    src = os.fspath(src)
    tgt = target(target_name)
    report = FixReport(src, tgt.name)
    found = verify(src, read_disks=False)
    report.changes.extend(Change(f.rule, f"fixed: {f.message}", f.member) for f in found.findings
                          if f.rule in _REWRITTEN and f.severity != "note")
    report.left.extend(f for f in found.findings if f.severity == "error"
                       and f.rule not in _REWRITTEN | _MENDED)
    with Package(src) as package:
        env, ovf_member, descriptor = _descriptor(package)
        editor = _Editor(env, tgt, report.changes)
        editor.for_target()
        disks = _plan_disks(package, env, editor)
        if check_only or out is None:
            return report
        _write(package, env, ovf_member, descriptor, editor, disks, os.fspath(out), tgt,
               signer, report)
    return report


def plan_for_target(path: str, target_name: str) -> FixReport:
    """What ``fix --target`` would change in the descriptor, nothing written."""
    tgt = target(target_name)
    report = FixReport(path, tgt.name)
    with Package(path) as package:
        env, _member, _data = _descriptor(package)
        _Editor(env, tgt, report.changes).for_target()
    return report


def _descriptor(package: Package) -> tuple[ovf.Envelope, str, bytes]:
    member = package.descriptor_member()
    if member is None:
        raise VmdkError("the package holds no OVF descriptor: nothing to fix it from",
                        package.path)
    data = package.read(member, ovf.MAX_OVF_SIZE)
    return ovf.parse(data, member.name), member.name, data


def _plan_disks(package: Package, env: ovf.Envelope, editor: _Editor) -> list[_Disk]:
    """Read every disk through; note the conversions and corrections needed."""
    disks = []
    for ref in package.disks():
        d = _read_disk(package, ref)
        if d.convert_because:
            editor.change("disk-version" if "version" in d.convert_because else "disk-format",
                          "converted to a version 3 streamOptimized disk "
                          f"({d.convert_because}); its content stays as it is", ref.member)
        disk = env.disk(ref.disk_id) if ref.disk_id else None
        if disk is not None and not d.convert_because:
            editor.set_disk(disk, d.capacity, d.populated, ref.member)
        disks.append(d)
    return disks


def _write(package: Package, env: ovf.Envelope, ovf_member: str, descriptor: bytes,
           editor: _Editor, disks: list[_Disk], out: str, tgt: Target, signer: Signer | None,
           report: FixReport) -> None:
    from .._output import StagedOutput
    from ..image import io_errors

    with io_errors(out):
        stage = StagedOutput(out, overwrite=True, image=False)
    with stage, io_errors(out):
        folder = os.path.dirname(stage.path)
        for d in disks:
            if d.convert_because:
                d.path = _convert_member(package, d.ref, folder)
                disk = env.disk(d.ref.disk_id) if d.ref.disk_id else None
                if disk is not None:
                    editor.set_disk(disk, *measure(d.path), d.ref.member)
        files = _files_in_order(package, env, editor, disks)
        name = os.path.splitext(os.path.basename(ovf_member))[0]
        if editor.edited and env.root is not None:
            descriptor = ovf.serialize(env.root, env.prefixes)
        algorithm = _algorithm(package, tgt, report)
        signer = _signer(package, signer, report)
        with open(stage.path, "wb") as f:
            _write_tar(f, package, name, descriptor, files, algorithm, signer)
            f.flush()
            os.fsync(f.fileno())
        stage.commit()
    report.written = out


def _files_in_order(package: Package, env: ovf.Envelope, editor: _Editor,
                    disks: list[_Disk]) -> list[tuple[str, str, str | None]]:
    """(member name, source member, converted path) of every file, References order first,
    then members nobody references (but the descriptor, manifest and certificate)."""
    converted = {d.ref.member: d.path for d in disks if d.path}
    out = []
    for f in env.files:
        href = os.path.basename(f.href)
        path = converted.get(f.href)
        member = package.member(f.href)
        if member is None:
            continue  # verify reports it; nothing to write
        size = os.path.getsize(path) if path else member.size
        editor.set_file(f, href, size, None if path else f.compression)
        out.append((href, f.href, path))
    listed = {f.href for f in env.files} | editor.dropped_members
    for m in package.all_members():
        if m.is_file and m.name not in listed and not m.name.lower().endswith(
                (".ovf", ".mf", ".cert")):
            out.append((os.path.basename(m.name), m.name, None))
    return out


def _algorithm(package: Package, tgt: Target, report: FixReport) -> str:
    """The manifest's own algorithm when the target takes it, else the target's first."""
    mf = next((m for m in package.members() if m.is_file and m.name.lower().endswith(".mf")),
              None)
    if mf is not None:
        entries, _junk = manifest.parse(package.read(mf, manifest.MAX_SIZE).decode(
            "utf-8", "replace"))
        used = {e.algorithm for e in entries}
        if len(used) == 1 and used <= set(tgt.algorithms):
            return str(used.pop())
        report.changes.append(Change("manifest-algorithm", f"written in {tgt.algorithms[0]} "
                                     f"({tgt.name} takes {', '.join(tgt.algorithms)})",
                                     mf.name))
    return tgt.algorithms[0]


def _signer(package: Package, signer: Signer | None, report: FixReport) -> Signer | None:
    had = any(m.is_file and m.name.lower().endswith(".cert") for m in package.members())
    if signer is not None:
        report.changes.append(Change("signature", "signed again with the key given" if had
                                     else "signed with the key given"))
    elif had:
        report.changes.append(Change("signature", "the certificate is left out: the manifest "
                                     "is written anew, and no key was given to sign it again"))
    return signer


def _write_tar(out: IO[bytes], package: Package, name: str, descriptor: bytes,
               files: list[tuple[str, str, str | None]], algorithm: str,
               signer: Signer | None) -> None:
    writer = DigestingWriter(out, algorithm)
    writer.add_bytes(f"{name}.ovf", descriptor)
    for member_name, source, path in files:
        if path is not None:
            writer.add_file(member_name, path)
            continue
        member = package.member(source)
        assert member is not None
        writer.add_stream(member_name, member.size, package.open(member))
    writer.finish(name, signer)


__all__ = ["Change", "FixReport", "fix", "plan_for_target"]
