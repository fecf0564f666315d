"""``vmdk ova create``: one virtual system and its disks, packaged as importers want it.

The appliance is described by :class:`Appliance` (from options, or from a
small YAML file through :func:`load_yaml`).  Disks are converted to
streamOptimized (header version 3) straight into the tar, one after another
(each conversion compresses on every core); a source that already is one is
checked and copied in as it is.  The package is ustar, the OVF first, files in
References order, then the manifest (SHA256 unless asked otherwise) and, when
a key is given, the certificate.  It appears under its name only when whole.

The OVF at the front gives each disk's size, known only once it is made.  A
local package is written in one pass: room is kept for the OVF and for each
disk's tar header, and both are written there at the end (the OVF padded with
trailing blanks to the room kept, which XML allows).  A package uploaded to a
URL is written front to back, with no local copy: each disk is converted once
to learn its size and again into the upload (the output is the same bytes
every time), at twice the compression work.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

from .._structs import SECTOR_SIZE, SparseFlags, SparseHeader
from ..errors import VmdkError
from . import manifest, ovf
from .ovf import OVF_NS, RASD_NS, VMW_NS, VSSD_NS, ResourceType

#: Network adapter models importers know (VMware's spelling, which VirtualBox reads too).
ADAPTERS = {"e1000": "E1000", "e1000e": "E1000e", "vmxnet3": "VmxNet3", "pcnet32": "PCNet32"}
FIRMWARES = ("bios", "efi")
#: Devices a controller of each bus takes (SCSI: 15, unit 7 being the controller's own).
SLOTS = {"ide": 2, "sata": 30, "scsi": 15, "nvme": 15}
#: The hardware version that first has each feature (vSphere's compatibility tables).
NEEDS_HARDWARE = {"nvme": 13, "secure boot": 13, "efi": 7}
DEFAULT_HARDWARE_VERSION = 14  # ESXi 6.7, Workstation 14: what nearly every importer takes
MAX_HARDWARE_VERSION = 21
_NAME = re.compile(r"[^/\\\"\x00-\x1f]+")


@dataclass
class Controller:
    id: str
    model: str = "lsilogic"  # a key of ovf.CONTROLLER_MODELS


@dataclass
class Disk:
    source: str
    controller: str | None = None  # a Controller.id; the first controller when None
    format: str | None = None  # "raw" or "vmdk"; detected when None


@dataclass
class Nic:
    network: str = "VM Network"
    adapter: str = "e1000"  # every importer has one (VirtualBox has no vmxnet3)


@dataclass
class Appliance:
    """What ``create`` packages: one virtual system and its disks."""

    name: str
    disks: list[Disk]
    cpus: int = 1
    memory_mib: int = 1024
    firmware: str = "bios"
    secure_boot: bool = False
    hardware_version: int = DEFAULT_HARDWARE_VERSION
    os_type: str = "otherGuest64"
    os_id: int = 102  # CIM "Other 64-Bit"
    controllers: list[Controller] = field(default_factory=lambda: [Controller("scsi0")])
    nics: list[Nic] = field(default_factory=lambda: [Nic()])
    product: ovf.Product | None = None
    extra_config: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse what no importer would take, before any disk is converted."""
        if not _NAME.fullmatch(self.name) or not self.name.isprintable():
            raise VmdkError(f"the VM name {self.name!r} cannot name files (no slashes, quotes "
                            "or control characters)")
        if self.cpus < 1 or self.memory_mib < 1:
            raise VmdkError(f"a VM needs at least one CPU and 1 MB of memory ({self.cpus} CPUs,"
                            f" {self.memory_mib} MB asked for)")
        if self.firmware not in FIRMWARES:
            raise VmdkError(f"firmware {self.firmware!r} is not bios or efi")
        if self.secure_boot and self.firmware != "efi":
            raise VmdkError("secure boot needs EFI firmware")
        if not 4 <= self.hardware_version <= MAX_HARDWARE_VERSION:
            raise VmdkError(f"hardware version {self.hardware_version} is not one of 4-"
                            f"{MAX_HARDWARE_VERSION}")
        if not self.disks:
            raise VmdkError("a package needs at least one disk")
        self._check_devices()
        self._check_hardware_version()

    def _check_devices(self) -> None:
        ids = [c.id for c in self.controllers]
        if not ids or len(set(ids)) != len(ids):
            raise VmdkError("controllers need distinct ids, and there must be one")
        for c in self.controllers:
            if c.model not in ovf.CONTROLLER_MODELS:
                raise VmdkError(f"controller {c.id}: unknown model {c.model!r} (one of "
                                f"{', '.join(ovf.CONTROLLER_MODELS)})")
        for c in self.controllers:
            bus = ovf.CONTROLLER_MODELS[c.model].bus
            attached = sum(self.controller_of(d).id == c.id for d in self.disks)
            if attached > SLOTS[bus]:
                raise VmdkError(f"controller {c.id} ({c.model}) takes {SLOTS[bus]} disks, "
                                f"not {attached}")
        for nic in self.nics:
            if nic.adapter.lower() not in ADAPTERS:
                raise VmdkError(f"unknown network adapter {nic.adapter!r} (one of "
                                f"{', '.join(ADAPTERS)})")

    def _check_hardware_version(self) -> None:
        wanted = [("nvme", any(c.model == "nvme" for c in self.controllers)),
                  ("secure boot", self.secure_boot), ("efi", self.firmware == "efi")]
        for feature, used in wanted:
            if used and self.hardware_version < NEEDS_HARDWARE[feature]:
                raise VmdkError(f"{feature} needs hardware version "
                                f"{NEEDS_HARDWARE[feature]} or later, not "
                                f"{self.hardware_version}")

    def controller_of(self, disk: Disk) -> Controller:
        if disk.controller is None:
            return self.controllers[0]
        found = next((c for c in self.controllers if c.id == disk.controller), None)
        if found is None:
            raise VmdkError(f"disk {disk.source}: no controller {disk.controller!r}")
        return found


