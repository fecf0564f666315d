"""What ``vmdk ova info`` (and ``vmdk info``) shows of a package, as data and as text.

Everything comes from the tar headers, the descriptor, the manifest and each
disk's first sector: nothing is read through, so a large package answers at once.
"""

from __future__ import annotations

import struct
from typing import Any

from .._structs import SECTOR_SIZE, SparseHeader
from ..errors import VmdkError
from . import manifest, ovf
from .package import Package
from .tar import Member


def package_info(path: str) -> dict[str, Any]:
    """The package's members, manifest, virtual systems and disks as a JSON-ready dict."""
    with Package(path) as package:
        members = [m for m in package.all_members() if m.is_file]
        digests = _manifest_digests(package, members)
        env = package.envelope()
        info: dict[str, Any] = {
            "filename": path, "format": "ova",
            "members": [m.name for m in members],
            "member-details": [_member_info(m, digests) for m in members],
            "manifest-algorithm": sorted({d.split(":")[0] for d in digests.values()}) or None,
            "signed": any(m.name.lower().endswith(".cert") for m in members),
            "disks": [_disk_info(package, m) for m in members
                      if m.name.lower().endswith(".vmdk")],
        }
        if env is not None:
            info["networks"] = [{"name": n.name, "description": n.description}
                                for n in env.networks]
            info["virtual-systems"] = [_system_info(env, s) for s in env.systems]
        return info


def _manifest_digests(package: Package, members: list[Member]) -> dict[str, str]:
    """member name -> "ALG:hexdigest", as the manifest lists them (not computed here)."""
    mf = next((m for m in members if m.name.lower().endswith(".mf")), None)
    if mf is None:
        return {}
    entries, _junk = manifest.parse(package.read(mf, manifest.MAX_SIZE).decode("utf-8",
                                                                               "replace"))
    return {e.name: f"{e.algorithm or '?'}:{e.digest}" for e in entries}


def _member_info(m: Member, digests: dict[str, str]) -> dict[str, Any]:
    return {"name": m.name, "size": m.size, "digest": digests.get(m.name)}


def _disk_info(package: Package, member: Member) -> dict[str, Any]:
    """The header's virtual size of a .vmdk member (None when it is no sparse VMDK)."""
    entry: dict[str, Any] = {"name": member.name, "file-size": member.size,
                             "virtual-size": None}
    ref = next((d for d in package.disks() if d.member == member.name), None)
    try:
        with package.open_disk(ref, member) if ref else package.open(member) as f:
            header = SparseHeader.unpack(f.read(SECTOR_SIZE))
    except (ValueError, struct.error, VmdkError):
        return entry
    entry["virtual-size"] = header.capacity * SECTOR_SIZE
    return entry


def _system_info(env: ovf.Envelope, system: ovf.VirtualSystem) -> dict[str, Any]:
    controllers = {c.instance_id: c for c in system.controllers}
    return {
        "id": system.id, "name": system.name, "os-id": system.os_id, "os-type": system.os_type,
        "cpus": system.cpus, "memory-mib": system.memory_mib, "firmware": system.firmware,
        "secure-boot": system.secure_boot, "hardware-version": system.hardware_version,
        "system-types": system.system_types,
        "controllers": [_controller_info(c) for c in system.controllers],
        "disks": [_attached_disk(env, d, controllers) for d in system.disks()],
        "networks": [{"adapter": n.subtype, "network": n.connection} for n in system.nics()],
        "products": [vars(p) for p in system.products],
        "extra-config": system.extra_config,
        "config": system.config,
    }


def _controller_info(item: ovf.Item) -> dict[str, Any]:
    kind = item.controller
    assert kind is not None
    return {"id": item.instance_id, "bus": kind.bus, "model": kind.model,
            "subtype": item.subtype, "name": item.name}


def _attached_disk(env: ovf.Envelope, item: ovf.Item,
                   controllers: dict[str, ovf.Item]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": item.name, "controller": None, "slot": item.address_on_parent}
    parent = controllers.get(item.parent or "")
    if parent is not None and parent.controller is not None:
        out["controller"] = f"{parent.controller.model} {parent.instance_id}"
    for resource in item.host_resources:
        found = ovf.host_resource_id(resource)
        disk = env.disk(found[1]) if found and found[0] == "disk" else None
        if disk is None:
            continue
        file = env.disk_file(disk)
        out.update({"disk-id": disk.disk_id, "capacity": disk.capacity,
                    "populated-size": disk.populated_size,
                    "file": file.href if file else None,
                    "compression": file.compression if file else None})
    return out


# ------------------------------------------------------------------------------- text


def _size(n: int | None) -> str:
    from ..cli import _human_size  # the text is the CLI's, and so is the way sizes read

    return "?" if n is None else _human_size(n)


def format_info(info: dict[str, Any]) -> str:
    """The text ``vmdk ova info`` prints."""
    lines = [f"package: {info['filename']}", "file format: ova",
             f"manifest: {', '.join(info['manifest-algorithm'] or ['none'])}"
             + (", signed" if info["signed"] else ""), "members:"]
    for m in info["member-details"]:
        lines.append(f"    {m['name']}  {m['size']} bytes" + (f"  {m['digest']}" if m["digest"]
                                                              else ""))
    for d in info["disks"]:
        shown = (f"{_size(d['virtual-size'])} ({d['virtual-size']} bytes)"
                 if d["virtual-size"] is not None else "not a VMDK")
        lines.append(f"disk {d['name']}: virtual size {shown}")
    for net in info.get("networks", []):
        lines.append(f"network: {net['name']}")
    for s in info.get("virtual-systems", []):
        lines.extend(_format_system(s))
    return "\n".join(lines)


def _format_system(s: dict[str, Any]) -> list[str]:
    lines = [f"virtual system {s['id']}" + (f" ({s['name']})" if s["name"] else "") + ":",
             f"    hardware: {' '.join(s['system-types']) or '?'}, {s['cpus']} CPUs, "
             f"{s['memory-mib']} MiB, firmware {s['firmware']}"
             + (" with secure boot" if s["secure-boot"] else ""),
             f"    guest: {s['os-type'] or s['os-id'] or '?'}"]
    for c in s["controllers"]:
        lines.append(f"    controller {c['id']}: {c['bus']} {c['model']}")
    for d in s["disks"]:
        lines.append(f"    disk {d.get('disk-id', '?')}: {d.get('file')}, capacity "
                     f"{_size(d.get('capacity'))}, populated {_size(d.get('populated-size'))}, "
                     f"on {d['controller'] or '?'} slot {d['slot']}")
    for n in s["networks"]:
        lines.append(f"    network adapter {n['adapter'] or '?'} on {n['network'] or '?'}")
    for p in s["products"]:
        lines.append(f"    product: {' '.join(v for v in (p['product'], p['version']) if v)}"
                     + (f" by {p['vendor']}" if p["vendor"] else ""))
        lines.extend(f"        property {k} = {v}" for k, v in p["properties"].items())
    lines.extend(f"    extra config {k} = {v}" for k, v in s["extra-config"].items())
    return lines


__all__ = ["format_info", "package_info"]
