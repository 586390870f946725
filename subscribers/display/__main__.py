"""python -m subscribers.display: serve the live display page (see docs/display.md)."""
from __future__ import annotations

import argparse
import logging
import sys

from subscribers.display.server import DisplayConfigError, DisplayServer, page_config, read_password


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m subscribers.display",
                                 description="Serve the live edgedance display: a page that reads the pose "
                                             "stream straight from Mosquitto over WebSockets.")
    ap.add_argument("--port", type=int, default=8080, help="HTTP port of the page (default 8080; 0: any free port)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1; 0.0.0.0 to serve the network)")
    ap.add_argument("--broker-ws", default=None,
                    help="the broker's WebSockets URL, e.g. ws://pi.local:9001 (default: ws://<page host>:9001)")
    ap.add_argument("--user", default="display", help="MQTT user (read-only; default display)")
    ap.add_argument("--password-file", default=None,
                    help="file with the password, or the broker's credentials.json (user -> password)")
    ap.add_argument("--device", default="+", help="device id to follow, or + for all (default +)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        password = read_password(args.password_file, args.user) if args.password_file else ""
        config = page_config(broker_ws=args.broker_ws, user=args.user, password=password, device=args.device)
        server = DisplayServer(config, host=args.host, port=args.port)
    except (DisplayConfigError, OSError) as e:
        print(f"display: {e}", file=sys.stderr)
        return 2
    print(f"display: open {server.url} (broker {config['broker'] or 'ws://<page host>:9001'}, "
          f"user {args.user}, device {args.device}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
