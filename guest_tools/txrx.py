"""The driver's TX and RX rings: queue frames (plain, crypto offload with host-built ESP, packet
offload), collect completions, receive write-backs (datasheet §6-§7)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from device.contract import regs
from device.contract.enums import Direction, UdpEspEncapsulation
from device.contract.net import ETH_P_IP, ETH_P_IPV6
from device.contract.regs import (
    RX_DESC,
    TX_DESC,
    CryptoStatus,
    Features,
    RxWbFlags,
    TxFlags,
    TxStatus,
    TxWbFlags,
)
from guest_tools import packets
from guest_tools.admin_queue import CardError, enum_name
from guest_tools.mmio import Mmio
from guest_tools.sa_api import HostSa, HostSaTable


@dataclass(frozen=True)
class TxCompletion:
    index: int
    status: int

    @property
    def status_name(self) -> str:
        return enum_name(TxStatus, self.status)


@dataclass
class RxPacket:
    frame: bytes  # as the card wrote it (crypto offload: decrypted in place, ESP header/trailer kept)
    length: int  # frame length the card reported (larger than len(frame) when truncated)
    flags: int  # RxWbFlags
    crypto_status: int
    handle: int
    next_header: int = 0
    pad_length: int = 0
    inner: bytes | None = None  # crypto offload success: the frame with ESP stripped (None otherwise)
    note: str = ""
    # transport over tunnel (NEXT_CRYPTO_DONE): the inner (transport) SA; ``handle`` is the tunnel SA
    next_handle: int = 0

    @property
    def crypto_done(self) -> bool:
        return bool(self.flags & RxWbFlags.CRYPTO_DONE)

    @property
    def policy_mismatch(self) -> bool:
        """Authentic, but outside its SA's filter: indicated unprocessed (datasheet §12.1 row 14)."""
        return bool(self.flags & RxWbFlags.POLICY_MISMATCH)

    @property
    def l4_csum_ok(self) -> bool:
        """The card vouches for the TCP/UDP checksum (RFC 3948 §3.1.2: an authentic UDP-encapsulated
        transport layer; datasheet §12.1 row 20)."""
        return bool(self.flags & RxWbFlags.L4_CSUM_OK)

    @property
    def next_crypto_done(self) -> bool:
        """Both layers of a transport-over-tunnel frame were checked (datasheet §7.6, §12.1 row 22)."""
        return bool(self.flags & RxWbFlags.NEXT_CRYPTO_DONE)

    @property
    def tunnel_status_name(self) -> str:
        """The tunnel (outer) layer's result: NEXT_CRYPTO_DONE is only set once the outer ESP verified
        (§12.1 row 22: an outer failure is a one-layer indication), so with it the outer layer is SUCCESS."""
        return CryptoStatus.SUCCESS.name if self.next_crypto_done else "-"

    @property
    def transport_status_name(self) -> str:
        """The transport (inner) layer's result: ``crypto_status`` when NEXT_CRYPTO_DONE is set."""
        return self.crypto_status_name if self.next_crypto_done else "-"

    @property
    def sa_delete_req(self) -> bool:
        return bool(self.flags & RxWbFlags.SA_DELETE_REQ)

    @property
    def decapsulated(self) -> bool:
        return bool(self.flags & RxWbFlags.DECAPSULATED)

    @property
    def truncated(self) -> bool:
        return bool(self.flags & RxWbFlags.ERROR)

    @property
    def crypto_status_name(self) -> str:
        return enum_name(CryptoStatus, self.crypto_status)

    def summary(self) -> dict:
        return {
            "length": self.length, "crypto_done": self.crypto_done,
            "crypto_status": self.crypto_status_name if self.crypto_done else "-",
            "sa_delete_req": self.sa_delete_req, "decapsulated": self.decapsulated, "handle": self.handle,
            "truncated": self.truncated, "inner_length": len(self.inner) if self.inner is not None else None,
            "note": self.note, "next_crypto_done": self.next_crypto_done, "next_handle": self.next_handle,
            "tunnel_status": self.tunnel_status_name, "transport_status": self.transport_status_name,
            "policy_mismatch": self.policy_mismatch, "l4_csum_ok": self.l4_csum_ok,
        }


