"""vmdk rename: an image moved with all its files, its snapshots pointed at the new name,
and a kill or failure at any step leaving the old image or the new one whole.

The sweeps reuse test_resume's forked worker, which ends itself (as a SIGKILL
would: nothing flushed, nothing closed) just before its Nth system call that
changes a file, for every N over the whole rename.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import test_resume
import vmdk
from conftest import pattern, run
from vmdk.chain import snapshot
from vmdk.cli import main
from vmdk.errors import (
    ChainError,
    ImageExistsError,
    ImageInUseError,
    UnsafePathError,
    VmdkError,
)
from vmdk.image import Image
from vmdk.rename import rename

MiB = 1 << 20
SIZE = 3 * MiB
KINDS = ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat", "twoGbMaxExtentFlat",
         "vmfs", "streamOptimized"]


def make(path: Path, subformat: str = "monolithicSparse", seed: int = 5) -> Path:
    with vmdk.create(path, SIZE, subformat) as disk:
        disk.write(pattern(SIZE, seed=seed))
    return path


def digest(path: Path) -> str:
    with vmdk.open(path) as disk:
        return hashlib.sha256(disk.read()).hexdigest()


def hint_of(path: Path) -> str | None:
    with Image.open(path, open_parent=False) as image:
        return image.descriptor.parent_file_name_hint


def family(folder: Path, subformat: str = "monolithicSparse") -> dict[str, str]:
    """base.vmdk with two snapshots, one with a snapshot of its own; what each reads."""
    make(folder / "base.vmdk", subformat)
    for child, parent in (("a.vmdk", "base.vmdk"), ("b.vmdk", "base.vmdk"),
                          ("a2.vmdk", "a.vmdk")):
        snapshot(folder / parent, folder / child)
        with vmdk.open(folder / child, "r+") as disk:
            disk.write_at(len(child) * 4096, child.encode() * 100)
    return {name: digest(folder / name) for name in ("base.vmdk", "a.vmdk", "b.vmdk", "a2.vmdk")}


@pytest.mark.parametrize("subformat", KINDS)
def test_every_file_gets_the_new_name(qemu_img: str, tmp_path: Path, subformat: str) -> None:
    src = make(tmp_path / "disk.vmdk", subformat)
    content = digest(src)
    with Image.open(src) as image:
        cid, old_lines = image.cid, image.descriptor.to_bytes().splitlines()
    before = os.listdir(tmp_path)
    assert main(["rename", str(src), str(tmp_path / "moved.vmdk")]) == 0
    dst = tmp_path / "moved.vmdk"
    assert sorted(os.listdir(tmp_path)) == sorted(n.replace("disk", "moved") for n in before)
    assert digest(dst) == content
    with Image.open(dst) as image:
        assert image.cid == cid
        names = [e.filename for e in image.descriptor.extents]
        new_lines = image.descriptor.to_bytes().splitlines()
    assert all(n is not None and n.startswith("moved") for n in names)
    # Only the extent lines changed, byte for byte.
    assert [a for a in old_lines if a not in new_lines] == [
        line for line in old_lines if line.startswith(b"RW ")]
    assert "No errors were found" in run(qemu_img, "check", dst).stdout


def test_file_names_follow_the_image(tmp_path: Path) -> None:
    src = make(tmp_path / "disk.vmdk", "monolithicFlat")
    rename(src, tmp_path / "other.vmdk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-flat.vmdk", "other.vmdk"]


def test_snapshots_follow_their_parent(qemu_img: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    reads = family(tmp_path)
    with Image.open(tmp_path / "a.vmdk", open_parent=False) as image:
        parent_cid = image.parent_cid
    assert main(["rename", str(tmp_path / "base.vmdk"), str(tmp_path / "gold.vmdk")]) == 0
    printed = capsys.readouterr().out
    assert "a.vmdk: now names" in printed and "b.vmdk: now names" in printed
    assert "a2.vmdk" not in printed  # its parent is a.vmdk, which kept its name
    assert not (tmp_path / "base.vmdk").exists()
    assert hint_of(tmp_path / "a.vmdk") == hint_of(tmp_path / "b.vmdk") == "gold.vmdk"
    assert hint_of(tmp_path / "a2.vmdk") == "a.vmdk"
    with Image.open(tmp_path / "a.vmdk", open_parent=False) as image:
        assert image.parent_cid == parent_cid
    assert {name: digest(tmp_path / name) for name in ("gold.vmdk", "a.vmdk", "b.vmdk",
                                                       "a2.vmdk")} == {
        "gold.vmdk" if n == "base.vmdk" else n: d for n, d in reads.items()}
    chain = json.loads(run(qemu_img, "info", "--output=json", "--backing-chain",
                           tmp_path / "a2.vmdk").stdout)
    assert [Path(c["filename"]).name for c in chain] == ["a2.vmdk", "a.vmdk", "gold.vmdk"]
    for name in ("gold.vmdk", "a.vmdk", "a2.vmdk"):
        assert run(qemu_img, "check", tmp_path / name).returncode == 0


def test_a_snapshot_itself_moves_into_another_folder(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    folder.mkdir()
    reads = family(folder)
    # a2.vmdk will name "../a.vmdk", outside its folder: only when that is trusted.
    rename(folder / "a.vmdk", tmp_path, allow_external=True)  # a folder: the same name in it
    assert hint_of(tmp_path / "a.vmdk") == "vm/base.vmdk"
    assert hint_of(folder / "a2.vmdk") == "../a.vmdk"
    with pytest.raises(UnsafePathError):
        digest(folder / "a2.vmdk")
    with vmdk.open(folder / "a2.vmdk", allow_external=True) as disk:
        assert hashlib.sha256(disk.read()).hexdigest() == reads["a2.vmdk"]
    assert digest(tmp_path / "a.vmdk") == reads["a.vmdk"]


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_refused_when_a_chain_would_break(tmp_path: Path) -> None:
    folder = tmp_path / "vm"
    (folder / "sub").mkdir(parents=True)
    reads = family(folder)
    before = contents(folder)
    with pytest.raises(UnsafePathError):  # a.vmdk would name its parent "../base.vmdk"
        rename(folder / "a.vmdk", folder / "sub" / "a.vmdk")
    with pytest.raises(ChainError, match=r"a\.vmdk .*; b\.vmdk .*outside"):
        rename(folder / "base.vmdk", tmp_path / "base.vmdk")  # they would name ../base.vmdk
    assert contents(folder) == before and os.listdir(folder / "sub") == []
    assert sorted(os.listdir(tmp_path)) == ["vm"]
    rename(folder / "base.vmdk", tmp_path / "base.vmdk", allow_external=True)  # when trusted
    assert hint_of(folder / "a.vmdk") == "../base.vmdk"
    with vmdk.open(folder / "a2.vmdk", allow_external=True) as disk:
        assert hashlib.sha256(disk.read()).hexdigest() == reads["a2.vmdk"]


def test_snapshot_in_use_refuses_naming_it(tmp_path: Path) -> None:
    family(tmp_path)
    before = contents(tmp_path)
    with Image.open(tmp_path / "b.vmdk", open_parent=False), \
            pytest.raises(ChainError, match=r"b\.vmdk \(image is in use"):
        rename(tmp_path / "base.vmdk", tmp_path / "gold.vmdk")
    assert contents(tmp_path) == before


def test_image_in_use_is_refused(tmp_path: Path) -> None:
    src = make(tmp_path / "disk.vmdk")
    with vmdk.open(src), pytest.raises(ImageInUseError, match="image is in use"):
        rename(src, tmp_path / "new.vmdk")
    assert sorted(os.listdir(tmp_path)) == ["disk.vmdk"]
    snapshot(src, tmp_path / "child.vmdk")
    # Reads its parent: the parent is in use too
    with vmdk.open(tmp_path / "child.vmdk"), \
            pytest.raises(ImageInUseError, match="image is in use"):
        rename(src, tmp_path / "new.vmdk")
    assert sorted(os.listdir(tmp_path)) == ["child.vmdk", "disk.vmdk"]


@pytest.mark.parametrize("taken", ["new.vmdk", "new-flat.vmdk"])
def test_existing_names_are_never_replaced(tmp_path: Path, taken: str) -> None:
    src = make(tmp_path / "disk.vmdk", "monolithicFlat")
    (tmp_path / taken).write_bytes(b"someone else's")
    with pytest.raises(ImageExistsError):
        rename(src, tmp_path / "new.vmdk")
    assert (tmp_path / taken).read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == sorted(["disk.vmdk", "disk-flat.vmdk", taken])


def test_another_file_system_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    elsewhere = Path("/dev/shm")
    if not elsewhere.is_dir() or os.stat(elsewhere).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to try")
    src = make(tmp_path / "disk.vmdk")
    target = elsewhere / f"vmdk-rename-test-{os.getpid()}.vmdk"
    assert main(["rename", str(src), str(target)]) == 1
    assert "another file system" in capsys.readouterr().err
    assert not target.exists() and src.exists()


def test_broken_chain_is_refused(tmp_path: Path) -> None:
    family(tmp_path)
    os.rename(tmp_path / "base.vmdk", tmp_path / "hidden.vmdk")
    with pytest.raises(ChainError, match="not found"):
        rename(tmp_path / "a.vmdk", tmp_path / "c.vmdk")
    assert (tmp_path / "a.vmdk").exists() and not (tmp_path / "c.vmdk").exists()


# ------------------------------------------------------------------ kills and failures

def expect_whole(folder: Path, reads: dict[str, str], src: str, dst: str) -> None:
    """The old image or the new one reads what the old one did, and so does every
    snapshot, through whichever parent it names."""
    whole = [name for name in (src, dst) if (folder / name).exists()
             and _reads(folder / name) == reads[src]]
    assert whole, f"neither {src} nor {dst} reads as before: {sorted(os.listdir(folder))}"
    for name, expected in reads.items():
        if name != src:
            assert _reads(folder / name) == expected, name


def _reads(path: Path) -> str | None:
    try:
        return digest(path)
    except (VmdkError, OSError):
        return None


def expect_finished(folder: Path, reads: dict[str, str], src: str, dst: str) -> None:
    assert not (folder / src).exists()
    assert digest(folder / dst) == reads[src]
    for name, expected in reads.items():
        if name != src:
            assert digest(folder / name) == expected
    stem = src.removesuffix(".vmdk")
    left = [n for n in os.listdir(folder) if n.startswith(stem + "-") or n == src]
    assert not left, left


SWEPT = ["monolithicSparse", "twoGbMaxExtentFlat"]


@pytest.mark.parametrize("subformat", SWEPT)
def test_killed_at_any_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subformat: str,
                            report_rounds: Callable[[str], None]) -> None:
    template = tmp_path / "template"
    template.mkdir()
    reads = family(template, subformat)

    def action(folder: Path) -> None:
        rename(folder / "base.vmdk", folder / "gold.vmdk")

    # Every link counts as a step too (test_resume's own operations make none).
    monkeypatch.setattr(test_resume, "MUTATING", (*test_resume.MUTATING, "link"))

    def verify(folder: Path, call: int) -> None:
        expect_whole(folder, reads, "base.vmdk", "gold.vmdk")
        if (folder / "base.vmdk").exists():
            rename(folder / "base.vmdk", folder / "gold.vmdk")  # again: it finishes
        expect_finished(folder, reads, "base.vmdk", "gold.vmdk")

    done, total = test_resume.sweep(template, tmp_path, action, verify, points=10_000,
                                    budget=120)
    report_rounds(f"{done} kills over {total} calls")


@pytest.mark.parametrize("subformat", SWEPT)
def test_failing_at_any_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subformat: str
                             ) -> None:
    """An error (EIO) from each call that changes a file, in turn: the error is raised,
    one image stays whole, and the same rename then finishes the job."""
    template = tmp_path / "template"
    template.mkdir()
    reads = family(template, subformat)
    with monkeypatch.context() as patch:
        calls = _fail_call(patch, 0)
        rename(test_resume.copy_folder(template, tmp_path / "count") / "base.vmdk",
               tmp_path / "count" / "gold.vmdk")
    failures = 0
    for n in range(1, calls[0] + 1):
        folder = test_resume.copy_folder(template, tmp_path / f"fail{n}")
        with monkeypatch.context() as patch:
            _fail_call(patch, n)
            try:
                rename(folder / "base.vmdk", folder / "gold.vmdk")
            except (OSError, VmdkError) as exc:
                assert "injected I/O error" in str(exc)
                failures += 1
        expect_whole(folder, reads, "base.vmdk", "gold.vmdk")
        if (folder / "base.vmdk").exists():  # (the last step is the folder's sync)
            rename(folder / "base.vmdk", folder / "gold.vmdk")
        expect_finished(folder, reads, "base.vmdk", "gold.vmdk")
        shutil.rmtree(folder)
    # Only the removal of the temporary descriptor may fail without failing the rename.
    assert failures >= calls[0] - 1 > 5


def _fail_call(patch: pytest.MonkeyPatch, n: int) -> list[int]:
    """Count the calls that change files; the Nth raises EIO (none when ``n`` is 0)."""
    calls = [0]
    for name in test_resume.MUTATING + ("link",):
        real = getattr(os, name)

        def call(*args: Any, _real: Callable[..., Any] = real, _name: str = name,
                 **kwargs: Any) -> Any:
            if _name != "open" or (len(args) > 1 and args[1] & os.O_CREAT):
                calls[0] += 1
                if calls[0] == n:
                    raise OSError(errno.EIO, "injected I/O error")
            return _real(*args, **kwargs)

        patch.setattr(os, name, call)
    return calls


def test_change_tracking_file_moves_too(tmp_path: Path) -> None:
    src = make(tmp_path / "disk.vmdk", "monolithicFlat")
    with Image.open(src, "r+", drop_change_tracking=True) as image:
        image.descriptor.set("changeTrackPath", "disk-ctk.vmdk")
    (tmp_path / "disk-ctk.vmdk").write_bytes(b"tracking data")
    rename(src, tmp_path / "new.vmdk")
    assert sorted(os.listdir(tmp_path)) == ["new-ctk.vmdk", "new-flat.vmdk", "new.vmdk"]
    with Image.open(tmp_path / "new.vmdk") as image:
        assert image.descriptor.get("changeTrackPath") == "new-ctk.vmdk"
    assert (tmp_path / "new-ctk.vmdk").read_bytes() == b"tracking data"
