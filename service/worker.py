"""The Gunicorn worker: `uvicorn_worker.UvicornWorker` with a gap-free shutdown.

Uvicorn's shutdown stops accepting and then at once closes every connection
that has no request in progress. A connection the worker accepted a moment
earlier, whose request bytes are still on their way, is closed unanswered:
during a SIGHUP rollout that is a failed request for a client that did nothing
wrong. This server waits a short grace between the two steps, so such requests
are parsed and then drained like any other in-flight request.
"""

from __future__ import annotations

import asyncio
import socket
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

ACCEPTED_REQUEST_GRACE_SECONDS = 0.25


class DrainingServer(Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(ACCEPTED_REQUEST_GRACE_SECONDS)
        await super().shutdown(sockets=None)


class DrainingUvicornWorker(UvicornWorker):  # type: ignore[misc]
    async def _serve(self) -> None:
        # Same as the parent's _serve (uvicorn-worker 0.4), with DrainingServer.
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        # Gunicorn halts the whole server on this code. A model problem never
        # gets here (the lifespan starts not ready and retries instead): only a
        # broken installation or configuration does.
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
