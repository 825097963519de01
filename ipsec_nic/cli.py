"""`ipsec-nic`: the project's command line.

A thin argparse layer: each subcommand imports its package lazily, so `ipsec-nic --help` is instant
and a broken optional part never stops the others.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DESCRIPTION = """\
ipsec-nic: an emulated PCIe NIC with IPsec offload, served to QEMU over vfio-user.

Quick start (each command sets up what it needs, idempotently):
  ipsec-nic demo      boot a VM with the card and run the guest tools against it
  ipsec-nic test      run the whole test suite (unit, protocol, firmware, VM-level)
"""


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(name)s: %(message)s")


def cmd_vm_setup(args: argparse.Namespace) -> int:
    from qemu import toolchain

    tc = toolchain.setup(force=args.force)
    version = ".".join(map(str, tc.qemu_version)) if isinstance(tc.qemu_version, tuple) else tc.qemu_version
    print(f"VM toolchain ready: {tc.root} (QEMU {version}, from {tc.qemu_source})")
    return 0


def cmd_vm_run(args: argparse.Namespace) -> int:
    from ipsec_nic import runner

    return runner.vm_run(
        profile=args.profile,
        guest_command=args.command,
        as_json=args.json,
        timeout=args.timeout,
        verbose=args.verbose,
        script=args.script,
        kernel_driver=args.kernel_driver,
        peer=args.peer,
        pcap=args.pcap,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from ipsec_nic import runner

    return runner.serve(socket_path=args.socket, profile=args.profile, ready_file=args.ready_file)


def cmd_demo(args: argparse.Namespace) -> int:
    from ipsec_nic import demo

    return demo.run(profile=args.profile, out_dir=Path(args.out), timeout=args.timeout, verbose=args.verbose,
                    kernel_driver=args.kernel_driver)


def cmd_soak(args: argparse.Namespace) -> int:
    from ipsec_nic import soak

    return soak.run(minutes=args.minutes, log_dir=args.logs, verbose=args.verbose)


def cmd_test(args: argparse.Namespace) -> int:
    """Run the test suite the way CI does: toolchain first (with progress), then pytest."""
    if not args.no_vm:
        from qemu import toolchain

        toolchain.setup()
    cmd = [sys.executable, "-m", "pytest", *args.pytest_args]
    if args.no_vm:
        cmd += ["-m", "not vm"]
    print("[ipsec-nic] running:", " ".join(cmd[2:]), flush=True)
    return subprocess.call(cmd, cwd=REPO)


def cmd_bench(args: argparse.Namespace) -> int:
    from ipsec_nic.bench import runner as bench_runner

    return bench_runner.run(args)


def _vm_run_epilog() -> str:
    from ipsec_nic.testbed import SCRIPT_VARIABLES

    width = max(map(len, SCRIPT_VARIABLES))
    table = "\n".join(f"  {name:<{width}}  {meaning}" for name, meaning in SCRIPT_VARIABLES.items())
    return ("The guest command or script sees these variables (with --script, --kernel-driver or --peer):\n"
            f"{table}\n\n"
            "Example:\n"
            "  ipsec-nic vm run --kernel-driver --peer --script my-offload-test.sh")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipsec-nic", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    vm = sub.add_parser("vm", help="the VM toolchain and booting a VM with the card")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="VM_COMMAND")
    s = vm_sub.add_parser(
        "setup",
        help="build (once) or check the VM toolchain: Debian trixie tree with QEMU >= 10.1, kernel, python3",
    )
    s.add_argument("--force", action="store_true", help="rebuild even if a ready toolchain exists")
    s.set_defaults(func=cmd_vm_setup)
    r = vm_sub.add_parser(
        "run",
        help="start the card, boot a VM with it, run a guest command or script (default: the probe), shut down",
        description="Start the card, boot a VM with it, run a command or script in the guest (default: the "
                    "probe tool), stream its output and shut down; the exit status is the guest command's.",
        epilog=_vm_run_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("--profile", help="card profile YAML (default: device/profiles/default.yaml)")
    what = r.add_mutually_exclusive_group()
    what.add_argument(
        "--command",
        help="shell command to run inside the guest (default: python3 -m guest_tools.probe); it travels on the "
             "kernel command line, so keep it short and use --script for anything longer",
    )
    what.add_argument(
        "--script", metavar="FILE",
        help="host file copied into the guest and run with sh (cwd /tmp) after the test bed is set up; "
             "its exit status is the command's",
    )
    r.add_argument(
        "--kernel-driver", action="store_true",
        help="build (once) and load the card's Linux driver: the card is a netdev ($IPSEC_NIC_DEV) in the "
             "root netns with $IPSEC_NIC_ADDR/$IPSEC_NIC_ADDR6",
    )
    r.add_argument(
        "--peer", action="store_true",
        help="add a virtio-net NIC on the other end of the card's wire, moved into netns 'peer' and addressed "
             "(the Linux IPsec peer of the demo); with --kernel-driver it is checked reachable by ping, IPv4 and IPv6",
    )
    r.add_argument("--pcap", metavar="FILE", help="record every frame on the card's wire to FILE")
    r.add_argument("--json", action="store_true", help="print the probe's result as JSON")
    r.add_argument("--timeout", type=float, default=300.0, help="seconds before the VM is killed")
    r.set_defaults(func=cmd_vm_run)

    sv = sub.add_parser("serve", help="serve the card over vfio-user on a UNIX socket (foreground)")
    sv.add_argument("--socket", required=True, help="path of the vfio-user UNIX socket to listen on (created "
                    "with mode 0600, so only this user can attach; a missing directory is created 0700)")
    sv.add_argument("--profile", help="card profile YAML (default: device/profiles/default.yaml)")
    sv.add_argument("--ready-file", help=argparse.SUPPRESS)
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="the main job: boot a VM with the card and exercise it end to end")
    d.add_argument("--profile", help="card profile YAML (default: device/profiles/default.yaml)")
    d.add_argument("--out", default="out", help="directory for logs and the wire pcap (default: ./out)")
    d.add_argument("--timeout", type=float, default=600.0, help="seconds before the VM is killed")
    d.add_argument(
        "--kernel-driver", action="store_true",
        help="run the scenarios through the card's Linux driver: plain `ip xfrm ... offload crypto|packet dev` "
             "in the guest instead of the Python user-space driver",
    )
    d.set_defaults(func=cmd_demo)

    sk = sub.add_parser("soak", help="benchmark mode: SA churn and traffic both ways against a Linux peer in a "
                                     "VM for N minutes, then account for every packet")
    sk.add_argument("--minutes", type=float, default=1.0, help="how long to run rounds (default 1)")
    sk.add_argument("--logs", help="directory for the card and VM logs (default: a new temporary one)")
    sk.set_defaults(func=cmd_soak)

    t = sub.add_parser("test", help="run the test suite (sets up the VM toolchain first)")
    t.add_argument("--no-vm", action="store_true", help="skip the VM-level tests (quick local runs only)")
    t.add_argument("pytest_args", nargs="*", metavar="PYTEST_ARG",
                   help="extra arguments for pytest, passed on in order, e.g. -x -k firmware")
    t.set_defaults(func=cmd_test)

    b = sub.add_parser(
        "bench", help="measure every performance figure against same-run references; one table",
        description="Run every benchmark and print one table: figure, value, unit, the reference measured in "
                    "the same run, their ratio, the target and whether it is met. Progress goes to stderr. "
                    "The full run boots one VM and runs the demo (about 5 minutes).")
    from ipsec_nic.bench.runner import add_arguments as add_bench_arguments

    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    try:
        from firmware_model import fwtool
    except ImportError:  # the offline tool is optional for the rest of the CLI
        fwtool = None
    if fwtool is not None and hasattr(fwtool, "add_fw_subparser"):
        fwtool.add_fw_subparser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # `test` hands everything after it to pytest, in order (only its own --no-vm is taken out).
    passthrough: list[str] = []
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command_at is not None and argv[command_at] == "test":
        rest = argv[command_at + 1:]
        if "-h" not in rest and "--help" not in rest:
            passthrough = [a for a in rest if a != "--no-vm"]
            argv = argv[: command_at + 1] + [a for a in rest if a == "--no-vm"]
    args = parser.parse_args(argv)
    if passthrough:
        args.pytest_args = [*args.pytest_args, *passthrough]
    _setup_logging(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
