"""A stand-in worker process for the pool and fan-out tests: real process, real socket.

``python fake_worker.py SOCKET BEHAVIOUR LOG``: answers HTTP on the Unix socket
SOCKET (``/healthz`` 200; other requests are appended to LOG and answered
200, or with the status after a colon: ``serve:422``). BEHAVIOUR: ``serve``
(until SIGTERM, then exit 0), ``crash`` (exit 3 at once), ``crash-later``
(exit 3 half a second after its first ``/healthz``: it has run), ``stubborn``
(ignore SIGTERM).
"""

import json
import os
import signal
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler


def main(socket_path: str, behaviour: str, log_path: str) -> int:
    behaviour, _, status = behaviour.partition(":")
    if behaviour == "crash":
        return 3

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode() if length else ""
            code = 200
            if behaviour == "crash-later" and self.path == "/healthz" and not checked.is_set():
                checked.set()
                threading.Timer(0.5, os._exit, [3]).start()
            if self.path != "/healthz":
                code = int(status or 200)
                with open(log_path, "a") as log:
                    log.write(json.dumps([os.getpid(), self.command, self.path, body]) + "\n")
            payload = json.dumps({"detail": "refused"} if code >= 300 else {"ok": True}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    checked = threading.Event()
    server = socketserver.UnixStreamServer(socket_path, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    if behaviour == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop = threading.Event()
    if behaviour != "stubborn":
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.1):
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
