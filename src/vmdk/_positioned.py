"""The file position shared by every file object over a virtual disk."""

from __future__ import annotations

import io
import operator
import os
from typing import NoReturn


class PositionedDisk(io.RawIOBase):
    """``seek``/``tell`` over a disk of ``size`` bytes; subclasses move ``_pos`` as they do I/O."""

    _pos = 0

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        raise NotImplementedError

    def seekable(self) -> bool:
        """Always True: a disk is read and written anywhere."""
        self._checkClosed()
        return True

    def tell(self) -> int:
        """The file position, in bytes from the start of the disk."""
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the file position (``whence`` as for files: SEEK_SET, SEEK_CUR, SEEK_END);
        returns the new position.  Past the end is allowed, as for files: reads there
        return nothing and writes raise."""
        self._checkClosed()
        offset = operator.index(offset)  # as FileIO: no floats or strings
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        # A copy would share open file descriptors that the original closes: refuse, as files do.
        raise TypeError(f"cannot pickle or copy {type(self).__name__!r} object")
