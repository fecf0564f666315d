"""Helpers of the OVA tests: VMware's peers (vmdk-convert, ova-compose), the DMTF schema
check, and hand-laid packages.  Test modules import the fixtures they use from here."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from conftest import pattern

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
if not REFERENCE.is_dir():  # CI clones main with shared/ beside it
    REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
OPEN_VMDK = REFERENCE / "open-vmdk"
SCHEMA = REFERENCE / "ovf-schema" / "dsp8023_1.1.1.xsd"
SRC = Path(__file__).resolve().parents[1] / "src"
MiB = 1 << 20


def cli(*args: str | os.PathLike[str], cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    """``vmdk ARGS`` in a subprocess that imports this work tree's package."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.run([sys.executable, "-m", "vmdk", *map(os.fspath, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="session")
def vmdk_convert_exe(tmp_path_factory: pytest.TempPathFactory) -> str:
    """open-vmdk's vmdk-convert, built for this session (VMware's own stream reader)."""
    if not (OPEN_VMDK / "vmdk" / "Makefile").is_file():
        pytest.skip(f"open-vmdk sources not found at {OPEN_VMDK}")
    if not shutil.which("gcc") or not shutil.which("make"):
        pytest.skip("gcc and make are needed to build open-vmdk's vmdk-convert")
    out = tmp_path_factory.mktemp("open-vmdk")
    built = subprocess.run(["make", "-s", "-C", str(OPEN_VMDK / "vmdk"), f"OUTPUTDIR={out}"],
                           check=False, capture_output=True, text=True, timeout=300)
    exe = out / "vmdk-convert"
    if built.returncode != 0 or not exe.is_file():
        pytest.skip(f"vmdk-convert did not build (zlib1g-dev missing?): {built.stderr[-500:]}")
    return str(exe)


Compose = Callable[..., Path]


@pytest.fixture(scope="session")
def ova_compose(vmdk_convert_exe: str) -> Compose:
    """``compose(folder, yaml_text, name, *options)``: VMware's ova-compose makes
    ``folder/name.ova`` from the YAML (disks named in it are looked up in ``folder``)."""
    for module in ("yaml", "lxml"):
        pytest.importorskip(module, reason=f"ova-compose needs {module} (pip install '.[test]')")

    def compose(folder: Path, yaml_text: str, name: str, *options: str) -> Path:
        (folder / f"{name}.yaml").write_text(yaml_text)
        out = folder / f"{name}.ova"
        subprocess.run([sys.executable, str(OPEN_VMDK / "ova-compose" / "ova-compose.py"), "-q",
                        "--vmdk-convert", vmdk_convert_exe, "-i", f"{name}.yaml", "-o",
                        out.name, *options], cwd=folder, check=True, capture_output=True,
                       timeout=300)
        return out

    return compose


def schema_errors(ovf: bytes, folder: Path) -> str | None:
    """xmllint's complaint about ``ovf`` under the DMTF schema, None when it validates."""
    if not shutil.which("xmllint"):
        pytest.skip("xmllint is not installed (Debian: libxml2-utils)")
    if not SCHEMA.is_file():
        pytest.skip(f"the DMTF OVF schema is not at {SCHEMA}")
    path = folder / "check.ovf"
    path.write_bytes(ovf)
    done = subprocess.run(["xmllint", "--noout", "--nonet", "--schema", str(SCHEMA), str(path)],
                          check=False, capture_output=True, text=True, timeout=120)
    return None if done.returncode == 0 else done.stderr


def raw_disk(path: Path, size: int, seed: int) -> bytes:
    """A raw disk of pattern data (sector-aligned: vmdk-convert spins on anything else)."""
    data = pattern(size, seed=seed)
    path.write_bytes(data)
    return data


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers() if m.isfile()}


def names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def lay_out(path: Path, items: Sequence[tuple[str, bytes]],
            fmt: int = tarfile.USTAR_FORMAT) -> Path:
    """A package holding ``items`` in this order, in the tar format asked for (pax: with
    a pax record before every member, as GNU tar --format=posix writes)."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            if fmt == tarfile.PAX_FORMAT:
                info.pax_headers = {"comment": "written as pax"}
            tar.addfile(info, io.BytesIO(data))
    return path
