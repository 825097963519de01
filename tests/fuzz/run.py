"""Run one fuzz target: coverage-guided with atheris (libFuzzer) when it is installed, else a plain
mutation loop over the seed corpus.

    python -m tests.fuzz.run --target vfio_user --runs 1000000          # a long run (documented figures)
    python -m tests.fuzz.run --target admin --runs 3000                 # what the test command does
    python -m tests.fuzz.run --list

Seeds come from tests/fuzz/corpus/<target>/ (never written to; new coverage goes to a temporary directory,
or --work DIR to keep it). Exit status 0: no finding; libFuzzer's own status (and a crash-* file with the
input) otherwise. At 10 % steps and at the end a line ``fuzz-summary {...}`` gives inputs run, open fds
and RSS, so leaks show as growth between the first and the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz import targets

CORPUS = Path(__file__).resolve().parent / "corpus"
MAX_LEN = 8192  # bytes per input: covers every message and frame layout, keeps each run fast


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


class _Summary:
    def __init__(self, name: str, runs: int) -> None:
        self.name = name
        self.runs = runs
        self.start = time.monotonic()
        self.first: dict | None = None

    def report(self, count: int) -> None:
        figures = {"target": self.name, "inputs": count, "fds": len(os.listdir("/proc/self/fd")),
                   "rss_kib": _rss_kib(), "seconds": round(time.monotonic() - self.start, 1)}
        if self.first is None:
            self.first = figures
        print("fuzz-summary " + json.dumps(figures), file=sys.stderr, flush=True)


def _wrap(target, summary: _Summary):
    count = 0
    step = max(1, summary.runs // 10) if summary.runs > 0 else 100_000

    def one(data: bytes) -> None:
        nonlocal count
        if count == 0:
            summary.report(0)
        target(data)
        count += 1
        if count % step == 0 or count == summary.runs:
            summary.report(count)

    return one


def _seeds(name: str) -> list[bytes]:
    d = CORPUS / name
    return [f.read_bytes() for f in sorted(d.iterdir())] if d.is_dir() else []


def run_atheris(name: str, runs: int, work: str, extra: list[str]) -> int:
    import atheris  # noqa: PLC0415 - optional

    with atheris.instrument_imports(include=["device", "firmware_model"]):
        target = targets.make(name)
    summary = _Summary(name, runs)
    # libFuzzer writes a failing input to the current directory unless told otherwise: keep them out of the
    # checkout, somewhere that outlives the run (atheris.Fuzz exits the process, so no cleanup runs anyway).
    artifacts = Path(tempfile.gettempdir()) / "ipsec-nic-fuzz-artifacts" / name
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], work, str(CORPUS / name), f"-runs={runs}", f"-max_len={MAX_LEN}", "-timeout=10",
            "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={artifacts}/", *extra]
    atheris.Setup(argv, _wrap(target, summary))
    atheris.Fuzz()  # exits the process when done
    return 0


def _mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif op == 2:
            b[rng.randrange(len(b) + 1):0] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and len(b) > 1:
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 8)]
        elif pool:
            other = rng.choice(pool)
            i = rng.randrange(len(other) + 1)
            b[rng.randrange(len(b) + 1):] = other[i:]
    return bytes(b[:MAX_LEN])


def run_mutate(name: str, runs: int, seed: int) -> int:
    target = targets.make(name)
    summary = _Summary(name, runs)
    one = _wrap(target, summary)
    pool = _seeds(name) or [b""]
    rng = random.Random(seed)
    for data in pool:
        one(data)
    for _ in range(max(0, runs - len(pool))):
        data = _mutate(rng, rng.choice(pool), pool)
        try:
            one(data)
        except Exception:
            crash = Path(f"crash-{name}-{int(time.time())}")
            crash.write_bytes(data)
            print(f"finding: input saved to {crash}", file=sys.stderr)
            raise
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=sorted(targets.TARGETS))
    ap.add_argument("--runs", type=int, default=10_000, help="inputs to run (default 10000)")
    ap.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto",
                    help="atheris (coverage-guided) if installed, else a plain mutation loop")
    ap.add_argument("--work", help="directory for inputs that found new coverage (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=1, help="mutate engine: random seed")
    ap.add_argument("--list", action="store_true", help="list the targets")
    args, extra = ap.parse_known_args(argv)
    if args.list or not args.target:
        print("\n".join(sorted(targets.TARGETS)))
        return 0 if args.list else 2
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401, PLC0415
            engine = "atheris"
        except ImportError:
            engine = "mutate"
    if engine == "mutate":
        return run_mutate(args.target, args.runs, args.seed)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return run_atheris(args.target, args.runs, args.work, extra)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{args.target}-") as work:
        return run_atheris(args.target, args.runs, work, extra)


if __name__ == "__main__":
    sys.exit(main())
