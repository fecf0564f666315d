"""The ``vmdk ova`` verb: its sub-verbs' options and thin handlers over the library.

Imported by the CLI's parser, so only :mod:`argparse` is loaded here; each
handler imports what it uses.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=4))


def cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, package_info

    info = package_info(args.package)
    if args.output == "json":
        _print_json(info)
    else:
        print(format_info(info))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import iter_lines, verify

    report = verify(args.package, read_disks=not args.no_disks, target=args.target)
    if args.output == "json":
        _print_json(report.to_json())
    else:
        for line in iter_lines(report):
            print(line)
    return report.exit_code


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def _disk(text: str) -> Any:
    """SRC[,controller=ID][,format=raw|vmdk]"""
    from .create import Disk

    source, *options = text.split(",")
    extra = _pairs(options, "disk option")
    unknown = set(extra) - {"controller", "format"}
    if unknown:
        raise ValueError(f"disk {text!r}: unknown option {', '.join(sorted(unknown))}")
    return Disk(source, extra.get("controller"), extra.get("format"))


def appliance_of(args: argparse.Namespace) -> Any:
    """The appliance the options describe (on top of --config's YAML when given)."""
    from . import ovf
    from .create import Appliance, Controller, Nic, load_yaml

    app = load_yaml(args.config) if args.config else Appliance(name="", disks=[])
    app.name = args.name or app.name or os.path.splitext(os.path.basename(args.package))[0]
    app.disks += [_disk(d) for d in args.disk]
    for attr in ("cpus", "firmware", "hardware_version", "os_type"):
        if getattr(args, attr) is not None:
            setattr(app, attr, getattr(args, attr))
    if args.memory is not None:
        app.memory_mib = args.memory
    if args.secure_boot:
        app.secure_boot = True
    if args.controller:
        app.controllers = [Controller(k, v) for k, v in _pairs(args.controller,
                                                                 "controller").items()]
    if args.network:
        app.nics = [Nic(*n.split("=", 1)) for n in args.network]
    app.extra_config.update(_pairs(args.extra_config, "extra config"))
    if args.product or args.vendor or args.version or args.property:
        app.product = app.product or ovf.Product()
        app.product.product = args.product or app.product.product
        app.product.vendor = args.vendor or app.product.vendor
        app.product.version = args.version or app.product.version
        app.product.properties.update(_pairs(args.property, "property"))
    return app


def cmd_create(args: argparse.Namespace) -> int:
    from ..cli import progress_bar
    from .create import Signer, create_ova

    app = appliance_of(args)
    if args.sign_cert and not args.sign_key:
        raise ValueError("--sign-cert needs --sign-key")
    signer = Signer.from_files(args.sign_key, args.sign_cert) if args.sign_key else None
    with progress_bar(args.progress, 0, "create") as bar:
        create_ova(app, args.package, algorithm=args.manifest, signer=signer,
                   compression_level=args.compression_level, progress=bar,
                   allow_external=args.allow_external, force_share=args.force_share)
    return 0


def cmd_fix(args: argparse.Namespace) -> int:
    from .create import Signer
    from .fix import fix

    if args.out is None and not args.check:
        raise ValueError("name the fixed package OUT, or say --check to only report")
    signer = Signer.from_files(args.sign_key, args.sign_cert) if args.sign_key else None
    report = fix(args.package, args.out, args.target, signer=signer, check_only=args.check)
    if args.output == "json":
        _print_json(report.to_json())
        return report.exit_code
    for change in report.changes:
        print(("would fix " if args.check else "") + change.line())
    for finding in report.left:
        print(f"not fixed: {finding.line()}")
    if not report.changes and not report.left:
        print(f"Nothing to change for {report.target}.")
    elif report.written:
        print(f"Wrote {report.written} ({len(report.changes)} change(s)).")
    return report.exit_code


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``ova`` verb and its sub-verbs, under the CLI's verb list ``sub``."""
    p = sub.add_parser("ova", help="inspect, verify, create and fix OVA packages",
                       description="Inspect, verify, create and fix OVA packages.")
    verbs = p.add_subparsers(dest="ova_verb", metavar="SUBVERB", required=True)

    q = verbs.add_parser("info", help="show a package's members, virtual systems and disks")
    q.set_defaults(func=cmd_info)
    q.add_argument("--output", choices=("human", "json"), default="human",
                   help="human-readable text (default) or JSON")
    q.add_argument("package", help="the OVA file")

    q = verbs.add_parser("create", help="package disks and one virtual system as an OVA",
                         description="Package disks (raw or any VMDK) and one virtual system "
                         "as an OVA. Options add to, or override, a YAML description.")
    q.set_defaults(func=cmd_create)
    q.add_argument("--config", metavar="YAML", help="describe the appliance in a YAML file")
    q.add_argument("--disk", action="append", default=[], metavar="SRC[,controller=ID]"
                   "[,format=raw|vmdk]", help="a disk, in order (repeat the option)")
    q.add_argument("--name", help="the VM's name (default: the package's file name)")
    q.add_argument("--cpus", type=int, help="virtual CPUs (default 1)")
    q.add_argument("--memory", type=int, help="memory in MiB")
    q.add_argument("--firmware", choices=("bios", "efi"), help="how the VM boots (default bios)")
    q.add_argument("--secure-boot", action="store_true", help="EFI secure boot")
    q.add_argument("--hardware-version", type=int, metavar="N", help="vmx-N (default 14)")
    q.add_argument("--os-type", metavar="ID", help="VMware guest id (default otherGuest64)")
    q.add_argument("--controller", action="append", default=[], metavar="ID=MODEL",
                   help="a storage controller: MODEL one of lsilogic, lsilogicsas, pvscsi, "
                        "buslogic, ahci, nvme, ide (default scsi0=lsilogic)")
    q.add_argument("--network", action="append", default=[], metavar="NAME[=ADAPTER]",
                   help="a network adapter on NAME: e1000 (default), e1000e, vmxnet3, pcnet32")
    q.add_argument("--extra-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a vmw:ExtraConfig setting, e.g. disk.EnableUUID=TRUE")
    q.add_argument("--product", help="product name (ProductSection)")
    q.add_argument("--vendor", help="the product's vendor (product section)")
    q.add_argument("--version", help="the product's version (product section)")
    q.add_argument("--property", action="append", default=[], metavar="KEY=VALUE",
                   help="a product property (OVF environment)")
    q.add_argument("--manifest", default="sha256", choices=("sha1", "sha256", "sha512"),
                   help="the manifest's algorithm (default sha256)")
    q.add_argument("--sign-key", metavar="PEM", help="sign the manifest with this private key")
    q.add_argument("--sign-cert", metavar="PEM",
                   help="the signer's certificate (default: the key's file holds it too)")
    q.add_argument("-c", dest="compression_level", type=int, default=1, metavar="LEVEL",
                   help="deflate level of converted disks, 0-9 (default 1)")
    q.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
    q.add_argument("--allow-external", action="store_true",
                   help="trust descriptor paths outside an image's folder, and devices")
    q.add_argument("-U", "--force-share", action="store_true",
                   help="read disks another process has open for writing")
    q.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an fsspec option for a package written to a URL (s3://...; pip "
                        "install 'vmdk[remote]'): uploaded as it is written")
    q.add_argument("package", help="the OVA to write (replaced if it exists), or a URL")

    from .targets import describe_targets

    q = verbs.add_parser("fix", help="rewrite a package so that an importer takes it",
                         description="Rewrite a package so that TARGET takes it: manifest "
                         "syntax and algorithm, OVF first, plain ustar, hardware version, "
                         "controllers and items the target refuses, disks that are not "
                         "version 3 streamOptimized, sizes and capacities; prints each change. "
                         "Disk content never changes. Exit 0 done (or nothing to do), 2 when "
                         "something is left that cannot be fixed, or with --check when "
                         "something would change. Targets: " + describe_targets() + ".")
    q.set_defaults(func=cmd_fix)
    q.add_argument("--target", required=True, metavar="NAME",
                   help="the importer to fix the package for (listed above)")
    q.add_argument("--check", action="store_true", help="only report what would change")
    q.add_argument("--sign-key", metavar="PEM", help="sign the fixed manifest with this key")
    q.add_argument("--sign-cert", metavar="PEM",
                   help="the signer's certificate (default: the key's file holds it too)")
    q.add_argument("--output", choices=("human", "json"), default="human",
                   help="human-readable text (default) or JSON")
    q.add_argument("package", help="the OVA file")
    q.add_argument("out", nargs="?", help="the fixed package (replaced if it exists)")

    q = verbs.add_parser("verify", help="check a package against what importers demand: exit 0 "
                         "clean, 2 when something is wrong (a line per finding)")
    q.set_defaults(func=cmd_verify)
    q.add_argument("--output", choices=("human", "json"), default="human",
                   help="human-readable text (default) or JSON")
    q.add_argument("--no-disks", action="store_true",
                   help="do not read the disks through (digests are still checked)")
    q.add_argument("--target", default=None, metavar="NAME",
                   help="also check what this importer refuses (see 'vmdk ova fix --help')")
    q.add_argument("package", help="the OVA file")


__all__ = ["add_parser"]
