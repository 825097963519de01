"""Host side of the interop topology: the card's server, one VM with the card and a virtio-net peer NIC.

    card server (ipsec-nic serve)  <-- vfio-user -->  QEMU  -device vfio-user-pci   (the card)
         wire: dgram, binds W_card,                         -netdev dgram local=W_qemu remote=W_card
         sends to W_qemu                                    -device virtio-net-pci    (the Linux peer)

QEMU's ``-netdev dgram`` binds its local path and sends each Ethernet frame as one datagram to the
remote path (reference/vm-recon.md); the card's ``dgram`` wire is the mirror image, so whatever the
card transmits arrives on the guest's virtio-net NIC and the other way round. Inside the guest,
guest_tools/scenario.py moves that NIC into netns ``peer`` and configures Linux XFRM there.

The VM boots once (qemu.launch.Vm, commands through the guest agent); each scenario is one guest
command that prints one JSON result line. Used by ``ipsec-nic demo`` and tests/vm/test_interop_*.py.

With ``kernel_module`` (qemu.kmod.KernelModule) the card's Linux driver is loaded instead and the card is
a netdev in the root netns; qemu/guest_testbed.sh sets up both ends (ipsec_nic/testbed.py), and
ipsec_nic/kernel_scenarios.py drives them with `ip xfrm` (``ipsec-nic demo --kernel-driver``,
tests/vm/test_kernel_offload.py).

With ``wire_sink`` the card's wire goes to a host process instead of the guest's virtio-net NIC (the VM
then has no peer NIC and the test bed no peer): ``wire_sink(path)`` returns a context manager that binds
``path`` before the card starts, e.g. ipsec_nic/bench/wire_sink.py WireSink for the kernel packets/s bench.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from guest_tools.scenario import RESULT_PREFIX, Spec, specs_to_b64
from ipsec_nic.runner import CardServer, module_shares, run_dir, write_profile
from ipsec_nic.testbed import NETDEV_KINDS, Testbed, netdev_args, wire_overrides
from qemu.launch import VfioUserCard, Vm, VmConfig
from qemu.toolchain import Toolchain

SCENARIO_TIMEOUT_S = 120.0


class TopologyError(RuntimeError):
    """The topology could not start, or the guest's scenario runner failed (message has the details)."""


_EXPORT = re.compile(r"^export (IPSEC_NIC_[A-Z0-9_]+)='([^']*)'$")


def parse_env_file(text: str) -> dict[str, str]:
    """The variables of the test bed's env file (`export NAME='value'` lines, see qemu/guest_testbed.sh)."""
    return {m.group(1): m.group(2) for m in map(_EXPORT.match, text.splitlines()) if m}


def parse_guest_results(output: str) -> list[dict[str, Any]]:
    """The per-case lines of ``scenario run-many`` (``{"case": i, ...}``), ordered by case number."""
    cases = []
    for line in output.splitlines():
        if line.startswith(RESULT_PREFIX):
            try:
                value = json.loads(line[len(RESULT_PREFIX):])
            except ValueError as exc:
                raise TopologyError(f"unreadable scenario result: {exc}") from None
            if isinstance(value, dict) and isinstance(value.get("case"), int):
                cases.append(value)
    return sorted(cases, key=lambda v: v["case"])