class TxRxOps:
    """Card's TX/RX part: uses the rings and buffers Card.init set up."""

    mmio: Mmio
    host: HostSaTable
    queue: int
    receive: bool
    buf_size: int
    sa_delete_requests: int
    # v2 crypto-offload tunnel frames whose inner header is outside the SA's selector (RFC 4301 §5.2): the card
    # cannot check them (datasheet §12.1 row 8), so this host does, and counts what it drops.
    host_policy_drops: int
    _open: bool
    _tx_backlog: list[TxCompletion]
    # Inside tx_burst(): descriptors are queued without a TAIL write; one doorbell covers them all.
    _tx_burst_depth = 0
    _tx_doorbell_pending = False

    def _wait(self, ready, timeout: float, what: str) -> None:
        raise NotImplementedError  # Card._wait

    def _arm_rx(self, i: int) -> None:
        raise NotImplementedError  # Card._arm_rx

    def update_sa(self, handle: int, seq_hi: int, spi: int | None = None, proto=None) -> None:
        raise NotImplementedError  # SaOps.update_sa

    def offers(self, feature: Features) -> bool:
        raise NotImplementedError  # Card.offers

    def offers_udp_esp(self, kind: UdpEspEncapsulation) -> bool:
        raise NotImplementedError  # Card.offers_udp_esp

    def _tx_reclaim_wait(self) -> None:
        def reclaimed() -> bool:
            self._tx_backlog.extend(self.poll_tx())  # kept for the caller's next poll_tx()
            return self._tx_free() > 0

        self._wait(reclaimed, 2.0,
                   "a free TX descriptor: the card is not completing TX (device server running? link up?)")

    def _tx_free(self) -> int:
        r = self.txr
        return r.entries - 1 - ((r.tail - r.clean) % r.entries)

    def send_raw(self, frame: bytes, flags: int = 0, handle: int = 0, esp_offset: int = 0, pad_length: int = 0,
                 next_header: int = 0, tunnel_handle: int = 0) -> int:
        """Queue one frame on the TX ring (one descriptor, EOP | REPORT_STATUS). Returns the descriptor index.
        ``tunnel_handle``: TxDesc.tunnel_handle (transport over tunnel, datasheet §7.3)."""
        if not self._open:
            raise CardError("card not initialised: call init() first")
        if not frame:
            raise CardError("refusing to send an empty frame")
        if len(frame) > self.buf_size:
            raise CardError(f"frame of {len(frame)} bytes exceeds the {self.buf_size}-byte TX buffer (MTU?)")
        if self._tx_free() == 0:
            self._tx_kick()  # a burst's queued frames first, or the card never frees a descriptor
            self._tx_reclaim_wait()
        r = self.txr
        i = r.tail
        buf = self.tx_bufs[i]
        buf.view[:len(frame)] = frame
        at = r.at(i)
        r.mem.view[at:at + TX_DESC.size] = TX_DESC.pack(
            addr=buf.iova, length=len(frame), flags=int(flags | TxFlags.EOP | TxFlags.REPORT_STATUS),
            offload_handle=handle, esp_offset=esp_offset, pad_length=pad_length, next_header=next_header,
            tunnel_handle=tunnel_handle)
        r.tail = (i + 1) % r.entries
        if self._tx_burst_depth:
            self._tx_doorbell_pending = True
        else:
            self.mmio.write32(regs.txq_reg(self.queue, regs.QREG_TAIL), r.tail)
        return i

    def _tx_kick(self) -> None:
        if self._tx_doorbell_pending:
            self._tx_doorbell_pending = False
            self.mmio.write32(regs.txq_reg(self.queue, regs.QREG_TAIL), self.txr.tail)

    @contextlib.contextmanager
    def tx_burst(self):
        """Queue several frames behind one doorbell: send()/send_raw() inside the block write no TAIL;
        the block's end writes TAIL once (a full ring writes it early, so the card can free slots).
        Each doorbell is a trapped register write, a vfio-user message; this cuts them by the burst."""
        self._tx_burst_depth += 1
        try:
            yield self
        finally:
            self._tx_burst_depth -= 1
            if not self._tx_burst_depth:
                self._tx_kick()

    def send(self, frame: bytes, handle: int = 0, mode: str | None = None, tunnel_handle: int = 0) -> int:
        """Send an Ethernet frame carrying a plain IP packet.

        mode None/"plain": as is (handle must be 0). "crypto": the driver builds ESP for outbound SA
        ``handle`` (its own sequence counter) and the card encrypts. "packet": the card encapsulates
        with SA ``handle`` (0 = the card picks the SA by selector). ``tunnel_handle`` (crypto only):
        transport over tunnel, ``handle`` the transport SA and ``tunnel_handle`` the tunnel SA."""
        mode = mode or ("crypto" if handle or tunnel_handle else "plain")
        if tunnel_handle:
            if mode != "crypto":
                raise CardError("transport over tunnel (a tunnel SA) is crypto offload only (datasheet §7.3)")
            return self._send_combined(frame, handle, tunnel_handle)
        if mode == "plain":
            if handle:
                raise CardError("a plain frame takes no SA handle (use --mode crypto or packet)")
            return self.send_raw(frame)
        if mode == "packet":
            return self.send_raw(frame, TxFlags.IPSEC_PACKET, handle)
        if mode != "crypto":
            raise CardError(f"send mode must be plain, crypto or packet, not {mode!r}")
        sa = self.host.get(handle)
        if sa is None or not sa.framable or sa.direction != Direction.OUTBOUND:
            raise CardError(f"handle {handle:#x} is not an outbound crypto-offload SA added through this "
                            "tool ('sa list'; the host needs its framing state)")
        l3 = packets.l3_offset(frame)
        if l3 < 0:
            raise CardError("crypto offload needs an Ethernet frame carrying IPv4 or IPv6")
        if sa.tunnel:
            why = packets.outside_selector(frame[l3:], sa.inner_src, sa.inner_dst)
            if why:
                raise CardError(f"SA {sa.spi:#x} does not apply to this packet: {why} (RFC 4301 §5.2)")
        seq = sa.next_seq
        if not sa.esn and seq > 0xFFFF_FFFF:
            raise CardError(f"SA {sa.spi:#x}: sequence numbers exhausted (RFC 4303 §3.3.3): add a new SA")
        if sa.esn and seq >> 32 != sa.seq_hi_pushed:
            self.update_sa(handle, seq >> 32, sa.spi)  # the card needs the ESN high half (RFC 4304)
        # ESP first, then AH over the result (RFC 4301 §4.5); both SAs of a bundle count from the same seq
        packet, esp_offset, pad_length, next_header = frame[l3:], 0, 0, 0
        try:
            if sa.has_esp:
                esp = packets.build_esp(sa.geometry(), packet, seq)
                packet, esp_offset, pad_length, next_header = (esp.packet, esp.esp_offset, esp.pad_length,
                                                               esp.next_header)
            if sa.ah_icv_len:
                before = len(packet)
                packet = packets.build_ah(sa.ah_geometry(), packet, seq)
                esp_offset += len(packet) - before if esp_offset else 0
        except packets.FrameError as exc:
            raise CardError(f"cannot build {'ESP' if sa.has_esp else 'AH'}: {exc}") from None
        index = self.send_raw(_reframe(frame, l3, packet), TxFlags.IPSEC_CRYPTO, handle,
                              l3 + esp_offset if esp_offset else 0, pad_length, next_header)
        sa.next_seq = seq + 1
        return index

    def _combined_sa(self, handle: int, tunnel: bool) -> HostSa:
        """One layer of transport over tunnel: an outbound crypto-offload ESP SA this host added, without AH
        (single-ESP SAs only, datasheet §12.2 row 1); the inner one in transport mode, the outer one in
        tunnel mode. UDP encapsulation is checked for the pair (_combined_udp_kind)."""
        role = "tunnel" if tunnel else "transport"
        sa = self.host.get(handle)
        if sa is None or not sa.framable or sa.direction != Direction.OUTBOUND:
            raise CardError(f"{role} SA handle {handle:#x} is not an outbound crypto-offload SA added through "
                            "this tool ('sa list'; the host needs its framing state)")
        if not sa.has_esp or sa.ah_icv_len or sa.tunnel != tunnel:
            raise CardError(f"SA {sa.spi:#x} cannot be the {role} layer of transport over tunnel: it must be an "
                            f"ESP SA in {role} mode (no AH; datasheet §7.3)")
        return sa

    def _combined_udp_kind(self, inner: HostSa, outer: HostSa) -> None:
        """A UDP-encapsulated layer (RFC 3948, port 4500) makes the pair one of NDIS's UDP-ESP kinds, which
        the card must advertise in its UDP_ESP register (datasheet §7.3): the tunnel layer in UDP =
        TRANSPORT_OVER_TUNNEL ("transport over UDP-encapsulated tunnel"), the transport layer in UDP =
        UDP_ESP_TRANSPORT_OVER_TUNNEL ("UDP-encapsulated transport over tunnel"). Both in UDP is no NDIS
        kind. Refused here, before any descriptor, rather than as the card's BAD_HANDLE."""
        if inner.encap is not None and outer.encap is not None:
            raise CardError(f"transport SA {inner.spi:#x} and tunnel SA {outer.spi:#x} are both UDP-encapsulated: "
                            "UDP-encapsulated transport over a UDP-encapsulated tunnel is not an NDIS kind "
                            "(datasheet §7.3); one layer at most may use UDP")
        for sa, kind, what, key in (
            (outer, UdpEspEncapsulation.TRANSPORT_OVER_TUNNEL, "a UDP-encapsulated tunnel",
             "transport-over-tunnel"),
            (inner, UdpEspEncapsulation.UDP_ESP_TRANSPORT_OVER_TUNNEL, "a UDP-encapsulated transport layer",
             "udp-transport-over-tunnel"),
        ):
            if sa.encap is not None and not self.offers_udp_esp(kind):
                raise CardError(f"this card does not offer transport over tunnel with {what} (SA {sa.spi:#x}): "
                                f"UDP_ESP.{kind.name} is clear (its profile's firmware.udp_esp lacks {key})")

    def _next_seq(self, handle: int, sa: HostSa) -> int:
        seq = sa.next_seq
        if not sa.esn and seq > 0xFFFF_FFFF:
            raise CardError(f"SA {sa.spi:#x}: sequence numbers exhausted (RFC 4303 §3.3.3): add a new SA")
        if sa.esn and seq >> 32 != sa.seq_hi_pushed:
            self.update_sa(handle, seq >> 32, sa.spi)  # the card needs the ESN high half (RFC 4304)
        return seq

    def _send_combined(self, frame: bytes, handle: int, tunnel_handle: int) -> int:
        """Transport over tunnel (NDIS TunnelHandle): the host builds the transport ESP around the packet,
        then the tunnel ESP around that IP packet (RFC 4301 §4.5 iterated tunnelling, inner first); the
        card seals both. Refused here, before any descriptor, when the card does not advertise it."""
        if not self.offers(Features.TRANSPORT_TUNNEL_COMBINED):
            raise CardError("this card does not offer transport over tunnel (FEATURES.TRANSPORT_TUNNEL_COMBINED "
                            "is clear: its profile leaves firmware.transport_tunnel_combined off)")
        if not handle:
            raise CardError("transport over tunnel needs the transport SA as the handle (--sa) besides the "
                            "tunnel SA")
        inner, outer = self._combined_sa(handle, False), self._combined_sa(tunnel_handle, True)
        self._combined_udp_kind(inner, outer)
        l3 = packets.l3_offset(frame)
        if l3 < 0:
            raise CardError("crypto offload needs an Ethernet frame carrying IPv4 or IPv6")
        # the tunnel SA carries the transport SA's packets: its selector must cover their endpoints
        why = packets.outside_selector(frame[l3:], outer.inner_src, outer.inner_dst)
        if why:
            raise CardError(f"tunnel SA {outer.spi:#x} does not apply to this packet: {why} (RFC 4301 §5.2)")
        seq_in, seq_out = self._next_seq(handle, inner), self._next_seq(tunnel_handle, outer)
        try:
            esp_in = packets.build_esp(inner.geometry(), frame[l3:], seq_in)
            esp_out = packets.build_esp(outer.geometry(), esp_in.packet, seq_out)
        except packets.FrameError as exc:
            raise CardError(f"cannot build ESP: {exc}") from None
        index = self.send_raw(_reframe(frame, l3, esp_out.packet), TxFlags.IPSEC_CRYPTO, handle,
                              l3 + esp_out.esp_offset, esp_out.pad_length, esp_out.next_header,
                              tunnel_handle=tunnel_handle)
        inner.next_seq, outer.next_seq = seq_in + 1, seq_out + 1
        return index

    def poll_tx(self) -> list[TxCompletion]:
        """Collect finished TX descriptors (wb_flags.DONE) in order."""
        r = self.txr
        out, self._tx_backlog = self._tx_backlog, []
        view = r.mem.view
        while r.clean != r.tail:
            at = r.at(r.clean)
            if not TX_DESC.get(view, at, "wb_flags") & TxWbFlags.DONE:
                break
            out.append(TxCompletion(r.clean, TX_DESC.get(view, at, "wb_status")))
            r.clean = (r.clean + 1) % r.entries
        return out

    def flush_tx(self, timeout: float = 5.0) -> list[TxCompletion]:
        """Wait until every queued frame completed; returns their completions."""
        done: list[TxCompletion] = []
        self._tx_kick()

        def all_done() -> bool:
            done.extend(self.poll_tx())
            return self.txr.clean == self.txr.tail

        self._wait(all_done, timeout, "TX completions (device server running? link up?)")
        return done

    # ------------------------------------------------------------------------------------------
    # receive

    def _rx_ready(self) -> bool:
        at = self.rxr.at(self.rxr.clean)
        return bool(RX_DESC.get(self.rxr.mem.view, at, "wb_flags") & RxWbFlags.DD)

    def recv(self, timeout: float = 0.0, limit: int = 64) -> list[RxPacket]:
        """Frames the card wrote back, waiting up to ``timeout`` seconds for the first one."""
        if not self.receive:
            raise CardError("this card handle was opened without an RX ring (receive=False)")
        if not self._rx_ready() and timeout > 0:
            with contextlib.suppress(CardError):
                self._wait(self._rx_ready, timeout, "a received frame")
        out: list[RxPacket] = []
        r = self.rxr
        armed = -1
        while len(out) < limit and self._rx_ready():
            i = r.clean
            d = RX_DESC.unpack(r.mem.view, r.at(i))
            buf = self.rx_bufs[i]
            frame = bytes(buf.view[:min(d.length, buf.size)])
            out.append(self._rx_packet(frame, d))
            self._arm_rx(i)
            r.clean = (i + 1) % r.entries
            armed = i
        if armed >= 0:
            # Hand the re-armed descriptors back in one doorbell: TAIL = the last one keeps one
            # descriptor between TAIL and HEAD (the card fills HEAD .. TAIL - 1).
            self.mmio.write32(regs.rxq_reg(self.queue, regs.QREG_TAIL), armed)
        return out

    def _rx_packet(self, frame: bytes, d) -> RxPacket:
        pkt = RxPacket(frame, d.length, d.wb_flags, d.crypto_status, d.offload_handle, d.next_header, d.pad_length)
        if pkt.sa_delete_req:
            self.sa_delete_requests += 1
        if pkt.next_crypto_done:
            pkt.next_handle = d.next_offload_handle  # valid only with NEXT_CRYPTO_DONE (datasheet §7.6)
            return self._rx_combined(pkt)
        if not pkt.crypto_done or pkt.decapsulated or pkt.crypto_status != CryptoStatus.SUCCESS:
            return pkt
        sa = self.host.get(d.offload_handle)
        if sa is None or not sa.framable:
            pkt.note = "processed by the card; SA unknown to this host, ESP/AH left in place"
            return pkt
        l3 = packets.l3_offset(frame)
        try:
            stripped = None
            if l3 >= 0:
                packet = frame[l3:]
                if sa.ah_icv_len:  # inbound bundle: AH first, then ESP
                    stripped = packets.strip_ah(packet)
                    packet = stripped.packet
                if sa.has_esp:
                    stripped = packets.strip_esp(sa.geometry(), packet)
        except packets.FrameError as exc:
            pkt.note = f"cannot strip {'AH/ESP' if sa.ah_icv_len else 'ESP'}: {exc}"
            return pkt
        if stripped is None:
            pkt.note = "not an IP frame"
        elif stripped.packet is None:
            pkt.note = "dummy packet (next header 59, RFC 4303 §2.6)"
        elif sa.tunnel and (why := packets.outside_selector(stripped.packet, sa.inner_src, sa.inner_dst)):
            pkt.note = f"dropped by the host: {why} (RFC 4301 §5.2)"
            self.host_policy_drops += 1
        else:
            head = bytearray(frame[:l3])
            etype = ETH_P_IPV6 if stripped.packet[0] >> 4 == 6 else ETH_P_IP
            head[l3 - 2:l3] = etype.to_bytes(2, "big")
            pkt.inner = bytes(head) + stripped.packet
        return pkt

    def _rx_combined(self, pkt: RxPacket) -> RxPacket:
        """Transport over tunnel: the card decrypted both layers in place (datasheet §7.6). Strip the tunnel
        ESP with SA ``handle``, check its selector, then the transport ESP with SA ``next_handle``."""
        if pkt.crypto_status != CryptoStatus.SUCCESS:
            pkt.note = f"transport layer failed ({pkt.crypto_status_name}); frame as received"
            return pkt
        outer, inner = self.host.get(pkt.handle), self.host.get(pkt.next_handle)
        if outer is None or inner is None or not outer.framable or not inner.framable:
            pkt.note = "processed by the card; SA unknown to this host, ESP left in place"
            return pkt
        frame = pkt.frame
        l3 = packets.l3_offset(frame)
        if l3 < 0:
            pkt.note = "not an IP frame"
            return pkt
        try:
            tunnelled = packets.strip_esp(outer.geometry(), frame[l3:])
            if tunnelled.packet is None:
                pkt.note = "dummy packet (next header 59, RFC 4303 §2.6)"
                return pkt
            why = packets.outside_selector(tunnelled.packet, outer.inner_src, outer.inner_dst)
            if why:
                pkt.note = f"dropped by the host: {why} (RFC 4301 §5.2)"
                self.host_policy_drops += 1
                return pkt
            plain = packets.strip_esp(inner.geometry(), tunnelled.packet)
        except packets.FrameError as exc:
            pkt.note = f"cannot strip ESP: {exc}"
            return pkt
        if plain.packet is None:
            pkt.note = "dummy packet (next header 59, RFC 4303 §2.6)"
            return pkt
        pkt.inner = _reframe(frame, l3, plain.packet)
        return pkt


def _reframe(frame: bytes, l3: int, packet: bytes) -> bytes:
    """The frame's link header (EtherType set to the packet's IP version) followed by ``packet``."""
    out = bytearray(frame[:l3]) + packet
    if l3 >= 2:
        etype = ETH_P_IPV6 if packet[0] >> 4 == 6 else ETH_P_IP
        out[l3 - 2:l3] = etype.to_bytes(2, "big")
    return bytes(out)
