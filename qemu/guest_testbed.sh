#!/bin/sh
# ipsec-nic test bed, guest side: the card's kernel netdev and/or the Linux peer, ready for a script.
#
#   sh /opt/ipsec-nic/qemu/guest_testbed.sh setup   # once per boot (a second call only re-reads the result)
#   sh /opt/ipsec-nic/qemu/guest_testbed.sh card    # (re)load the module and configure the card's netdev
#
# The host (ipsec_nic/testbed.py) passes every parameter in the environment, so the addresses are
# declared once, in Python:
#   TB_LOAD        shell snippet that loads the kernel driver (empty: no kernel driver)
#   TB_PCI         the card's PCI vendor:device, e.g. ec5e:0001 (finds its netdev in sysfs)
#   TB_PEER        1: move the virtio-net NIC into netns TB_NETNS as the Linux peer
#   TB_NETNS TB_CARD4 TB_PEER4 TB_PREFIX4 TB_CARD6 TB_PEER6 TB_PREFIX6
#   TB_CARD_IN4 TB_PEER_IN4 TB_CARD_IN6 TB_PEER_IN6   tunnel mode: the networks behind each end
#   TB_MODULES     peer-side ESP/crypto modules, loaded in one go
#   TB_ENV_FILE    where the result goes (default /run/ipsec-nic-testbed.env)
# Result: /run/ipsec-nic-testbed.env, `export NAME=value` lines for IPSEC_NIC_DEV, IPSEC_NIC_ADDR, ...
# Failures print "ipsec-nic test bed: ..." and exit 125 (the user's script never ran).

ENV_FILE=${TB_ENV_FILE:-/run/ipsec-nic-testbed.env}
LINK_WAIT_S=20

fail() {
    echo "ipsec-nic test bed: $*" >&2
    exit 125
}

# The netdev whose PCI device is the card (no udev here: names are eth0, eth1, ... in probe order).
card_dev() {
    vendor="0x${TB_PCI%%:*}"
    device="0x${TB_PCI#*:}"
    for dir in /sys/class/net/*; do
        [ -r "$dir/device/vendor" ] || continue
        if [ "$(cat "$dir/device/vendor")" = "$vendor" ] && [ "$(cat "$dir/device/device")" = "$device" ]; then
            echo "${dir##*/}"
            return 0
        fi
    done
    return 1
}

virtio_dev() {
    for dir in /sys/class/net/*; do
        [ -e "$dir/device/driver" ] || continue
        if [ "$(basename "$(readlink "$dir/device/driver")")" = virtio_net ]; then
            echo "${dir##*/}"
            return 0
        fi
    done
    return 1
}

# Try a command once a second until it succeeds or $1 seconds have passed.
retry() {
    seconds=$1
    shift
    while ! "$@" >/dev/null 2>&1; do
        seconds=$((seconds - 1))
        [ "$seconds" -gt 0 ] || return 1
        sleep 1
    done
}

setup_card() {
    if ! card_dev >/dev/null; then
        # stdout is this function's result (the netdev name): the loader's chatter goes to stderr.
        sh -c "$TB_LOAD" >&2 || fail "loading the kernel driver failed: $TB_LOAD"
    fi
    retry 10 card_dev || fail "the driver loaded but no netdev belongs to PCI device $TB_PCI (dmesg | tail: $(dmesg | tail -5))"
    dev=$(card_dev)
    ip link set dev "$dev" up || fail "ip link set $dev up failed"
    ip addr replace "$TB_CARD4/$TB_PREFIX4" dev "$dev" || fail "cannot address $dev"
    ip -6 addr replace "$TB_CARD6/$TB_PREFIX6" dev "$dev" nodad || fail "cannot address $dev (IPv6)"
    # Tunnel mode: the card's inner network on lo, the peer's behind the peer, with the inner source
    # address, so traffic between the inner networks matches the tunnel policies' selectors.
    ip addr replace "$TB_CARD_IN4/32" dev lo
    ip -6 addr replace "$TB_CARD_IN6/128" dev lo nodad
    if [ "$TB_PEER" = 1 ]; then
        ip route replace "$TB_PEER_IN4/32" via "$TB_PEER4" dev "$dev" src "$TB_CARD_IN4"
        ip -6 route replace "$TB_PEER_IN6/128" via "$TB_PEER6" dev "$dev" src "$TB_CARD_IN6"
        retry "$LINK_WAIT_S" grep -qx 1 "/sys/class/net/$dev/carrier" ||
            fail "$dev has no carrier after ${LINK_WAIT_S} s (the card's wire to the peer is down)"
    fi
    echo "$dev"
}