def parse_guest_result(output: str) -> dict[str, Any]:
    """The JSON object the guest's scenario runner printed (the last result line)."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            try:
                value = json.loads(line[len(RESULT_PREFIX):])
            except ValueError as exc:
                raise TopologyError(f"unreadable scenario result: {exc}") from None
            if isinstance(value, dict):
                return value
    raise TopologyError("the guest printed no scenario result; its output ends with:\n" + output[-3000:])


class Topology:
    """Card server + VM (card + peer NIC), set up once; a context manager.

    ``run(spec)`` runs one scenario in the guest and returns its result dict; ``guest(cmd)`` runs any
    shell command there. Everything started here is stopped on exit, whatever happened.
    """

    def __init__(self, toolchain: Toolchain, log_dir: Path, *, profile: str | None = None,
                 pcap: Path | None = None, timeout_s: float = 300.0, verbose: int = 0,
                 on_console: Callable[[str], None] | None = None, netdev: str = "dgram",
                 kernel_module: Any | None = None,
                 wire_sink: Callable[[Path], AbstractContextManager[Any]] | None = None) -> None:
        if netdev not in NETDEV_KINDS:
            raise ValueError(f"netdev must be one of {NETDEV_KINDS}, not {netdev!r}")
        self.netdev = netdev
        self.toolchain = toolchain
        self.log_dir = Path(log_dir)
        self.profile = profile
        self.pcap = pcap
        self.timeout_s = timeout_s
        self.verbose = verbose
        self.on_console = on_console
        # qemu.kmod.KernelModule: the card's Linux driver is loaded and the card is a netdev (setup_info["dev"])
        self.kernel_module = kernel_module
        self.wire_sink = wire_sink
        self.sink: Any = None  # what wire_sink's context manager returned, while running
        self.testbed = (Testbed(peer=wire_sink is None, load_command=kernel_module.load_command)
                        if kernel_module else None)
        self.card: CardServer | None = None
        self.vm: Vm | None = None
        self.setup_info: dict[str, Any] = {}
        self.boot_seconds = 0.0
        self.setup_seconds = 0.0
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> Topology:
        stack = contextlib.ExitStack()
        self._stack = stack
        try:
            self._start(stack)
        except BaseException:
            stack.close()
            self._stack = None
            raise
        return self

    def _start(self, stack: contextlib.ExitStack) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        sockets = stack.enter_context(run_dir("ipsec-nic-topo-"))
        card_wire, qemu_wire = sockets / "wire-card.sock", sockets / "wire-qemu.sock"
        profile = write_profile(sockets / "card.yaml", self.profile, wire_overrides(card_wire, qemu_wire, self.pcap,
                                                                                     self.netdev))
        (self.log_dir / "card-profile.yaml").write_text(profile.read_text())
        if self.wire_sink is not None:
            # Bound before the card starts: the card's dgram wire is up when its peer socket exists.
            self.sink = stack.enter_context(self.wire_sink(qemu_wire))
        self.card = stack.enter_context(
            CardServer(sockets / "card.sock", profile, self.log_dir / "card.log", verbose=max(1, self.verbose)))
        peer_nic = netdev_args(card_wire, qemu_wire, kind=self.netdev) if self.wire_sink is None else ()
        cfg = VmConfig(cards=(VfioUserCard(sockets / "card.sock"),), extra_args=peer_nic,
                       shares=module_shares(self.kernel_module), timeout_s=self.timeout_s, log_dir=self.log_dir / "vm")
        t0 = time.monotonic()
        try:
            self.vm = stack.enter_context(Vm(cfg, self.toolchain, on_output=self.on_console))
        except Exception as exc:
            raise TopologyError(f"the VM did not come up: {exc}\n--- card server log:\n{self.card.log_tail()}") \
                from None
        self.boot_seconds = time.monotonic() - t0
        t1 = time.monotonic()
        if self.testbed is not None:
            self.setup_info = self.kernel_setup()
        else:
            self.setup_info = self.guest_json("python3 -m guest_tools.scenario setup").get("setup", {})
        self.setup_seconds = time.monotonic() - t1

    def kernel_setup(self, action: str = "setup") -> dict[str, Any]:
        """Load the driver, address the card's netdev and the peer (qemu/guest_testbed.sh); returns the
        test bed's variables, e.g. {"IPSEC_NIC_DEV": "eth1", ...}. ``card`` (re)loads and configures
        the card only (after an rmmod)."""
        assert self.testbed is not None
        result = self.guest(self.testbed.setup_command(action))
        if result.exit_code != 0:
            raise TopologyError(f"the kernel test bed did not come up (exit {result.exit_code}):\n"
                                f"{result.output[-3000:]}" + self._card_state())
        env = self.guest(f"cat {self.testbed.paths.env_file}").output
        return parse_env_file(env)

    def __exit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # ----- commands in the guest

    def guest(self, command: str, timeout: float = SCENARIO_TIMEOUT_S):
        if self.vm is None:
            raise TopologyError("the topology is not running")
        return self.vm.run(command, timeout=timeout)

    def guest_json(self, command: str, timeout: float = SCENARIO_TIMEOUT_S) -> dict[str, Any]:
        result = self.guest(command, timeout)
        if result.timed_out:
            raise TopologyError(f"guest command timed out after {timeout:.0f} s:\n{result.output[-3000:]}"
                                + self._card_state())
        value = parse_guest_result(result.output)
        if "error" in value:
            raise TopologyError(f"guest scenario failed: {value['error']}\n{result.output[-2000:]}"
                                + self._card_state())
        return value

    def _card_state(self) -> str:
        if self.card is None:
            return ""
        alive = "alive" if self.card.alive() else f"DEAD (exit {self.card.process.returncode if self.card.process else '?'})"
        return f"\n--- card server ({alive}), log tail:\n{self.card.log_tail(15)}"

    def run(self, spec: Spec, timeout: float = SCENARIO_TIMEOUT_S) -> dict[str, Any]:
        """Run one scenario in the guest; returns its result (see guest_tools/scenario.py run())."""
        spec.check()
        value = self.guest_json(f"python3 -m guest_tools.scenario run {spec.to_b64()}", timeout)
        result = value.get("result")
        if not isinstance(result, dict):
            raise TopologyError(f"scenario {spec.name}: no result in {sorted(value)}")
        return result

    def run_many(self, specs: list[Spec], timeout: float | None = None) -> list[dict[str, Any]]:
        """Run a list of scenarios in ONE guest process (guest_tools.scenario run-many): one Python start-up
        for all. Returns, in order, each case's result, or ``{"error": ...}`` for a case the guest could not
        set up (the others still run)."""
        for spec in specs:
            spec.check()
        if timeout is None:
            timeout = SCENARIO_TIMEOUT_S + sum(2.0 * s.timeout + 5.0 for s in specs)
        result = self.guest(f"python3 -m guest_tools.scenario run-many {specs_to_b64(specs)}", timeout)
        outcomes = parse_guest_results(result.output)
        if result.timed_out or len(outcomes) != len(specs):
            raise TopologyError(f"run-many: {len(outcomes)} of {len(specs)} results (exit {result.exit_code}, "
                                f"timed out: {result.timed_out}):\n{result.output[-3000:]}" + self._card_state())
        return [o["result"] if "result" in o else {"error": o.get("error", "no result")} for o in outcomes]

    def delete_all(self) -> dict[str, int]:
        return self.guest_json("python3 -m guest_tools.scenario delete-all").get("deleted", {})


# --- what a passing scenario looks like (host side, from the spec alone) --------------------------------


def _peer_state(result: dict[str, Any], spi: int) -> dict[str, Any] | None:
    for state in result.get("peer_states", []):
        if state.get("spi") == spi:
            return state
    return None


def interop_failures(spec: Spec, result: dict[str, Any]) -> list[str]:
    """Everything that is wrong with a scenario's result; [] when both sides decrypted exactly what the
    other sent and no error counter moved. Expected payload digests are recomputed here from the
    spec, so the guest's own comparison is not trusted on its word."""
    from guest_tools.scenario import SPI_IN, SPI_OUT, expected_digest

    bad: list[str] = []
    n = spec.count

    def expect(what: str, got: object, want: object) -> None:
        if got != want:
            bad.append(f"{what}: got {got!r}, expected {want!r}")

    out_spi, in_spi = SPI_OUT + spec.spi_base, SPI_IN + spec.spi_base
    if "card-to-peer" in spec.directions:
        c2p = result.get("card_to_peer", {})
        expect("card->peer error", c2p.get("error"), "")
        expect("card->peer TX completions", c2p.get("tx_status"), {"OK": n})
        expect("card->peer datagrams the peer decrypted", c2p.get("received"), n)
        expect("card->peer payload digest", c2p.get("digest"), expected_digest(spec, "card-to-peer"))
        state = _peer_state(result, out_spi) or {}
        expect(f"peer state {out_spi:#x} packets", state.get("packets"), n)
        if spec.esn:
            last = spec.seq + n
            expect(f"peer state {out_spi:#x} ESN receive position (seq-hi, seq)",
                   (state.get("seq_hi"), state.get("seq")), (last >> 32, last & 0xFFFF_FFFF))
        if spec.esn and spec.offload == "crypto":
            expect("ESN high half the driver pushed with UPDATE_SA", result.get("esn_hi_pushed"),
                   (spec.seq + n) >> 32)
    if "peer-to-card" in spec.directions:
        p2c = result.get("peer_to_card", {})
        expect("peer->card error", p2c.get("error"), "")
        expect("peer->card CryptoStatus counts", p2c.get("crypto_status"), {"SUCCESS": n})
        expect("peer->card datagrams the card decrypted", p2c.get("received"), n)
        expect("peer->card payload digest", p2c.get("digest"), expected_digest(spec, "peer-to-card"))
        expect("peer->card frames indicated on another SA", p2c.get("wrong_handle"), 0)
        state = _peer_state(result, in_spi) or {}
        expect(f"peer state {in_spi:#x} packets", state.get("packets"), n)
        if spec.esn:
            last = spec.seq + n
            expect(f"peer state {in_spi:#x} ESN send position (oseq-hi, oseq)",
                   (state.get("oseq_hi"), state.get("oseq")), (last >> 32, last & 0xFFFF_FFFF))
    for state in result.get("peer_states", []):
        for key in ("integrity_failed", "replay", "replay_window_errors"):
            expect(f"peer state {state.get('spi', 0):#x} {key}", state.get(key), 0)
    expect("peer /proc/net/xfrm_stat counters that moved", result.get("xfrm_stat_delta"), {})
    stats = result.get("card_stats", {})
    sends = n if "card-to-peer" in spec.directions else 0
    receives = n if "peer-to-card" in spec.directions else 0
    expect("card TX_CRYPTO_OK", stats.get("tx_crypto_ok"), sends)
    expect("card RX_CRYPTO_OK", stats.get("rx_crypto_ok"), receives)
    for key in ("rx_auth_fail", "rx_replay_drop", "tx_offload_error", "bad_descriptor", "dma_error", "rx_no_buffer"):
        expect(f"card {key.upper()}", stats.get(key), 0)
    for name, want in (("outbound", sends), ("inbound", receives)):
        for entry in result.get("sa_stats", {}).get(name, []):
            expect(f"card {name} SA packets", entry.get("packets"), want)
            for key in ("auth_failures", "replay_drops", "syntax_errors", "other_errors"):
                expect(f"card {name} SA {key}", entry.get(key), 0)
    expect("driver errors", result.get("driver_errors"), [])
    if not spec.keep_sas:
        expect("SAs deleted on the card", result.get("deleted"), 2)
        expect("card SAs left after delete", result.get("card_sas_after_delete"), 0)
        expect("peer states left after flush", result.get("peer_states_after_flush"), 0)
    return bad
