"""OVA packages: inspect, verify, build and fix them, and read their disks.

An OVA is a tar of an ``.ovf`` descriptor, its disks (streamOptimized VMDK)
and a manifest of digests, perhaps signed.  The modules, one concept each:
:mod:`~vmdk.ova.tar` (the archive as stored), :mod:`~vmdk.ova.ovf` (the
descriptor's model), :mod:`~vmdk.ova.manifest` (digests and signatures),
:mod:`~vmdk.ova.package` (reading a package and its disks),
:mod:`~vmdk.ova.info`, and the verbs built on them.

Disks inside are read front to back by :mod:`vmdk.stream_read`, straight
from the archive, so nothing is extracted and a package cut inside a disk is
refused as a cut stream.
"""

from __future__ import annotations

from ..stream_read import iter_stream_grains
from .create import build_ovf, export_ova
from .info import package_info as ova_info
from .package import (
    DiskRef,
    Package,
    copy_from_ova,
    is_ova,
    open_ova_disk,
    ova_disk_size,
    ova_disks,
)

__all__ = ["DiskRef", "Package", "build_ovf", "copy_from_ova", "export_ova", "is_ova",
           "iter_stream_grains", "open_ova_disk", "ova_disk_size", "ova_disks", "ova_info"]
