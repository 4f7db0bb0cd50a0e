"""The real default model, SmolLM2-135M-Instruct (GGUF Q4_1/Q8_0), against transformers."""
import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from tiny import our_greedy, smollm2_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def path():
    return smollm2_path()


@pytest.fixture(scope="module")
def tokenizer(path):
    from dllama_mpi.tokenizer import Tokenizer
    return Tokenizer.from_gguf(path)


def test_f32_greedy_32_tokens_equal_transformers(path, tokenizer):
    import os

    import torch
    from transformers import AutoModelForCausalLM
    ids = tokenizer.encode("The capital of France is")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 torch_dtype=torch.float32)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    ours = our_greedy(SerialComm(), path, ids, 32, max_seq_len=64)
    assert ours == ref, (tokenizer.decode(ours), tokenizer.decode(ref))
