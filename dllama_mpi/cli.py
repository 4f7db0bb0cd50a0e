"""Subcommands: argparse for every command, configs built from the arguments, dispatch to
apps/. No math here."""
from __future__ import annotations

import argparse
import math
import sys

from . import registry
from .config import BUFFER_TYPES, KV_FLOAT_TYPES, KV_STORAGES, SEED_LIMIT, WEIGHT_TYPES, RunConfig
from .errors import DllamaError
from .launch import world_rank


class _Parser(argparse.ArgumentParser):
    """argparse with every default shown in --help and a bad option reported as one
    `error: ...` line (exit 2), like every other error of the program."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if world_rank() == 0:      # every rank parses the same arguments: one says it
            sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _named(name: str):
    """argparse names a type by its function's name in `invalid <name> value: 'x'`."""
    def mark(fn):
        fn.__name__ = name
        return fn
    return mark


@_named("integer")
def _count(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


@_named("integer")
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@_named("integer")
def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


@_named("port number")
def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


@_named("number")
def _temperature(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


@_named("number")
def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:          # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml",
                   help="a preset (see configs/): its keys are defaults for these options; "
                   "options on the command line win")
    p.add_argument("--model",
                   help=f"a .gguf (or any part of a split .gguf), .m or .h5 file, a Hugging Face folder, or a known model name ({', '.join(registry.KNOWN_MODELS)})")
    p.add_argument("--tokenizer", default=None,
                   help="a tokenizer file (.t or tokenizer.json): for .m models, or to replace "
                   "the model's own")
    p.add_argument("--weights-float-type", choices=("auto",) + WEIGHT_TYPES, default="auto",
                   help="runtime weight format; auto (default): Q4_0 files run as q40, Q4_1 "
                   "files as q41, Q8_0 files are quantised to q40, float files f32, and files "
                   "that mix types or hold K-quants (Q4_K_M, ...) keep each matrix in its own "
                   "form (Q4_K as q41, Q5_K/Q6_K/Q5_0/Q5_1/Q8_0 as q80); a type named here "
                   "converts every matrix to it (f16: float weights at half f32's memory)")
    p.add_argument("--buffer-float-type", choices=("auto",) + BUFFER_TYPES, default="auto",
                   help="activations between ranks (auto: q80 with 4-bit weights, else f32)")
    p.add_argument("--max-seq-len", type=_count, default=0,
                   help="KV cache positions (0: the model's context, at most 4096)")
    p.add_argument("--nthreads", type=_count, default=0,
                   help="threads per rank (0: the cores this rank may use / ranks on the node; "
                   "at most numba's NUMBA_NUM_THREADS)")
    p.add_argument("--load", choices=("auto", "scatter", "direct"), default="auto",
                   help="scatter: rank 0 reads the model and sends each rank its slice; direct: "
                   "every rank reads its own slice (shared filesystem); auto: direct when every "
                   "rank can read the file")
    p.add_argument("--kv-cache-storage", choices=KV_STORAGES, default=None,
                   help="where the KV cache lives: memory, or disk (memory-mapped files, "
                   "removed at exit); default: memory, disk when --kv-cache-dir is given")
    p.add_argument("--kv-cache-dir", default=None, metavar="DIR",
                   help="an existing directory for the disk KV cache (a folder per job is "
                   "made in it); default for disk: $SLURM_TMPDIR, $TMPDIR or /tmp")
    p.add_argument("--kv-cache-float-type", choices=KV_FLOAT_TYPES, default="f32",
                   help="KV cache values: f32, or f16 (half the memory)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy")
    p.add_argument("--topp", type=_probability, default=0.9,
                   help="nucleus sampling: the smallest set of tokens with this probability")
    p.add_argument("--topk", type=_count, default=0, help="sample among the k likeliest (0 = off)")
    p.add_argument("--seed", type=_seed, default=None,
                   help="random seed of the sampler (none: a random one, so a different text "
                   "every run; inference prints it on stderr)")


def _add_generation_args(p: argparse.ArgumentParser, steps_help: str) -> None:
    p.add_argument("--steps", type=_count, default=64, help=steps_help)
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message with the model's chat template")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-sequence tokens (benchmarks)")


def run_config(args) -> RunConfig:
    return RunConfig(weights_float_type=args.weights_float_type,
                     buffer_float_type=args.buffer_float_type,
                     max_seq_len=args.max_seq_len, nthreads=getattr(args, "nthreads", 0),
                     load=getattr(args, "load", "auto"),
                     temperature=getattr(args, "temperature", 0.0),
                     topp=getattr(args, "topp", 1.0), topk=getattr(args, "topk", 0),
                     seed=getattr(args, "seed", None), parallel=getattr(args, "parallel", 1),
                     kv_cache_storage=getattr(args, "kv_cache_storage", None) or "auto",
                     kv_cache_dir=getattr(args, "kv_cache_dir", None),
                     kv_cache_float_type=getattr(args, "kv_cache_float_type", "f32"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dllama_mpi", description="Tensor-parallel LLM inference on MPI. Run under "
        "mpiexec -n N for N ranks (N up to the model's number of query heads).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inference", help="generate a continuation of one prompt")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the "
                   "user's message)")
    _add_generation_args(p, "tokens to generate at most")
    p.add_argument("--echo", action="store_true",
                   help="print the prompt on stdout before the text (with --chat: the "
                   "message, then a newline)")
    p.add_argument("--stats", action="store_true",
                   help="timing lines on stderr: the prompt pass, then each token")
    p.add_argument("--json", action="store_true",
                   help="stdout: one JSON object at the end instead of the streamed text")
    p.add_argument("--quiet", action="store_true",
                   help="no start-up lines or summary on stderr (errors only)")

    p = sub.add_parser("batch", help="complete a file of requests (OpenAI Batch JSONL, simple "
                       "JSONL or text) into a file of OpenAI Batch output records; resumable")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--input", required=True, metavar="REQUESTS",
                   help="the requests: OpenAI Batch JSONL ({custom_id, method, url, body}), "
                   'simple JSONL ({"prompt"} or {"messages"}, optional "id", "max_tokens") or '
                   "text (one prompt a line)")
    p.add_argument("--input-format", choices=("auto", "openai", "jsonl", "text"), default="auto",
                   help="auto: from the first non-blank line ({ with custom_id/url/body: "
                   "openai; other {: jsonl; else text)")
    p.add_argument("--output", required=True, metavar="RESULTS.jsonl",
                   help="one OpenAI Batch output record a line, appended as requests finish; "
                   "an existing output is resumed (its custom_ids are skipped)")
    p.add_argument("--errors", default=None, metavar="ERRORS.jsonl",
                   help="write error records here instead of into --output")
    p.add_argument("--output-order", choices=("completion", "input"), default="completion",
                   help="input: rewrite the output in input order at the very end (atomically)")
    p.add_argument("--max-batch", "--parallel", dest="max_batch", type=_positive, default=16,
                   help="sequences in flight (KV-cache slots; memory grows with it)")
    _add_generation_args(p, "default max_tokens of a request")
    p.add_argument("--model-name", default=None,
                   help="the model id in the response bodies (default: the model file's name)")
    p.add_argument("--stop-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="after SIGTERM/SIGUSR1/SIGINT: how long running requests may finish "
                   "before they are abandoned (rerun to resume; exit code 75)")
    p.add_argument("--fsync-seconds", type=float, default=2.0, metavar="SECONDS",
                   help="fsync the output at least this often (and at exit)")
    p.add_argument("--progress-seconds", type=float, default=30.0, metavar="SECONDS",
                   help="a progress line this often when stderr is not a terminal")
    p.add_argument("--quiet", action="store_true", help="no progress (the summary stays)")

    p = sub.add_parser("chat", help="an interactive conversation (stdin/stdout on rank 0)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="a system prompt for the conversation")
    p.add_argument("--steps", type=_count, default=1024,
                   help="tokens an answer may have at most")
    p.add_argument("--parallel", type=_positive, default=1,
                   help="KV-cache slots (one conversation needs one)")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on rank 0 "
                       "(/v1/chat/completions, /v1/completions, /v1/models, /metrics)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=9990, help="port to listen on (0: any free)")
    p.add_argument("--parallel", "--max-batch", type=_positive, default=4,
                   help="sequences decoding together (KV-cache slots; memory grows with it)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (or set DLLAMA_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browsers on this origin (repeatable; CORS is off without it)")
    p.add_argument("--model-name", default=None,
                   help="the model id the API reports (default: the model file's name)")

    p = sub.add_parser("pull", help="download a known model into the cache")
    p.add_argument("name", choices=sorted(registry.KNOWN_MODELS), help="the model")

    p = sub.add_parser("info", help="print a model's config and the memory per rank")
    p.add_argument("--model", required=True,
                   help="a model file or folder, or a known model name")
    p.add_argument("-n", "--ranks", type=_positive, default=1, help="the ranks of the run")
    p.add_argument("--weights-float-type", choices=("auto",) + WEIGHT_TYPES, default="auto",
                   help="as for inference")
    p.add_argument("--buffer-float-type", choices=("auto",) + BUFFER_TYPES, default="auto",
                   help="as for inference")
    p.add_argument("--max-seq-len", type=_count, default=0,
                   help="KV cache positions (0: the model's context, at most 4096)")
    p.add_argument("--parallel", type=_positive, default=1,
                   help="KV-cache slots (sequences decoding together)")
    p.add_argument("--kv-cache-storage", choices=KV_STORAGES, default=None,
                   help="as for inference (disk: the KV cache is not counted in memory)")
    p.add_argument("--kv-cache-float-type", choices=KV_FLOAT_TYPES, default="f32",
                   help="as for inference")
    p = sub.add_parser("convert", help="convert a model (GGUF, .m, HF folder, .h5) to our "
                       "HDF5 store or to Distributed Llama's .m + .t")
    from .apps.convert import add_arguments as add_convert_arguments
    add_convert_arguments(p)

    # -- plan (apps/plan.py) --
    p = sub.add_parser("plan", help="predict memory per rank, bytes per token and tok/s of N "
                       "ranks on a given link (no MPI, no model file needed with --preset)")
    from .apps.plan import add_arguments as add_plan_arguments
    add_plan_arguments(p)
    # -- end plan --

    # -- perplexity (apps/perplexity.py) --
    p = sub.add_parser("perplexity", help="teacher-forced perplexity of a text file, in "
                       "strided windows")
    _add_model_args(p)
    from .apps.perplexity import add_arguments as add_perplexity_arguments
    add_perplexity_arguments(p)
    # -- end perplexity --

    parser.subcommands = dict(sub.choices)
    return parser


def load_preset(path: str, parser: argparse.ArgumentParser, command: str) -> dict:
    """TOML preset -> defaults for the subcommand's options (keys spelled like the options)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise DllamaError(f"cannot read config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise DllamaError(f"config {path} is not valid TOML: {e}") from None
    known = {a.dest for a in parser.subcommands[command]._actions}
    values = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DllamaError(f"config {path}: unknown keys {', '.join(unknown)} for '{command}'")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        parser.subcommands[args.command].set_defaults(**load_preset(args.config, parser, args.command))
        args = parser.parse_args(argv)
    if getattr(args, "model", "") is None and not getattr(args, "preset", None):
        parser.error("--model is required (on the command line or in --config)")
    for name in ("prompt", "model", "input", "output", "text", "tokenizer", "config",
                 "kv_cache_dir", "src"):
        value = getattr(args, name, None)
        option = name if name == "src" else "--" + name.replace("_", "-")
        if isinstance(value, str) and not _utf8(value):
            parser.error(f"{option} is not valid UTF-8 text")
        if isinstance(value, str) and "\0" in value:
            parser.error(f"{option} contains a NUL character")
    if getattr(args, "nthreads", 0):
        from .kernels import max_threads
        if args.nthreads > max_threads():
            parser.error(f"--nthreads {args.nthreads}: at most {max_threads()} here (numba's "
                         f"NUMBA_NUM_THREADS; 0 picks the cores per rank)")
    return args


def _utf8(text: str) -> bool:
    """argv arrives decoded with surrogate escapes: bytes that were not UTF-8 stay lone
    surrogates, which cannot be encoded back."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "pull":
        print(registry.pull(args.name))
        return 0
    if args.command == "convert":
        from .apps.convert import run as run_convert
        return run_convert(args)
    if args.command == "info":
        from .apps.info import print_info
        return print_info(args.model, args.ranks, run_config(args))
    if args.command == "plan":
        from .apps.plan import run as run_plan
        return run_plan(args)
    if args.command == "perplexity":
        from .apps.perplexity import run_perplexity
        return run_perplexity(args, run_config(args))
    if args.command == "inference":
        from .apps.inference import run_inference
        return run_inference(args, run_config(args))
    if args.command == "batch":
        from .apps.batch_signals import StopFlag
        stop = StopFlag()                  # before the heavy imports: a stop signal is never lost
        previous = stop.install(world_rank() == 0)
        try:
            from .apps.batch import run_batch
            return run_batch(args, run_config(args), stop)
        finally:
            stop.restore(previous)
    if args.command == "chat":
        from .apps.chat import run_chat_command
        return run_chat_command(args, run_config(args))
    if args.command == "serve":
        from .apps.serve import run_serve
        return run_serve(args, run_config(args))
    raise DllamaError(f"unknown command {args.command}")