# -------------------------------------------------------------------------- YAML


def load_yaml(path: str) -> Appliance:
    """An appliance described in YAML (see the README); disk paths are relative to it."""
    import importlib

    try:
        yaml: Any = importlib.import_module("yaml")  # an optional dependency, untyped
    except ImportError:
        raise VmdkError("YAML descriptions need PyYAML: pip install 'vmdk[ova]'") from None
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise VmdkError(f"not valid YAML ({exc})", path) from exc
    if not isinstance(data, dict):
        raise VmdkError("the description must be a mapping (name: ..., disks: ...)", path)
    try:
        return appliance_from_dict(data, os.path.dirname(os.path.abspath(path)))
    except (KeyError, TypeError, ValueError) as exc:
        raise VmdkError(f"the description is not understood ({exc!r})", path) from exc


_KEYS = {"name", "cpus", "memory", "firmware", "secure-boot", "hardware-version", "os-type",
         "os-id", "controllers", "disks", "networks", "product", "extra-config"}


def appliance_from_dict(data: dict[str, Any], folder: str = ".") -> Appliance:
    unknown = set(data) - _KEYS
    if unknown:
        raise VmdkError(f"unknown keys {', '.join(sorted(unknown))} (known: "
                        f"{', '.join(sorted(_KEYS))})")
    disks = [Disk(os.path.join(folder, str(d["source"])), d.get("controller"), d.get("format"))
             if isinstance(d, dict) else Disk(os.path.join(folder, str(d)))
             for d in data.get("disks", [])]
    app = Appliance(name=str(data["name"]), disks=disks, cpus=int(data.get("cpus", 1)),
                    memory_mib=int(data.get("memory", 1024)),
                    firmware=str(data.get("firmware", "bios")),
                    secure_boot=bool(data.get("secure-boot", False)),
                    hardware_version=int(data.get("hardware-version",
                                                  DEFAULT_HARDWARE_VERSION)),
                    os_type=str(data.get("os-type", "otherGuest64")),
                    os_id=int(data.get("os-id", 102)),
                    extra_config={str(k): _config_text(v)
                                  for k, v in (data.get("extra-config") or {}).items()})
    if "controllers" in data:
        app.controllers = [Controller(str(c["id"]), str(c.get("model", "lsilogic")))
                           for c in data["controllers"]]
    if "networks" in data:
        app.nics = [Nic(str(n["network"]), str(n.get("adapter", "e1000")))
                    if isinstance(n, dict) else Nic(str(n)) for n in data["networks"] or []]
    if data.get("product"):
        p = data["product"]
        app.product = ovf.Product(str(p.get("name", "")), str(p.get("vendor", "")),
                                  str(p.get("version", "")), str(p.get("full-version", "")),
                                  {str(k): _config_text(v)
                                   for k, v in (p.get("properties") or {}).items()})
    return app


