"""The split: for every test shape and the real model, every size 1..n_heads."""
import numpy as np
import pytest

from dllama_mpi.config import ModelConfig
from dllama_mpi.errors import DllamaError
from dllama_mpi.shard import check, plan, split_blocks, split_even
from tiny import SHAPES

SMOLLM2 = dict(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152)
SYNTHETIC = dict(dim=2048, hidden_dim=8192, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=32000)


def configs():
    shapes = dict(SHAPES, smollm2=SMOLLM2, synthetic=SYNTHETIC)
    for name, s in shapes.items():
        s = {k: v for k, v in s.items() if k not in ("tied", "rope_scaling")}
        yield name, ModelConfig(arch="llama", context_length=256, **s)


@pytest.mark.parametrize("name,config", list(configs()))
def test_ranges_tile_and_kv_heads_present(name, config):
    for size in range(1, config.n_heads + 1):
        plans = [plan(config, r, size) for r in range(size)]
        for attr, total in (("q_heads", config.n_heads), ("ffn", config.hidden_dim),
                            ("vocab", config.vocab_size)):
            ranges = [getattr(p, attr) for p in plans]
            assert ranges[0].start == 0 and ranges[-1].stop == total, (name, size, attr)
            assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:])), (name, size, attr)
        # query heads as even as possible
        counts = [p.q_heads.size for p in plans]
        assert max(counts) - min(counts) <= 1 and min(counts) >= 1
        for p in plans:
            # every query head's KV head is held, and nothing more than needed
            needed = {q // config.group for q in range(p.q_heads.start, p.q_heads.stop)}
            held = set(range(p.kv_heads.start, p.kv_heads.stop))
            assert needed == held
            kv = p.kv_of_q()
            assert np.array_equal(kv + p.kv_heads.start,
                                  np.arange(p.q_heads.start, p.q_heads.stop) // config.group)
            # in-split bands are whole 32-blocks (except the end of an odd-sized axis)
            assert p.ffn.start % 32 == 0 and (p.ffn.stop % 32 == 0 or p.ffn.stop == config.hidden_dim)
            assert p.vocab.start % 32 == 0


def test_split_helpers():
    assert [split_even(10, 3, r).size for r in range(3)] == [4, 3, 3]
    r = [split_blocks(100, 3, k) for k in range(3)]  # 4 blocks: 2, 1, 1 (last partial)
    assert [(x.start, x.stop) for x in r] == [(0, 64), (64, 96), (96, 100)]


def test_smollm2_on_two_and_four_ranks_shares_kv_heads():
    c = dict(configs())["smollm2"]
    p4 = [plan(c, r, 4) for r in range(4)]
    assert [p.q_heads.size for p in p4] == [3, 2, 2, 2]
    assert [(p.kv_heads.start, p.kv_heads.stop) for p in p4] == [(0, 1), (1, 2), (1, 3), (2, 3)]


def test_too_many_ranks_is_one_clear_error():
    c = dict(configs())["smollm2"]
    with pytest.raises(DllamaError, match="at most 9 ranks"):
        check(c, 10, "q40")
    check(c, 9, "q40")


def test_q40_needs_whole_blocks():
    c = dict(configs())["gqa6"]  # head_dim 16: a rank's attention band is not whole blocks
    with pytest.raises(DllamaError, match="f32"):
        check(c, 2, "q40")
    check(c, 2, "f32")
