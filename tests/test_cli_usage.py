"""The command line's own surface: usage errors, help, version and shell completion."""

from __future__ import annotations

import argparse
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vmdk
from vmdk.cli import _leaf_parsers, build_parser, main

SRC = Path(__file__).resolve().parents[1] / "src"


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and not err.startswith("usage:"), err
    return err


@pytest.mark.parametrize(("argv", "verb"), [
    (["compare", "--output=json", "a", "b"], "vmdk compare"),
    (["convert"], "vmdk convert"),
    (["info", "--nonsense", "x"], "vmdk info"),
    (["ova", "verify", "--nonsense", "x.ova"], "vmdk ova verify"),
    (["nosuch", "x"], "vmdk"),
    (["create", "-o"], "vmdk create"),
])
def test_usage_errors_are_one_line_naming_the_verb(argv: list[str], verb: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`vmdk compare --output=json a b` showed vmdk's top-level usage, over several lines,
    and exited 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"{verb}: error: ") and f"'{verb} --help'" in err


@pytest.mark.parametrize("argv", [["help", "info"], ["-h", "info"], ["info", "-h"],
                                  ["help", "ova"]])
def test_help_of_one_verb(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vmdk {argv[1] if argv[0] != 'info' else 'info'} ")


def test_help_alone_lists_every_verb(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["help"])
    out = capsys.readouterr().out
    for verb in ("info", "convert", "ova", "completion", "measure"):
        assert verb in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vmdk {vmdk.__version__}"


def test_every_option_and_argument_says_what_it_is_for() -> None:
    missing = []
    for parser in _leaf_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog}: {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def _complete(script: str, *words: str) -> list[str]:
    line = " ".join(f"'{w}'" for w in words)
    done = subprocess.run(
        ["bash", "-c", f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _vmdk; '
         'printf "%s\\n" "${COMPREPLY[@]}"'], capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_knows_verbs_options_and_values(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert set(_complete(script, "vmdk", "co")) == {"convert", "compare", "commit", "compact",
                                                    "completion"}
    assert "--missing-as-zeros" in _complete(script, "vmdk", "convert", "--m")
    assert _complete(script, "vmdk", "convert", "-O", "") == ["raw", "vmdk"]
    assert set(_complete(script, "vmdk", "ova", "")) >= {"info", "verify", "create", "fix"}
    assert _complete(script, "vmdk", "ova", "create", "--manifest", "sha5") == ["sha512"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "zsh"]) == 0
    script = capsys.readouterr().out
    done = subprocess.run(["zsh", "-c", script + "\nwhence -w _vmdk"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0 and "function" in done.stdout, done.stderr


def test_python_m_vmdk_usage_error_exit_code() -> None:
    done = subprocess.run([sys.executable, "-m", "vmdk", "compare", "--output=json", "a", "b"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1
    one_line(done.stderr)


def test_verbose_logs_what_is_done(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-v printed nothing at all."""
    import logging

    src = tmp_path / "src.raw"
    src.write_bytes(b"\x01" * (1 << 20))
    out = tmp_path / "out.vmdk"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        root.handlers.clear()
        assert main(["-v", "convert", "-f", "raw", str(src), str(out)]) == 0
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])  # (setLevel, not the attribute: loggers cache what is enabled)
    err = capsys.readouterr().err
    assert f"converting {src}" in err and f"{out}: complete" in err


def test_info_text_as_qemu_img_shows_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    """true/false in lower case, extents named as the descriptor names them (beside the
    image as given), VMFS extents called VMFS."""
    vmdk.create(tmp_path / "esx.vmdk", 1 << 20, "vmfs").close()
    vmdk.create(tmp_path / "split.vmdk", 3 << 30, "twoGbMaxExtentSparse").close()
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["info", "split.vmdk"]) == 0
        out = capsys.readouterr().out
        assert "filename: split-s001.vmdk" in out and "compressed: false" in out
        assert "False" not in out
        assert main(["info", "esx.vmdk"]) == 0
        out = capsys.readouterr().out
        assert "format: VMFS" in out and "filename: esx-flat.vmdk" in out
    finally:
        os.chdir(old)


def test_progress_ends_on_a_full_line(tmp_path: Path) -> None:
    """The bar vanished when done; it ends at 100%, whatever holes were skipped."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(b"\x01" * (1 << 20))
        f.truncate(64 << 20)  # mostly a hole: skipped, yet counted as done
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        done = subprocess.run([sys.executable, "-m", "vmdk", "convert", "-p", "-f", "raw",
                               str(src), str(tmp_path / "out.vmdk")], stderr=follower,
                              env=dict(os.environ, PYTHONPATH=str(SRC)), check=False,
                              timeout=120)
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0
    last = shown.replace(b"\r", b"\n").strip().splitlines()[-1]
    assert b"100%" in last, shown[-300:]
