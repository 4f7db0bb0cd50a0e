"""Model and run configuration: plain dataclasses, derived fields, one validation."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import DllamaError

WEIGHT_TYPES = ("q40", "q41", "q80", "f16", "f32")  # runtime forms; "auto" picks one per file
FLOAT_FORMS = ("f32", "f16")   # runtime forms that are not block-quantised (f32 inputs)
MIXED = "mixed"   # what "auto" resolves to when every matrix keeps its own runtime type
# GGML type -> the runtime form that loses least (quant/kquants.py says what each loses)
RUNTIME_TYPE = {"F32": "f32", "F16": "f32", "BF16": "f32", "Q4_0": "q40", "Q4_1": "q41",
                "Q4_K": "q41", "Q8_0": "q80", "Q5_0": "q80", "Q5_1": "q80", "Q5_K": "q80",
                "Q6_K": "q80"}
BUFFER_TYPES = ("q80", "f32")
KV_STORAGES = ("memory", "disk")   # "auto": disk when a --kv-cache-dir is given
KV_FLOAT_TYPES = ("f32", "f16")
SEED_LIMIT = 2 ** 63               # seeds are in [0, 2**63), as the server's
DEFAULT_MAX_SEQ_LEN = 4096  # cap on the model's context unless --max-seq-len says otherwise


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int
    head_dim: int = 0                # 0: dim // n_heads
    rope_theta: float = 10000.0
    # per rope pair i, inv_freq_i is divided by this factor (llama3 / linear scaling);
    # q/k rows are always held for interleaved-pair rope (GGUF's Llama order)
    rope_freq_factors: tuple[float, ...] | None = None
    norm_eps: float = 1e-5
    tied_embeddings: bool = False
    attn_bias: bool = False          # q/k/v biases (Qwen2): bq, bk, bv, out-split like their rows
    qk_norm: bool = False            # per-head RMSNorm of q and k before rope (Qwen3)
    # mixture of experts (Qwen3-MoE, Mixtral): every layer's FFN is n_experts experts of
    # hidden_dim units each, n_experts_used chosen per token by a router [n_experts, dim]
    # (softmax, top-k, the k weights renormalised to sum 1 with expert_norm)
    n_experts: int = 0
    n_experts_used: int = 0
    expert_norm: bool = True

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_freq_factors") is not None:
            d["rope_freq_factors"] = tuple(d["rope_freq_factors"])
        return cls(**d)

    def check(self) -> None:
        """Raise DllamaError if the shape cannot describe a Llama."""
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise DllamaError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise DllamaError(f"model config: n_heads ({self.n_heads}) is not a multiple of "
                              f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise DllamaError(f"model config: head_dim ({self.head_dim}) must be even for rope")
        if self.n_experts and not 0 < self.n_experts_used <= self.n_experts:
            raise DllamaError(f"model config: {self.n_experts_used} experts used per token of "
                              f"{self.n_experts}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.head_dim // 2:
            raise DllamaError(f"model config: {len(self.rope_freq_factors)} rope frequency "
                              f"factors for head_dim {self.head_dim}")


@dataclass
class RunConfig:
    # auto: the file's 4-bit type kept, f32 for float files, and for files that mix types
    # (K-quants: Q4_K_M holds Q4_K, Q6_K, Q8_0) "mixed": every matrix its own (tensor_types)
    weights_float_type: str = "auto"
    buffer_float_type: str = "auto"    # auto: q80 with 4-bit weights, f32 with f32 weights
    # the output matrix (wcls): auto keeps it at 8 bits (q80) when the weights are 4-bit and
    # the file holds it at >= 8 bits: 4-bit logits cost SmolLM2 ~13 points of top-1 agreement
    output_float_type: str = "auto"
    max_seq_len: int = 0             # 0: the model's context, capped at DEFAULT_MAX_SEQ_LEN
    nthreads: int = 0                # 0: cores available to this rank / ranks on the node
    temperature: float = 0.8
    topp: float = 0.9
    topk: int = 0
    seed: int | None = None
    prefill_chunk: int = 128         # prompt tokens per forward (a matrix through the weights)
    load: str = "auto"               # scatter | direct | auto (see session._direct_load)
    parallel: int = 1                # sequences decoded together (KV-cache slots)
    kv_cache_storage: str = "auto"   # memory | disk | auto (disk when kv_cache_dir is set)
    kv_cache_dir: str | None = None  # disk: where the job's folder goes (None: node tmp)
    kv_cache_float_type: str = "f32"  # f32 | f16 (half the bytes; attention reads f16)
    # weights "mixed": runtime type of every layer matrix by canonical name (layers.3.wv: q80)
    tensor_types: dict = dataclasses.field(default_factory=dict)

    @property
    def kv_storage(self) -> str:
        """memory or disk: "auto" settled by whether a directory was given."""
        if self.kv_cache_storage != "auto":
            return self.kv_cache_storage
        return "disk" if self.kv_cache_dir is not None else "memory"

    def resolved(self, file_weight_type: str, file_output_type: str = "F32",
                 tensor_types: dict | None = None) -> "RunConfig":
        """Settle the "auto" types from what the model file suggests: runtime weight type
        for its layers ("mixed" with `tensor_types`, canonical name -> runtime type, when
        each matrix keeps its own); GGML type name of its output matrix."""
        w = file_weight_type if self.weights_float_type == "auto" else self.weights_float_type
        types = dict(tensor_types or {}) if w == MIXED else {}
        if w == MIXED and not types:
            raise DllamaError("mixed weight types need the type of every matrix")
        quantised = w not in FLOAT_FORMS and not (w == MIXED and
                                                  set(types.values()) <= set(FLOAT_FORMS))
        b = self.buffer_float_type
        if b == "auto":
            b = "q80" if quantised else "f32"
        o = self.output_float_type
        if o == "auto":
            # quantised layers: the output matrix in the form that loses least (8 bits for
            # files that hold it at more than 4: 4-bit logits cost SmolLM2 ~13 points of
            # top-1 agreement); f32 layers: f32
            natural = RUNTIME_TYPE.get(file_output_type, "q80")
            o = ("q80" if natural == "f32" else natural) if quantised else \
                ("f16" if w == "f16" else "f32")
        return dataclasses.replace(self, weights_float_type=w, buffer_float_type=b,
                                   output_float_type=o, tensor_types=types)

    def matrix_type(self, name: str) -> str:
        """Runtime type of a matrix (canonical name: layers.0.wq, ..., wcls) in a resolved run."""
        if name == "wcls":
            return self.output_float_type
        if self.weights_float_type == MIXED:
            return self.tensor_types[name]
        return self.weights_float_type

    @property
    def quantised_layers(self) -> bool:
        """Some layer matrix is block-quantised (its inputs are then made Q80 once)."""
        if self.weights_float_type == MIXED:
            return any(t not in FLOAT_FORMS for t in self.tensor_types.values())
        return self.weights_float_type not in FLOAT_FORMS

    def resolved_max_seq_len(self, model: ModelConfig) -> int:
        if self.max_seq_len > 0:
            return self.max_seq_len
        return min(model.context_length or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)

    def validate(self, model: ModelConfig) -> None:
        """The run's own checks (the split's are shard.check), on rank 0 before any loading."""
        model.check()
        if self.weights_float_type not in WEIGHT_TYPES + ("auto", MIXED):
            raise DllamaError(f"--weights-float-type must be one of {WEIGHT_TYPES}, "
                              f"got {self.weights_float_type!r}")
        if self.output_float_type not in WEIGHT_TYPES + ("q80", "auto"):
            raise DllamaError(f"output float type must be one of {WEIGHT_TYPES + ('q80',)}, "
                              f"got {self.output_float_type!r}")
        if self.buffer_float_type not in BUFFER_TYPES + ("auto",):
            raise DllamaError(f"--buffer-float-type must be one of {BUFFER_TYPES}, "
                              f"got {self.buffer_float_type!r}")
        ctx = self.resolved_max_seq_len(model)
        if ctx <= 0:
            raise DllamaError(f"--max-seq-len must be positive, got {ctx}")
        if model.context_length and ctx > model.context_length:
            raise DllamaError(f"--max-seq-len {ctx} exceeds the model's context "
                              f"length {model.context_length}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise DllamaError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.topp <= 1.0:
            raise DllamaError(f"--topp must be in (0, 1], got {self.topp}")
        if self.topk < 0:
            raise DllamaError(f"--topk must be >= 0, got {self.topk}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise DllamaError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.nthreads < 0:
            raise DllamaError(f"--nthreads must be >= 0, got {self.nthreads}")
        if self.kv_cache_storage not in KV_STORAGES + ("auto",):
            raise DllamaError(f"--kv-cache-storage must be one of {', '.join(KV_STORAGES)}, "
                              f"got {self.kv_cache_storage!r}")
        if self.kv_cache_storage == "memory" and self.kv_cache_dir is not None:
            raise DllamaError("--kv-cache-dir is for --kv-cache-storage disk, not memory")
        if self.kv_cache_float_type not in KV_FLOAT_TYPES:
            raise DllamaError(f"--kv-cache-float-type must be one of "
                              f"{', '.join(KV_FLOAT_TYPES)}, got {self.kv_cache_float_type!r}")
        if self.load not in ("scatter", "direct", "auto"):
            raise DllamaError(f"--load must be scatter, direct or auto, got {self.load!r}")
        if self.prefill_chunk <= 0:
            raise DllamaError("prefill chunk must be positive")
        if self.parallel < 1:
            raise DllamaError(f"--parallel must be >= 1, got {self.parallel}")


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled and when it ends (a server request, a batch line, a
    chat turn). `stop` strings end the text as soon as it contains one (never emitted)."""
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0                   # 0: off
    seed: int | None = None
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False         # keep going past end-of-sequence ids (benchmarks)
    logprobs: bool = False           # report the chosen token's log-probability
    top_logprobs: int = 0            # and this many alternatives
    min_p: float = 0.0               # drop tokens below min_p x the top probability (0: off)
    # structured output: grammar.response_format_text() of an OpenAI response_format (JSON
    # text, hashable); None: free text. Compiled at submit (an invalid schema is a DllamaError)
    response_format: str | None = None

    def check(self) -> None:
        """Raise DllamaError naming the first bad field."""
        if self.temperature < 0:
            raise DllamaError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise DllamaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DllamaError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise DllamaError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.max_tokens < 0:
            raise DllamaError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if not 0 <= self.top_logprobs <= 20:
            raise DllamaError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise DllamaError("stop strings must be non-empty strings")
        if not 0.0 <= self.min_p <= 1.0:
            raise DllamaError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.response_format is not None and not isinstance(self.response_format, str):
            raise DllamaError("response_format must be the JSON text of grammar."
                              "response_format_text()")
