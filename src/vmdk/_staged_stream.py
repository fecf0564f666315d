"""A streamOptimized image written in a staging folder and put in place when closed."""

from __future__ import annotations

from typing import Any

from ._output import StagedOutput
from .image import io_errors
from .stream import StreamFile


class StagedStreamFile(StreamFile):
    """What ``create(..., subformat="streamOptimized")`` returns.

    The image gets its name when it is closed, its footer written; abandoned,
    or failing on the way, nothing of it remains and what the name held before
    is left as it was.
    """

    def __init__(self, stage: StagedOutput, capacity_sectors: int, descriptor: bytes,
                 **options: Any) -> None:
        super().__init__(stage.path, capacity_sectors, descriptor, **options)
        self.stage = stage
        self.path = stage.final

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
        except BaseException:
            self.stage.discard()
            raise
        with io_errors(self.stage.final):
            self.stage.commit()

    def abandon(self) -> None:
        try:
            super().abandon()
        finally:
            self.stage.discard()
