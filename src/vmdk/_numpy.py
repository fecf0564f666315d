"""numpy, imported when first used.

Importing numpy takes about 80 ms, more than opening, mapping and reading a
typical image.  Sparse grain directories and tables are stdlib ``array``
objects, so inspecting, reading and converting most images never loads it;
the bulk arithmetic of checks, repairs, compaction, zero detection and the
COWD and seSparse tables does, on first use.

Modules write ``np.frombuffer(...)`` as usual; mypy sees numpy itself::

    if TYPE_CHECKING:
        import numpy as np
    else:
        from ._numpy import np
"""

from __future__ import annotations

import importlib
from typing import Any


class _LazyNumpy:
    def __getattr__(self, name: str) -> Any:
        value = getattr(importlib.import_module("numpy"), name)
        self.__dict__[name] = value  # later lookups skip __getattr__
        return value

    def __repr__(self) -> str:
        return "<numpy, imported on first use>"


np: Any = _LazyNumpy()
