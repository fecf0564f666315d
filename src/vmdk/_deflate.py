"""Deflate for compressed grains: ISA-L when installed (many times faster), zlib otherwise.

Both produce and accept zlib-wrapped streams (RFC 1950), which is what every
VMDK implementation writes despite the spec naming raw deflate.  The engine is
loaded on first use: most images have no compressed grain.
"""

from __future__ import annotations

import functools
import zlib
from types import ModuleType
from typing import cast

#: ISA-L knows levels 0-3; higher levels are clamped to its best.
ISAL_MAX_LEVEL = 3


@functools.cache
def engine() -> tuple[ModuleType, tuple[type[Exception], ...]]:
    """The deflate module in use, and the exceptions it raises for damaged streams."""
    try:
        from isal import isal_zlib
    except ImportError:  # pragma: no cover - depends on the platform
        return zlib, (zlib.error,)
    return isal_zlib, (zlib.error, cast("type[Exception]", isal_zlib.error))


def deflate_bound(length: int) -> int:
    """The most bytes a zlib stream of ``length`` input bytes takes: zlib's compressBound,
    which zlib guarantees at every level.  Grains written here never exceed it (see
    :func:`vmdk.stream.make_compressor`), so an image's size can be bounded before it is made.
    """
    return length + (length >> 12) + (length >> 14) + (length >> 25) + 13


def compress(data: bytes | memoryview, level: int = 1) -> bytes:
    module, _errors = engine()
    if module is not zlib:
        level = min(level, ISAL_MAX_LEVEL)
    out: bytes = module.compress(data, level)
    return out


def inflate_bounded(data: bytes | memoryview, limit: int) -> bytes:
    """Inflate a zlib stream, refusing output above ``limit`` bytes (a bomb guard).

    Raises ``ValueError`` when the stream is damaged or too large; callers turn
    it into a ``CorruptImageError`` naming the grain.
    """
    module, errors = engine()
    obj = module.decompressobj()
    try:
        out = obj.decompress(data, limit + 1)
    except errors as exc:
        raise ValueError(f"damaged deflate stream: {exc}") from exc
    if len(out) > limit:
        raise ValueError(f"inflates to more than {limit} bytes")
    return bytes(out)