def _config_text(value: object) -> str:
    """YAML's true/false as VMware writes them; anything else as text."""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    return str(value)


# -------------------------------------------------------------------------- disks


@dataclass
class PackedDisk:
    """A disk ready to go into the tar: its streamOptimized file and what the OVF says."""

    path: str
    member: str
    capacity: int
    populated: int
    size: int  # of the file, as ovf:size tells it


def is_stream_v3(path: str) -> bool:
    """Whether ``path`` is a streamOptimized VMDK of header version 3, as importers want:
    then it goes into the package as it is."""
    try:
        with open(path, "rb") as f:
            header = SparseHeader.unpack(f.read(SECTOR_SIZE))
    except (OSError, ValueError, struct.error):
        return False
    return (header.version == 3 and header.has(SparseFlags.COMPRESSED)
            and header.has(SparseFlags.MARKERS))


def measure(path: str, **open_args: Any) -> tuple[int, int]:
    """(virtual size, bytes of data stored) of a VMDK."""
    from ..image import Image

    with Image.open(path, **open_args) as image:
        if image.info()["format-specific"]["data"]["create-type"] != "streamOptimized":
            raise VmdkError("not a streamOptimized disk", path)
        return image.size, sum(r.length for r in image.map() if r.data)


def _as_is(app: Appliance, **open_args: Any) -> list[PackedDisk | None]:
    """Each disk that goes into the package as it is (a v3 stream), measured; None for the
    disks to convert."""
    packed: list[PackedDisk | None] = []
    for n, disk in enumerate(app.disks, 1):
        if disk.format != "raw" and is_stream_v3(disk.source):
            capacity, populated = measure(disk.source, **open_args)
            packed.append(PackedDisk(disk.source, _member(app, n), capacity, populated,
                                     os.path.getsize(disk.source)))
        else:
            packed.append(None)
    return packed


def _member(app: Appliance, n: int) -> str:
    return f"{app.name}-disk{n}.vmdk"


# -------------------------------------------------------------------------- the OVF


def _el(parent: ET.Element, tag: str, text: str | None = None,
        attrib: dict[str, str] | None = None) -> ET.Element:
    e = ET.SubElement(parent, tag, attrib or {})
    if text is not None:
        e.text = text
    return e


def _ovf(local: str) -> str:
    return f"{{{OVF_NS}}}{local}"


def _item(hardware: ET.Element, fields: dict[str, str | None],
          config: Iterable[tuple[str, str]] = ()) -> None:
    """An Item, its rasd elements in the schema's (alphabetical) order."""
    item = _el(hardware, _ovf("Item"))
    for key in sorted(k for k, v in fields.items() if v is not None):
        _el(item, f"{{{RASD_NS}}}{key}", fields[key])
    for key, value in config:
        _el(item, f"{{{VMW_NS}}}Config", attrib={_ovf("required"): "false",
                                                 f"{{{VMW_NS}}}key": key,
                                                 f"{{{VMW_NS}}}value": value})


def describe(app: Appliance, disks: list[PackedDisk]) -> bytes:
    """The OVF descriptor of ``app`` whose disks are packed as ``disks``."""
    root = ET.Element(_ovf("Envelope"))
    refs = _el(root, _ovf("References"))
    section = _el(root, _ovf("DiskSection"))
    _el(section, _ovf("Info"), "Virtual disk information")
    for n, d in enumerate(disks, 1):
        _el(refs, _ovf("File"), attrib={_ovf("href"): d.member, _ovf("id"): f"file{n}",
                                        _ovf("size"): str(d.size)})
        _el(section, _ovf("Disk"), attrib={
            _ovf("capacity"): str(d.capacity), _ovf("capacityAllocationUnits"): "byte",
            _ovf("diskId"): f"vmdisk{n}", _ovf("fileRef"): f"file{n}",
            _ovf("format"): ovf.STREAM_OPTIMIZED, _ovf("populatedSize"): str(d.populated)})
    if app.nics:
        nets = _el(root, _ovf("NetworkSection"))
        _el(nets, _ovf("Info"), "The logical networks")
        for name in dict.fromkeys(n.network for n in app.nics):
            net = _el(nets, _ovf("Network"), attrib={_ovf("name"): name})
            _el(net, _ovf("Description"), f"The {name} network")
    _system(root, app)
    ET.indent(root)
    return ovf.serialize(root)


