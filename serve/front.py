"""Refusals written by the HTTP protocol itself, before a request becomes an ASGI task.

Under overload most requests are refused, and on a server whose one core is shared by the event loop and the
encoder, every microsecond a refusal takes is taken from encoding. :class:`serve.app.ServeApp` already refuses before
FastAPI's stack; this goes one step further down. uvicorn's httptools protocol parses the request line and headers,
then creates a task that runs the ASGI app (a coroutine, a ``receive``/``send`` pair, two awaited messages). A
refused request needs none of that: the protocol asks :class:`serve.app.Admission` as soon as the path is known and,
when it refuses, writes the 503 to the socket at once. The body, when it arrives, is consumed by the parser and
dropped (as for any response sent before its body was read), so the keep-alive connection stays usable.

``ServeApp`` keeps its own check (admission is decided there too, with the in-flight count that only it updates),
so the app refuses correctly behind any other server; this protocol only makes most refusals cheaper.
uvicorn's ``limit_concurrency`` is not this: it counts connections, idle keep-alive ones included, and its 503
carries no Retry-After. Cost per refusal: ``server_loop_cpu_ms_per_answer`` in benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embtune.serve.app import Admission, RequestError

logger = logging.getLogger(__name__)


def admission_protocol(admission: Admission, work_routes: tuple[str, ...]) -> type[asyncio.Protocol] | str:
    """An httptools protocol class for ``uvicorn.run(http=...)`` that refuses work requests ``admission`` refuses,
    or ``"auto"`` (uvicorn's choice) where httptools is not installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
        from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
    except ImportError:  # uvicorn without httptools: ServeApp still refuses, a little later
        logger.info("httptools is not installed: refusals are written by the app, not by the protocol")
        return "auto"

    class AdmissionProtocol(HttpToolsProtocol):
        def _start_asgi_task(self, cycle, app) -> None:
            if cycle.scope["path"] in work_routes:
                err = admission.refusal_error()
                if err is not None:
                    self._refuse(cycle, err)
                    return
            super()._start_asgi_task(cycle, app)

        def _refuse(self, cycle, err: RequestError) -> None:
            """Write the 503 that ServeApp would have sent, and end the request as uvicorn ends a response."""
            status, body, extra = err.response()
            head = [STATUS_LINE[status]]
            for name, value in [*self.server_state.default_headers, (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), *extra]:
                head += [name, b": ", value, b"\r\n"]
            if not cycle.keep_alive:
                head.append(b"connection: close\r\n")
            head += [b"\r\n", body]
            self.transport.write(b"".join(head))
            if self.access_log:
                self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(cycle.scope),
                                        cycle.scope["method"], get_path_with_query_string(cycle.scope),
                                        cycle.scope["http_version"], status)
            cycle.response_started = cycle.response_complete = True
            cycle.message_event.set()
            if not cycle.keep_alive:
                self.transport.close()
            self.on_response_complete()

    return AdmissionProtocol
