"""The ``vmdk ova`` verb: its sub-verbs' options and thin handlers over the library.

Imported by the CLI's parser, so only :mod:`argparse` is loaded here; each
handler imports what it uses.
"""

from __future__ import annotations

import argparse
import json


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

    report = verify(args.package, read_disks=not args.no_disks)
    if args.output == "json":
        _print_json(report.to_json())
    else:
        for line in iter_lines(report):
            print(line)
    return report.exit_code


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``ova`` verb and its sub-verbs, under the CLI's verb list ``sub``."""
    p = sub.add_parser("ova", help="inspect, verify, create and fix OVA packages",
                       description="Inspect, verify, create and fix OVA packages.")
    verbs = p.add_subparsers(dest="ova_verb", metavar="SUBVERB", required=True)

    q = verbs.add_parser("info", help="show a package's members, virtual systems and disks")
    q.set_defaults(func=cmd_info)
    q.add_argument("--output", choices=("human", "json"), default="human")
    q.add_argument("package")

    q = verbs.add_parser("verify", help="check a package against what importers demand: exit 0 "
                         "clean, 2 when something is wrong (a line per finding)")
    q.set_defaults(func=cmd_verify)
    q.add_argument("--output", choices=("human", "json"), default="human")
    q.add_argument("--no-disks", action="store_true",
                   help="do not read the disks through (digests are still checked)")
    q.add_argument("package")


__all__ = ["add_parser"]