def _system(root: ET.Element, app: Appliance) -> None:
    system = _el(root, _ovf("VirtualSystem"), attrib={_ovf("id"): app.name})
    _el(system, _ovf("Info"), "A virtual machine")
    _el(system, _ovf("Name"), app.name)
    if app.product is not None:
        _product(system, app.product)
    os_section = _el(system, _ovf("OperatingSystemSection"),
                     attrib={_ovf("id"): str(app.os_id), f"{{{VMW_NS}}}osType": app.os_type})
    _el(os_section, _ovf("Info"), "The kind of installed guest operating system")
    hardware = _el(system, _ovf("VirtualHardwareSection"))
    _el(hardware, _ovf("Info"), "Virtual hardware requirements")
    vssd = _el(hardware, _ovf("System"))
    for key, value in (("ElementName", "Virtual Hardware Family"), ("InstanceID", "0"),
                       ("VirtualSystemIdentifier", app.name),
                       ("VirtualSystemType", f"vmx-{app.hardware_version:02d}")):
        _el(vssd, f"{{{VSSD_NS}}}{key}", value)
    _hardware_items(hardware, app)
    for key, value in app.extra_config.items():
        _el(hardware, f"{{{VMW_NS}}}ExtraConfig", attrib={
            _ovf("required"): "false", f"{{{VMW_NS}}}key": key, f"{{{VMW_NS}}}value": value})
    config = {"firmware": app.firmware}
    if app.firmware == "efi":
        config["bootOptions.efiSecureBootEnabled"] = "true" if app.secure_boot else "false"
    for key, value in config.items():
        _el(hardware, f"{{{VMW_NS}}}Config", attrib={
            _ovf("required"): "false", f"{{{VMW_NS}}}key": key, f"{{{VMW_NS}}}value": value})


def _hardware_items(hardware: ET.Element, app: Appliance) -> None:
    ids = iter(range(1, 1 << 16))
    _item(hardware, {"AllocationUnits": "hertz * 10^6", "Description": "Number of virtual CPUs",
                     "ElementName": f"{app.cpus} virtual CPU(s)", "InstanceID": str(next(ids)),
                     "ResourceType": str(ResourceType.PROCESSOR),
                     "VirtualQuantity": str(app.cpus)})
    _item(hardware, {"AllocationUnits": "byte * 2^20", "Description": "Memory size",
                     "ElementName": f"{app.memory_mib} MB of memory",
                     "InstanceID": str(next(ids)), "ResourceType": str(ResourceType.MEMORY),
                     "VirtualQuantity": str(app.memory_mib)})
    buses: dict[str, int] = {}
    instance = {}
    for c in app.controllers:
        kind = ovf.CONTROLLER_MODELS[c.model]
        address = buses.get(kind.bus, 0)
        buses[kind.bus] = address + 1
        instance[c.id] = str(next(ids))
        _item(hardware, {"Address": str(address), "Description": f"{kind.bus.upper()} "
                         "controller", "ElementName": f"{kind.bus.upper()} controller "
                         f"{address}", "InstanceID": instance[c.id],
                         "ResourceSubType": kind.vmware or None,
                         "ResourceType": str(kind.resource_type)})
    slots: dict[str, int] = {}
    for n, d in enumerate(app.disks, 1):
        c = app.controller_of(d)
        slot = slots.get(c.id, 0)
        slot += slot == 7 and ovf.CONTROLLER_MODELS[c.model].bus == "scsi"  # the HBA's own
        slots[c.id] = slot + 1
        _item(hardware, {"AddressOnParent": str(slot), "ElementName": f"Hard disk {n}",
                         "HostResource": f"ovf:/disk/vmdisk{n}", "InstanceID": str(next(ids)),
                         "Parent": instance[c.id], "ResourceType": str(ResourceType.DISK)})
    for n, nic in enumerate(app.nics, 1):
        _item(hardware, {"AddressOnParent": str(n + 6), "AutomaticAllocation": "true",
                         "Connection": nic.network, "ElementName": f"Network adapter {n}",
                         "InstanceID": str(next(ids)),
                         "ResourceSubType": ADAPTERS[nic.adapter.lower()],
                         "ResourceType": str(ResourceType.ETHERNET)})


