"""The benchmark harness: rows, same-run references, timing helpers, the table and the JSON file.

Every figure is a :class:`Row`: a value, the reference it is compared with (measured in the same run, on
the same machine, interleaved with it where possible), their ratio and the target the ratio must meet.
Absolute figures swing by a third between runs on shared machines; ratios measured side by side do not,
so targets are always on ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path


class Cmp(Enum):
    """How a ratio is checked against its target."""

    AT_LEAST = ">="
    AT_MOST = "<="


@dataclass(frozen=True)
class Target:
    cmp: Cmp
    ratio: float

    def met(self, ratio: float | None) -> bool | None:
        if ratio is None:
            return None
        return ratio >= self.ratio if self.cmp is Cmp.AT_LEAST else ratio <= self.ratio

    def __str__(self) -> str:
        return f"{'≥' if self.cmp is Cmp.AT_LEAST else '≤'} {self.ratio:g}×"


def at_least(ratio: float) -> Target:
    return Target(Cmp.AT_LEAST, ratio)


def at_most(ratio: float) -> Target:
    return Target(Cmp.AT_MOST, ratio)


@dataclass
class Row:
    """One figure. ``value`` None means not measurable here; ``note`` then says why."""

    name: str
    value: float | None
    unit: str
    reference: float | None = None
    reference_name: str = ""
    target: Target | None = None
    note: str = ""
    ratio: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.value is not None and self.reference:
            self.ratio = self.value / self.reference

    @property
    def met(self) -> bool | None:
        return self.target.met(self.ratio) if self.target is not None else None

    def as_json(self) -> dict:
        d = asdict(self)
        d["target"] = str(self.target) if self.target is not None else None
        d["met"] = self.met
        return d


# ----------------------------------------------------------------------------------------------- progress


class Progress:
    """One line per step on stderr (stdout carries only the table)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[bench {time.monotonic() - self.t0:6.1f} s] {message}", file=self.stream, flush=True)


# ----------------------------------------------------------------------------------------------- timing


def rates(fns: Sequence[tuple[Callable[[object], object], object]], seconds: float, rounds: int,
          batch: int = 200) -> list[float]:
    """Median calls/s of each ``fn(arg)`` over ``rounds`` interleaved slices of ``seconds / rounds``
    (after one warm-up slice each). Interleaving puts a value and its reference under the same load;
    rates are per second of this thread's CPU time, so time spent descheduled by other work on the
    machine does not count, and the median drops the slices a neighbour's burst disturbed."""
    per: list[list[float]] = [[] for _ in fns]
    slice_s = seconds / rounds
    for r in range(rounds + 1):
        for i, (fn, arg) in enumerate(fns):
            n = 0
            cpu = time.thread_time()
            deadline = time.perf_counter() + slice_s
            while True:
                for _ in range(batch):
                    fn(arg)
                n += batch
                if time.perf_counter() >= deadline:
                    break
            if r:  # round 0 is the warm-up
                per[i].append(n / max(time.thread_time() - cpu, 1e-9))
    return [statistics.median(p) for p in per]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# ----------------------------------------------------------------------------------------------- output


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _reference_text(r: Row) -> str:
    if r.reference is not None:
        return f"{_num(r.reference)} {r.reference_name}".strip()
    # No reference figure: say what the row is about instead (a note shown in the value column for
    # rows without a value is not repeated).
    extra = r.note if r.value is not None else ""
    return "; ".join(x for x in (r.reference_name, extra) if x) or "—"


def format_table(rows: Sequence[Row]) -> str:
    head = ("figure", "value", "unit", "reference (same run)", "ratio", "target", "met")
    body = []
    for r in rows:
        value = _num(r.value) if r.value is not None else (r.note or "n/a")
        ref = _reference_text(r)
        ratio = f"{r.ratio:.3g}×" if r.ratio is not None else "—"
        met = {True: "yes", False: "NO", None: "—"}[r.met]
        body.append((r.name, value, r.unit, ref, ratio, str(r.target) if r.target else "report", met))
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=True)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)


def format_markdown(rows: Sequence[Row]) -> str:
    """The same table as Markdown (README's Performance section)."""
    out = ["| figure | value | unit | reference (same run) | ratio | target | met |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        value = _num(r.value) if r.value is not None else (r.note or "n/a")
        ref = _reference_text(r)
        ratio = f"{r.ratio:.3g}×" if r.ratio is not None else "—"
        met = {True: "yes", False: "**no**", None: "—"}[r.met]
        out.append(f"| {r.name} | {value} | {r.unit} | {ref} | {ratio} | {r.target or 'report'} | {met} |")
    return "\n".join(out)


def write_json(rows: Sequence[Row], path: Path, meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": [r.as_json() for r in rows]}, indent=2) + "\n")
