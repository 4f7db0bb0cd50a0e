"""On N ranks, every rank's loaded shard holds the bytes memory.py predicts for it (what
`info -n N` prints), for Q40 layers and for Q41 layers with the 8-bit output matrix."""
import pytest

from dllama_mpi import memory
from dllama_mpi.config import RunConfig
from dllama_mpi.runtime.startup import run_root, start
from mpi_util import agree, on_root
from tiny import write_tiny_gguf


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("gguf_type,weights", [("q4_0", "auto"), ("f32", "q41")])
def test_every_rank_holds_what_memory_predicts(comm, shared_dir, gguf_type, weights):
    path = on_root(comm, lambda: write_tiny_gguf(
        f"{shared_dir}/mem-{gguf_type}.gguf", "q40_9h", gguf_type))
    s = start(comm, path, RunConfig(weights_float_type=weights, max_seq_len=20, nthreads=1,
                                    parallel=2), want_tokenizer=False)
    held = comm.allgather_obj((s.engine.model.w.nbytes(), s.engine.model.kv.nbytes))
    assert run_root(s, lambda _: None) == 0
    predicted = [(m.weights, m.kv_cache) for m in memory.per_rank(s.config, s.run, comm.size)]
    agree(comm, held == predicted if comm.is_root else None, f"held {held} != {predicted}")