def _product(system: ET.Element, product: ovf.Product) -> None:
    section = _el(system, _ovf("ProductSection"))
    _el(section, _ovf("Info"), "Information about the installed software")
    for local, value in (("Product", product.product), ("Vendor", product.vendor),
                         ("Version", product.version), ("FullVersion", product.full_version)):
        if value:
            _el(section, _ovf(local), value)
    for key, value in product.properties.items():
        _el(section, _ovf("Property"), attrib={_ovf("key"): key, _ovf("type"): "string",
                                               _ovf("value"): value})


# -------------------------------------------------------------------------- the package


@dataclass
class Signer:
    key_pem: bytes
    cert_pem: bytes

    @classmethod
    def from_files(cls, key: str, cert: str | None = None) -> Signer:
        """The key and certificate from PEM files (one file may hold both)."""
        with open(key, "rb") as f:
            key_pem = f.read()
        if cert is None:
            return cls(key_pem, key_pem)
        with open(cert, "rb") as f:
            return cls(key_pem, f.read())


T = TypeVar("T")


class DigestingWriter:
    """The tar's writer, taking each member's digest on the way."""

    def __init__(self, out: IO[bytes], algorithm: str) -> None:
        from .tar import TarWriter

        self.tar = TarWriter(out)
        self.algorithm = algorithm
        self.digests: list[tuple[str, str]] = []
        self._reserved: dict[int, tuple[int, int]] = {}  # digest slot -> (offset, size)

    def add_bytes(self, name: str, data: bytes) -> None:
        digest = manifest.hasher(self.algorithm)
        digest.update(data)
        self.tar.add_bytes(name, data)
        self.digests.append((name, digest.hexdigest()))

    def add_file(self, name: str, path: str) -> None:
        with open(path, "rb") as f:
            self.add_stream(name, os.fstat(f.fileno()).st_size, f)

    def add_stream(self, name: str, size: int, src: IO[bytes]) -> None:
        """A member of ``size`` bytes read from ``src`` (which must hold them all)."""
        def copy(sink: _MemberSink) -> None:
            while chunk := src.read(min(4 << 20, size - sink.written)):
                sink.write(chunk)

        self.add_made(name, size, copy)

    def add_made(self, name: str, size: int | None, make: Callable[[_MemberSink], T]) -> T:
        """A member whose data ``make`` writes to the file object it is given; returns what
        ``make`` does.  ``size`` None: as many bytes as it writes (the output must seek).
        Other sizes raise :class:`~vmdk.ova.tar.MemberSizeError` when the data differs."""
        sink = _MemberSink(self.tar, manifest.hasher(self.algorithm))
        if size is None:
            self.tar.begin_unsized(name)
        else:
            self.tar.begin(name, size)
        made = make(sink)
        self.tar.end()  # raises when the data came short
        self.digests.append((name, sink.hexdigest()))
        return made

    def reserve(self, name: str, size: int) -> int:
        """Room for a member of ``size`` bytes that :meth:`fill` writes later (the output
        must seek); returns its slot."""
        self._reserved[len(self.digests)] = (self.tar.reserve(name, size), size)
        self.digests.append((name, ""))
        return len(self.digests) - 1

    def fill(self, slot: int, data: bytes) -> None:
        at, size = self._reserved.pop(slot)
        if len(data) != size:
            raise ValueError(f"{self.digests[slot][0]}: {len(data)} bytes for the {size} kept")
        self.tar.fill(at, data)
        digest = manifest.hasher(self.algorithm)
        digest.update(data)
        self.digests[slot] = (self.digests[slot][0], digest.hexdigest())

    def finish(self, name: str, signer: Signer | None = None) -> None:
        """The manifest of every member so far (``name``.mf), the certificate when signed,
        and the end of the archive."""
        assert not self._reserved, "a reserved member was never filled"
        mf = manifest.format_manifest(self.algorithm, self.digests)
        self.tar.add_bytes(f"{name}.mf", mf)
        if signer is not None:
            self.tar.add_bytes(f"{name}.cert", manifest.sign(
                mf, f"{name}.mf", signer.key_pem, signer.cert_pem, self.algorithm))
        self.tar.close()


