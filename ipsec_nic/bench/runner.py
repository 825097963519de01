"""`ipsec-nic bench`: run every benchmark group, print one table, optionally write it as JSON.

Groups (``--only`` takes one or more, comma-separated): esp, firmware, scapy, vfio-user, datapath,
sadb, vm, demo, toolchain. ``--quick`` shortens every measurement, leaves out the 1 M-SA table, the VM
and the demo, and finishes in under two minutes: CI runs it as a smoke test of the command (the
figures of a quick run are noisier; targets are judged on a full run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .core import Progress, Row, format_markdown, format_table, write_json


@dataclass(frozen=True)
class Settings:
    quick: bool
    seconds: float  # per measured function (and size) in the in-process benchmarks
    rounds: int
    messages: int  # per round of the vfio-user round trip
    frames: int  # per mode through the host-side datapath
    sa_sizes: tuple[int, ...]
    vm_seconds: float
    kernel_slice_seconds: float  # a round of kernel driver packets/s sends for 3x this, split over its modes (kernel_pps.slice_seconds)
    kernel_rounds: int
    run_dir: Path
    logs: Path

    @classmethod
    def make(cls, quick: bool, run_dir: Path, logs: Path) -> Settings:
        if quick:
            return cls(True, 0.25, 3, 2000, 2000, (1000, 100_000), 10, 2.0, 2, run_dir, logs)
        return cls(False, 2.5, 9, 20000, 20000, (1000, 100_000, 1_000_000), 30, 3.0, 3, run_dir, logs)


def _esp(s: Settings, say: Progress) -> list[Row]:
    from .esp import Budget, engine_cbc, engine_gcm

    b = Budget(s.seconds, s.rounds)
    return engine_gcm(b, say) + engine_cbc(b, say)


def _firmware(s: Settings, say: Progress) -> list[Row]:
    from .esp import Budget, firmware_frames

    return firmware_frames(Budget(s.seconds, s.rounds), say)[0]


def _scapy(s: Settings, say: Progress) -> list[Row]:
    from .esp import Budget, scapy_esp

    return scapy_esp(Budget(s.seconds, s.rounds), say)


def _vfio_user(s: Settings, say: Progress) -> list[Row]:
    from .vfio_rtt import round_trip

    return round_trip(s.run_dir, s.messages, s.rounds, say)


def _datapath(s: Settings, say: Progress) -> list[Row]:
    from .datapath import host_datapath

    return host_datapath(s.run_dir, s.frames, say, s.rounds)


def _sadb(s: Settings, say: Progress) -> list[Row]:
    from .sadb import sa_table

    return sa_table(s.sa_sizes, say)


def _vm(s: Settings, say: Progress) -> list[Row]:
    from .kernel_pps import kernel_pps
    from .vm import vm_figures

    rows = vm_figures(s.vm_seconds, say, s.logs)
    return rows + kernel_pps(s.kernel_slice_seconds, s.kernel_rounds, say, s.logs)


def _demo(s: Settings, say: Progress) -> list[Row]:
    from .vm import demo_wall_time

    return [demo_wall_time(say, s.logs / "demo")]


def _toolchain(s: Settings, say: Progress) -> list[Row]:
    from .vm import toolchain_build

    return [toolchain_build()]


# name -> (function, runs in --quick)
GROUPS: dict[str, tuple[Callable[[Settings, Progress], list[Row]], bool]] = {
    "esp": (_esp, True),
    "firmware": (_firmware, True),
    "scapy": (_scapy, True),
    "vfio-user": (_vfio_user, True),
    "datapath": (_datapath, True),
    "sadb": (_sadb, True),
    "vm": (_vm, False),
    "demo": (_demo, False),
    "toolchain": (_toolchain, True),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="short measurements, no VM, no demo, no 1 M-SA table (< 2 min; CI's smoke test)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    p.add_argument("--only", metavar="NAME", help=f"run only these groups (comma-separated): {', '.join(GROUPS)}")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")


def run(args: argparse.Namespace) -> int:
    say = Progress()
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in GROUPS]
        if unknown:
            print(f"ipsec-nic bench: unknown benchmark {', '.join(unknown)}; choose from {', '.join(GROUPS)}",
                  file=sys.stderr)
            return 2
    else:
        names = [n for n, (_, in_quick) in GROUPS.items() if in_quick or not args.quick]
    rows: list[Row] = []
    failures: list[str] = []
    t0 = time.monotonic()
    logs = Path(tempfile.mkdtemp(prefix="ipsec-nic-bench-logs-"))
    with tempfile.TemporaryDirectory(prefix="ipsec-nic-bench-", dir="/tmp") as d:
        settings = Settings.make(args.quick, Path(d), logs)
        for name in names:
            fn, _ = GROUPS[name]
            try:
                rows += fn(settings, say)
            except Exception as exc:  # noqa: BLE001 - one broken group must not hide the others' figures
                say(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
    try:
        logs.rmdir()  # only the VM and demo groups leave logs; an empty directory is not worth keeping
        say(f"done in {time.monotonic() - t0:.0f} s")
    except OSError:
        say(f"done in {time.monotonic() - t0:.0f} s (logs: {logs})")
    print(format_markdown(rows) if args.markdown else format_table(rows))
    if args.json:
        meta = {"quick": args.quick, "groups": names, "failures": failures, "seconds": round(time.monotonic() - t0, 1),
                "python": platform.python_version(), "cpus": os.cpu_count(),
                "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(rows, Path(args.json), meta)
    if failures:
        print("\nbenchmarks that failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0
