"""`import vmdk` loads what opening and reading need, and nothing of the rest.

Start-up is part of every command's time (``python -m bench`` shows ``vmdk info``
against ``python -c pass``); this test keeps the import's reach from growing back,
by naming what it may load, not by timing it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

#: The package's modules that `import vmdk` loads: the file object, images and extents.
CORE = {"vmdk", "vmdk._access", "vmdk._deflate", "vmdk._file", "vmdk._numpy",
        "vmdk._positioned", "vmdk._structs", "vmdk.create", "vmdk.descriptor", "vmdk.errors",
        "vmdk.extents", "vmdk.extents.base", "vmdk.extents.flat", "vmdk.extents.sparse",
        "vmdk.extents.table_scan", "vmdk.image"}

#: Loaded only by what needs them (each costs milliseconds, some tens of them).
NEVER = {"numpy", "isal", "tqdm", "fsspec", "aiohttp", "s3fs", "mfusepy", "cryptography", "yaml",
         "lxml", "argparse", "json", "tarfile", "zipfile", "gzip", "uuid", "platform",
         "hashlib", "ssl", "socket", "subprocess", "tempfile", "shutil", "concurrent",
         "xml", "urllib", "http", "email", "pathlib", "selectors", "signal", "fractions",
         "decimal", "random", "datetime", "locale", "gettext", "importlib.metadata"}


def _imported() -> set[str]:
    code = ("import sys; before = set(sys.modules); import vmdk; "
            "new = sorted(set(sys.modules) - before); print(' '.join(new))")
    # -S: without this machine's site-packages .pth files, which import things of their own
    done = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(SRC)},
                          capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_import_vmdk_loads_the_core_only() -> None:
    loaded = _imported()
    ours = {m for m in loaded if m == "vmdk" or m.startswith("vmdk.")}
    assert ours == CORE, f"more: {sorted(ours - CORE)}, fewer: {sorted(CORE - ours)}"
    heavy = {m for m in loaded if m.split(".")[0] in NEVER or m in NEVER}
    assert not heavy, sorted(heavy)


def test_import_vmdk_has_no_side_effects() -> None:
    """No thread, no file, no signal handler, no change to the environment."""
    code = ("import os, signal, sys, threading; env = dict(os.environ); "
            "handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}; "
            "import vmdk; "
            "assert threading.active_count() == 1, threading.enumerate(); "
            "assert dict(os.environ) == env; "
            "assert handlers == {s: signal.getsignal(s) for s in handlers}; "
            "print(len(os.listdir('/proc/self/fd')))")
    bare = "import os, signal, sys, threading; print(len(os.listdir('/proc/self/fd')))"
    base = subprocess.run([sys.executable, "-S", "-c", bare],
                          env={"PYTHONPATH": str(SRC)}, capture_output=True, text=True,
                          check=True)
    done = subprocess.run([sys.executable, "-S", "-c", code], env={"PYTHONPATH": str(SRC)},
                          capture_output=True, text=True, check=True)
    assert done.stdout == base.stdout  # no file left open


def test_stream_conversions_load_no_numpy(tmp_path: Path) -> None:
    """numpy costs a conversion 45 ms of its start: writing a stream, from a raw disk or a
    sparse image, does without it (zero detection a grain at a time, tables as arrays)."""
    import vmdk

    with open(tmp_path / "disk.raw", "wb") as f:
        f.write(bytes(3 << 20) + b"data" * 300000)
    with vmdk.create(tmp_path / "sparse.vmdk", 8 << 20) as disk:
        disk.write_at(5 << 20, b"data" * 300000)
    code = ("import sys; from vmdk.convert import convert; "
            "convert(sys.argv[1], sys.argv[3], subformat='streamOptimized', durable=False); "
            "convert(sys.argv[2], sys.argv[4], subformat='streamOptimized', durable=False); "
            "print('numpy' in sys.modules)")
    done = subprocess.run([sys.executable, "-S", "-c", code, tmp_path / "disk.raw",
                           tmp_path / "sparse.vmdk", tmp_path / "a.vmdk", tmp_path / "b.vmdk"],
                          env={"PYTHONPATH": str(SRC)}, capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False"]