class _MemberSink:
    """The write-only file object a member's data goes through: tarred, counted, digested.

    Large ``bytes`` are digested on a thread of their own while the next are made and
    written (hashlib lets go of the GIL); one at a time, so in order.
    """

    def __init__(self, tar: Any, digest: Any) -> None:
        self.tar, self._digest = tar, digest
        self.written = 0
        self._hashing: Future[None] | None = None

    def write(self, data: bytes | memoryview) -> int:
        self.tar.write(data)
        self.written += len(data)
        self._wait()
        if isinstance(data, bytes) and len(data) >= _HASH_APART:
            self._hashing = _hasher().submit(self._digest.update, data)
        else:
            self._digest.update(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is held here."""

    def hexdigest(self) -> str:
        self._wait()
        return str(self._digest.hexdigest())

    def _wait(self) -> None:
        if self._hashing is not None:
            hashing, self._hashing = self._hashing, None
            hashing.result()


#: Writes at least this large are digested apart from the writing thread.
_HASH_APART = 1 << 18
_hashers: list[ThreadPoolExecutor] = []


def _hasher() -> ThreadPoolExecutor:
    if not _hashers:
        _hashers.append(ThreadPoolExecutor(1, thread_name_prefix="vmdk-digest"))
    return _hashers[0]


class _Counter:
    """A write-only file object that only counts: a conversion's first, measuring pass."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes | memoryview) -> int:
        self.written += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is held here."""


def write_package(out: IO[bytes], name: str, descriptor: bytes, files: list[tuple[str, str]],
                  algorithm: str = manifest.DEFAULT_ALGORITHM, signer: Signer | None = None
                  ) -> None:
    """OVF first, then ``files`` (member name, path) in that order, the manifest and the
    certificate last."""
    writer = DigestingWriter(out, algorithm)
    writer.add_bytes(f"{name}.ovf", descriptor)
    for member, path in files:
        writer.add_file(member, path)
    writer.finish(name, signer)


@dataclass
class _Packing:
    """What packing one appliance needs to know, shared by both ways of writing it."""

    app: Appliance
    algorithm: str
    signer: Signer | None
    compression_level: int
    progress: Callable[[int], None] | None
    open_args: dict[str, Any]

    def convert(self, n: int, out: Any) -> PackedDisk:
        """Disk ``n`` (from 1) converted into ``out``, which counts what it is given."""
        from ..convert import convert_to_stream

        disk, member = self.app.disks[n - 1], _member(self.app, n)
        made = convert_to_stream(disk.source, out, name=member, src_format=disk.format,
                                 progress=self.progress, adapter_type="lsilogic",
                                 compression_level=self.compression_level, **self.open_args)
        return PackedDisk(disk.source, member, made.capacity, made.populated, out.written)


def create_ova(app: Appliance, ova: str | os.PathLike[str], *,
               algorithm: str = manifest.DEFAULT_ALGORITHM, signer: Signer | None = None,
               compression_level: int = 1, progress: Callable[[int], None] | None = None,
               allow_external: bool = False, force_share: bool = False) -> None:
    """Package ``app`` as the OVA ``ova``; it appears only when whole.

    ``ova`` may be a URL (``s3://...``): the package is then uploaded as it is
    written (see :func:`vmdk.remote.upload`), with no local copy; each disk to
    convert is then converted twice (see the module's notes).
    """
    from .._access import is_url
    from .._output import StagedOutput
    from ..image import io_errors

    ova = os.fspath(ova)
    app.check()
    packing = _Packing(app, manifest.check_algorithm(algorithm), signer, compression_level,
                       progress, {"allow_external": allow_external, "force_share": force_share})
    if is_url(ova):
        _upload_ova(packing, ova)
        return
    with io_errors(ova):
        stage = StagedOutput(ova, overwrite=True, image=False)
    with stage, io_errors(ova):
        with open(stage.path, "wb") as out:
            _write_in_one_pass(packing, out)
            out.flush()
            os.fsync(out.fileno())
        stage.commit()


#: Stands for every number the OVF takes from a disk not made yet: no size has more digits.
_LONGEST_NUMBER = 10 ** 19


def _write_in_one_pass(packing: _Packing, out: IO[bytes]) -> None:
    """The package, disks converted straight into it; the OVF and the disks' tar headers
    are written where room was kept for them, once the disks are made."""
    app = packing.app
    writer = DigestingWriter(out, packing.algorithm)
    as_is = _as_is(app, **packing.open_args)
    room = len(describe(app, [p or PackedDisk("", _member(app, n), *[_LONGEST_NUMBER] * 3)
                              for n, p in enumerate(as_is, 1)]))
    slot = writer.reserve(f"{app.name}.ovf", room)
    packed = []
    for n, known in enumerate(as_is, 1):
        if known is not None:
            writer.add_file(known.member, known.path)
            packed.append(known)
        else:
            packed.append(writer.add_made(_member(app, n), None,
                                          functools.partial(packing.convert, n)))
    writer.fill(slot, _padded(describe(app, packed), room))
    writer.finish(app.name, packing.signer)


def _padded(descriptor: bytes, size: int) -> bytes:
    """``descriptor`` made ``size`` bytes long by blanks after its root element."""
    return descriptor.rstrip(b"\n").ljust(size - 1) + b"\n"


def _upload_ova(packing: _Packing, url: str) -> None:
    """``create_ova`` to a URL, front to back: the disks to convert are converted once to
    learn their sizes for the OVF at the front, then again into the upload."""
    from .._output import output_errors
    from ..remote import upload
    from .tar import MemberSizeError

    app = packing.app
    as_is = _as_is(app, **packing.open_args)
    packed = [known or packing.convert(n, _Counter()) for n, known in enumerate(as_is, 1)]
    with upload(url, overwrite=True) as out, output_errors(url):
        writer = DigestingWriter(out, packing.algorithm)
        writer.add_bytes(f"{app.name}.ovf", describe(app, packed))
        for n, (known, expected) in enumerate(zip(as_is, packed, strict=True), 1):
            if known is not None:
                writer.add_file(known.member, known.path)
                continue
            made: PackedDisk | None = None
            with contextlib.suppress(MemberSizeError):
                made = writer.add_made(expected.member, expected.size,
                                       functools.partial(packing.convert, n))
            if made != expected:
                raise VmdkError("changed while the package was made: its second conversion "
                                "differs from the first", expected.path)
        writer.finish(app.name, packing.signer)


def export_ova(src: str | os.PathLike[str], ova: str | os.PathLike[str], *,
               name: str | None = None, cpus: int = 1, memory_mb: int = 1024,
               compression_level: int = 1, progress: Callable[[int], None] | None = None,
               allow_external: bool = False, force_share: bool = False) -> None:
    """Package the disk ``src`` (raw or any VMDK) as an OVA: ``create`` with one disk."""
    ova = os.fspath(ova)
    stem = name or os.path.splitext(os.path.basename(ova))[0]
    app = Appliance(stem, [Disk(os.fspath(src))], cpus=cpus, memory_mib=memory_mb)
    create_ova(app, ova, compression_level=compression_level, progress=progress,
               allow_external=allow_external, force_share=force_share)


def build_ovf(name: str, disk_file: str, disk_file_size: int, capacity: int, populated: int, *,
              cpus: int = 1, memory_mb: int = 1024,
              hardware_version: int = DEFAULT_HARDWARE_VERSION) -> bytes:
    """The descriptor of a one-disk package whose disk is already made (the fuzzer lays
    packages out by hand with it)."""
    app = Appliance(name, [Disk(disk_file)], cpus=cpus, memory_mib=memory_mb,
                    hardware_version=hardware_version)
    return describe(app, [PackedDisk(disk_file, disk_file, capacity, populated,
                                     disk_file_size)])


__all__ = ["Appliance", "Controller", "DigestingWriter", "Disk", "Nic", "PackedDisk", "Signer",
           "appliance_from_dict", "build_ovf", "create_ova", "describe", "export_ova",
           "is_stream_v3", "load_yaml", "measure", "write_package"]
