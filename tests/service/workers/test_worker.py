"""A worker whose supervisor is gone (killed, say) stops itself: SIGTERM, so it drains."""

import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import os, signal, sys, threading, time
from service.workers import worker
worker._PARENT_POLL_S = 0.05
mark = sys.argv[1]
def stop(*_):
    open(mark, "w").write("SIGTERM")
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
threading.Thread(target=worker._stop_when_orphaned, args=(os.getppid(),), daemon=True).start()
open(mark + ".up", "w").write("")
time.sleep(60)
"""

SUPERVISOR = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
time.sleep(60)
"""


def test_a_worker_stops_itself_when_its_supervisor_is_killed(tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, CHILD, str(mark)])
    try:
        deadline = time.monotonic() + 20
        while not Path(f"{mark}.up").exists():
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        assert not mark.exists()  # its parent lives: it keeps running
        supervisor.kill()
        supervisor.wait()
        deadline = time.monotonic() + 10
        while not mark.exists():
            assert time.monotonic() < deadline, "the orphaned worker kept running"
            time.sleep(0.05)
    finally:
        supervisor.kill()
        supervisor.wait()
    assert mark.read_text() == "SIGTERM"
