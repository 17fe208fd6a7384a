"""One worker of ``winnow serve --workers N``: a whole scorer on a private Unix socket.

It is ``winnow serve`` with one difference of address: it listens on the socket
its supervisor named. Its log lines say ``worker=I``. It watches its parent,
and stops itself (SIGTERM: drain and commit) should the supervisor be gone
without stopping it (killed, say), so that no worker outlives its pod's
supervisor.
"""

import logging
import os
import signal
import threading
import time
from pathlib import Path

from service.config import Settings
from service.http.serve import serve

_PARENT_POLL_S = 1.0


def run_worker(settings: Settings, socket: Path, index: int) -> int:
    """Runs the scorer as worker ``index`` on ``socket``; its exit status."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s worker={index} %(name)s %(message)s")
        )
    watch = threading.Thread(
        target=_stop_when_orphaned, args=(os.getppid(),), name="parent-watch", daemon=True
    )
    watch.start()
    return serve(settings.model_copy(update={"workers": 1}), uds=socket)


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_POLL_S)
    logging.getLogger(__name__).error("the supervisor (pid %d) is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)
