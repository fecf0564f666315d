"""vmdk: read, write, create, check, convert and serve VMware VMDK virtual disks.

    import vmdk
    with vmdk.open("disk.vmdk") as disk:          # mode="r+" to write
        disk.read(4096)
    with vmdk.create("new.vmdk", size=10 * 2**30) as disk:
        disk.write(b"...")
"""

from ._file import VmdkFile, open
from .create import RawRange, create
from .errors import (
    ChainError,
    CorruptImageError,
    DescriptorError,
    DescriptorSpaceError,
    ImageExistsError,
    ImageInUseError,
    ImageIOError,
    InvalidHeaderError,
    MissingExtentError,
    OutOfRangeError,
    ReadOnlyError,
    RemoteError,
    UnsafePathError,
    UnsupportedFormatError,
    VmdkError,
)
from .image import Image, MapRun

__version__ = "0.1.0"

__all__ = [
    "ChainError",
    "CorruptImageError",
    "DescriptorError",
    "DescriptorSpaceError",
    "Image",
    "ImageExistsError",
    "ImageIOError",
    "ImageInUseError",
    "InvalidHeaderError",
    "MapRun",
    "MissingExtentError",
    "OutOfRangeError",
    "RawRange",
    "ReadOnlyError",
    "RemoteError",
    "UnsafePathError",
    "UnsupportedFormatError",
    "VmdkError",
    "VmdkFile",
    "create",
    "open",
]