setup_peer() {
    vif=$(virtio_dev) || fail "no virtio-net NIC in the root netns (was the VM started with the peer NIC?)"
    # Load the peer's ESP and crypto modules in one go (on-demand loading once raced the first SA).
    modprobe -q -a $TB_MODULES 2>/dev/null
    ip netns add "$TB_NETNS" || fail "ip netns add $TB_NETNS failed"
    ip link set "$vif" netns "$TB_NETNS" || fail "cannot move $vif into netns $TB_NETNS"
    ip -n "$TB_NETNS" -batch - <<EOF || fail "configuring the peer netns failed"
link set lo up
link set $vif up
addr add $TB_PEER4/$TB_PREFIX4 dev $vif
addr add $TB_PEER6/$TB_PREFIX6 dev $vif nodad
addr add $TB_PEER_IN4/32 dev lo
addr add $TB_PEER_IN6/128 dev lo nodad
route add $TB_CARD_IN4/32 via $TB_CARD4 dev $vif src $TB_PEER_IN4
route add $TB_CARD_IN6/128 via $TB_CARD6 dev $vif src $TB_PEER_IN6
EOF
    echo "$vif"
}

# The Linux peer without a kernel netdev for the card: the demo's topology (the Python driver drives
# the card; the peer has permanent neighbour entries for the card's addresses).
setup_python_peer() {
    python3 -m guest_tools.scenario setup >/run/ipsec-nic-scenario-setup.out 2>&1 ||
        fail "the peer setup failed: $(tail -3 /run/ipsec-nic-scenario-setup.out)"
    ip -n "$TB_NETNS" -o link show | awk -F': ' '$2 != "lo" { sub(/@.*/, "", $2); print $2; exit }'
}

reachable() {
    # ARP/ND and the first frames through the card's rings can take a few seconds under TCG.
    retry 10 ping -c 1 -W 2 "$TB_PEER4" || fail "the peer $TB_PEER4 does not answer ping from $1"
    retry 10 ping -6 -c 1 -W 2 "$TB_PEER6" || fail "the peer $TB_PEER6 does not answer ping -6 from $1"
}

# After ARP/ND worked once: permanent neighbour entries on both ends. Unicast neighbour probes between
# the two addresses would otherwise ride host-to-host IPsec policies later and upset exact packet counts.
# The peer's inner addresses too: with packet offload in tunnel mode the stack hands the card the plain
# inner packet and resolves the neighbour of its inner destination (net/xfrm/xfrm_output.c
# xfrm_dev_direct_output uses the tunnel endpoint's on-link route, whose next hop is the packet's own
# daddr). IPv4 gets away with it (the peer answers ARP for any local address); ND does not.
pin_neighbours() {
    card_mac=$(cat "/sys/class/net/$1/address")
    peer_mac=$(ip netns exec "$TB_NETNS" cat "/sys/class/net/$2/address")
    ip neigh replace "$TB_PEER4" lladdr "$peer_mac" dev "$1" nud permanent &&
        ip neigh replace "$TB_PEER6" lladdr "$peer_mac" dev "$1" nud permanent &&
        ip neigh replace "$TB_PEER_IN4" lladdr "$peer_mac" dev "$1" nud permanent &&
        ip neigh replace "$TB_PEER_IN6" lladdr "$peer_mac" dev "$1" nud permanent &&
        ip -n "$TB_NETNS" neigh replace "$TB_CARD4" lladdr "$card_mac" dev "$2" nud permanent &&
        ip -n "$TB_NETNS" neigh replace "$TB_CARD6" lladdr "$card_mac" dev "$2" nud permanent ||
        fail "cannot pin the neighbour entries"
}

write_env() {
    {
        echo "export IPSEC_NIC_DEV='$1'"
        if [ -n "$1" ] || [ "$TB_PEER" = 1 ]; then
            echo "export IPSEC_NIC_ADDR='$TB_CARD4'"
            echo "export IPSEC_NIC_ADDR6='$TB_CARD6'"
        fi
        if [ "$TB_PEER" = 1 ]; then
            echo "export IPSEC_NIC_PEER_ADDR='$TB_PEER4'"
            echo "export IPSEC_NIC_PEER_ADDR6='$TB_PEER6'"
            echo "export IPSEC_NIC_PEER_NS='$TB_NETNS'"
            echo "export IPSEC_NIC_PEER_DEV='$2'"
        fi
    } >"$ENV_FILE.new" && mv "$ENV_FILE.new" "$ENV_FILE"
}

setup() {
    if [ -f "$ENV_FILE" ]; then
        return 0
    fi
    dev=
    vif=
    if [ -n "$TB_LOAD" ]; then
        dev=$(setup_card) || exit 125
        if [ "$TB_PEER" = 1 ]; then
            vif=$(setup_peer) || exit 125
            reachable "$dev"
            pin_neighbours "$dev" "$vif"
        fi
    elif [ "$TB_PEER" = 1 ]; then
        vif=$(setup_python_peer) || exit 125
    fi
    write_env "$dev" "$vif"
}

case "${1:-}" in
    setup) setup ;;
    card) setup_card >/dev/null || exit 125 ;;
    *)
        echo "usage: sh guest_testbed.sh setup | card" >&2
        exit 2
        ;;
esac
