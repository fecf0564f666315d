"""The importers ``vmdk ova fix --target`` writes for, as data: a new target is one entry.

What each takes is gathered from vendors' compatibility tables and the reports of
refused packages: vSphere's hardware versions per release (ESXi 6.7 runs vmx-14, 7.0
vmx-17, 8.0 vmx-20, vCenter 8 U2 vmx-21; Workstation 17 vmx-20); VMware refusing the
``virtualbox-2.2`` family and VirtualBox's spellings of controllers; ESXi having no
sound card; VirtualBox refusing VMware's NVRAM item ("Unknown resource type 32768")
and having no paravirtual SCSI; older vSphere clients taking SHA1 manifests only and
some ESXi 8 builds refusing SHA1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import VmdkError
from .ovf import ResourceType


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    #: How controller subtypes are spelled for it: "vmware" or "virtualbox".
    family: str
    #: The highest vmx-NN it runs; None where the family name is not checked.
    max_hardware: int | None
    #: Manifest algorithms it takes, the one ``fix`` writes first.
    algorithms: tuple[str, ...]
    #: Controller models it lacks, and the model that replaces each.
    controllers: dict[str, str] = field(default_factory=dict)
    #: Hardware item types it refuses (VENDOR stands for every vendor-reserved type).
    refused_items: frozenset[int] = frozenset()
    #: VirtualSystemType families it refuses (VMware: VirtualBox's).
    refused_families: tuple[str, ...] = ()

    def refuses_item(self, resource_type: int) -> bool:
        return resource_type in self.refused_items or (
            ResourceType.VENDOR in self.refused_items and resource_type >= ResourceType.VENDOR)


_VMWARE_REFUSES = ("virtualbox-",)

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("esxi-6.7", "VMware ESXi 6.7 host client and ovftool", "vmware", 14,
           ("SHA256", "SHA1"), refused_items=frozenset({ResourceType.SOUND}),
           refused_families=_VMWARE_REFUSES),
    Target("esxi-7", "VMware ESXi 7.0", "vmware", 17, ("SHA256", "SHA512", "SHA1"),
           refused_items=frozenset({ResourceType.SOUND}), refused_families=_VMWARE_REFUSES),
    Target("esxi-8", "VMware ESXi 8.0 (refuses SHA1 manifests)", "vmware", 20,
           ("SHA256", "SHA512"), refused_items=frozenset({ResourceType.SOUND}),
           refused_families=_VMWARE_REFUSES),
    Target("vcenter", "VMware vCenter 8 (Deploy OVF Template, content library)", "vmware", 21,
           ("SHA256", "SHA512"), refused_items=frozenset({ResourceType.SOUND}),
           refused_families=_VMWARE_REFUSES),
    Target("workstation-17", "VMware Workstation 17 and Fusion 13", "vmware", 20,
           ("SHA256", "SHA512", "SHA1"), controllers={"pvscsi": "lsilogic"},
           refused_families=_VMWARE_REFUSES),
    Target("virtualbox-7", "Oracle VirtualBox 7", "virtualbox", None,
           ("SHA256", "SHA512", "SHA1"), controllers={"pvscsi": "lsilogic"},
           refused_items=frozenset({ResourceType.VENDOR})),
    Target("generic", "what every importer above takes: vmx-14, SHA256, no pvscsi, no "
           "sound card or vendor items", "vmware", 14, ("SHA256",), controllers={"pvscsi": "lsilogic"},
           refused_items=frozenset({ResourceType.SOUND, ResourceType.VENDOR}),
           refused_families=_VMWARE_REFUSES),
)}


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise VmdkError(f"unknown target {name!r} (one of {', '.join(TARGETS)})") from None


def describe_targets() -> str:
    """One line per target, for ``--help``."""
    return "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values())


__all__ = ["TARGETS", "Target", "describe_targets", "target"]
