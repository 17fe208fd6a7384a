"""A TCP proxy in front of a broker that a test can cut off and heal: a broker outage on demand.

The proxy runs its own event loop in a thread, so it keeps forwarding (or
refusing) whatever the test's own loop is doing: a test may block in
``Popen.wait`` while a role talks to the broker through it.

While cut, every open connection is closed and each new one is accepted and
closed at once (the client sees a reset, as when a broker host goes away), so
clients retry and fail until :meth:`FaultProxy.heal`.

:meth:`FaultProxy.freeze` wedges instead: the connections open at that moment
stay open but get no more bytes from the broker (a broker, or a middlebox, that
stopped answering on them), while new connections are served as usual, so the
broker still answers a probe.
"""

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Self

_CHUNK = 256 * 1024


class FaultProxy:
    """Forwards ``listen_host:port`` to ``target_host:target_port`` until cut.

    Args:
        target: the broker's ``host:port``.
        port: the port to listen on; 0 picks a free one (see :attr:`port`).
        host: the address to listen on.
    """

    def __init__(self, target: str, port: int = 0, host: str = "127.0.0.1") -> None:
        target_host, _, target_port = target.rpartition(":")
        self.target = (target_host, int(target_port))
        self.host = host
        self.port = port or free_port(host)
        self.connections_refused = 0
        self._cut = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._client_sides: set[asyncio.StreamWriter] = set()
        self._frozen: set[asyncio.StreamWriter] = set()  # client sides that get nothing more

    @property
    def address(self) -> str:
        """``host:port`` of the proxy: what the broker advertises and clients bootstrap from."""
        return f"{self.host}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def cut(self) -> None:
        """Closes every connection and refuses new ones until :meth:`heal`."""
        self._call(self._cut_all())

    def heal(self) -> None:
        """Forwards new connections again."""
        self._cut = False

    def freeze(self) -> int:
        """Stops forwarding the broker's bytes on every open connection; returns how many.

        The connections stay open; new ones are served. The frozen ones end when their
        client gives up on them (or at :meth:`stop`).
        """
        return self._call(self._freeze_all())  # type: ignore[return-value]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: "asyncio.Future[object] | object") -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_address=True
        )

    async def _stop(self) -> None:
        await self._cut_all()
        if self._server is not None:
            self._server.close()

    async def _cut_all(self) -> None:
        self._cut = True
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()

    async def _freeze_all(self) -> int:
        clients = {w for w in self._writers if w in self._client_sides}
        self._frozen |= clients
        return len(clients)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.connections_refused += 1
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        if self._cut:  # cut while connecting
            _abort(writer)
            _abort(up_writer)
            return
        self._writers.update((writer, up_writer))
        self._client_sides.add(writer)
        try:
            await asyncio.gather(
                _pipe(reader, up_writer), _pipe(up_reader, writer, lambda: writer in self._frozen)
            )
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                _abort(w)
            self._client_sides.discard(writer)
            self._frozen.discard(writer)


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    frozen: "Callable[[], bool]" = lambda: False,
) -> None:
    try:
        while data := await reader.read(_CHUNK):
            if frozen():
                continue  # swallowed: the client waits for an answer that never comes
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Closes at once with a reset, as a host that went away would."""
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
