"""Deflate for compressed grains: ISA-L when installed (many times faster), zlib otherwise.

Both produce and accept zlib-wrapped streams (RFC 1950), which is what every
VMDK implementation writes despite the spec naming raw deflate.
"""

from __future__ import annotations

import zlib
from types import ModuleType

_engine: ModuleType
_errors: tuple[type[Exception], ...] = (zlib.error,)
try:
    from isal import isal_zlib as _engine

    _errors = (zlib.error, _engine.error)
except ImportError:  # pragma: no cover - depends on the platform
    _engine = zlib

ENGINE_NAME = "isal" if _engine is not zlib else "zlib"
#: ISA-L knows levels 0-3; higher levels are clamped to its best.
ISAL_MAX_LEVEL = 3


def compress(data: bytes | memoryview, level: int = 1) -> bytes:
    if _engine is not zlib:
        level = min(level, ISAL_MAX_LEVEL)
    out: bytes = _engine.compress(data, level)
    return out


def inflate_bounded(data: bytes | memoryview, limit: int) -> bytes:
    """Inflate a zlib stream, refusing output above ``limit`` bytes (a bomb guard).

    Raises ``ValueError`` when the stream is damaged or too large; callers turn
    it into a ``CorruptImageError`` naming the grain.
    """
    obj = _engine.decompressobj()
    try:
        out = obj.decompress(data, limit + 1)
    except _errors as exc:
        raise ValueError(f"damaged deflate stream: {exc}") from exc
    if len(out) > limit:
        raise ValueError(f"inflates to more than {limit} bytes")
    return bytes(out)
