"""Serve a block device (an opened VMDK image) over NBD.

:mod:`.protocol` is the sans-I/O state machine, :mod:`.server` the threaded
socket shell around it.
"""

from .protocol import (
    ExportInfo,
    LocalProtocolError,
    NbdProtocolError,
    RemoteProtocolError,
    ServerConnection,
    State,
)
from .server import BlockDevice, MapRun, NbdServer, serve

__all__ = [
    "BlockDevice",
    "ExportInfo",
    "LocalProtocolError",
    "MapRun",
    "NbdProtocolError",
    "NbdServer",
    "RemoteProtocolError",
    "ServerConnection",
    "State",
    "serve",
]
