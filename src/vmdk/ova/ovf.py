"""The OVF descriptor: a model of what importers read, parsed from XML and written back.

Only the parts importers act on are modelled (files, disks, networks, and per
virtual system its CPUs, memory, firmware, controllers, disks, network
adapters, product sections and extra configuration).  Each parsed piece keeps
its XML element, so :mod:`vmdk.ova.fix` edits the document in place and
everything not modelled is written back as it came, under its own namespace
prefixes.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ..errors import CorruptImageError

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
#: The prefixes ovftool uses; a parsed document keeps its own.
PREFIXES = {"ovf": OVF_NS, "cim": "http://schemas.dmtf.org/wbem/wscim/1/common",
            "rasd": RASD_NS, "vmw": VMW_NS, "vssd": VSSD_NS,
            "xsi": "http://www.w3.org/2001/XMLSchema-instance"}
_XML_NS = "http://www.w3.org/XML/1998/namespace"
#: OVF 2.x envelopes are read too: same element names, another namespace.
ENVELOPE_NAMESPACES = (OVF_NS, "http://schemas.dmtf.org/ovf/envelope/2")
STREAM_OPTIMIZED = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
#: A descriptor larger than this is no descriptor (importers read it into memory too).
MAX_OVF_SIZE = 16 << 20


class ResourceType:
    """CIM resource types of hardware items (CIM_ResourceAllocationSettingData)."""

    OTHER = 1
    PROCESSOR = 3
    MEMORY = 4
    IDE = 5
    SCSI = 6
    ETHERNET = 10
    FLOPPY = 14
    CD = 15
    DVD = 16
    DISK = 17
    OTHER_STORAGE = 20
    USB = 23
    GRAPHICS = 24
    SOUND = 35
    #: The first vendor-reserved type: VMware writes its NVRAM item so.
    VENDOR = 32768


@dataclass(frozen=True)
class ControllerKind:
    """One storage controller model and how each family of importers spells it."""

    bus: str  # ide, sata, scsi, nvme
    model: str  # the name used on our command line and in findings
    resource_type: int
    vmware: str  # ResourceSubType as VMware writes it ("" for none)
    virtualbox: str  # as VirtualBox writes it
    other_spellings: tuple[str, ...] = ()


#: Every controller model known here, declared once (classification, building, mapping).
CONTROLLERS = (
    ControllerKind("ide", "ide", ResourceType.IDE, "", "PIIX4", ("piix3",)),
    ControllerKind("scsi", "lsilogic", ResourceType.SCSI, "lsilogic", "lsilogic"),
    ControllerKind("scsi", "lsilogicsas", ResourceType.SCSI, "lsilogicsas", "LsiLogicSas",
                   ("lsisas1068",)),
    ControllerKind("scsi", "pvscsi", ResourceType.SCSI, "VirtualSCSI", "VirtualSCSI"),
    ControllerKind("scsi", "buslogic", ResourceType.SCSI, "buslogic", "buslogic"),
    ControllerKind("sata", "ahci", ResourceType.OTHER_STORAGE, "vmware.sata.ahci", "AHCI"),
    ControllerKind("nvme", "nvme", ResourceType.OTHER_STORAGE, "vmware.nvme.controller", "NVMe"),
)
CONTROLLER_MODELS = {k.model: k for k in CONTROLLERS}
_BY_SUBTYPE = {(k.resource_type, s.lower()): k for k in CONTROLLERS
               for s in (k.vmware, k.virtualbox, *k.other_spellings)}
#: VirtualBox files its SAS controller under "other storage" too.
_BY_SUBTYPE[(ResourceType.OTHER_STORAGE, "lsilogicsas")] = CONTROLLER_MODELS["lsilogicsas"]


def controller_kind(resource_type: int, subtype: str) -> ControllerKind | None:
    """The controller an item describes, or None when it is no (known) controller."""
    if resource_type == ResourceType.IDE:
        return CONTROLLER_MODELS["ide"]
    return _BY_SUBTYPE.get((resource_type, subtype.lower()))


# ------------------------------------------------------------------------------- units

_NAMED_UNITS = {"byte": 1, "bytes": 1, "kilobytes": 1 << 10, "megabytes": 1 << 20,
                "gigabytes": 1 << 30, "terabytes": 1 << 40, "kb": 1 << 10, "mb": 1 << 20,
                "gb": 1 << 30, "tb": 1 << 40}


def unit_factor(units: str | None, default: int = 1) -> int:
    """Bytes per unit of a programmatic unit ("byte * 2^30", "MegaBytes")."""
    if not units:
        return default
    text = units.strip().lower()
    if text in _NAMED_UNITS:
        return _NAMED_UNITS[text]
    m = re.fullmatch(r"byte\s*\*\s*(\d+)\s*\^\s*(\d+)", text)
    if not m or int(m.group(2)) > 60:
        raise ValueError(f"unknown allocation units {units!r}")
    factor: int = int(m.group(1)) ** int(m.group(2))
    return factor


# ------------------------------------------------------------------------------- model


@dataclass
class FileRef:
    id: str
    href: str
    size: int | None = None
    compression: str | None = None
    chunk_size: int | None = None


@dataclass
class DiskDef:
    disk_id: str
    file_ref: str | None
    capacity: int | None  # in bytes
    capacity_units: str | None = None
    populated_size: int | None = None
    format: str | None = None
    element: ET.Element | None = field(default=None, repr=False, compare=False)


@dataclass
class Network:
    name: str
    description: str = ""


@dataclass
class Item:
    """A hardware item of a virtual system, as stored."""

    instance_id: str
    resource_type: int
    subtype: str = ""
    name: str = ""
    parent: str | None = None
    address: str | None = None
    address_on_parent: str | None = None
    host_resources: tuple[str, ...] = ()
    connection: str | None = None
    quantity: int | None = None
    units: str | None = None
    element: ET.Element | None = field(default=None, repr=False, compare=False)

    @property
    def controller(self) -> ControllerKind | None:
        return controller_kind(self.resource_type, self.subtype)


@dataclass
class Product:
    product: str = ""
    vendor: str = ""
    version: str = ""
    full_version: str = ""
    properties: dict[str, str] = field(default_factory=dict)


@dataclass
class VirtualSystem:
    id: str
    name: str = ""
    os_id: str | None = None
    os_type: str | None = None
    system_types: list[str] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    config: dict[str, str] = field(default_factory=dict)  # vmw:Config
    extra_config: dict[str, str] = field(default_factory=dict)  # vmw:ExtraConfig
    products: list[Product] = field(default_factory=list)
    system_type_elements: list[ET.Element] = field(default_factory=list, repr=False,
                                                   compare=False)
    hardware: ET.Element | None = field(default=None, repr=False, compare=False)

    def _quantity(self, resource_type: int) -> Item | None:
        return next((i for i in self.items if i.resource_type == resource_type), None)

    @property
    def cpus(self) -> int | None:
        item = self._quantity(ResourceType.PROCESSOR)
        return item.quantity if item else None

    @property
    def memory_mib(self) -> int | None:
        item = self._quantity(ResourceType.MEMORY)
        if item is None or item.quantity is None:
            return None
        return item.quantity * unit_factor(item.units, 1 << 20) >> 20

    @property
    def firmware(self) -> str:
        return self.config.get("firmware", "bios")

    @property
    def secure_boot(self) -> bool:
        return self.config.get("bootOptions.efiSecureBootEnabled", "false").lower() == "true"

    @property
    def hardware_version(self) -> int | None:
        """The highest vmx-NN the system names (VMware's virtual hardware version)."""
        found = [int(m.group(1)) for t in self.system_types
                 if (m := re.fullmatch(r"vmx-0*(\d+)", t))]
        return max(found) if found else None

    @property
    def controllers(self) -> list[Item]:
        return [i for i in self.items if i.controller is not None]

    def disks(self) -> list[Item]:
        return [i for i in self.items if i.resource_type == ResourceType.DISK]

    def nics(self) -> list[Item]:
        return [i for i in self.items if i.resource_type == ResourceType.ETHERNET]


@dataclass
class Envelope:
    files: list[FileRef] = field(default_factory=list)
    disks: list[DiskDef] = field(default_factory=list)
    networks: list[Network] = field(default_factory=list)
    systems: list[VirtualSystem] = field(default_factory=list)
    namespace: str = OVF_NS
    root: ET.Element | None = field(default=None, repr=False, compare=False)
    prefixes: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def file(self, file_id: str | None) -> FileRef | None:
        return next((f for f in self.files if f.id == file_id), None)

    def disk(self, disk_id: str) -> DiskDef | None:
        return next((d for d in self.disks if d.disk_id == disk_id), None)

    def disk_file(self, disk: DiskDef) -> FileRef | None:
        return self.file(disk.file_ref)


# ------------------------------------------------------------------------------- parsing


class OvfError(CorruptImageError):
    """The descriptor is no OVF envelope that can be read."""


def parse(data: bytes, name: str = "descriptor") -> Envelope:
    """The model of an OVF descriptor; ``OvfError`` when it is not one."""
    if len(data) > MAX_OVF_SIZE:
        raise OvfError(f"the descriptor is {len(data)} bytes long: no OVF is", name)
    prefixes: dict[str, str] = {}
    try:
        # The prefixes the document uses, to write it back with them.
        for _event, (prefix, uri) in ET.iterparse(io.BytesIO(data), events=("start-ns",)):
            prefixes.setdefault(uri, prefix)
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise OvfError(f"the descriptor is not well-formed XML ({exc})", name) from exc
    ns, local = _split(root.tag)
    if local != "Envelope" or ns not in ENVELOPE_NAMESPACES:
        raise OvfError(f"the descriptor's root is {root.tag}, not an OVF Envelope", name)
    env = Envelope(namespace=ns, root=root, prefixes=prefixes)
    q = _Names(ns)
    env.files = [_file(q, e) for e in root.iterfind(f"{q('References')}/{q('File')}")]
    env.disks = [_disk(q, e) for e in root.iterfind(f"{q('DiskSection')}/{q('Disk')}")]
    env.networks = [Network(e.get(q.attr("name"), ""), _child_text(e, q("Description")))
                    for e in root.iterfind(f"{q('NetworkSection')}/{q('Network')}")]
    env.systems = [_system(q, e) for e in root.iter(q("VirtualSystem"))]
    return env


def _split(tag: str) -> tuple[str, str]:
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return ns, local
    return "", tag


class _Names:
    """Qualified names in one envelope namespace."""

    def __init__(self, ns: str) -> None:
        self.ns = ns

    def __call__(self, local: str) -> str:
        return f"{{{self.ns}}}{local}"

    attr = __call__  # ovf: attributes are qualified like elements


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _child_text(e: ET.Element, tag: str) -> str:
    child = e.find(tag)
    return (child.text or "").strip() if child is not None else ""


def _file(q: _Names, e: ET.Element) -> FileRef:
    return FileRef(id=e.get(q.attr("id"), ""), href=e.get(q.attr("href"), ""),
                   size=_int(e.get(q.attr("size"))), compression=e.get(q.attr("compression")),
                   chunk_size=_int(e.get(q.attr("chunkSize"))))


def _disk(q: _Names, e: ET.Element) -> DiskDef:
    units = e.get(q.attr("capacityAllocationUnits"))
    raw = _int(e.get(q.attr("capacity")))
    try:
        capacity = raw * unit_factor(units) if raw is not None else None
    except ValueError:
        capacity = None
    return DiskDef(disk_id=e.get(q.attr("diskId"), ""), file_ref=e.get(q.attr("fileRef")),
                   capacity=capacity, capacity_units=units,
                   populated_size=_int(e.get(q.attr("populatedSize"))),
                   format=e.get(q.attr("format")), element=e)


def _system(q: _Names, e: ET.Element) -> VirtualSystem:
    system = VirtualSystem(id=e.get(q.attr("id"), ""), name=_child_text(e, q("Name")))
    os_section = e.find(q("OperatingSystemSection"))
    if os_section is not None:
        system.os_id = os_section.get(q.attr("id"))
        system.os_type = os_section.get(f"{{{VMW_NS}}}osType")
    hardware = e.find(q("VirtualHardwareSection"))
    if hardware is not None:
        system.hardware = hardware
        for sys_el in hardware.iterfind(f"{q('System')}/{{{VSSD_NS}}}VirtualSystemType"):
            system.system_type_elements.append(sys_el)
            system.system_types.extend((sys_el.text or "").split())
        system.items = [_item(q, i) for i in hardware.iterfind(q("Item"))]
        for key, target in (("Config", system.config), ("ExtraConfig", system.extra_config)):
            for c in hardware.iterfind(f"{{{VMW_NS}}}{key}"):
                target[c.get(f"{{{VMW_NS}}}key", "")] = c.get(f"{{{VMW_NS}}}value", "")
    system.products = [_product(q, p) for p in e.iterfind(q("ProductSection"))]
    return system


def _rasd(e: ET.Element, local: str) -> str | None:
    child = e.find(f"{{{RASD_NS}}}{local}")
    return (child.text or "").strip() if child is not None else None


def _item(q: _Names, e: ET.Element) -> Item:
    return Item(instance_id=_rasd(e, "InstanceID") or "",
                resource_type=_int(_rasd(e, "ResourceType")) or 0,
                subtype=_rasd(e, "ResourceSubType") or "",
                name=_rasd(e, "ElementName") or _rasd(e, "Caption") or "",
                parent=_rasd(e, "Parent"), address=_rasd(e, "Address"),
                address_on_parent=_rasd(e, "AddressOnParent"),
                host_resources=tuple((h.text or "").strip()
                                     for h in e.iterfind(f"{{{RASD_NS}}}HostResource")),
                connection=_rasd(e, "Connection"),
                quantity=_int(_rasd(e, "VirtualQuantity")),
                units=_rasd(e, "AllocationUnits"), element=e)


def _product(q: _Names, e: ET.Element) -> Product:
    props = {p.get(q.attr("key"), ""): p.get(q.attr("value"), "")
             for p in e.iter(q("Property"))}
    return Product(product=_child_text(e, q("Product")), vendor=_child_text(e, q("Vendor")),
                   version=_child_text(e, q("Version")),
                   full_version=_child_text(e, q("FullVersion")), properties=props)


def host_resource_id(resource: str) -> tuple[str, str] | None:
    """("disk" or "file", id) of a HostResource such as ``ovf:/disk/vmdisk1``."""
    m = re.fullmatch(r"(?:ovf:)?/(disk|file)/(.+)", resource.strip())
    return (m.group(1), m.group(2)) if m else None


# ------------------------------------------------------------------------------- writing


def serialize(root: ET.Element, prefixes: dict[str, str] | None = None) -> bytes:
    """The document as UTF-8 XML, elements of the OVF namespace unprefixed as ovftool
    writes them, every other namespace under its prefix (the document's own first)."""
    ns = _split(root.tag)[0]
    used: set[str] = {ns}
    for e in root.iter():
        used.add(_split(e.tag)[0])
        used.update(_split(a)[0] for a in e.attrib)
    used -= {"", _XML_NS}  # xml: is bound by XML itself and never declared
    names = _prefixes_for(used, ns, prefixes or {})
    names[_XML_NS] = "xml"
    out = io.StringIO()
    out.write('<?xml version="1.0" encoding="UTF-8"?>\n')
    decls = [f'xmlns="{ns}"'] + [f'xmlns:{names[u]}="{_escape(u)}"'
                                  for u in sorted(used, key=lambda u: names[u])]
    _write(out, root, names, ns, " ".join(decls))
    out.write("\n")
    return out.getvalue().encode("utf-8")


def _prefixes_for(used: set[str], ns: str, own: dict[str, str]) -> dict[str, str]:
    """One distinct prefix per namespace: the document's own, else ovftool's, else nsN."""
    known = {uri: p for p, uri in PREFIXES.items()}
    names: dict[str, str] = {ns: "ovf"}
    taken = {"ovf"}
    for uri in sorted(used - {ns}):
        for candidate in (own.get(uri), known.get(uri)):
            if candidate and candidate not in taken and candidate != "xml":
                break
        else:
            candidate = next(f"ns{n}" for n in range(len(used) + 1) if f"ns{n}" not in taken)
        names[uri] = candidate
        taken.add(candidate)
    return names


def _qname(name: str, names: dict[str, str], default: str | None) -> str:
    ns, local = _split(name)
    if not ns:
        return local
    if ns == default:
        return local
    return f"{names[ns]}:{local}"


def _write(out: io.StringIO, e: ET.Element, names: dict[str, str], default: str,
           decls: str = "") -> None:
    tag = _qname(e.tag, names, default)
    attrs = "".join(f' {_qname(k, names, None)}="{_escape(v)}"' for k, v in e.attrib.items())
    out.write(f"<{tag}{' ' + decls if decls else ''}{attrs}")
    if not len(e) and not e.text:
        out.write("/>")
    else:
        out.write(">" + _escape(e.text or "", attribute=False))
        for child in e:
            _write(out, child, names, default)
            out.write(_escape(child.tail or "", attribute=False))
        out.write(f"</{tag}>")


def _escape(text: str, attribute: bool = True) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace('"', "&quot;").replace("\n", "&#10;") if attribute else text


__all__ = [
    "CONTROLLERS",
    "CONTROLLER_MODELS",
    "STREAM_OPTIMIZED",
    "ControllerKind",
    "DiskDef",
    "Envelope",
    "FileRef",
    "Item",
    "Network",
    "OvfError",
    "Product",
    "ResourceType",
    "VirtualSystem",
    "controller_kind",
    "host_resource_id",
    "parse",
    "serialize",
    "unit_factor",
]
