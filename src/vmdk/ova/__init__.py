"""OVA packages: inspect, verify, build and fix them, and read their disks.

An OVA is a tar of an ``.ovf`` descriptor, its disks (streamOptimized VMDK)
and a manifest of digests, perhaps signed.  The modules, one concept each:
:mod:`~vmdk.ova.tar` (the archive as stored), :mod:`~vmdk.ova.ovf` (the
descriptor's model), :mod:`~vmdk.ova.manifest` (digests and signatures),
:mod:`~vmdk.ova.package` (reading a package and its disks),
:mod:`~vmdk.ova.disk` (a disk read in place), :mod:`~vmdk.ova.rules` (what
importers demand), :mod:`~vmdk.ova.targets` (importers as data), and the
verbs :mod:`~vmdk.ova.info`, :mod:`~vmdk.ova.verify`,
:mod:`~vmdk.ova.create` and :mod:`~vmdk.ova.fix`.

Disks inside are read front to back by :mod:`vmdk.stream_read`, straight
from the archive, so nothing is extracted and a package cut inside a disk is
refused as a cut stream.  Names are imported on first use: ``convert`` asks
``is_ova`` of every source, and that must not load the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..stream_read import iter_stream_grains
    from .create import build_ovf, export_ova
    from .info import package_info as ova_info
    from .package import (
        DiskRef,
        Package,
        copy_from_ova,
        open_ova_disk,
        ova_disk_size,
        ova_disks,
    )

#: name -> (module, its name there)
_EXPORTS = {"iter_stream_grains": ("..stream_read", "iter_stream_grains"),
            "build_ovf": (".create", "build_ovf"), "export_ova": (".create", "export_ova"),
            "ova_info": (".info", "package_info"),
            **{name: (".package", name) for name in (
                "DiskRef", "Package", "copy_from_ova", "open_ova_disk",
                "ova_disk_size", "ova_disks")}}


def is_ova(path: str) -> bool:
    """Whether ``path`` is to be read as an OVA package (see :func:`.package.is_ova`).

    Asked of every source: a name that cannot be a package's loads nothing more.
    """
    if not path.lower().endswith((".ova", ".tar")):
        return False
    from .package import is_ova as looks_like_a_package

    return looks_like_a_package(path)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(module, __name__), attr)


__all__ = ["DiskRef", "Package", "build_ovf", "copy_from_ova", "export_ova", "is_ova",
           "iter_stream_grains", "open_ova_disk", "ova_disk_size", "ova_disks", "ova_info"]
