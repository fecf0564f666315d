"""Serve a block device (an opened VMDK image) over NBD.

:mod:`.protocol` is the sans-I/O state machine, :mod:`.server` the socket
shell around it (one thread, a selector loop, bounded clients and memory).
"""

from .protocol import (
    ExportInfo,
    LocalProtocolError,
    NbdProtocolError,
    RemoteProtocolError,
    ServerConnection,
    State,
)
from .server import BlockDevice, Limits, MapRun, NbdServer, serve

__all__ = [
    "BlockDevice",
    "ExportInfo",
    "Limits",
    "LocalProtocolError",
    "MapRun",
    "NbdProtocolError",
    "NbdServer",
    "RemoteProtocolError",
    "ServerConnection",
    "State",
    "serve",
]
