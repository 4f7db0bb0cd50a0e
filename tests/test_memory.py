"""memory.py predicts what a loaded shard holds: the runtime matrices' bytes (every layout),
and whole shards (weights and KV cache) for Q40, Q41 with the 8-bit output matrix, Q80, F32
and a Q4_K_M file's mixed types, with 1 and 4 KV slots. The same figures are what `info` prints."""
import numpy as np
import pytest

from dllama_mpi import memory
from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.quant import Q40Matrix, Q41Matrix, Q80Matrix, quantize_q41
from dllama_mpi.runtime.startup import start
from tiny import write_tiny_gguf


@pytest.mark.parametrize("rows,cols", [(1, 32), (17, 96), (40, 2048), (33, 2080), (5, 4096)])
def test_matrix_bytes_match_the_runtime_layouts(rows, cols):
    w = np.random.default_rng(rows).standard_normal((rows, cols)).astype(np.float32)
    assert memory.matrix_bytes(rows, cols, "f32") == w.nbytes
    assert memory.matrix_bytes(rows, cols, "q40") == Q40Matrix.from_f32(w).nbytes
    assert memory.matrix_bytes(rows, cols, "q41") == Q41Matrix.from_blocks(quantize_q41(w)).nbytes
    assert memory.matrix_bytes(rows, cols, "q80") == Q80Matrix.from_f32(w).nbytes


CASES = [("q40_9h", "q4_0", "auto", "q40", "q40"),   # Q4_0 file: Q40 layers and output
         ("q40_9h", "f32", "q41", "q41", "q80"),     # 4-bit layers, the output kept at 8 bits
         ("q40_9h", "f32", "auto", "f32", "f32"),
         ("q40_9h", "q8_0", "q80", "q80", "q80"),    # 8-bit layers
         # Q4_K_M: every matrix its own type (q41, q80), layer 1's q|k|v stack split in two
         ("k8h", "q4_k_m", "auto", "mixed", "q80"),
         ("k8h_fallback", "q4_k_m", "auto", "mixed", "q41"),   # tied: the Q4_K embedding
         ("k8h", "q4_k_m", "q40", "q40", "q80")]      # one type asked for: all requantised


@pytest.mark.parametrize("shape,gguf_type,requested,layers,output", CASES)
@pytest.mark.parametrize("slots", [1, 4])
def test_prediction_equals_a_loaded_shard(tmp_path, shape, gguf_type, requested, layers, output,
                                          slots):
    path = write_tiny_gguf(str(tmp_path / f"m-{gguf_type}.gguf"), shape, gguf_type)
    s = start(SerialComm(), path, RunConfig(weights_float_type=requested, max_seq_len=24,
                                            nthreads=1, parallel=slots), want_tokenizer=False)
    assert (s.run.weights_float_type, s.run.output_float_type) == (layers, output)
    held = s.memory[0]
    predicted = memory.per_rank(s.config, s.run, 1)[0]
    assert held.weights == s.engine.model.w.nbytes()
    assert held.kv_cache == s.engine.model.kv.nbytes
    assert (predicted.weights, predicted.kv_cache) == (held.weights, held.kv_cache)


def test_buffers_after_a_batch_are_the_predicted_ones(tmp_path):
    """Steps of many row counts (prefill chunks shared with decode rows, decode rows alone)
    hold one arena of the most rows: what memory.py predicts, to the byte."""
    import importlib
    att = importlib.import_module("dllama_mpi.kernels.attention")
    from dllama_mpi.runtime.generation import generate_batch
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), "q40_9h", "q4_0")
    run = RunConfig(max_seq_len=64, nthreads=1, parallel=5, prefill_chunk=16)
    s = start(SerialComm(), path, run, want_tokenizer=False)
    att._ATT_SCRATCH.clear()
    prompts = [list(range(3 + 7 * i, 10 + 9 * i)) for i in range(7)]
    generate_batch(s.engine, prompts, [20] * 7,
                   [lambda l: int(np.argmax(l))] * 7, set(), 64, 5, 16)
    model = s.engine.model
    assert len(model._buffers) > 3                       # several row counts ran
    scratch = sum(a.nbytes for k, a in att._ATT_SCRATCH.items() if type(k) is int)
    predicted = memory.per_rank(s.config, s.run, 1)[0].buffers
    assert model.buffer_nbytes() + scratch == predicted
    s.close()
