"""Long fuzz runs: ``python -m fuzz --seconds 600 [--target NAME] [--engine atheris]``.

Run from the repository root with ``PYTHONPATH=src``.  New distinct findings
are saved (gzip'd, when small) under ``tests/fuzz_regressions`` unless
``--no-save``; ``--replay DIR`` runs saved inputs again.  ``--json FILE``
writes the figures (inputs, findings) for scripts and the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

from . import (DEFAULT_MEMORY_MB, REGRESSIONS, TARGETS, fuzz, limit_memory, make_seeds,
               pack_input, replay, run_input, select, Finding, Mutator, Seed, Stats, _record)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=None, help="time budget (default 60)")
    ap.add_argument("--max-inputs", type=int, default=None, help="stop after this many inputs")
    ap.add_argument("--target", action="append", choices=TARGETS,
                    help="only seeds of this kind (repeatable)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    ap.add_argument("--engine", choices=("random", "atheris"), default="random",
                    help="random: deterministic structure-aware mutation (default); atheris: "
                         "coverage-guided, single-file seeds only")
    ap.add_argument("--save-dir", type=Path, default=REGRESSIONS)
    ap.add_argument("--no-save", action="store_true", help="do not save findings")
    ap.add_argument("--replay", type=Path, metavar="DIR_OR_FILE",
                    help="run saved regression inputs instead of fuzzing")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    ap.add_argument("--memory-mb", type=int, default=DEFAULT_MEMORY_MB,
                    help="address-space cap of this process, besides the stacks of its "
                         f"worker threads (default {DEFAULT_MEMORY_MB})")
    ap.add_argument("--write-ratio", type=float, default=0.1,
                    help="share of inputs that are also opened for writing")
    args = ap.parse_args(argv)
    limit_memory(args.memory_mb)
    logging.disable(logging.WARNING)  # damaged inputs make the library warn a lot

    if args.replay is not None:
        return _replay(args)
    seed = args.seed if args.seed is not None else int(time.time())
    if args.seconds is None and args.max_inputs is None:
        args.seconds = 60.0
    seeds = select(make_seeds(), args.target)
    save = None if args.no_save else args.save_dir
    _log(f"{len(seeds)} seeds, random seed {seed}, engine {args.engine}")
    if args.engine == "atheris":
        stats = _atheris(seeds, args, seed, save)
    else:
        stats = fuzz(seeds, seconds=args.seconds, max_inputs=args.max_inputs, seed=seed,
                     save_dir=save, write_ratio=args.write_ratio, log=_log)
    report = stats.to_json() | {"seed": seed, "seeds": len(seeds)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    _log(f"{stats.inputs} inputs in {stats.seconds:.0f} s ({stats.refused} refused, "
         f"{stats.accepted} accepted), {len(stats.findings)} distinct findings")
    for f in stats.findings.values():
        _log(f"  {stats.hits[f.signature]:5d}x {f.signature}  [{f.seed}: {f.mutation}]"
             f"{'  saved ' + f.saved if f.saved else ''}")
    return 1 if stats.findings else 0


def _replay(args: argparse.Namespace) -> int:
    paths = sorted(args.replay.glob("*.tar.gz")) if args.replay.is_dir() else [args.replay]
    results = {}
    for path in paths:
        sig, detail = replay(path)
        results[path.name] = {"signature": sig, "detail": detail[-3000:]}
        _log(f"{path.name}: {sig or 'ok'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if any(r["signature"] for r in results.values()) else 0


def _atheris(seeds: list[Seed], args: argparse.Namespace, seed: int, save: Path | None
             ) -> Stats:
    """Coverage-guided run: atheris drives one-file inputs, our mutator is its custom mutator."""
    try:
        import atheris
    except ImportError:
        sys.exit("atheris is not installed (pip install atheris); use --engine random")
    with atheris.instrument_imports():
        import vmdk  # noqa: F401
        import vmdk.check  # noqa: F401
    single = [s for s in seeds if len(s.files) == 1]
    stats = Stats()
    rng = random.Random(seed)
    mutator = Mutator(rng)
    work = Path(tempfile.mkdtemp(prefix="vmdk-atheris-"))
    corpus = work / "corpus"
    corpus.mkdir()
    for s in single:
        (corpus / s.name).write_bytes(s.files[s.entry])
    folder = work / "input"
    folder.mkdir()
    started = time.monotonic()

    def one_input(data: bytes) -> None:
        files = {"disk.vmdk": data}
        sig, detail = run_input(folder, files, "disk.vmdk", random.Random(len(data)),
                                write=rng.random() < args.write_ratio, measure=False)
        stats.inputs += 1
        if sig is not None:
            _record(stats, Finding(sig, detail, "atheris", "", files, "disk.vmdk"), save, _log)
        stats.seconds = time.monotonic() - started
        if args.json and stats.inputs % 500 == 0:
            args.json.write_text(json.dumps(stats.to_json()))

    def custom_mutator(data: bytes, max_size: int, mseed: int) -> bytes:
        rng.seed(mseed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max(max_size, len(data)))
        files, _ = mutator.mutate(Seed("x", "sample", {"d": data}, "d", ("d",)))
        return files["d"]

    libfuzzer_args = [sys.argv[0], str(corpus), f"-seed={seed & 0x7FFFFFFF}",
                      "-max_len=1048576", "-rss_limit_mb=0", "-timeout=30"]
    if args.seconds:
        libfuzzer_args.append(f"-max_total_time={int(args.seconds)}")
    if args.max_inputs:
        libfuzzer_args.append(f"-runs={args.max_inputs}")
    atheris.Setup(libfuzzer_args, one_input, custom_mutator=custom_mutator)
    try:
        atheris.Fuzz()
    except SystemExit:
        pass
    return stats


if __name__ == "__main__":
    sys.exit(main())
