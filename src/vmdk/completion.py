"""Shell completion scripts, made from the command line's own parser.

The script knows every verb (and the ``ova`` sub-verbs), each one's options and
the values an option takes from a fixed list; anything else completes as a file
name.  It is made from the parser, so it cannot fall behind it.  zsh runs the
bash script through its ``bashcompinit``.
"""

from __future__ import annotations

import argparse
import shlex

_HEAD = """# vmdk completion for {shell}: eval "$(vmdk completion {shell})" in {rc}
"""

_BASH = r"""_vmdk() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"
    local path="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            -*) ;;
            *) case "$path ${COMP_WORDS[i]}" in
                   %(paths)s) path="${path:+$path }${COMP_WORDS[i]}" ;;
               esac ;;
        esac
    done
    local words="" values="" verbs=""
    case "$path" in
%(options)s
    esac
    case "$path|$prev" in
%(choices)s
    esac
    if [[ -n $values ]]; then
        COMPREPLY=($(compgen -W "$values" -- "$cur"))
    elif [[ $cur == -* || -n $verbs ]]; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    else
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}
complete -o filenames -o bashdefault -F _vmdk vmdk
"""


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` ("bash" or "zsh")."""
    if shell not in ("bash", "zsh"):
        raise ValueError(f"no completion for {shell!r} (bash or zsh)")
    commands = dict(_commands(parser, ""))
    paths = " | ".join(shlex.quote(f"{_parent(p)} {_last(p)}") for p in commands if p)
    options = "\n".join(
        f"        {shlex.quote(path)}) words={shlex.quote(' '.join(words))}"
        f"{' verbs=1' if any(not w.startswith('-') for w in words) else ''} ;;"
        for path, (words, _choices) in commands.items())
    choices = "\n".join(f"        {shlex.quote(path + '|' + option)}) values="
                        f"{shlex.quote(' '.join(values))} ;;"
                        for path, (_words, table) in commands.items()
                        for option, values in table.items())
    body = _BASH % {"paths": paths or "''", "options": options, "choices": choices or "    ''"}
    if shell == "zsh":
        return (_HEAD.format(shell="zsh", rc="~/.zshrc")
                + "autoload -U +X bashcompinit && bashcompinit\n" + body)
    return _HEAD.format(shell="bash", rc="~/.bashrc") + body


def _commands(parser: argparse.ArgumentParser, path: str
              ) -> list[tuple[str, tuple[list[str], dict[str, list[str]]]]]:
    """(path of words, (what may follow: options and sub-verbs, option -> its values))."""
    words: list[str] = []
    choices: dict[str, list[str]] = {}
    below: list[tuple[str, tuple[list[str], dict[str, list[str]]]]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                words.append(name)
                below += _commands(child, f"{path} {name}".strip())
            continue
        words += action.option_strings
        if action.option_strings and action.choices:
            for option in action.option_strings:
                choices[option] = [str(c) for c in action.choices]
    return [(path, (words, choices)), *below]


def _parent(path: str) -> str:
    return path.rpartition(" ")[0]


def _last(path: str) -> str:
    return path.rpartition(" ")[2]
