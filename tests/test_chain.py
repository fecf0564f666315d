"""Snapshot chains: create, read through, commit, rebase; against qemu-img where it reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmdk
from vmdk.chain import commit, rebase, snapshot
from conftest import pattern, run

MiB = 1 << 20


def build_chain(tmp_path: Path, depth: int = 3) -> tuple[list[Path], bytes]:
    base = tmp_path / "base.vmdk"
    with vmdk.create(base, 4 * MiB) as disk:
        disk.write(pattern(4 * MiB, seed=1, zero_every=0))
    paths = [base]
    for i in range(1, depth):
        child = tmp_path / f"snap{i}.vmdk"
        snapshot(paths[-1], child)
        with vmdk.open(child, "r+") as disk:
            disk.seek(i * 300_000 + 123)
            disk.write(bytes([i]) * 100_000)
        paths.append(child)
    with vmdk.open(paths[-1]) as disk:
        return paths, disk.read()


def expected_content(depth: int = 3) -> bytes:
    data = bytearray(pattern(4 * MiB, seed=1, zero_every=0))
    for i in range(1, depth):
        data[i * 300_000 + 123:i * 300_000 + 123 + 100_000] = bytes([i]) * 100_000
    return bytes(data)


def test_chain_reads_through_parents(tmp_path: Path) -> None:
    paths, content = build_chain(tmp_path)
    assert content == expected_content()
    with vmdk.open(paths[-1]) as disk:
        chain = disk.image.chain()
        assert [Path(img.path).name for img in chain] == ["snap2.vmdk", "snap1.vmdk", "base.vmdk"]
        assert chain[0].parent_cid == chain[1].cid
        depths = {run.depth for run in disk.map() if run.data}
        assert depths == {0, 1, 2}


def test_child_partial_grain_write_keeps_parent_bytes(tmp_path: Path) -> None:
    paths, _ = build_chain(tmp_path, depth=2)
    with vmdk.open(paths[-1], "r+") as disk:
        disk.seek(3 * MiB + 10)
        disk.write(b"xyz")
    expected = bytearray(expected_content(2))
    expected[3 * MiB + 10:3 * MiB + 13] = b"xyz"
    with vmdk.open(paths[-1]) as disk:
        assert disk.read() == bytes(expected)


def test_writing_the_parent_breaks_the_child_cid(tmp_path: Path) -> None:
    paths, _ = build_chain(tmp_path, depth=2)
    with vmdk.open(paths[0], "r+") as disk:
        disk.write(b"changed")
    with pytest.raises(vmdk.ChainError, match="parentCID"):
        vmdk.open(paths[1])
    with vmdk.open(paths[1], ignore_cid=True) as disk:
        assert disk.read(7) == b"changed"
    with pytest.raises(vmdk.ChainError, match="read-only"):
        vmdk.open(paths[1], "r+", ignore_cid=True)


def test_commit_merges_child_into_parent(tmp_path: Path) -> None:
    paths, content = build_chain(tmp_path)
    commit(paths[-1])
    with vmdk.open(paths[1]) as disk:
        assert disk.read() == content
    with vmdk.open(paths[-1]) as disk:  # the child stays valid on top
        assert disk.read() == content


def test_commit_without_parent_is_an_error(tmp_path: Path) -> None:
    with vmdk.create(tmp_path / "a.vmdk", MiB):
        pass
    with pytest.raises(vmdk.ChainError, match="no parent"):
        commit(tmp_path / "a.vmdk")


def test_safe_rebase_keeps_content(tmp_path: Path) -> None:
    paths, content = build_chain(tmp_path)
    rebase(paths[-1], paths[0])
    with vmdk.open(paths[-1]) as disk:
        assert Path(disk.image.parent.path).name == "base.vmdk"
        assert disk.read() == content
    rebase(paths[-1], None)
    with vmdk.open(paths[-1]) as disk:
        assert disk.image.parent is None
        assert disk.read() == content


def test_unsafe_rebase_only_rewrites_the_descriptor(tmp_path: Path) -> None:
    paths, _ = build_chain(tmp_path)
    copy = tmp_path / "copy.vmdk"
    copy.write_bytes(paths[1].read_bytes())
    rebase(paths[-1], copy, safe=False)
    with vmdk.open(paths[-1]) as disk:
        assert Path(disk.image.parent.path).name == "copy.vmdk"


@pytest.mark.interop
def test_chain_made_here_reads_in_qemu(tmp_path: Path, qemu_img: str) -> None:
    paths, content = build_chain(tmp_path)
    (tmp_path / "expected.raw").write_bytes(content)
    assert run(qemu_img, "compare", paths[-1], tmp_path / "expected.raw").returncode == 0
    for path in paths:
        assert run(qemu_img, "check", path).returncode == 0
    commit(paths[-1])
    rebase(paths[-1], paths[0])
    assert run(qemu_img, "compare", paths[-1], tmp_path / "expected.raw").returncode == 0


@pytest.mark.interop
def test_esx_vmfs_sparse_snapshot_reads_in_qemu(tmp_path: Path, qemu_img: str) -> None:
    base = tmp_path / "esx.vmdk"
    with vmdk.create(base, 2 * MiB, "vmfs") as disk:
        disk.write(pattern(2 * MiB, seed=4))
    child = tmp_path / "esx-000001.vmdk"
    with vmdk.create(child, parent=base, subformat="vmfsSparse") as disk:
        disk.seek(5000)
        disk.write(b"\x77" * 9000)
    assert (tmp_path / "esx-000001-delta.vmdk").exists()
    with vmdk.open(child) as disk:
        content = disk.read()
    expected = bytearray(pattern(2 * MiB, seed=4))
    expected[5000:14000] = b"\x77" * 9000
    assert content == bytes(expected)
    (tmp_path / "expected.raw").write_bytes(content)
    assert run(qemu_img, "compare", child, tmp_path / "expected.raw").returncode == 0


def test_chain_deeper_than_the_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    import vmdk.image

    paths, _ = build_chain(tmp_path, depth=5)
    monkeypatch.setattr(vmdk.image, "MAX_CHAIN_DEPTH", 2)
    with pytest.raises(vmdk.ChainError, match="deeper"):
        vmdk.open(paths[-1])


def test_rebase_refuses_to_make_a_loop(tmp_path: Path) -> None:
    paths, _ = build_chain(tmp_path)
    with pytest.raises(vmdk.ChainError, match="loop"):
        rebase(paths[0], paths[-1], safe=False)
    with pytest.raises(vmdk.ChainError, match="loop"):
        rebase(paths[1], paths[1])


def test_commit_grows_a_smaller_parent_first(tmp_path: Path) -> None:
    from vmdk.resize import resize

    base, top = tmp_path / "b.vmdk", tmp_path / "c.vmdk"
    with vmdk.create(base, MiB) as d:
        d.write_at(0, b"base")
    snapshot(base, top)
    resize(top, 2 * MiB)
    with vmdk.open(top, "r+") as d:
        d.write_at(MiB + 100, b"beyond-parent")
    commit(top)
    with vmdk.open(base) as b, vmdk.open(top) as c:
        assert b.size == c.size == 2 * MiB
        assert b.read() == c.read()
        assert b.read_at(MiB + 100, 13) == b"beyond-parent" and b.read_at(0, 4) == b"base"


def test_refused_cid_mismatch_open_changes_nothing(tmp_path: Path) -> None:
    base, top = tmp_path / "b.vmdk", tmp_path / "c.vmdk"
    vmdk.create(base, MiB).close()
    snapshot(base, top)
    with vmdk.open(base, "r+") as d:
        d.write_at(0, b"new")  # the parent's CID changes under its child
    before = top.read_bytes()
    with pytest.raises(vmdk.ChainError, match="CID"):
        vmdk.open(top, "r+")
    assert top.read_bytes() == before


def _parent_elsewhere(tmp_path: Path) -> tuple[Path, Path]:
    """A parent in a/ and the place for its child in b/: outside the child's folder."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    parent = tmp_path / "a" / "base.vmdk"
    with vmdk.create(parent, 4 << 20) as disk:
        disk.write_at(0, b"base data")
    return parent, tmp_path / "b" / "child.vmdk"


