"""`python -m broker run`: a Mosquitto with the project's configuration, for development.

Subcommands are functions registered in COMMANDS.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys
import threading

from broker import config
from broker.launcher import Broker, BrokerError


def _devices(text: str) -> tuple[str, ...]:
    ids = tuple(d.strip() for d in text.split(",") if d.strip())
    if not ids:
        raise argparse.ArgumentTypeError("give at least one device id, e.g. --devices pi1,pi2")
    for d in ids:
        try:
            config.device_user(d)
        except config.BrokerConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from e
    return ids


def cmd_run(args) -> int:
    """Start Mosquitto in the foreground until Ctrl-C."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a flag, not KeyboardInterrupt: no window where Ctrl-C kills us
        signal.signal(sig, lambda *_: stop.set())
    try:
        with Broker(args.dir, devices=args.devices, tls=not args.no_tls, websockets=not args.no_ws,
                    port=args.port, host=args.bind) as b:
            print(f"mosquitto running (pid {b.pid}), config {b.conf}")
            print(f"  mqtt        {b.host}:{b.port}")
            if b.tls_port:
                print(f"  mqtt+tls    {b.host}:{b.tls_port}  (CA {b.cafile})")
            if b.ws_port:
                print(f"  websockets  ws://{b.host}:{b.ws_port}/")
            print(f"  credentials {b.credentials_file}  (users: {', '.join(b.credentials)})")
            print(f"  log         {b.log_file}")
            print("Ctrl-C stops it.", flush=True)
            try:
                while not stop.wait(0.5):
                    if not b.running:
                        print(f"mosquitto exited unexpectedly; log:\n{b.log_tail()}", file=sys.stderr)
                        return 1
            except KeyboardInterrupt:
                pass
            print("stopping mosquitto")
    except (BrokerError, config.BrokerConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_files(args) -> int:
    """Only write the configuration, password file, ACL and certificates (e.g. for a system Mosquitto)."""
    try:
        layout = config.prepare(args.dir, devices=args.devices, port=args.port or 1883,
                                tls_port=None if args.no_tls else args.tls_port,
                                ws_port=None if args.no_ws else args.ws_port, bind_address=args.bind)
    except config.BrokerConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"config      {layout.conf}")
    print(f"credentials {layout.credentials_file}")
    return 0


def _common(p: argparse.ArgumentParser):
    p.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("broker-run"),
                   help="folder for the generated config, passwords, certificates and log (default ./broker-run)")
    p.add_argument("--devices", type=_devices, default=("pi1",), help="comma-separated device ids (default pi1)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the LAN)")
    p.add_argument("--no-tls", action="store_true", help="no TLS listener")
    p.add_argument("--no-ws", action="store_true", help="no WebSockets listener")


COMMANDS = {"run": cmd_run, "files": cmd_files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m broker", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help=cmd_run.__doc__)
    _common(p)
    p.add_argument("--port", type=int, default=None, help="plain MQTT port (default: a free one); TLS/WS use free ports")
    p = sub.add_parser("files", help=cmd_files.__doc__)
    _common(p)
    p.add_argument("--port", type=int, default=1883, help="plain MQTT port (default 1883)")
    p.add_argument("--tls-port", type=int, default=8883, help="TLS port (default 8883)")
    p.add_argument("--ws-port", type=int, default=9001, help="WebSockets port (default 9001)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
