"""A short `ipsec-nic soak`: SA churn (add, ESN update, delete) with traffic both ways between the card
and the guest kernel's XFRM, then every datagram accounted for, no SA left, the card server's fds and
memory flat. The test command runs SOAK_SECONDS (one round of each variant); `ipsec-nic soak --minutes N`
runs longer (docs/robustness.md)."""

from __future__ import annotations

import os

import pytest

from ipsec_nic.soak import VARIANTS, soak
from ipsec_nic.topology import Topology

pytestmark = pytest.mark.vm

SOAK_SECONDS = float(os.environ.get("IPSEC_NIC_SOAK_SECONDS", "30"))


def test_soak_accounts_for_every_datagram(toolchain, tmp_path):
    with Topology(toolchain, tmp_path / "logs") as topo:
        res = soak(topo, SOAK_SECONDS, min_rounds=len(VARIANTS))  # every variant at least once
    print(res.report())
    assert res.rounds >= len(VARIANTS)
    assert not res.errors, res.errors
    for d in ("card-to-peer", "peer-to-card"):
        assert res.ledger.sent[d] > 0 and res.ledger.lost(d) == 0, res.report()
    assert not res.sa_leaks and res.esn_updates >= 1
    assert not res.resource_growth(), res.report()
    assert res.ok