def test_snapshot_and_commit_take_allow_external(tmp_path: Path) -> None:
    parent, child = _parent_elsewhere(tmp_path)
    with pytest.raises(vmdk.UnsafePathError):
        snapshot(parent, child)
    snapshot(parent, child, allow_external=True)
    with vmdk.open(child, "r+", allow_external=True) as disk:
        disk.write_at(1 << 20, b"child data")
    with pytest.raises(vmdk.UnsafePathError):
        commit(child)
    commit(child, allow_external=True)
    with vmdk.open(parent) as disk:
        assert disk.read_at(1 << 20, 10) == b"child data"


def test_cli_snapshot_and_commit_pass_allow_external(tmp_path: Path) -> None:
    from vmdk.cli import main

    parent, child = _parent_elsewhere(tmp_path)
    assert main(["snapshot", "--allow-external", str(parent), str(child)]) == 0
    with vmdk.open(child, "r+", allow_external=True) as disk:
        disk.write_at(0, b"CHILD")
    assert main(["commit", "-q", "--allow-external", str(child)]) == 0
    with vmdk.open(parent) as disk:
        assert disk.read_at(0, 9) == b"CHILD" + b"base data"[5:]


def test_snapshot_of_a_parent_in_use_needs_force_share(tmp_path: Path) -> None:
    parent = tmp_path / "base.vmdk"
    vmdk.create(parent, 4 << 20).close()
    with vmdk.open(parent, "r+"):
        with pytest.raises(vmdk.ImageInUseError):
            snapshot(parent, tmp_path / "child.vmdk")
        snapshot(parent, tmp_path / "child.vmdk", force_share=True)
    with vmdk.open(tmp_path / "child.vmdk") as disk:
        assert disk.image.parent is not None


def test_a_writer_never_shares(tmp_path: Path) -> None:
    """force_share reads without locks; a writer without its lock could write under another
    (qemu refuses it too: "force-share=on can only be used with read-only images")."""
    path = tmp_path / "d.vmdk"
    vmdk.create(path, 1 << 20).close()
    with pytest.raises(ValueError, match="read"):
        vmdk.open(path, "r+", force_share=True)
