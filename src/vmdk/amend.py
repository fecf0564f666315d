"""Changing an image's metadata in place: ``vmdk amend``, with ``qemu-img amend``'s spelling.

What can change is what the disk database says about the disk, never its
content: adapter type, hardware and tools version, geometry, image UUID and
comment.  The CID stays, so snapshots of the image keep matching it.  All
changes are made together or none is, in one write of the descriptor (in
place, as every descriptor update here is).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import UnsupportedFormatError, VmdkError
from .image import Image

if TYPE_CHECKING:
    from uuid import UUID

#: The ``-o`` keys amend takes, and what each sets.
AMEND_OPTIONS = {
    "adapter_type": "ddb.adapterType (ide, buslogic, lsilogic, legacyESX, pvscsi, lsisas1068)",
    "hwversion": "ddb.virtualHWVersion (a number)",
    "compat6": "on: hardware version 6, as qemu-img's create option",
    "toolsversion": "ddb.toolsVersion (a number)",
    "geometry": "CYLINDERS/HEADS/SECTORS (ddb.geometry.*)",
    "uuid": "ddb.uuid.image: a UUID, or 'new' for a random one",
    "comment": "ddb.comment (free text, no double quote)",
}
#: Create options that amend cannot change, and what does.
_ELSEWHERE = {
    "subformat": "'vmdk convert -o subformat=...' makes a copy in another subformat",
    "size": "'vmdk resize' changes the size",
    "cluster_size": "'vmdk convert -o cluster_size=...' makes a copy with other grains",
    "backing_file": "'vmdk rebase' changes the parent",
    "zeroed_grain": "'vmdk convert -o zeroed_grain=on' makes a copy with zeroed-grain entries",
    "compression_level": "'vmdk convert' makes a new streamOptimized copy",
    "preallocation": "preallocation is chosen when an image is made ('vmdk convert')",
}


def amend_options(options: Mapping[str, str]) -> dict[str, Any]:
    """Translate ``-o key=value`` options (qemu-img's names) into :func:`amend`'s arguments.

    Unknown keys are refused with the list of known ones; keys that another verb
    changes name that verb.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in _ELSEWHERE:
            raise VmdkError(f"option {key} cannot be amended: {_ELSEWHERE[key]}")
        if key not in AMEND_OPTIONS:
            raise VmdkError(f"unknown option {key!r}: amend changes "
                            f"{', '.join(AMEND_OPTIONS)}")
        if key == "compat6":
            if value.lower() not in ("on", "yes", "true", "1"):
                continue  # compat6=off asks for nothing
            if "hwversion" in options:  # as qemu-img: the two say different things
                raise VmdkError("option compat6 cannot be used with hwversion")
            out["hardware_version"] = "6"
        elif key == "geometry":
            out["geometry"] = _geometry(value)
        elif key == "hwversion":
            out["hardware_version"] = value
        elif key == "toolsversion":
            out["tools_version"] = value
        else:
            out[key] = value
    if not out:
        raise VmdkError(f"nothing to amend: give -o with one of {', '.join(AMEND_OPTIONS)}")
    return out


def _geometry(value: str) -> tuple[int, int, int]:
    parts = value.replace(",", "/").split("/")
    try:
        c, h, s = (int(p) for p in parts)
    except ValueError:
        raise VmdkError(f"option geometry: {value!r} is not CYLINDERS/HEADS/SECTORS") from None
    return c, h, s


def amend(path: str | os.PathLike[str], *, adapter_type: str | None = None,
          hardware_version: str | int | None = None, tools_version: str | int | None = None,
          geometry: tuple[int, int, int] | None = None, uuid: UUID | str | None = None,
          comment: str | None = None, allow_external: bool = False) -> None:
    """Change what the image's disk database says; arguments left None stay as they are.

    ``uuid`` may be "new" for a random one.  Every value is checked before
    anything is written: a bad one raises ``ValueError`` (or ``DescriptorError``
    for a comment with a double quote, ``DescriptorSpaceError`` when an
    embedded descriptor would outgrow its area) and the image is left as it
    was.  The image is opened for writing, so one in use elsewhere is refused
    (``ImageInUseError``); so is a streamOptimized image, which is written
    once.  The content, the CID and every other line of the descriptor stay.
    """
    path = os.fspath(path)
    _refuse_write_once(path, allow_external)
    # Changed block tracking stays valid: no content changes, so the tracked image may be
    # opened for writing (the tracking is dropped only on a first content write).
    with Image.open(path, "r+", open_parent=False, allow_external=allow_external,
                    drop_change_tracking=True) as image:
        if not image.stores_descriptor:
            raise UnsupportedFormatError("this file has no descriptor of its own (a bare "
                                         "extent): amend the image's descriptor file", path)
        before = image.descriptor.copy()
        try:
            _apply(image, adapter_type, hardware_version, tools_version, geometry, uuid,
                   comment)
        except BaseException:
            image.descriptor = before  # nothing is written: close() finds no change
            raise


def _refuse_write_once(path: str, allow_external: bool) -> None:
    """A streamOptimized file cannot be opened for writing: say what to do instead."""
    with Image.open(path, "r", open_parent=False, force_share=True,
                    allow_external=allow_external) as image:
        if any(getattr(extent, "compressed", False) for extent in image.extents):
            raise UnsupportedFormatError(
                "a streamOptimized image is written once and cannot be amended: convert it "
                "('vmdk convert -o subformat=monolithicSparse', amend, convert back)", path)


def _apply(image: Image, adapter_type: str | None, hardware_version: str | int | None,
           tools_version: str | int | None, geometry: tuple[int, int, int] | None,
           uuid: UUID | str | None, comment: str | None) -> None:
    """Set each given value through the image's own checked setters."""
    if adapter_type is not None:
        image.adapter_type = adapter_type
    if hardware_version is not None:
        image.hardware_version = str(hardware_version)
    if tools_version is not None:
        if not str(tools_version).isdigit():
            raise ValueError(f"tools version {tools_version!r} is not a number")
        image.set_metadata("ddb.toolsVersion", str(tools_version))
    if geometry is not None:
        image.set_geometry(*geometry)
    if uuid is not None:
        image.uuid = _uuid(str(uuid))
    if comment is not None:
        image.comment = comment


def _uuid(text: str) -> UUID:
    """A UUID from its text, or a random one for "new"; ValueError for anything else."""
    import uuid  # on first use: it costs 4 ms at start-up (it imports platform)

    if text.lower() == "new":
        return uuid.uuid4()
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a UUID (or 'new')") from None
