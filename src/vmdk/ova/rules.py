"""What importers demand of a package, one rule per entry, and the findings that break them.

Every finding of ``verify`` and every change of ``fix`` names the rule it is
about, so a user sees which demand a package breaks, not only that it breaks
one.  Severities: an ``error`` makes some importer refuse the package; a
``warning`` is something importers take but people get wrong; a ``note``
says what could not be checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: rule -> the demand, as importers make it (VMware vSphere/ESXi/Workstation, VirtualBox).
RULES: dict[str, str] = {
    "tar-format": "the archive is a plain ustar tar: no pax or GNU extension records",
    "tar-members": "members are regular files under plain names, each name once",
    "tar-end": "the archive ends with its end-of-archive blocks (nothing cut off)",
    "ovf-first": "the OVF descriptor is the first member, and the only one",
    "ovf-xml": "the descriptor is well-formed XML with an OVF Envelope at its root",
    "ovf-schema": "the descriptor validates against the DMTF OVF schema (DSP8023)",
    "references": "every file the OVF references is a member under that name, every disk "
                  "item names a disk and a controller the OVF has",
    "member-order": "files come in the order the OVF's References lists them; the manifest "
                    "and certificate right after the OVF or at the end, the certificate last",
    "file-size": "ovf:size is the member's size",
    "manifest-syntax": "manifest lines are exactly 'ALG(name)= hexdigest'",
    "manifest-algorithm": "the manifest uses one of SHA1, SHA256 and SHA512 (the target takes)",
    "manifest-coverage": "the manifest lists every member but itself and the certificate, once, "
                         "and nothing else",
    "manifest-name": "the manifest and certificate are named after the OVF (NAME.mf, NAME.cert)",
    "digest": "every member's digest is what the manifest says",
    "signature": "the certificate file signs the manifest, with the certificate it holds",
    "certificate": "the signing certificate is valid today",
    "disk-format": "disks are streamOptimized VMDKs, as ovf:format says",
    "disk-version": "streamOptimized disks have header version 3",
    "disk-stream": "every disk reads through: its stream is sound and nothing is cut off",
    "capacity": "ovf:capacity (in ovf:capacityAllocationUnits) is the disk's virtual size",
    "populated-size": "ovf:populatedSize is the data the disk holds",
    "hardware-version": "vssd:VirtualSystemType names a vmx-NN the target supports",
    "system-type": "vssd:VirtualSystemType is a family the target knows",
    "controller": "storage controllers are of models the target supports",
    "hardware-item": "hardware items are of types the target supports",
}


@dataclass(frozen=True)
class Finding:
    rule: str
    message: str
    member: str | None = None
    severity: str = "error"

    def __post_init__(self) -> None:
        assert self.rule in RULES, self.rule

    def line(self) -> str:
        """One line of ``verify``'s text output."""
        where = f"{self.member}: " if self.member else ""
        return f"{self.severity.upper()} [{self.rule}] {where}{self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "severity": self.severity, "member": self.member,
                "message": self.message, "demand": RULES[self.rule]}


__all__ = ["RULES", "Finding"]
