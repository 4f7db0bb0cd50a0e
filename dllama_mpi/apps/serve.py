"""`serve`: an OpenAI-compatible HTTP server on rank 0, in front of the scheduler.

    GET  /health                 {"status": "ok"}
    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages -> chat template -> tokens -> scheduler
    POST /v1/completions         prompt(s) (text or token ids) -> scheduler
    GET  /metrics                Prometheus text format (the app's own registry)

Threads: the scheduler's run() loop owns the main thread (numba kernels and MPI run from one
Python thread); uvicorn runs its event loop in a background thread. Requests are submitted to
the scheduler from the event loop (submit is thread-safe); tokens come back on the scheduler
thread and cross to the event loop through loop.call_soon_threadsafe onto an asyncio.Queue.
A client that goes away (noticed by Starlette's disconnect listener while streaming, or by
polling request.is_disconnected()) cancels its sequences, which frees their KV slots.

Errors use the OpenAI error object {"error": {"message", "type", "param", "code"}}: a bad body
is a 400 (FastAPI's 422 is turned into 400 too), a prompt that leaves no room in the context is
a 400 with code "context_length_exceeded", the scheduler's DllamaError is a 400, an unknown
route a 404, a missing/wrong API key a 401.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SamplingParams
from ..errors import DllamaError
from . import openai_schema as oa
from .http_bridge import ApiError, RequestRun, failure, openai_finish
from .http_metrics import Gate, Metrics

__all__ = ["create_app", "run_server", "run_serve", "MAX_SEQUENCES"]

MAX_SEQUENCES = 64          # sequences one request may start (prompts x n)
MAX_BODY_BYTES = 8 << 20    # a request body larger than this is refused (413)
POLL_SECONDS = 0.5          # how often a waiting request checks that its client is still there


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------
def create_app(scheduler, tokenizer, model_name: str, max_seq_len: int, *,
               defaults: SamplingParams | None = None, api_key: str | None = None,
               poll_seconds: float = POLL_SECONDS, max_body_bytes: int = MAX_BODY_BYTES,
               cors_origins: tuple[str, ...] = ()) -> FastAPI:
    """The HTTP app in front of `scheduler` (anything with the scheduler contract's submit;
    requests_running / requests_waiting / *_total counters are read for /metrics when present).

    `defaults` gives the sampling of fields a request leaves out (default: OpenAI's
    temperature 1, top_p 1, and as many tokens as the context leaves); every sequence's
    max_tokens is capped at the room its prompt leaves in max_seq_len; an explicit max_tokens
    beyond that room is a 400 (context_length_exceeded), as OpenAI answers."""
    if defaults is None:
        defaults = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_seq_len)
    metrics = Metrics(scheduler)
    created_at = oa.now()
    vocab_size = getattr(tokenizer, "vocab_size", None)

    app = FastAPI(title="dllama_mpi", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.state.scheduler = scheduler
    app.add_middleware(Gate, api_key=api_key, metrics=metrics)
    if cors_origins:        # off unless asked: browsers on other origins get no access
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])

    @functools.lru_cache(maxsize=65536)
    def token_text(t: int) -> str:
        return tokenizer.decode([t])

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(DllamaError)
    async def _dllama_error(request: Request, e: DllamaError):
        return ApiError(400, str(e)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = list(e.errors())
        skip = 1 if errors and tuple(errors[0].get("loc", ()))[:1] == ("body",) else 0
        message, param = oa.validation_error_message(errors, skip_loc=skip)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif e.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return JSONResponse(oa.error_body(message), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    # -- request parsing --------------------------------------------------------------------
    async def read_body(request: Request) -> bytes:
        """The body, refused with a 413 as soon as it is known to exceed max_body_bytes."""
        too_big = ApiError(413, f"the request body exceeds {max_body_bytes} bytes",
                           code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: Request, model):
        raw = await read_body(request)
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            body = model.model_validate(obj)
        except oa.ValidationError as e:
            message, param = oa.validation_error_message(e.errors())
            raise ApiError(400, message, param=param) from None
        try:
            params = oa.to_sampling_params(body, defaults)
        except DllamaError as e:
            raise ApiError(400, str(e)) from None
        return body, params

    def encode(text: str, param: str) -> list[int]:
        message = oa.nul_message(text, param)
        if message is not None:
            raise ApiError(400, message, param=param)
        return tokenizer.encode(text)

    def check_prompt(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if len(ids) >= max_seq_len:
            raise ApiError(400, f"This model's maximum context length is {max_seq_len} tokens, "
                                f"but the prompt has {len(ids)} tokens (at least one must be "
                                f"left to generate). Please shorten the {param}.",
                           param=param, code="context_length_exceeded")
        return ids

    def check_ids(ids: list[int]) -> list[int]:
        if vocab_size and any(t >= vocab_size for t in ids):
            raise ApiError(400, f"prompt token ids must be below the vocabulary size {vocab_size}",
                           param="prompt")
        return ids

    # -- routes -----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != model_name:
            raise ApiError(404, f"The model '{model}' does not exist", param="model",
                           code="model_not_found")
        return _model_card()

    def _model_card():
        return {"id": model_name, "object": "model", "created": created_at,
                "owned_by": "dllama_mpi", "max_model_len": max_seq_len}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body, params = await parse(request, oa.ChatCompletionRequest)
        try:
            text = tokenizer.apply_chat_template(body.template_messages(),
                                                 add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        prompt = check_prompt(encode(text, "messages"), "messages")
        return await generate(request, True, body, params, [prompt])

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, params = await parse(request, oa.CompletionRequest)
        prompts = [check_prompt(encode(p, "prompt") if isinstance(p, str) else check_ids(p),
                                "prompt") for p in body.prompts()]
        return await generate(request, False, body, params, prompts)

    # -- generation -------------------------------------------------------------------------
    async def generate(request: Request, chat: bool, body, params: SamplingParams,
                       prompts: list[list[int]]):
        n = body.n
        if len(prompts) * n > MAX_SEQUENCES:
            raise ApiError(400, f"at most {MAX_SEQUENCES} sequences per request (prompts x n), "
                                f"got {len(prompts) * n}", param="n")
        overflow = oa.completion_overflow(body, prompts, max_seq_len)
        if overflow is not None:
            raise ApiError(400, overflow, param="max_tokens", code="context_length_exceeded")
        run = RequestRun(asyncio.get_running_loop(), metrics)
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        try:
            for i, prompt in enumerate(prompts):
                p = replace(params, max_tokens=min(params.max_tokens, max_seq_len - len(prompt)))
                for j in range(n):
                    # off the event loop: a first constrained request builds the grammar's
                    # tokenizer (about a second), and other clients must not wait for it
                    await asyncio.to_thread(run.submit, scheduler, prompt, p, i * n + j,
                                            f"{rid}-{i * n + j}")
        except DllamaError as e:
            run.cancel()
            raise ApiError(400, str(e)) from None
        except BaseException:
            run.cancel()
            raise
        if body.stream:
            return StreamingResponse(
                stream(request, run, chat, rid, body, params, prompts),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await complete(request, run, chat, rid, params, prompts, n)
        finally:
            run.cancel()

    def usage_of(results, prompts, n) -> dict:
        cached = sum(min(c.cached_tokens or 0 for c in results[i * n:(i + 1) * n])
                     for i in range(len(prompts)))
        return oa.usage(sum(len(p) for p in prompts),
                        sum(len(c.generated_tokens) for c in results), cached)

    def entry(event) -> oa.LogprobEntry:
        return (event.token, event.logprob, event.top_logprobs)

    async def complete(request, run: RequestRun, chat, rid, params, prompts, n):
        created = oa.now()
        total = len(run.handles)
        entries = [[] for _ in range(total)]
        results = [None] * total
        async with contextlib.aclosing(run.items(request, poll_seconds)) as items:
            async for index, item, done in items:
                if done:
                    results[index] = item
                elif params.logprobs:
                    entries[index].append(entry(item))
        if run.disconnected:
            return Response(status_code=499)       # nobody is listening
        for c in results:
            error = failure(c)
            if error is not None:
                raise error
        choices = []
        for i, c in enumerate(results):
            lp = None
            if params.logprobs:
                kept = entries[i][:len(c.generated_tokens)]
                lp = (oa.chat_logprobs(kept, token_text) if chat else
                      oa.completion_logprobs(kept, token_text, with_top=params.top_logprobs > 0))
            finish = openai_finish(c.finish_reason)
            choices.append(oa.chat_choice(i, c.text, finish, lp) if chat else
                           oa.completion_choice(i, c.text, finish, lp))
        u = usage_of(results, prompts, n)
        if chat:
            return oa.chat_response(rid, created, model_name, choices, u)
        return oa.completion_response(rid, created, model_name, choices, u)

    async def stream(request, run: RequestRun, chat, rid, body, params, prompts):
        created = oa.now()
        total = len(run.handles)
        inc = body.include_usage
        emitted = [""] * total
        results = [None] * total

        def chunk(index, text, finish=None, lp=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": text} if first else (
                    {"content": text} if text or finish is None else {})
                return oa.sse(oa.chat_chunk(rid, created, model_name, index, delta, finish, lp, inc))
            return oa.sse(oa.completion_chunk(rid, created, model_name, index, text, finish, lp, inc))

        try:
            if chat:
                for i in range(total):
                    yield chunk(i, "", first=True)
            async with contextlib.aclosing(run.items(request, poll_seconds)) as items:
                async for index, item, done in items:
                    if not done:
                        text = item.text or ""
                        lp = None
                        if params.logprobs:
                            lp = (oa.chat_logprobs([entry(item)], token_text) if chat else
                                  oa.completion_logprobs([entry(item)], token_text,
                                                         offset=len(emitted[index]),
                                                         with_top=params.top_logprobs > 0))
                        if text or lp is not None:
                            emitted[index] += text
                            yield chunk(index, text, lp=lp)
                        continue
                    c = results[index] = item
                    error = failure(c)
                    if error is not None:
                        run.cancel()
                        yield oa.sse(oa.error_body(error.message, error.type, code=error.code))
                        yield oa.SSE_DONE
                        return
                    # text held back until the end (an incomplete character, a stop-string prefix)
                    rest = c.text[len(emitted[index]):] if c.text.startswith(emitted[index]) else ""
                    yield chunk(index, rest, finish=openai_finish(c.finish_reason))
            if run.disconnected:
                return
            if inc:
                yield oa.sse(oa.usage_chunk(rid, created, model_name,
                                            "chat.completion.chunk" if chat else "text_completion",
                                            usage_of(results, prompts, body.n)))
            yield oa.SSE_DONE
        finally:
            run.cancel()

    return app


# ---------------------------------------------------------------------------------------------
# the server: uvicorn in a thread, the scheduler on the main thread
# ---------------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (the main thread's handlers stop it)."""

    def install_signal_handlers(self) -> None:      # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self):                      # uvicorn >= 0.29
        yield


