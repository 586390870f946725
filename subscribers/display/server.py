"""A tiny static web server for the display page, plus `/config.json` for the page:
where the broker's WebSockets listener is, which user to log in as, which device to
follow, and the pose layout (keypoint names, bones) from `device.contract`.

The display user may only read (see the broker ACL), which is why its password may
be handed to any browser that can reach this server; bind to 127.0.0.1 (the default)
unless the page should be reachable from the network.
"""
from __future__ import annotations

import functools
import http.server
import json
import logging
import pathlib
import threading

from device.contract import BONES, KEYPOINTS
from device.protocol import DEVICE_ID_RE

log = logging.getLogger(__name__)

STATIC_DIR = pathlib.Path(__file__).with_name("static")


class DisplayConfigError(ValueError):
    """Bad display settings (device id, password file); the text says how to fix it."""


def page_config(*, broker_ws: str | None = None, user: str = "display", password: str = "",
                device: str = "+") -> dict:
    """What `/config.json` serves. `broker_ws` None: the page uses ws://<its own host>:9001."""
    if device != "+" and not DEVICE_ID_RE.match(device):
        raise DisplayConfigError(f"device {device!r}: use '+' (all devices) or 1-64 characters from A-Z a-z 0-9 _ -")
    if broker_ws is not None and not broker_ws.startswith(("ws://", "wss://")):
        raise DisplayConfigError(f"broker URL {broker_ws!r}: must start with ws:// or wss:// (the WebSockets listener)")
    return {"broker": broker_ws, "username": user, "password": password, "device": device,
            "keypoints": list(KEYPOINTS), "bones": [list(b) for b in BONES]}


def read_password(path, user: str = "display") -> str:
    """The password from a file: either the password alone on the first line, or the
    broker's `credentials.json` (user -> password), from which `user`'s is taken."""
    path = pathlib.Path(path)
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise DisplayConfigError(f"password file {path}: {e.strerror}; give a file holding the password "
                                 "or the broker's credentials.json") from e
    if text.startswith("{"):
        try:
            creds = json.loads(text)
        except json.JSONDecodeError as e:
            raise DisplayConfigError(f"password file {path}: not valid JSON ({e})") from e
        if not isinstance(creds, dict) or not isinstance(creds.get(user), str):
            raise DisplayConfigError(f"password file {path}: no password for user {user!r} in it "
                                     f"(users: {sorted(creds) if isinstance(creds, dict) else '?'})")
        return creds[user]
    if not text:
        raise DisplayConfigError(f"password file {path} is empty")
    return text.splitlines()[0]


class _Handler(http.server.SimpleHTTPRequestHandler):
    config_blob = b"{}"

    def do_GET(self):
        if self.path.split("?", 1)[0] == "/config.json":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(self.config_blob)))
            self.end_headers()
            self.wfile.write(self.config_blob)
            return
        super().do_GET()

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def list_directory(self, path):
        self.send_error(404, "No listing")
        return None

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)


class DisplayServer:
    """Serves the page on `host:port` (port 0: a free one) in a thread (context manager).

    `url` is the page's address once started.
    """

    def __init__(self, config: dict, host: str = "127.0.0.1", port: int = 0):
        handler = type("Handler", (_Handler,), {"config_blob": json.dumps(config).encode()})
        self._httpd = http.server.ThreadingHTTPServer(
            (host, port), functools.partial(handler, directory=str(STATIC_DIR)))
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "DisplayServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="display-http", daemon=True)
        self._thread.start()
        log.info("display page on %s", self.url)
        return self

    def serve_forever(self):
        self._httpd.serve_forever()

    def close(self):
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "DisplayServer":
        return self.start()

    def __exit__(self, *exc):
        self.close()
