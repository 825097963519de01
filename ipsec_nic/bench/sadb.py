"""SA table scale: adds/s, inbound lookups/s (SPI + destination + protocol, as the receive path looks
SAs up, RFC 4301 §4.1), and bytes per SA at 1 k / 100 k / 1 M SAs; lookups are compared with the 1 k
table's in the same run (target: O(1), ≥ 0.8×).

Bytes per SA: Python heap growth while the table is filled (tracemalloc, in a second fill so the add
rate is not slowed by tracing) up to 100 k SAs; at 1 M the process's RSS growth (tracing a million adds
takes too long). The SaParams are built before either, so they are not counted.
"""

from __future__ import annotations

import gc
import os
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


@dataclass(frozen=True)
class ScaleResult:
    sas: int
    adds_per_s: float
    lookups_per_s: float
    gets_per_s: float  # by handle (the transmit path: the descriptor names the SA)
    bytes_per_sa: float
    memory_method: str


def measure(n: int, rounds: int = 5) -> ScaleResult:
    from device.contract.sa import Direction, EncAlg, IpProto, Mode, SaParams
    from firmware_model.capabilities import Capabilities
    from firmware_model.sadb import Sadb

    base = SaParams(spi=0x1000, proto=IpProto.ESP, direction=Direction.INBOUND, mode=Mode.TRANSPORT,
                    src="10.0.0.1", dst="10.0.0.2", enc_alg=EncAlg.AES_GCM_128, enc_key=bytes(range(20)))
    params = [replace(base, spi=0x100 + i) for i in range(n)]
    dst = bytes([10, 0, 0, 2])
    # The same number of probes at every size, spread over the whole table.
    probes = [(p.spi, dst, 50) for p in params[:: max(1, n // 1000)]]
    gc.collect()
    db = Sadb(Capabilities(sa_capacity=n))
    add = db.add
    rss0 = rss_bytes()
    t0 = time.thread_time()
    for p in params:
        add([p])
    t_add = time.thread_time() - t0
    grown = rss_bytes() - rss0
    lookup, get = db.lookup_inbound, db.get
    handles = []
    for spi, d, proto in probes:  # warm-up, and proves every probe is found
        found = lookup(spi, d, proto)
        if not found:
            raise RuntimeError(f"SA {spi:#x} not found after adding it")
        handles.append(found[0].handle)
    per_round, per_round_get = [], []
    for _ in range(rounds):
        c0 = time.thread_time()
        for _ in range(20):
            for spi, d, proto in probes:
                lookup(spi, d, proto)
        per_round.append(20 * len(probes) / max(time.thread_time() - c0, 1e-9))
        c0 = time.thread_time()
        for _ in range(20):
            for h in handles:
                get(h)
        per_round_get.append(20 * len(handles) / max(time.thread_time() - c0, 1e-9))
    del db
    gc.collect()
    method = "RSS growth"
    if n <= TRACE_LIMIT:
        method = "tracemalloc"
        tracemalloc.start()
        db = Sadb(Capabilities(sa_capacity=n))
        for p in params:
            db.add([p])
        grown = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del db
    result = ScaleResult(n, n / t_add, statistics.median(per_round), statistics.median(per_round_get),
                         grown / n, method)
    del params, probes
    gc.collect()
    return result


def sa_table(sizes: tuple[int, ...], say: Progress) -> list[Row]:
    results = []
    for n in sizes:
        say(f"SA table: {n:,} SAs")
        results.append(measure(n))
    ref = results[0]
    rows = []
    for r in results:
        label = f"{r.sas // 1000:,} k" if r.sas < 1_000_000 else f"{r.sas // 1_000_000} M"
        is_ref = r is ref  # the smallest table is the reference, not compared with itself
        rows.append(Row(f"SA table {label}: adds", r.adds_per_s, "SA/s"))
        rows.append(Row(f"SA table {label}: inbound lookups", r.lookups_per_s, "lookup/s",
                        None if is_ref else ref.lookups_per_s,
                        "reference for the larger tables" if is_ref else f"lookup/s at {ref.sas:,} SAs",
                        None if is_ref else LOOKUP_TARGET))
        rows.append(Row(f"SA table {label}: lookups by handle", r.gets_per_s, "lookup/s",
                        None if is_ref else ref.gets_per_s,
                        "reference for the larger tables" if is_ref else f"lookup/s at {ref.sas:,} SAs",
                        None if is_ref else LOOKUP_TARGET))
        rows.append(Row(f"SA table {label}: memory", r.bytes_per_sa, "B/SA", note=r.memory_method))
    return rows
