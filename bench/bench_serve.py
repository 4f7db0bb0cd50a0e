"""Load generator for an OpenAI-compatible server: concurrent streams, TTFT and time between tokens.

    python bench/bench_serve.py --url http://127.0.0.1:9990 [--concurrency 1 4 16]
        [--requests 4] [--tokens 64] [--api chat|completions] [--json FILE]
    python bench/bench_serve.py --launch ours --model smollm2-135m [--ranks 1] [--parallel 16]
    python bench/bench_serve.py --launch llama-server --model smollm2-135m
        [--llama-server /tmp/peers/llama.cpp/build/bin/llama-server]

Run by hand, never in the tests. For each concurrency level C, C clients each send
--requests streamed requests one after another (C streams are open at any time), every one
asking for --tokens tokens at temperature 0 with `ignore_eos` (an extension both dllama_mpi
and llama-server accept), so every stream makes exactly --tokens tokens. Prompts differ per
request (no prompt-cache hits between requests beyond the chat template's shared head).

Per level it reports:
  tok/s     aggregate generated tokens / wall time of the level (first send to last byte)
  TTFT      time to first token: send -> the first chunk carrying text (p50, p95)
  ITL       time between tokens: gaps between consecutive text chunks of one stream
            (p50, p95); a chunk carrying k tokens counts as one gap (the `chunks` column
            says how many chunks came per token)
  TPOT      per request (last chunk - first chunk) / (tokens - 1), mean
Tokens are the server's `usage.completion_tokens` when it reports them (stream_options
include_usage), else the count of text chunks.

--launch starts the server itself on a free port of 127.0.0.1, waits for GET /health = 200,
runs the levels and stops it (SIGTERM, then SIGKILL of its process group after 30 s):
  ours          [mpiexec -n R] python -m dllama_mpi serve --model M --port P --parallel N
                --max-seq-len CTX --nthreads T/R          (this checkout's dllama_mpi)
  llama-server  llama-server -m M --host 127.0.0.1 --port P -np N -c N*CTX -cb -t T
                --temp 0 (continuous batching; CTX positions per slot like ours)
Its log goes to bench/results/serve-<server>-<time>.log.

Bounds: 127.0.0.1/localhost only; at most --requests x C requests per level (<= 4096);
--max-seconds per level (default 300: no new request after it, open ones cancelled), and
--request-timeout per request. The output names the CPU (lscpu), the load average before
and after (the figures are noisy when it is above 0), the server command line and the GGUF.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
LLAMA_SERVER = "/tmp/peers/llama.cpp/build/bin/llama-server"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS_PER_LEVEL = 4096

TOPICS = ["a lighthouse keeper", "a lost umbrella", "the first snow", "a clockmaker", "a river",
          "a train at night", "an old library", "a robot gardener", "a mountain village",
          "a paper boat", "a fox in the city", "the last bakery", "a comet", "a violin",
          "a desert well", "a sleepy dragon"]


def prompt_text(i: int) -> str:
    return f"Story {i}: write a short story about {TOPICS[i % len(TOPICS)]}."


# --------------------------------------------------------------------------- machine facts

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(l for l in f if l.startswith("flags")).split(":", 1)[1].split()
        keep = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
        return " ".join(k for k in keep if k in flags)
    except (OSError, StopIteration):
        return ""


def loadavg() -> float:
    return os.getloadavg()[0]


def git_commit(path: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", path, "rev-parse", "--short=12", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_local(url: str) -> str:
    """The base URL without a trailing /v1 or slash; refuses anything but loopback."""
    u = urllib.parse.urlparse(url)
    if u.scheme not in ("http", "https") or u.hostname not in LOCAL_HOSTS:
        raise SystemExit(f"error: only http://127.0.0.1 (or localhost) is allowed, got {url!r}")
    base = url.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    return base


def resolve_model(model: str) -> str:
    if os.path.exists(model):
        return os.path.abspath(model)
    sys.path.insert(0, ROOT)
    from dllama_mpi import registry                        # a known name: pulled once, cached
    return os.path.abspath(registry.resolve(model))


# --------------------------------------------------------------------------- the server

class Launched:
    """A server started by us: its command, its log, stopped on exit."""

    def __init__(self, kind: str, args) -> None:
        self.kind = kind
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.model = resolve_model(args.model)
        threads = args.threads or len(os.sched_getaffinity(0))
        if kind == "ours":
            cmd = [sys.executable, "-m", "dllama_mpi", "serve", "--model", self.model,
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--parallel", str(args.parallel), "--max-seq-len", str(args.ctx),
                   "--nthreads", str(max(1, threads // args.ranks))]
            if args.ranks > 1:
                mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
                cmd = [mpiexec if os.path.exists(mpiexec) else "mpiexec",
                       "-n", str(args.ranks)] + cmd
            cwd = ROOT
            self.version = f"dllama_mpi {git_commit(ROOT) or '?'}"
        else:
            binary = args.llama_server
            if not os.path.exists(binary):
                raise SystemExit(f"error: {binary} not found (build llama.cpp, see "
                                 "docs/bench_serve.md, or pass --llama-server)")
            cmd = [binary, "-m", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                   "-np", str(args.parallel), "-c", str(args.parallel * args.ctx), "-cb",
                   "-t", str(threads), "--temp", "0"]
            cwd = os.path.dirname(binary)
            self.version = self._llama_version(binary)
        cmd += args.server_arg
        self.cmd = cmd
        os.makedirs(RESULTS, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_path = os.path.join(RESULTS, f"serve-{kind}-{stamp}.log")
        self.log = open(self.log_path, "wb")
        print(f"launching: {shlex.join(cmd)}\n  log: {self.log_path}", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.perf_counter()

    @staticmethod
    def _llama_version(binary: str) -> str:
        try:
            r = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
            lines = [l for l in (r.stdout + r.stderr).splitlines() if l.startswith("version")]
            return "llama.cpp " + (lines[0].split(":", 1)[1].strip() if lines else "?")
        except (OSError, subprocess.SubprocessError):
            return "llama.cpp ?"

    def wait_ready(self, timeout: float) -> float:
        import httpx
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: the server exited with {self.proc.returncode} before "
                                 f"it was ready; see {self.log_path}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"error: the server was not ready within {timeout:.0f} s; "
                         f"see {self.log_path}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)   # the group we started
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


# --------------------------------------------------------------------------- one request

def request_body(api: str, model: str, i: int, tokens: int) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": tokens, "temperature": 0.0, "stream": True,
              "ignore_eos": True, "stream_options": {"include_usage": True}}
    if api == "chat":
        return "/v1/chat/completions", {
            "messages": [{"role": "user", "content": prompt_text(i)}], **common}
    return "/v1/completions", {"prompt": prompt_text(i), **common}


async def one_request(client, base: str, api: str, model: str, i: int, tokens: int) -> dict:
    path, body = request_body(api, model, i, tokens)
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    text_len = 0
    error = None
    try:
        async with client.stream("POST", base + path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return dict(error=f"HTTP {r.status_code}: {r.text[:200]}", t0=t0,
                            t1=time.perf_counter(), stamps=[])
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                try:
                    obj = json.loads(data)
                except ValueError:
                    continue
                if "error" in obj:
                    error = str(obj["error"])[:200]
                    break
                for ch in obj.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content") if api == "chat" \
                        else ch.get("text")
                    if text:
                        stamps.append(now)
                        text_len += len(text)
                u = obj.get("usage")
                if u and u.get("completion_tokens") is not None:
                    usage_tokens = int(u["completion_tokens"])
    except Exception as e:                                # noqa: BLE001 - reported, not raised
        error = f"{type(e).__name__}: {e}"[:160]
    t1 = time.perf_counter()
    if error:
        error += f" (after {t1 - t0:.1f} s, {len(stamps)} text chunks)"
    return dict(t0=t0, t1=t1, stamps=stamps, usage_tokens=usage_tokens, chars=text_len,
                error=error)


# --------------------------------------------------------------------------- one level

def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run_level(base, api, model, conc, per_client, tokens, max_seconds, req_timeout,
                    first_index) -> dict:
    import httpx
    limits = httpx.Limits(max_connections=conc + 2, max_keepalive_connections=conc + 2)
    timeout = httpx.Timeout(req_timeout, connect=10.0)
    results: list[dict] = []
    deadline = time.perf_counter() + max_seconds
    counter = iter(range(first_index, first_index + conc * per_client))
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        async def worker():
            for _ in range(per_client):
                if time.perf_counter() >= deadline:
                    return
                results.append(await one_request(client, base, api, model, next(counter),
                                                 tokens))

        cpu0 = time.process_time()
        t_start = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(conc)]
        _, pending = await asyncio.wait(tasks, timeout=max_seconds + req_timeout)
        for t in pending:
            t.cancel()
        t_end = time.perf_counter()
        client_cpu = time.process_time() - cpu0
    ok = [r for r in results if not r.get("error")]
    errors = [r["error"] for r in results if r.get("error")]
    ttft = [r["stamps"][0] - r["t0"] for r in ok if r["stamps"]]
    itl, tpot = [], []
    total_tokens = chunks = 0
    short = 0
    for r in ok:
        s = r["stamps"]
        n = r["usage_tokens"] if r["usage_tokens"] is not None else len(s)
        total_tokens += n
        chunks += len(s)
        if n != tokens:
            short += 1
        itl += [b - a for a, b in zip(s, s[1:])]
        if len(s) >= 2 and n >= 2:
            tpot.append((s[-1] - s[0]) / (n - 1))
    last = max((r["t1"] for r in ok), default=t_end)
    wall = last - t_start
    ms = lambda x: None if x is None else x * 1e3           # noqa: E731
    return dict(
        concurrency=conc, requests=len(results), ok=len(ok), errors=len(errors),
        error_samples=errors[:3], not_exactly_n_tokens=short,
        tokens=total_tokens, chunks=chunks, wall_s=wall,
        tok_s=total_tokens / wall if wall > 0 else None,
        ttft_p50_ms=ms(pct(ttft, 50)), ttft_p95_ms=ms(pct(ttft, 95)),
        itl_p50_ms=ms(pct(itl, 50)), itl_p95_ms=ms(pct(itl, 95)),
        tpot_mean_ms=ms(sum(tpot) / len(tpot)) if tpot else None,
        usage_reported=all(r["usage_tokens"] is not None for r in ok) if ok else False,
        client_cpu_s=client_cpu, cut=len(results) < conc * per_client or bool(pending))


# --------------------------------------------------------------------------- report

def fmt(x, spec=".1f") -> str:
    return "—" if x is None else format(x, spec)


def table(levels: list[dict]) -> str:
    head = ("| C | requests | tokens | wall s | tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms "
            "| ITL p95 ms | TPOT ms | chunks/token | errors |")
    lines = [head, "|" + "---|" * 12]
    for L in levels:
        cpt = L["chunks"] / L["tokens"] if L["tokens"] else None
        lines.append(
            f"| {L['concurrency']} | {L['ok']} | {L['tokens']} | {fmt(L['wall_s'], '.2f')} "
            f"| {fmt(L['tok_s'])} | {fmt(L['ttft_p50_ms'])} | {fmt(L['ttft_p95_ms'])} "
            f"| {fmt(L['itl_p50_ms'])} | {fmt(L['itl_p95_ms'])} | {fmt(L['tpot_mean_ms'])} "
            f"| {fmt(cpt, '.2f')} | {L['errors']}{' (cut: --max-seconds)' if L['cut'] else ''} |")
    return "\n".join(lines)


def server_info(base: str) -> dict:
    import httpx
    info: dict = {}
    try:
        data = httpx.get(base + "/v1/models", timeout=10).json().get("data") or []
        if data:
            info["model_id"] = data[0].get("id")
    except (httpx.HTTPError, ValueError):
        pass
    try:                                            # llama-server only: its model path and slots
        r = httpx.get(base + "/props", timeout=10)
        if r.status_code == 200:
            p = r.json()
            info["props"] = {k: p.get(k) for k in ("model_path", "total_slots") if k in p}
            gs = p.get("default_generation_settings") or {}
            if "n_ctx" in gs:
                info["props"]["n_ctx_per_slot"] = gs["n_ctx"]
    except (httpx.HTTPError, ValueError):
        pass
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server's base URL (127.0.0.1 only)")
    where.add_argument("--launch", choices=("ours", "llama-server"),
                       help="start this server on a free port, measure, stop it")
    ap.add_argument("--model", default=None,
                    help="GGUF path or a known model name (--launch; default smollm2-135m); "
                    "with --url only a label (default: llama-server's /props model_path)")
    ap.add_argument("--server-cmd", default=None,
                    help="with --url: the command line the server was started with (a label)")
    ap.add_argument("--model-id", default=None,
                    help="the `model` field to send (default: the first of /v1/models)")
    ap.add_argument("--api", choices=("chat", "completions"), default="chat")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4,
                    help="streams each client requests, one after another (default 4)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="unmeasured 8-token requests sent together first (default 2)")
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="per level: no new request after this (default 300)")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--ranks", type=int, default=1, help="--launch ours: MPI ranks")
    ap.add_argument("--parallel", type=int, default=16, help="--launch: server slots")
    ap.add_argument("--ctx", type=int, default=512,
                    help="--launch: KV positions per slot (ours --max-seq-len; "
                    "llama-server -c parallel*ctx)")
    ap.add_argument("--threads", type=int, default=0,
                    help="--launch: threads in all (default: the CPUs this process may use; "
                    "ours gets threads/ranks per rank)")
    ap.add_argument("--llama-server", default=LLAMA_SERVER, help=f"default {LLAMA_SERVER}")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="--launch: one more argument for the server (repeatable)")
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--note", default="", help="a label printed with the figures")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-': stdout)")
    args = ap.parse_args()
    if args.launch and not args.model:
        args.model = "smollm2-135m"
    for c in args.concurrency:
        if c < 1 or c * args.requests > MAX_REQUESTS_PER_LEVEL:
            ap.error(f"concurrency x requests must be 1..{MAX_REQUESTS_PER_LEVEL}")
    if args.tokens < 1 or args.requests < 1:
        ap.error("--tokens and --requests must be >= 1")

    import httpx  # noqa: F401 - fail early when it is missing

    load_before = loadavg()
    launched = None
    ready_s = None
    if args.launch:
        launched = Launched(args.launch, args)
        base = launched.base
    else:
        base = check_local(args.url)
    try:
        if launched:
            ready_s = launched.wait_ready(args.ready_timeout)
            print(f"ready after {ready_s:.1f} s", file=sys.stderr, flush=True)
        info = server_info(base)
        model_id = args.model_id or info.get("model_id") or "default"
        if args.warmup:
            asyncio.run(run_level(base, args.api, model_id, args.warmup, 1, 8, 120.0,
                                  args.request_timeout, 10_000))
        levels = []
        index = 0
        for c in args.concurrency:
            print(f"C={c}: {c * args.requests} requests x {args.tokens} tokens ...",
                  file=sys.stderr, flush=True)
            L = asyncio.run(run_level(base, args.api, model_id, c, args.requests, args.tokens,
                                      args.max_seconds, args.request_timeout, index))
            index += c * args.requests
            levels.append(L)
            print(f"  {fmt(L['tok_s'])} tok/s, TTFT p50 {fmt(L['ttft_p50_ms'])} ms, "
                  f"errors {L['errors']}", file=sys.stderr, flush=True)
    finally:
        code = launched.stop() if launched else None
    load_after = loadavg()

    ncpu = os.cpu_count() or 1
    if launched:
        server_cmd = shlex.join(launched.cmd)
        model_path = launched.model
        version = launched.version
    else:
        server_cmd = args.server_cmd or "(not given: --server-cmd)"
        model_path = ((info.get("props") or {}).get("model_path") or args.model
                      or f"(not given: --model; the server calls it {model_id})")
        version = None
    gguf_bytes = os.path.getsize(model_path) if os.path.exists(model_path) else None
    noisy = max(load_before, load_after) > 0.5
    report = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        note=args.note, cpu=cpu_model(), cpu_flags=cpu_flags(), ncpu=ncpu,
        loadavg_before=load_before, loadavg_after=load_after, noisy=noisy,
        server=args.launch or "url", base_url=base, server_cmd=server_cmd,
        server_version=version, server_exit=code, ready_s=ready_s,
        log=launched.log_path if launched else None,
        model=model_path, model_bytes=gguf_bytes, model_id=model_id, server_info=info,
        api=args.api, tokens=args.tokens, requests_per_client=args.requests,
        client="bench/bench_serve.py (httpx, asyncio, one process) @ "
               f"{git_commit(ROOT) or '?'}",
        levels=levels)

    print()
    print(f"# bench_serve {report['date']}  {args.note}".rstrip())
    print(f"server:  {report['server']}  {version or ''}".rstrip())
    print(f"command: {server_cmd}")
    print(f"model:   {model_path}" + (f" ({gguf_bytes / 2**20:.1f} MiB)" if gguf_bytes else ""))
    print(f"cpu:     {report['cpu']} ({ncpu} CPUs; {report['cpu_flags']})")
    print(f"load:    {load_before:.2f} before, {load_after:.2f} after"
          + ("  -- NOISY: other work was running; do not compare these figures" if noisy else ""))
    print(f"api:     {args.api}, {args.tokens} tokens per stream (ignore_eos, temperature 0), "
          f"{args.requests} streams per client, C clients at once")
    print()
    print(table(levels))
    for L in levels:
        if L["error_samples"]:
            print(f"C={L['concurrency']} errors: {L['error_samples']}")
        if L["not_exactly_n_tokens"]:
            print(f"C={L['concurrency']}: {L['not_exactly_n_tokens']} streams did not make "
                  f"exactly {args.tokens} tokens")
        if not L["usage_reported"]:
            print(f"C={L['concurrency']}: the server sent no usage; tokens = text chunks")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            print(f"\nwrote {args.json}")
    if code not in (None, 0):
        print(f"the server exited with {code} when stopped (see {report['log']})")
    return 1 if sum(L["errors"] for L in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
