"""One API request's sequences, bridged from the scheduler thread (callbacks) to the event
loop (an asyncio.Queue fed through loop.call_soon_threadsafe), and the errors answered as
OpenAI error objects."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import JSONResponse

from ..config import SamplingParams
from . import openai_schema as oa
from .http_metrics import Metrics


class ApiError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(oa.error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status)


class RequestRun:
    """The n sequences of one API request and the queue their events arrive on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics):
        self.loop = loop
        self.metrics = metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handles: list = []
        self.pending = 0
        self.disconnected = False

    def submit(self, scheduler, prompt: list[int], params: SamplingParams, index: int,
               request_id: str) -> None:
        t0 = time.monotonic()
        last = None
        metrics = self.metrics

        def on_token(event):                       # scheduler thread
            nonlocal last
            now = time.monotonic()
            if last is None:
                metrics.ttft.observe(now - t0)
            else:
                metrics.itl.observe(now - last)
            last = now
            self._post((index, event, False))

        def on_done(completion):                   # scheduler thread
            metrics.finished(completion, time.monotonic() - t0)
            self._post((index, completion, True))

        handle = scheduler.submit(prompt, params, on_token=on_token, on_done=on_done,
                                  request_id=request_id)
        self.handles.append(handle)
        self.pending += 1

    def _post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:                       # the event loop is gone (server stopped)
            pass

    async def items(self, request: Request, poll: float):
        """(index, TokenEvent | Completion, done) until every sequence is done, or until the
        client disconnects (then everything is cancelled and `disconnected` is set)."""
        get = None
        checked = time.monotonic()
        try:
            while self.pending:
                if get is None:
                    get = asyncio.ensure_future(self.queue.get())
                finished, _ = await asyncio.wait({get}, timeout=poll)
                if not finished or time.monotonic() - checked >= poll:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.disconnected = True
                        self.cancel()
                        return
                if not finished:
                    continue
                item, get = get.result(), None
                if item[2]:
                    self.pending -= 1
                yield item
        finally:
            if get is not None:
                get.cancel()

    def cancel(self) -> None:
        """Cancel the sequences still running (any thread; finished ones are left alone)."""
        for h in self.handles:
            try:
                if not h.done():
                    h.cancel()
            except Exception:                      # never let a cancel break the response
                pass


def openai_finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def failure(c) -> ApiError | None:
    if c.finish_reason == "error":
        return ApiError(500, f"generation failed: {c.error or 'unknown error'}", "server_error")
    if c.finish_reason == "cancelled":
        return ApiError(503, "the request was cancelled (the server is shutting down)",
                        "server_error", code="cancelled")
    return None
