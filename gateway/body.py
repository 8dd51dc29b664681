"""The chat completion's body on its way in: when the request arrived, before FastAPI reads and
parses the body, so that the answer's `timings_ms.body` can say what receiving, parsing and
validating it cost (a 40 MB data URL makes that the gateway's largest cost before the Encode call).
"""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.routing import APIRoute


class ChatRoute(APIRoute):
    """The chat completion's route: stamps `request.state.arrived_at` (time.perf_counter()) before
    FastAPI reads the body."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def stamped(request: Request):
            request.state.arrived_at = time.perf_counter()
            return await handler(request)

        return stamped