def run_server(scheduler, tokenizer, model_name: str, max_seq_len: int,
               host: str = "127.0.0.1", port: int = 9990, api_key: str | None = None, *,
               defaults: SamplingParams | None = None, log_level: str = "warning",
               startup_timeout: float = 60.0, shutdown_timeout: float = 5.0,
               cors_origins: tuple[str, ...] = ()) -> None:
    """Serve until SIGINT/SIGTERM (or until the scheduler is closed): uvicorn in a background
    thread, `scheduler.run()` on the calling thread, which must be the main thread of rank 0.
    Prints `serving <model> on http://host:port/v1` on stderr once listening. The first signal
    stops gracefully (no new connections, running requests cancelled, scheduler closed); a
    second one forces uvicorn out. Raises DllamaError if the server cannot listen."""
    app = create_app(scheduler, tokenizer, model_name, max_seq_len, defaults=defaults,
                     api_key=api_key, cors_origins=cors_origins)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            access_log=log_level in ("debug", "info", "trace"),
                            timeout_graceful_shutdown=max(1, int(shutdown_timeout)))
    server = _Server(config)
    stopping = threading.Event()

    def serve():
        try:
            server.run()
        except SystemExit:                         # startup failure, already logged by uvicorn
            pass
        except BaseException as e:                 # pragma: no cover - uvicorn crashed
            print(f"error: HTTP server: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        finally:
            if server.started and not stopping.is_set():
                scheduler.close(cancel=True)       # the scheduler must not outlive the server

    thread = threading.Thread(target=serve, name="dllama-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        stopping.set()
        server.should_exit = True
        thread.join(timeout=shutdown_timeout)
        raise DllamaError(f"cannot serve on {host}:{port} (see the message above)")
    bound = port
    with contextlib.suppress(Exception):
        bound = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {model_name} on http://{shown}:{bound}/v1", file=sys.stderr, flush=True)

    def on_signal(signum, frame):
        if stopping.is_set():
            server.force_exit = True
            return
        stopping.set()
        print("stopping (again to force)", file=sys.stderr, flush=True)
        server.should_exit = True
        # not from the handler itself: it may interrupt the scheduler holding its own lock
        threading.Thread(target=scheduler.close, kwargs={"cancel": True},
                         name="dllama-close", daemon=True).start()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, on_signal)
    try:
        scheduler.run()
    finally:
        stopping.set()
        server.should_exit = True
        thread.join(timeout=shutdown_timeout + 5)
        for s, h in previous.items():
            signal.signal(s, h)


API_KEY_VARIABLE = "DLLAMA_API_KEY"   # the key without putting it on the command line


def run_serve(args, run) -> int:
    """`serve`: every rank starts; the root serves HTTP until SIGINT/SIGTERM, then stops the
    workers."""
    from ..comm import make_comm
    from ..registry import served_name
    from ..runtime.startup import ignore_job_signals_on_workers, run_root, scheduler_for, start
    comm = make_comm()
    ignore_job_signals_on_workers(comm)
    session = start(comm, args.model, run, kv_dir=args.kv_cache_dir,
                    tokenizer_path=args.tokenizer)
    name = args.model_name or served_name(args.model)

    def body(s) -> None:
        s.print_memory()
        run_server(scheduler_for(s), s.tokenizer, name, s.max_seq_len, host=args.host,
                   port=args.port, api_key=args.api_key or os.environ.get(API_KEY_VARIABLE),
                   cors_origins=tuple(args.cors_origin))

    return run_root(session, body)
