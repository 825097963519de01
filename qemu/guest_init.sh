#!/bin/sh
# ipsec-nic guest init, PID 1 of a VM booted by qemu/launch.py.
#
# The tree's stage-0 init (/sbin/ipsec-nic-init) has mounted /proc and the project share at
# /opt/ipsec-nic read-only and exec'd this script from there, so this file can change without
# rebuilding the tree. Parameters come from the kernel command line (all optional):
#   ipsec_nic.nonce=N         tag for the markers, so output can never fake them
#   ipsec_nic.cmd=BASE64      run this shell command once, between markers, then power off
#   ipsec_nic.agent=DEV       else serve commands on this serial device (qemu/guest_agent.py)
#   ipsec_nic.shares=T:N,...  mount virtiofs tag T at /mnt/N
#   ipsec_nic.fs=9p           the shares are virtio-9p (a boot without shared RAM: qemu/initrd_9p.py
#                             mounted root and project and ran this script in place of stage 0)
#   ipsec_nic.modules=a,b     modules to load (best effort; the kernel loads most others on demand)
# The root file system is the read-only toolchain tree: everything writable is tmpfs.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export LANG=C.UTF-8
export PYTHONPATH=/opt/ipsec-nic
# Both shares are read-only. (No PYTHONPYCACHEPREFIX: it would hide the tree's precompiled
# byte code, and compiling scapy under TCG takes over a minute.)
export PYTHONDONTWRITEBYTECODE=1

mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
for dir in /tmp /run /var/tmp /var/log /mnt /root; do
    mount -t tmpfs -o mode=0755 tmpfs "$dir"
done
chmod 1777 /tmp /var/tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

nonce=none
cmd=
agent=
shares=
modules=
fs=virtiofs
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ipsec_nic.nonce=*) nonce="${arg#*=}" ;;
        ipsec_nic.cmd=*) cmd="${arg#*=}" ;;
        ipsec_nic.agent=*) agent="${arg#*=}" ;;
        ipsec_nic.shares=*) shares="${arg#*=}" ;;
        ipsec_nic.modules=*) modules="${arg#*=}" ;;
        ipsec_nic.fs=*) fs="${arg#*=}" ;;
    esac
done

# No udev here: load what the host asked for by hand; a missing module is not fatal.
for module in $(echo "$modules" | tr ',' ' '); do
    modprobe -q "$module" 2>/dev/null || echo "ipsec-nic init: cannot load module $module"
done
ip link set lo up

for share in $(echo "$shares" | tr ',' ' '); do
    tag="${share%%:*}"
    name="${share#*:}"
    mkdir -p "/mnt/$name"
    if [ "$fs" = 9p ]; then
        mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 "$tag" "/mnt/$name"
    else
        mount -t virtiofs "$tag" "/mnt/$name"
    fi || echo "ipsec-nic init: cannot mount share $tag at /mnt/$name"
done

# Kernel messages of warning level and below stay in dmesg, out of the command's output.
echo 4 > /proc/sys/kernel/printk
cd /opt/ipsec-nic || cd /

power_off() {
    sync
    echo o > /proc/sysrq-trigger
    sleep 30
}

if [ -n "$cmd" ]; then
    script=$(echo "$cmd" | base64 -d)
    echo "@@ipsec-nic-begin $nonce@@"
    /bin/sh -c "$script" < /dev/null 2>&1
    status=$?
    echo "@@ipsec-nic-exit $nonce $status@@"
elif [ -n "$agent" ]; then
    echo "@@ipsec-nic-agent $nonce@@"
    python3 /opt/ipsec-nic/qemu/guest_agent.py "$agent" "$nonce"
    echo "@@ipsec-nic-agent-exit $nonce $?@@"
else
    echo "ipsec-nic init: nothing to do (no ipsec_nic.cmd or ipsec_nic.agent)"
fi
power_off
