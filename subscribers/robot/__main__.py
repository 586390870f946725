"""python -m subscribers.robot: follow a device's pose stream and drive servos.

    python -m subscribers.robot --device pi1 --broker 127.0.0.1:1883 --user robot \\
        --password-file broker-run/credentials.json --driver sim --trace out.png
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import signal
import sys
import threading

from subscribers.robot.config import DEFAULT_INI, RobotConfigError, load_config
from subscribers.robot.drivers import DRIVERS, BusError, SimulatedBus, open_bus
from subscribers.robot.follower import Follower


def read_password(path: pathlib.Path, user: str) -> str:
    """A file holding the password, or a broker credentials.json (user -> password)."""
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise SystemExit(f"error: cannot read the password file {path}: {e}") from e
    if text.startswith("{"):
        try:
            creds = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path} looks like JSON but is not: {e}") from e
        if user not in creds:
            raise SystemExit(f"error: {path} has no password for user {user!r} (users: {sorted(creds)})")
        return creds[user]
    return text


def _broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--broker {text!r}: use HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m subscribers.robot", description=__doc__.splitlines()[0])
    ap.add_argument("--device", required=True, help="device id to follow (topic edgedance/v1/<id>/pose)")
    ap.add_argument("--broker", type=_broker, default=("127.0.0.1", 1883), help="HOST:PORT (default 127.0.0.1:1883)")
    ap.add_argument("--user", default="robot", help="broker user (default robot)")
    ap.add_argument("--password-file", type=pathlib.Path, help="file with the password, or the broker's credentials.json")
    ap.add_argument("--transport", choices=("tcp", "tls", "websockets"), default="tcp")
    ap.add_argument("--cafile", type=pathlib.Path, help="CA certificate for --transport tls")
    ap.add_argument("--config", type=pathlib.Path, default=DEFAULT_INI, help=f"robot config (default {DEFAULT_INI.name})")
    ap.add_argument("--driver", choices=DRIVERS, default="sim", help="servo bus (default sim)")
    ap.add_argument("--serial-port", help="serial device for --driver serial, e.g. /dev/ttyACM0")
    ap.add_argument("--baud", type=int, default=115200, help="serial baud rate (default 115200)")
    ap.add_argument("--i2c-address", type=lambda s: int(s, 0), default=0x40, help="PCA9685 address (default 0x40)")
    ap.add_argument("--trace", type=pathlib.Path, help="with --driver sim: write a PNG of the servo traces on exit")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config)
    except RobotConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    password = read_password(args.password_file, args.user) if args.password_file else None
    names = {j.channel: j.name for j in cfg.joints}
    try:
        bus = open_bus(args.driver, names=names, serial_port=args.serial_port, baudrate=args.baud,
                       i2c_address=args.i2c_address)
    except BusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with bus, Follower(cfg, bus, args.device) as f:
        f.connect(*args.broker, user=args.user, password=password, transport=args.transport, cafile=args.cafile)
        try:
            stop.wait(args.seconds or None)
        except KeyboardInterrupt:
            pass
        counts = dict(f.counts)
    print("messages: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.trace:
        if isinstance(bus, SimulatedBus) and bus.trace:
            print(f"trace: {bus.plot(args.trace, title=f'robot following {args.device}')}")
        else:
            print("no trace: --trace needs --driver sim and some recorded commands", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
