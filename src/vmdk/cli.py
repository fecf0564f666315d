"""The ``vmdk`` command: qemu-img's verbs and spelling, over the library.

Every verb is a thin function over the public API; errors become one line
on stderr (``vmdk: error: ...``) and an exit code, never a traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, NoReturn

from . import __version__
from ._access import is_url
from ._output import discard_all
from .convert import DEFAULT_SPARSE_SIZE, SequentialOutput, Source, convert, copy, open_source
from .create import PREALLOCATION_MODES, SUBFORMATS, create
from .errors import UnsupportedFormatError, VmdkError
from .extents.base import SECTOR_SIZE
from .image import Image

log = logging.getLogger("vmdk")

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
             "p": 1 << 50, "e": 1 << 60}


def _json(value: object, indent: int | None = None) -> str:
    """JSON of ``value``, valid UTF-8 whatever file names it holds: the bytes of a name that
    are not UTF-8 (surrogates after os.fsdecode) become U+FFFD, as in qemu-img's JSON."""
    import json  # only --output json needs it

    return json.dumps(_valid_text(value), indent=indent)


def _valid_text(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(value, dict):
        return {_valid_text(k): _valid_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_valid_text(v) for v in value]
    return value


def parse_size(text: str) -> int:
    """Sizes as qemu-img takes them: bytes, or a number with K, M, G, T, P or E (powers of
    1024), which may have a fraction (truncated to whole bytes: 1.1k is 1126)."""
    from fractions import Fraction

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid size {text!r}: use bytes or a number with k, M, G, T, P or E")
    unit = _SUFFIXES[m.group(2).lower()]
    value = Fraction(m.group(1)) * unit
    if unit == 1 and value.denominator != 1:
        raise ValueError(f"invalid size {text!r}: a size in bytes is a whole number of bytes "
                         "(a fraction needs a unit: 1.5k, 2.5G)")
    return int(value)


def parse_options(items: Sequence[str]) -> dict[str, str]:
    """``-o key=value,key=value`` (repeatable) into a dict."""
    out: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise VmdkError(f"option {part!r} needs a value (key=value)")
            out[key.strip()] = value.strip()
    return out


_BOOL = {"on": True, "yes": True, "true": True, "1": True,
         "off": False, "no": False, "false": False, "0": False}


def _flag(key: str, value: str) -> bool:
    try:
        return _BOOL[value.lower()]
    except KeyError:
        raise VmdkError(f"option {key}: {value!r} is not on or off") from None


def _number(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise VmdkError(f"option {key}: {value!r} is not a whole number") from None


def _geometry(value: str) -> tuple[int, int, int]:
    parts = value.replace(",", "/").split("/")
    if len(parts) != 3:
        raise VmdkError(f"option geometry: {value!r} is not CYLINDERS/HEADS/SECTORS")
    c, h, s = (_number("geometry", p) for p in parts)
    return c, h, s


def create_kwargs(options: dict[str, str]) -> dict[str, Any]:
    """Translate qemu-img's create options (``-o``) into ``vmdk.create`` arguments."""
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        if key in ("subformat", "adapter_type", "hwversion", "toolsversion", "comment"):
            kwargs[key] = value
        elif key == "compat6":
            if _flag(key, value):
                if "hwversion" in options:  # as qemu-img: the two say different things
                    raise VmdkError("option compat6 cannot be used with hwversion")
                kwargs["hwversion"] = "6"
        elif key == "zeroed_grain":
            kwargs["zeroed_grain"] = _flag(key, value)
        elif key == "preallocation":
            if value not in PREALLOCATION_MODES:
                raise VmdkError(f"option preallocation: {value!r} is not one of "
                                f"{', '.join(PREALLOCATION_MODES)}")
            kwargs["preallocate"] = value
        elif key == "cluster_size":
            kwargs["cluster_size"] = parse_size(value)
        elif key == "compression_level":
            kwargs["compression_level"] = _number(key, value)
        elif key == "geometry":
            kwargs["geometry"] = _geometry(value)
        elif key == "device":
            kwargs["raw_device"] = value
        elif key == "partitions":  # ':' joins numbers: ',' already separates options
            kwargs["partitions"] = [_number(key, n) for n in value.replace("+", ":").split(":")]
        elif key == "backing_file":
            kwargs["parent"] = value
        elif key == "backing_fmt":
            if value != "vmdk":
                raise VmdkError("a VMDK snapshot's parent must be a VMDK image")
        else:
            raise VmdkError(f"unknown option {key!r}")
    return kwargs


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, desc: str) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on stderr when asked for and stderr is a terminal; otherwise nothing."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm  # type: ignore[import-untyped]

    sized = {"total": total, "unit": "B", "unit_scale": True, "unit_divisor": 1024} if total else {}
    # The bar stays, ending on its 100% line, as qemu-img's does.
    with tqdm(desc=desc, leave=True, **sized) as bar:
        yield bar.update
        if total and bar.n < total:  # what was skipped (holes) counts as done
            bar.update(total - bar.n)


def _print_error(message: str) -> None:
    """"vmdk: error: MESSAGE" on stderr; a file name that is not UTF-8 shows its own bytes
    (Python would print "\\udcff", naming no file that exists)."""
    line = f"vmdk: error: {message}\n"
    raw = getattr(sys.stderr, "buffer", None)
    if raw is None:
        sys.stderr.write(line)
        return
    sys.stderr.flush()
    raw.write(line.encode(sys.stderr.encoding or "utf-8", "surrogateescape"))
    raw.flush()


def _text(value: object) -> str:
    """A value as qemu-img prints it: true and false in lower case."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` words as fsspec's storage options: a value is read as
    JSON where it is JSON (true, 3, {"a": 1}), else kept as text; a dotted key nests
    (``client_kwargs.endpoint_url=...``)."""
    import json

    options: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--storage-option {item!r} is not KEY=VALUE")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        *outer, last = key.split(".")
        node = options
        for part in outer:
            node = node.setdefault(part, {})
            if isinstance(node, dict):
                continue
            raise ValueError(f"--storage-option {item!r}: {part} has a value, not options")
        node[last] = value
    return options


def _configure_remote(args: argparse.Namespace) -> None:
    """Hand --storage-option and --connections to vmdk.remote (loaded only when given)."""
    items = getattr(args, "storage_option", None)
    connections = getattr(args, "connections", None)
    if items or connections is not None:
        from .remote import configure

        configure(parse_storage_options(items or []), connections)


def _open_flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = {"allow_external": getattr(args, "allow_external", False),
             "force_share": getattr(args, "force_share", False)}
    if getattr(args, "ignore_cid", False):
        flags["ignore_cid"] = True
    if getattr(args, "missing_as_zeros", False):
        flags["missing_as_zeros"] = True
    return flags


# ----------------------------------------------------------------------- verbs

def cmd_info(args: argparse.Namespace) -> int:
    from .ova import is_ova

    if is_ova(args.image):
        from .ova import ova_info

        package = ova_info(args.image)
        if args.output == "json":
            print(_json(package, indent=4))
            return 0
        print(f"package: {args.image}\nfile format: ova")
        for name in package["members"]:
            print(f"    {name}")
        for disk in package["disks"]:
            size = disk["virtual-size"]
            shown = f"{_human_size(size)} ({size} bytes)" if size is not None else "not a VMDK"
            print(f"disk {disk['name']}: virtual size {shown}")
        return 0
    # As qemu-img info: the image is shown without its parent (which may be missing or
    # changed); --backing-chain opens the whole chain, and a break in it is an error.
    with Image.open(args.image, "r", open_parent=args.backing_chain,
                    **_open_flags(args)) as image:
        infos = [img.info() for img in (image.chain() if args.backing_chain else [image])]
    if args.output == "json":
        print(_json(infos if args.backing_chain else infos[0], indent=4))
        return 0
    for n, info in enumerate(infos):
        if n:
            print()
        _print_info(info)
    return 0


def _print_info(info: dict[str, Any]) -> None:
    data = info["format-specific"]["data"]
    print(f"image: {info['filename']}")
    print("file format: vmdk")
    print(f"virtual size: {_human_size(info['virtual-size'])} ({info['virtual-size']} bytes)")
    print(f"disk size: {_human_size(info['actual-size'])}")
    if "cluster-size" in info:
        print(f"cluster_size: {info['cluster-size']}")
    if "backing-filename" in info:
        print(f"backing file: {info['backing-filename']}")
        print(f"backing file format: {info.get('backing-filename-format', 'vmdk')}")
    for key in ("adapter-type", "hardware-version", "uuid", "comment"):
        if key in info:
            print(f"{key.replace('-', ' ')}: {info[key]}")
    geo = info["geometry"]
    print(f"geometry: {geo['cylinders']}/{geo['heads']}/{geo['sectors']}")
    print(f"dirty flag: {'yes' if info['dirty-flag'] else 'no'}")
    print("Format specific information:")
    print(f"    cid: {data['cid']}")
    print(f"    parent cid: {data['parent-cid']}")
    print(f"    create type: {data['create-type']}")
    print("    extents:")
    for i, ext in enumerate(data["extents"]):
        print(f"        [{i}]:")
        for key, value in ext.items():
            print(f"            {key.replace('-', ' ')}: {_text(value)}")


def cmd_create(args: argparse.Namespace) -> int:
    kwargs = create_kwargs(parse_options(args.options))
    if args.backing:
        kwargs["parent"] = args.backing
    if "parent" in kwargs and not os.path.isabs(kwargs["parent"]):
        # As qemu-img: a relative parent name is relative to the new image's folder.
        kwargs["parent"] = os.path.join(os.path.dirname(args.image), kwargs["parent"])
    size = parse_size(args.size) if args.size is not None else None
    if size is None and "parent" not in kwargs and "raw_device" not in kwargs:
        raise VmdkError("a size is required (for example 10G)")
    with create(args.image, size, overwrite=True, allow_external=args.allow_external,
                **kwargs) as disk:
        size = disk.size
    if not args.quiet:
        sub = kwargs.get("subformat", "monolithicSparse")
        print(f"Formatting '{args.image}', fmt=vmdk subformat={sub} size={size}")
    return 0


def _sparse_size(text: str) -> int:
    size = parse_size(text)
    if size % SECTOR_SIZE:
        raise VmdkError(f"-S {text}: the sparse size must be a multiple of 512 bytes "
                        "(0: no zero detection, the output fully allocated)")
    return size


def cmd_convert(args: argparse.Namespace) -> int:
    from .ova import is_ova

    kwargs = create_kwargs(parse_options(args.options))
    if args.source == "-" or args.recover:
        size = 0  # a stream read front to back: its size is in a header not read yet
    elif args.source_format == "raw" and not is_url(args.source):
        size = os.path.getsize(args.source)
    elif args.source_format == "ova" or (args.source_format is None and is_ova(args.source)):
        from .ova import ova_disk_size

        size = ova_disk_size(args.source, args.disk)
    else:
        source = open_source(args.source, args.source_format, **_open_flags(args))
        size = source.size
        source.close()
    with progress_bar(args.progress, size, "convert") as bar:
        convert(args.source, args.target, src_format=args.source_format, overwrite=True,
                out_format=args.output_format, sparse_size=_sparse_size(args.sparse_size),
                progress=bar,
                allow_external=args.allow_external, force_share=args.force_share,
                ignore_cid=args.ignore_cid, disk=args.disk, durable=args.cache != "unsafe",
                recover=args.recover, missing_as_zeros=args.missing_as_zeros, **kwargs)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check

    total = 0
    if args.progress:
        with contextlib.suppress(VmdkError, OSError), Image.open(  # check reports why, if
                args.image, "r", open_parent=False, force_share=True,
                allow_external=getattr(args, "allow_external", False)) as image:
            total = image.size
    with progress_bar(args.progress, total, "check") as bar:
        result = check(args.image, repair=args.repair, progress=bar, **_open_flags(args))
    opening = [p for p in result.problems if p.kind == "error"]
    if result.check_errors and opening and not result.allocated_clusters:
        # The image could not even be opened: an error like any other verb's.
        _print_error(_problem_text(opening[0], args))
        return 1
    if args.output == "json":
        print(_json(result.to_json(), indent=4))
        return result.exit_code
    for problem in result.problems:
        label = {"corruption": "ERROR", "leak": "Leaked", "warning": "Warning"}.get(
            problem.kind, "ERROR")
        where = problem.filename or result.filename
        message = _problem_text(problem, args)
        print(f"{label}: {message}" if message.startswith(where) else f"{label}: {where}: {message}")
    if result.corruptions_fixed or result.leaks_fixed:
        print(f"The following inconsistencies were found and repaired:\n\n"
              f"    {_plural(result.leaks_fixed, 'leaked cluster')}\n"
              f"    {_plural(result.corruptions_fixed, 'corruption')}\n")
        print("Double checking the fixed image now...")
    if result.unclean_cleared:
        print("The unclean-shutdown flag was cleared.")
    if result.check_errors:
        print("An error occurred during the check.")
    elif result.corruptions:
        print(f"\n{_plural(result.corruptions, 'error')} "
              f"{'was' if result.corruptions == 1 else 'were'} found on the image.\n"
              "Data may be corrupted, or further writes to the image may corrupt it.")
    elif result.chain_errors:
        print("\nThe image's snapshot chain is broken: it does not read as it should.")
    elif result.leaks:
        print(f"\n{_plural(result.leaks, 'leaked cluster')} "
              f"{'was' if result.leaks == 1 else 'were'} found on the image.\n"
              "This means waste of disk space, but no harm to data.")
    else:
        print("No errors were found on the image.")
    if result.total_clusters:
        pct = 100.0 * result.allocated_clusters / result.total_clusters
        print(f"{result.allocated_clusters}/{result.total_clusters} = {pct:.2f}% allocated")
    return result.exit_code


def cmd_map(args: argparse.Namespace) -> int:
    with Image.open(args.image, "r", **_open_flags(args)) as image:
        runs = image.map()
    if args.output == "json":
        print("[" + ",\n".join(_json(r.to_json()) for r in runs) + "]")
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
    for r in runs:
        if r.data and r.offset is not None:
            print(f"{r.start:<#20x}{r.length:<#20x}{r.offset:<#20x}{r.filename}")
        elif r.data:
            print(f"{r.start:<#20x}{r.length:<#20x}{'(compressed)':<20}{r.filename}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    # As qemu-img compare: 0 same, 1 different, 2 an image could not be opened, 4 read error.
    try:
        a = open_source(args.first, args.first_format, **_open_flags(args))
        b = open_source(args.second, args.second_format, **_open_flags(args))
    except (VmdkError, OSError) as exc:
        _print_error(_message(exc, args))
        return 2
    try:
        with progress_bar(args.progress, max(a.size, b.size), "compare") as bar:
            return _compare(a, b, args.strict, args.quiet, bar)
    except (VmdkError, OSError) as exc:
        _print_error(_message(exc, args))
        return 4
    finally:
        a.close()
        b.close()


def _compare(a: Source, b: Source, strict: bool, quiet: bool,
             progress: Callable[[int], None] | None = None) -> int:
    """Messages and exit code as qemu-img compare's, except that a mismatch is placed at
    its first differing byte, not at the start of that byte's sector."""
    from .compare import first_difference

    say = (lambda line: None) if quiet else print
    if strict and a.size != b.size:
        say(f"Strict mode: Image size mismatch! ({a.size} vs {b.size})")
        return 1
    found = first_difference(a, b, progress)
    if a.size != b.size and (found is None or found >= min(a.size, b.size)):
        # qemu-img warns once the common part compared equal, before the longer tail.
        say("Warning: Image size mismatch!")
    if found is not None:
        say(f"Content mismatch at offset {found}!")
        return 1
    say("Images are identical.")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    if sys.stdout.isatty():
        raise VmdkError("standard output is a terminal: 'vmdk cat' writes the disk's bytes; "
                        "redirect them to a file (> disk.raw) or a pipe")
    from ._output import output_errors

    source = open_source(args.image, args.format, **_open_flags(args))
    try:
        with output_errors("<stdout>"):
            _write_disk(source, sys.stdout.buffer)
    finally:
        source.close()
    return 0


def _write_disk(source: Source, out: BinaryIO) -> None:
    """Every byte of the disk to ``out``; ranges the source does not store are written as
    zeros without reading them, and stored ones are read ahead of the writes (side by
    side from a URL)."""
    sequential = SequentialOutput(out)
    copy(source, sequential.write_at, sparse_size=0)
    sequential.finish(source.size)


def cmd_amend(args: argparse.Namespace) -> int:
    from .amend import amend, amend_options

    amend(args.image, allow_external=args.allow_external,
          **amend_options(parse_options(args.options)))
    return 0


def cmd_rename(args: argparse.Namespace) -> int:
    from .rename import rename

    children = rename(args.source, args.target, allow_external=args.allow_external)
    target = args.target
    if os.path.isdir(target):  # moved into it, under its own name
        target = os.path.join(target, os.path.basename(args.source))
    if not args.quiet:
        for child in children:
            print(f"{child}: now names {target} as its parent")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from .measure import measure

    kwargs = create_kwargs(parse_options(args.options))
    if (args.size is None) == (args.source is None):
        raise VmdkError("measure takes either --size SIZE or a source image")
    size = parse_size(args.size) if args.size is not None else None
    total = 0
    if args.source is not None and args.progress:
        source = open_source(args.source, args.source_format, **_open_flags(args))
        total = source.size
        source.close()
    with progress_bar(args.progress, total, "measure") as bar:
        result = measure(args.source, size=size, src_format=args.source_format,
                         out_format=args.output_format, target=args.target, progress=bar,
                         **_open_flags(args), **kwargs)
    if args.output == "json":
        print(_json(result.to_json(), indent=4))
    else:
        print(f"required size: {result.required}\n"
              f"fully allocated size: {result.fully_allocated}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from .chain import snapshot

    snapshot(args.parent, args.child, overwrite=True, allow_external=args.allow_external,
             force_share=args.force_share)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    from .chain import commit

    with Image.open(args.image, "r", force_share=True,
                    allow_external=args.allow_external) as image:
        size = image.size
    with progress_bar(args.progress, size, "commit") as bar:
        commit(args.image, progress=bar, allow_external=args.allow_external)
    if not args.quiet:
        print("Image committed.")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    from .chain import rebase

    with Image.open(args.image, "r", open_parent=False, force_share=True) as image:
        size = image.size
    with progress_bar(args.progress, size, "rebase") as bar:
        rebase(args.image, args.backing or None, safe=not args.unsafe, progress=bar)
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    from .resize import resize

    text = args.size
    if text.startswith(("+", "-")):
        with Image.open(args.image, "r", open_parent=False) as image:
            current = image.size
        delta = parse_size(text[1:])
        size = current + delta if text[0] == "+" else current - delta
    else:
        size = parse_size(text)
    resize(args.image, size, shrink=args.shrink)
    if not args.quiet:
        print("Image resized.")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    from .compact import compact

    with Image.open(args.image, "r", open_parent=False) as image:
        size = image.size
    with progress_bar(args.progress, size, "compact") as bar:
        result = compact(args.image, progress=bar)
    if not args.quiet:
        print(f"Dropped {result.zero_grains_dropped} zero grains, moved {result.grains_moved}; "
              f"{_human_size(result.bytes_before)} -> {_human_size(result.bytes_after)}")
    return 0


def cmd_export_ova(args: argparse.Namespace) -> int:
    from .ova import export_ova

    source = open_source(args.source, args.source_format, **_open_flags(args))
    size = source.size
    source.close()
    with progress_bar(args.progress, size, "export") as bar:
        export_ova(args.source, args.ova, name=args.name, cpus=args.cpus,
                   memory_mb=args.memory, progress=bar, **_open_flags(args))
    return 0


def _option_value(text: str, parse: Callable[[str], float], fits: Callable[[float], bool],
            what: str) -> float:
    """An option's value, or the one-line usage error saying what it must be."""
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not fits(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _port(text: str) -> int:
    return int(_option_value(text, int, lambda n: 0 <= n <= 65535, "a port number (0-65535)"))


def _positive_int(text: str) -> int:
    return int(_option_value(text, int, lambda n: n >= 1, "a positive whole number"))


def _seconds(text: str) -> float:
    return _option_value(text, float, lambda s: 0 < s < float("inf"),
                         "a positive number of seconds")


def _open_served(path: str, mode: str, allow_external: bool) -> Any:
    """The image to serve; an OVA's disk (the first) is served read-only, in place."""
    from ._file import open as open_image
    from .ova import is_ova

    if is_ova(path):
        from .ova.disk import open_disk

        return open_disk(path, read_only=mode == "r")
    return open_image(path, mode, allow_external=allow_external)


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .nbd.server import serve

    mode = "r" if args.read_only else "r+"
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    where = args.socket or f"{args.bind}:{args.port}"
    try:
        disk = _open_served(args.image, mode, args.allow_external)
    except VmdkError as exc:
        if mode == "r" or not _read_only_would_serve(exc):
            raise
        raise type(exc)(f"{exc.reason}; --read-only serves it as it is",
                        exc.filename) from exc
    listening = []

    def ready(uri: str) -> None:
        listening.append(uri)
        print(f"serving {args.image} at {uri}", flush=True)

    with disk:
        try:
            serve(disk, host=args.bind, port=args.port, unix_socket=args.socket,
                  export_name=args.export_name, read_only=args.read_only,
                  max_connections=args.max_connections,
                  handshake_timeout=args.handshake_timeout,
                  request_timeout=args.request_timeout, ready=ready, stop_event=stop)
        except OSError as exc:
            if listening:
                raise
            raise VmdkError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from .mount import mount

    announce = None if args.quiet else (lambda line: print(line, flush=True))
    return mount(args.image, args.dir, read_write=args.read_write, foreground=args.foreground,
                 open_args=_open_flags(args), announce=announce)


def cmd_umount(args: argparse.Namespace) -> int:
    from .mount import unmount

    unmount(args.dir)
    return 0


def _problem_text(problem: Any, args: argparse.Namespace) -> str:
    """A problem check found, its hint spelled for this verb."""
    from .errors import respell

    return respell(problem.message, problem.opt_in, _verb_flags(args))


def cmd_completion(args: argparse.Namespace) -> int:
    from .completion import script

    print(script(build_parser(), args.shell), end="")
    return 0


def _read_only_would_serve(exc: VmdkError) -> bool:
    """Whether what refused to open an image for writing lets it be read: a file or folder
    without write permission, a write-once stream, change tracking, other readers."""
    from .errors import ImageInUseError, ImageIOError

    if isinstance(exc, ImageIOError):
        return exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    if isinstance(exc, ImageInUseError):
        return "open for reading elsewhere" in exc.reason
    return isinstance(exc, UnsupportedFormatError) and (
        "streamOptimized" in exc.reason or "opens read-only" in exc.reason
        or (exc.opt_in is not None and exc.opt_in[0] == "drop_change_tracking"))


# ---------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """Usage errors as every other error: one line on stderr, naming the verb's own help,
    and exit code 1 (argparse prints the whole usage and exits 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that run something: every verb's and sub-verb's."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases share a parser
            yield from _leaf_parsers(child)


#: Verbs that read an image named by URL (read-only: an image elsewhere is never written).
_URL_VERBS = ("info", "map", "check", "compare", "convert", "cat", "serve", "measure")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only`` one verb (argparse costs ~1 ms a verb)."""
    parser = _Parser(
        prog="vmdk",
        description="Inspect, create, convert, check and serve VMware VMDK virtual disks.",
        epilog="Run 'vmdk VERB --help' for the options of each verb.")
    parser.add_argument("--version", action="version", version=f"vmdk {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is done")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, func: Callable[[argparse.Namespace], int], help: str,
             image: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("--allow-external", action="store_true",
                       help="trust descriptor paths outside the image's folder, and devices")
        if name not in ("create", "serve", "commit", "rebase", "resize", "compact", "amend",
                        "rename"):
            # (verbs that write an existing image hold its lock: there is nothing to share)
            p.add_argument("-U", "--force-share", action="store_true",
                           help="read an image another process has open for writing")
        if name not in ("create", "check", "commit", "rebase", "resize", "compact",
                        "snapshot", "amend", "rename"):
            p.add_argument("--ignore-cid", action="store_true",
                           help="read a snapshot whose parent changed since (CID mismatch)")
        if name in ("convert", "cat", "compare", "measure"):
            p.add_argument("--missing-as-zeros", action="store_true",
                           help="read the missing end of a flat extent file shorter than its "
                                "descriptor says as zeros (refused by default: a cut copy)")
        if name in _URL_VERBS:
            p.add_argument("--storage-option", action="append", default=[],
                           metavar="KEY=VALUE",
                           help="an fsspec option for images named by URL (s3://, https://...; "
                                "pip install 'vmdk[remote]'): anon=true, "
                                "client_kwargs.endpoint_url=URL, ...")
            p.add_argument("--connections", type=_positive_int, default=None, metavar="N",
                           help="requests run side by side per image named by URL (default 8)")
        return p

    if only in (None, "info"):
        p = verb("info", cmd_info, "show an image's size, kind, metadata and extents")
        p.add_argument("--output", choices=("human", "json"), default="human")
        p.add_argument("--backing-chain", action="store_true", help="also show every parent")
        p.add_argument("-f", dest="format", choices=("vmdk",), default="vmdk")
        p.add_argument("image")

    if only in (None, "create"):
        p = verb("create", cmd_create, "create a new image")
        p.add_argument("-f", dest="format", choices=("vmdk",), default="vmdk")
        p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                       help=f"subformat={{{','.join(SUBFORMATS)}}}, adapter_type=ide|buslogic|"
                            "lsilogic|legacyESX|pvscsi|lsisas1068, hwversion=N, compat6=on, "
                            "toolsversion=N, geometry=C/H/S, comment=TEXT, zeroed_grain=on, "
                            "cluster_size=SIZE, preallocation=off|metadata|falloc|full, "
                            "compression_level=0-9, backing_file=PATH, device=PATH (the disk "
                            "of fullDevice and partitionedDevice), partitions=N:N... (the "
                            "partitions of device that partitionedDevice exposes)")
        p.add_argument("-b", dest="backing", metavar="PARENT",
                       help="create a snapshot (child) of PARENT")
        p.add_argument("-F", dest="backing_format", choices=("vmdk",), default="vmdk",
                       help="the parent's format (only vmdk)")
        p.add_argument("-q", dest="quiet", action="store_true")
        p.add_argument("image")
        p.add_argument("size", nargs="?", help="bytes, or with a suffix: 10G, 512M")

    if only in (None, "convert"):
        p = verb("convert", cmd_convert, "copy a disk into a new image or raw file")
        p.add_argument("-f", dest="source_format", choices=("raw", "vmdk", "ova"), default=None,
                       help="source format (detected when omitted)")
        p.add_argument("--disk", default=None, help="which disk of an OVA (default: the first)")
        p.add_argument("--recover", action="store_true",
                       help="salvage a truncated or damaged streamOptimized source: keep every "
                            "grain that reads (a damaged grain reads as zeros), up to where the "
                            "stream is cut or its structure breaks")
        p.add_argument("--target-is-zero", action="store_true",
                       help="accepted for qemu-img compatibility: zeros are never written anyway")
        p.add_argument("-O", dest="output_format", choices=("raw", "vmdk"), default="vmdk",
                       help="target format (default vmdk)")
        p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                       help="create options of the target, as for 'create'")
        p.add_argument("-S", dest="sparse_size", default=str(DEFAULT_SPARSE_SIZE),
                       help="runs of zeros of at least this size are not written (default 4k, a "
                            "multiple of 512); 0 writes everything and allocates raw output fully")
        p.add_argument("-t", dest="cache", choices=("writeback", "unsafe"), default="writeback",
                       help="writeback (default) syncs the target before returning; unsafe "
                            "skips the sync, as qemu-img convert does by default")
        p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
        p.add_argument("source", help="raw file, VMDK (any kind; a snapshot is flattened) or OVA")
        p.add_argument("target", help="the file to create (replaced if it exists)")

    if only in (None, "check"):
        p = verb("check", cmd_check, "check an image for inconsistencies (and repair them)")
        p.add_argument("--output", choices=("human", "json"), default="human")
        p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
        p.add_argument("-r", dest="repair", choices=("leaks", "all"), default=None,
                       help="repair leaked space, or everything that can be repaired without "
                            "losing data")
        p.add_argument("-f", dest="format", choices=("vmdk",), default="vmdk")
        p.add_argument("image")

    if only in (None, "map"):
        p = verb("map", cmd_map, "show where the image's data is stored")
        p.add_argument("--output", choices=("human", "json"), default="human")
        p.add_argument("-f", dest="format", choices=("vmdk",), default="vmdk")
        p.add_argument("image")

    if only in (None, "compare"):
        p = verb("compare", cmd_compare, "compare the contents of two disks (raw or vmdk); exit 0 "
                 "same, 1 different, 2 could not open, 4 read error")
        p.add_argument("-f", dest="first_format", choices=("raw", "vmdk"), default=None,
                       help="the first disk's format (detected when omitted)")
        p.add_argument("-F", dest="second_format", choices=("raw", "vmdk"), default=None,
                       help="the second disk's format (detected when omitted)")
        p.add_argument("-s", dest="strict", action="store_true", help="sizes must match too")
        p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
        p.add_argument("-q", dest="quiet", action="store_true")
        p.add_argument("first")
        p.add_argument("second")

    if only in (None, "cat"):
        p = verb("cat", cmd_cat, "write the disk's contents to standard output")
        p.add_argument("-f", dest="format", choices=("raw", "vmdk"), default=None)
        p.add_argument("image")

    if only in (None, "amend"):
        p = verb("amend", cmd_amend, "change an image's metadata in place (not its content "
                 "or CID): adapter type, hardware version, geometry, UUID, comment")
        p.add_argument("-f", dest="format", choices=("vmdk",), default="vmdk")
        p.add_argument("-o", dest="options", action="append", required=True, metavar="OPTIONS",
                       help="adapter_type=ide|buslogic|lsilogic|legacyESX|pvscsi|lsisas1068, "
                            "hwversion=N, compat6=on, toolsversion=N, geometry=C/H/S, "
                            "uuid=UUID|new, comment=TEXT; all are changed or none")
        p.add_argument("image")

    if only in (None, "rename"):
        p = verb("rename", cmd_rename, "move an image and all its files to a new name, pointing "
                 "its snapshots in the same folder at it (vmware-vdiskmanager -n)")
        p.add_argument("-q", dest="quiet", action="store_true")
        p.add_argument("source", help="the image (its descriptor, or the one file)")
        p.add_argument("target", help="the new name, or a folder on the same file system; "
                                      "never replaced")

    if only in (None, "measure"):
        p = verb("measure", cmd_measure, "how many bytes of files an image needs: converting "
                 "SOURCE, or creating one of --size; 'required' for the content, 'fully "
                 "allocated' with every byte stored (streamOptimized: 'required' is an upper "
                 "bound, compression decides the rest)")
        p.add_argument("--output", choices=("human", "json"), default="human")
        p.add_argument("--size", default=None, help="measure a new empty image of this size")
        p.add_argument("-f", dest="source_format", choices=("raw", "vmdk"), default=None,
                       help="source format (detected when omitted)")
        p.add_argument("-O", dest="output_format", choices=("raw", "vmdk"), default="vmdk",
                       help="target format (default vmdk, as convert's)")
        p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                       help="create options of the target, as for 'create'; subformat="
                            "monolithicSparse (default), twoGbMaxExtentSparse, monolithicFlat, "
                            "twoGbMaxExtentFlat, vmfs or streamOptimized")
        p.add_argument("--target", default="disk.vmdk", metavar="NAME",
                       help="the output's file name: descriptors name their extent files after "
                            "it, so a few bytes depend on it (default disk.vmdk)")
        p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
        p.add_argument("source", nargs="?", help="raw file or VMDK (a snapshot is flattened)")

    if only in (None, "snapshot"):
        p = verb("snapshot", cmd_snapshot, "create CHILD as a new snapshot on top of PARENT")
        p.add_argument("parent", help="the image to take the snapshot of")
        p.add_argument("child", help="the new snapshot (replaced if it exists)")

    if only in (None, "commit"):
        p = verb("commit", cmd_commit, "write a snapshot's changes into its parent")
        p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
        p.add_argument("-q", dest="quiet", action="store_true")
        p.add_argument("image")

    if only in (None, "rebase"):
        p = verb("rebase", cmd_rebase, "change the parent of a snapshot (-b '' makes it standalone)")
        p.add_argument("-b", dest="backing", required=True, metavar="PARENT",
                       help="the new parent; an empty string makes the image standalone")
        p.add_argument("-F", dest="backing_format", choices=("vmdk",), default="vmdk",
                       help="the parent's format (only vmdk)")
        p.add_argument("-u", dest="unsafe", action="store_true",
                       help="only rewrite the parent's name and CID, copy nothing")
        p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
        p.add_argument("image")

    if only in (None, "resize"):
        p = verb("resize", cmd_resize, "change the virtual size (grow; shrink only with --shrink)")
        p.add_argument("--shrink", action="store_true",
                       help="allow shrinking (refused anyway if data would be lost)")
        p.add_argument("-q", dest="quiet", action="store_true")
        p.add_argument("image")
        p.add_argument("size", help="new size (10G), or a change (+1G, -512M)")

    if only in (None, "compact"):
        p = verb("compact", cmd_compact, "drop all-zero grains and give the space back")
        p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
        p.add_argument("-q", dest="quiet", action="store_true")
        p.add_argument("image")

    if only in (None, "export-ova"):
        p = verb("export-ova", cmd_export_ova,
                 "package a disk as an OVA (OVF 1.0, streamOptimized disk, SHA-256 manifest)")
        p.add_argument("-f", dest="source_format", choices=("raw", "vmdk"), default=None,
                       help="the source's format (detected when omitted)")
        p.add_argument("--name", default=None, help="the VM's name (default: the OVA's file name)")
        p.add_argument("--cpus", type=int, default=1, help="virtual CPUs (default 1)")
        p.add_argument("--memory", type=int, default=1024, help="memory in MiB")
        p.add_argument("-p", dest="progress", action="store_true", help="show a progress bar")
        p.add_argument("source", help="the disk: raw or any VMDK")
        p.add_argument("ova", help="the package to write (replaced if it exists)")

    if only in (None, "ova"):  # its sub-verbs live with the OVA package
        from .ova.commands import add_parser as add_ova_parser

        add_ova_parser(sub)

    if only in (None, "serve"):
        from .nbd import server as nbd

        p = verb("serve", cmd_serve, "export the image over NBD until SIGINT or SIGTERM")
        p.add_argument("--read-only", "-r", action="store_true", help="refuse writes")
        p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default loopback)")
        p.add_argument("--port", type=_port, default=10809,
                       help="TCP port to listen on (default 10809, NBD's own)")
        p.add_argument("--socket", default=None,
                       help="listen on this Unix socket instead of TCP (one a killed server "
                            "left behind is replaced)")
        p.add_argument("--export-name", default="", help="export name (default empty)")
        p.add_argument("--max-connections", "-e", type=_positive_int, metavar="N",
                       default=nbd.DEFAULT_MAX_CONNECTIONS,
                       help="clients served at once (default %(default)s); more wait until "
                            "one leaves")
        p.add_argument("--handshake-timeout", type=_seconds, metavar="SECONDS",
                       default=nbd.DEFAULT_HANDSHAKE_TIMEOUT,
                       help="drop a client still negotiating after this long (default "
                            "%(default)g)")
        p.add_argument("--request-timeout", type=_seconds, metavar="SECONDS",
                       default=nbd.DEFAULT_REQUEST_TIMEOUT,
                       help="drop a client that takes longer to send a request or to take its "
                            "reply (default %(default)g)")
        p.add_argument("image")

    if only in (None, "mount"):
        p = verb("mount", cmd_mount, "show the disk and each of its partitions as files (disk, "
                 "p1, p2...) in a directory, through FUSE, until 'vmdk umount DIR'")
        p.add_argument("--read-write", "-w", action="store_true",
                       help="write through to the image (opened for writing, with its lock); "
                            "read-only by default")
        p.add_argument("-f", "--foreground", dest="foreground", action="store_true",
                       help="stay in the foreground until unmounted (Ctrl-C or SIGTERM "
                            "unmounts); by default return once mounted and serve it in the "
                            "background")
        p.add_argument("-q", dest="quiet", action="store_true")
        p.add_argument("image", help="a VMDK of any kind (a snapshot shows its whole chain) or "
                                     "an OVA (its first disk)")
        p.add_argument("dir", help="an empty directory to mount on")

    if only in (None, "umount"):
        p = sub.add_parser("umount", help="unmount what 'vmdk mount' mounted, once the image "
                           "is flushed and closed", description="Unmount a directory 'vmdk "
                           "mount' mounted, and wait until the process serving it has flushed "
                           "and closed the image.")
        p.set_defaults(func=cmd_umount)
        p.add_argument("dir", help="the directory the disk is mounted on")

    if only in (None, "completion"):
        p = sub.add_parser("completion", help="print a shell completion script (bash or zsh)",
                           description="Print a script that completes vmdk's verbs, options "
                           "and file names. bash: eval \"$(vmdk completion bash)\" in "
                           "~/.bashrc; zsh: eval \"$(vmdk completion zsh)\" in ~/.zshrc.")
        p.set_defaults(func=cmd_completion)
        p.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete in")
    for leaf in _leaf_parsers(parser):
        leaf.set_defaults(verb_parser=leaf)  # a usage error names the verb's own help
        for action in leaf._actions:
            if action.help is None:
                action.help = _COMMON_HELP.get(action.dest)
    return parser


#: What the options and arguments many verbs share are for (by their destination).
_COMMON_HELP = {
    "image": "the image: a descriptor, a monolithic file or a bare extent",
    "output": "human-readable text (default) or JSON",
    "format": "the image's format",
    "quiet": "print nothing when all went well",
    "first": "the first disk: raw, any VMDK or an OVA",
    "second": "the second disk: raw, any VMDK or an OVA",
}


#: The command line's spelling of the library's opt-ins (keyword -> option), offered in a
#: hint only by the verbs that have the option.
_OPT_IN_FLAGS = {"allow_external": "--allow-external", "force_share": "-U",
                 "ignore_cid": "--ignore-cid", "missing_as_zeros": "--missing-as-zeros",
                 "shrink": "--shrink", "options": "-o partitions=N:N (as sfdisk numbers them)"}
#: Opt-ins that are options of -o on the command line (keyword -> the dest that has them).
_OPT_IN_DESTS = {"partitions": "options"}


def _verb_flags(args: argparse.Namespace | None) -> dict[str, str]:
    """The opt-ins this verb's command line has, in its spelling."""
    flags = {k: v for k, v in _OPT_IN_FLAGS.items() if hasattr(args, k)}
    for keyword, dest in _OPT_IN_DESTS.items():
        if dest in flags:
            flags[keyword] = flags.pop(dest)
    return flags


def _message(exc: BaseException, args: argparse.Namespace | None = None) -> str:
    """"FILE: fault", also for the system's own errors ("[Errno 30] ...: 'x'" otherwise);
    a hint names an option only when this verb has it."""
    if isinstance(exc, VmdkError):
        return exc.with_flags(_verb_flags(args))
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return str(exc)


def _relative_sizes(argv: list[str]) -> list[str]:
    """Let "resize IMAGE -1M" through: argparse would take -1M for an option."""
    if "resize" not in argv or "--" in argv:
        return argv
    for i, word in enumerate(argv):
        if re.fullmatch(r"-\d+(\.\d+)?[A-Za-z]*", word):
            return argv[:i] + argv[i + 1:] + ["--", word]  # options after it stay options
    return argv


#: Every verb build_parser knows (a test keeps the two in step).
_VERB_NAMES = frozenset({"info", "create", "convert", "check", "map", "compare", "cat", "snapshot",
                         "commit", "rebase", "resize", "compact", "export-ova", "serve",
                         "amend", "rename", "measure", "ova", "completion", "mount",
                         "umount"})


def _verb_of(argv: list[str]) -> str | None:
    """The verb, when the command line names a known one (global options take no value)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in _VERB_NAMES else None
    return None


def _help_words(argv: list[str]) -> list[str]:
    """"vmdk help VERB" and "vmdk -h VERB" as "vmdk VERB --help" ("vmdk help" alone: the
    list of verbs)."""
    if argv[:1] == ["help"]:
        return argv[1:2] + ["--help"]
    if argv[:1] in (["-h"], ["--help"]) and len(argv) > 1 and argv[1] in _VERB_NAMES:
        return [argv[1], "--help"]
    return argv


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken as an interrupt: a terminated verb cleans up as an interrupted one."""


#: The signal that interrupted this run, if one did.  An interrupt that lands inside an
#: import or a C extension may surface as another exception (numpy turns it into an
#: ImportError): the exit still says what happened.
_interrupted_by: list[int] = []


def _interrupt(signum: int, frame: object) -> None:
    _interrupted_by.append(signum)
    if signum == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """For the verb's run: SIGINT and SIGTERM interrupt it, and are remembered
    (serve sets handlers of its own)."""
    try:
        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals go elsewhere
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    del _interrupted_by[:]
    # Nothing here multiplies matrices, yet numpy's OpenBLAS starts a thread per core that
    # spins for work: 3% of a stream conversion's CPU, taken from the threads that
    # compress.  This process is ours to set up (a library must not change its host's).
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    with _signals_as_interrupts():
        try:
            words = _help_words(_relative_sizes(list(sys.argv[1:] if argv is None else argv)))
            args = _parse(build_parser(_verb_of(words)), words)
            if args.verbose:
                logging.basicConfig(level=logging.INFO, format="vmdk: %(message)s")
            else:
                logging.basicConfig(level=logging.WARNING, format="vmdk: warning: %(message)s")
        except KeyboardInterrupt as exc:  # still starting: nothing to clean up yet
            return _interrupted(isinstance(exc, Terminated))
        except Exception:
            if not _interrupted_by:
                raise
            return _interrupted(_interrupted_by[0] == signal.SIGTERM)
        return _run(args)


def _parse(parser: argparse.ArgumentParser, words: list[str]) -> argparse.Namespace:
    """The arguments; what no option takes is the verb's usage error, not vmdk's."""
    args, extra = parser.parse_known_args(words)
    if extra:
        getattr(args, "verb_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _run(args: argparse.Namespace) -> int:
    """The verb, its errors as one line and an exit code; no output of it left half made."""
    try:
        _configure_remote(args)
        code = int(args.func(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (as with "| head"): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (VmdkError, OSError, ValueError, OverflowError, MemoryError) as exc:
        if _interrupted_by:  # the interrupt's own consequence
            return _interrupted(_interrupted_by[0] == signal.SIGTERM)
        discard_all()
        if args.debug:
            raise
        _print_error(_message(exc, args))
        return 1
    except KeyboardInterrupt as exc:
        return _interrupted(isinstance(exc, Terminated))
    except Exception:
        if not _interrupted_by:
            raise
        return _interrupted(_interrupted_by[0] == signal.SIGTERM)


def _interrupted(terminated: bool) -> int:
    discard_all()  # a stage the interrupt caught between two lines of its owner
    print(f"vmdk: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
    return 143 if terminated else 130
