"""SA table scale: adds/s, inbound lookups/s (SPI + destination + protocol, as the receive path looks
SAs up, RFC 4301 §4.1), lookups by handle, and bytes per SA at 1 k / 100 k / 1 M SAs; lookups are
compared with the 1 k table's in the same run (target: O(1), ≥ 0.8×).

Fair at every size: the same number of probes (1000), spread evenly over the table and visited in the
same shuffled order (a fixed seed), so no size gains from the prefetcher or from neighbouring probes
sharing cache lines; all tables are built first and then measured in interleaved slices (every size in
every round, median of the rounds), so a neighbour's burst hits all sizes alike. A bare dict of n ints
probed the same way is measured beside them: its own 1 M : 1 k ratio is what memory latency alone costs
any dict lookup on this machine, the floor the SA table's ratio is to be read against.

Bytes per SA: Python heap growth while the table is filled (tracemalloc, in a second fill so the add
rate is not slowed by tracing) up to 100 k SAs; at 1 M the process's RSS growth (tracing a million adds
takes too long). The SaParams are built before either, so they are not counted.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
import tracemalloc
from dataclasses import dataclass, replace

from .core import Progress, Row, at_least

PAGE = os.sysconf("SC_PAGE_SIZE")
LOOKUP_TARGET = at_least(0.8)
TRACE_LIMIT = 100_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


PROBES = 1000
PASSES = 20  # over the probe list per slice
ROUNDS = 15
SEED = 12


@dataclass(frozen=True)
class ScaleResult:
    sas: int
    adds_per_s: float
    lookups_per_s: float
    gets_per_s: float  # by handle (the transmit path: the descriptor names the SA)
    bare_per_s: float  # dict of n ints, same probes: the memory-latency floor
    bytes_per_sa: float
    memory_method: str


@dataclass
class _Table:
    n: int
    db: object
    probes: list[tuple[int, bytes, int]]
    handles: list[int]
    bare: dict[int, int]
    bare_keys: list[int]
    adds_per_s: float
    bytes_per_sa: float
    memory_method: str


def _build(n: int) -> _Table:
    from device.contract.sa import Direction, EncAlg, IpProto, Mode, SaParams
    from firmware_model.capabilities import Capabilities
    from firmware_model.sadb import Sadb

    base = SaParams(spi=0x1000, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT,
                    src="10.0.0.1", dst="10.0.0.2", enc_alg=EncAlg.AES_GCM_128, enc_key=bytes(range(20)))
    params = [replace(base, spi=0x100 + i) for i in range(n)]
    # The same number of probes at every size, spread over the whole table, in a shuffled order.
    spis = [p.spi for p in params[:: max(1, n // PROBES)]][:PROBES]
    random.Random(SEED).shuffle(spis)
    probes = [(spi, bytes([10, 0, 0, 2]), 50) for spi in spis]
    gc.collect()
    db = Sadb(Capabilities(sa_capacity=n))
    add = db.add
    rss0 = rss_bytes()
    t0 = time.thread_time()
    for p in params:
        add([p])
    t_add = time.thread_time() - t0
    grown = rss_bytes() - rss0
    handles = []
    for spi, d, proto in probes:  # proves every probe is found
        found = db.lookup_inbound(spi, d, proto)
        if not found:
            raise RuntimeError(f"SA {spi:#x} not found after adding it")
        handles.append(found[0].handle)
    method = "RSS growth"
    if n <= TRACE_LIMIT:
        method = "tracemalloc"
        gc.collect()
        tracemalloc.start()
        traced = Sadb(Capabilities(sa_capacity=n))
        for p in params:
            traced.add([p])
        grown = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del traced
    # 2-digit ints as keys and values, like the SA table's SPI keys and bundle values (one object each)
    bare = {0x1_0000_0000 + i: 0x2_0000_0000 + i for i in range(n)}
    bare_keys = [0x1_0000_0000 + (spi - 0x100) for spi in spis]
    del params
    gc.collect()
    return _Table(n, db, probes, handles, bare, bare_keys, n / t_add, grown / n, method)


def _lookups(t: _Table) -> None:
    lookup = t.db.lookup_inbound
    for _ in range(PASSES):
        for spi, d, proto in t.probes:
            lookup(spi, d, proto)


def _gets(t: _Table) -> None:
    get = t.db.get
    for _ in range(PASSES):
        for h in t.handles:
            get(h)


def _bare(t: _Table) -> None:
    get = t.bare.get
    for _ in range(PASSES):
        for k in t.bare_keys:
            get(k)


def measure_all(sizes: tuple[int, ...], say: Progress, rounds: int = ROUNDS) -> list[ScaleResult]:
    tables = []
    for n in sizes:
        say(f"SA table: filling {n:,} SAs")
        tables.append(_build(n))
    say(f"SA table: lookups, {rounds} interleaved rounds")
    kinds = (_lookups, _gets, _bare)
    per: dict[tuple[int, int], list[float]] = {}
    for r in range(rounds + 1):
        for t in tables:
            for k, fn in enumerate(kinds):
                c0 = time.thread_time()
                fn(t)
                if r:  # round 0 is the warm-up
                    per.setdefault((t.n, k), []).append(PASSES * len(t.probes) / max(time.thread_time() - c0, 1e-9))
    return [ScaleResult(t.n, t.adds_per_s, *(statistics.median(per[(t.n, k)]) for k in range(len(kinds))),
                        t.bytes_per_sa, t.memory_method) for t in tables]


def sa_table(sizes: tuple[int, ...], say: Progress) -> list[Row]:
    results = measure_all(sizes, say)
    gc.collect()
    ref = results[0]
    rows = []
    for r in results:
        label = f"{r.sas // 1000:,} k" if r.sas < 1_000_000 else f"{r.sas // 1_000_000} M"
        is_ref = r is ref  # the smallest table is the reference, not compared with itself
        ref_name = "reference for the larger tables" if is_ref else f"lookup/s at {ref.sas:,} SAs"
        rows.append(Row(f"SA table {label}: adds", r.adds_per_s, "SA/s"))
        rows.append(Row(f"SA table {label}: inbound lookups", r.lookups_per_s, "lookup/s",
                        None if is_ref else ref.lookups_per_s, ref_name, None if is_ref else LOOKUP_TARGET))
        rows.append(Row(f"SA table {label}: lookups by handle", r.gets_per_s, "lookup/s",
                        None if is_ref else ref.gets_per_s, ref_name, None if is_ref else LOOKUP_TARGET))
        rows.append(Row(f"SA table {label}: bare dict of ints (floor)", r.bare_per_s, "lookup/s",
                        None if is_ref else ref.bare_per_s,
                        "reference for the larger dicts" if is_ref else f"lookup/s in a dict of {ref.sas:,} ints",
                        note="same probes: memory latency alone"))
        rows.append(Row(f"SA table {label}: memory", r.bytes_per_sa, "B/SA", note=r.memory_method))
    return rows
