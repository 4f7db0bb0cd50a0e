"""The synthetic "bytes" vocabulary of test models: a byte-level BPE trained here.

ids 0..2 ``<unk>`` ``<s>`` ``</s>``, the 256 bytes in GPT-2 spelling, merges learned greedily
from a fixed English text, ``<unused_N>`` fillers; with a ChatML-like template whose turns end
with the eos token.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

import gguf

from ..tokenizer import bytes_to_unicode

# ChatML layout, with <s> / </s> (the only control tokens of the "bytes" vocabulary) standing in
# for <|im_start|> / <|im_end|>, so that an assistant turn ends with the eos token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


# A fixed English text the "bytes" vocabulary's merges are learned from (written for this file).
_TRAINING_TEXT = """
The model reads the prompt one token at a time and writes the next token. In the beginning there
was only the text, and the text was split into words, and the words into bytes. Then the most
common pairs of bytes were joined, again and again, until the vocabulary was full. This is how
a byte pair encoding is built: the pair that is seen most often is merged first, and the new
token can be merged with others in the next round.
A cluster of computers can run a large language model when no single machine has the memory
for it. Each node holds a slice of every weight matrix, computes its part of the output, and
then the nodes exchange their partial results over the network. The root node samples the
next token and sends it to all the others, and the whole process starts again for the next
position in the sequence. It is important that the work is shared evenly, that the messages
are small, and that no node waits longer than it has to.
There are many things to think about: the time it takes to send a message, the number of
bytes in each one, the way the heads of the attention layer are split between the nodes, and
what happens when the number of heads is not a multiple of the number of nodes. We want the
answer to be the same as on one machine, and we want it to be fast. For this we measure the
time of every step, we compare the results with a reference, and we write down what we find.
What is the capital of France? Paris is the capital of France. How many days are there in a
week? There are seven days in a week. Where do you want to go today? I would like to go to
the sea, or to the mountains, or to a small town with an old church and a market square.
She said that he would come back in the morning, but he did not come, and they went home
without him. They have been working on this for a long time, and they are not done yet.
"""

_PRETOKENIZE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


@lru_cache(maxsize=8)
def _learn_merges(max_new_tokens: int) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Greedy byte-level BPE on the fixed text: (merges, new tokens), at most ``max_new_tokens``."""
    b2u = bytes_to_unicode()
    words = Counter(_PRETOKENIZE.findall(_TRAINING_TEXT))
    seqs = {tuple(b2u[b] for b in w.encode("utf-8")): c for w, c in words.items()}
    known = set(b2u.values())
    merges: list[tuple[str, str]] = []
    new_tokens: list[str] = []
    while len(new_tokens) < max_new_tokens:
        pairs: Counter = Counter()
        for seq, c in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best_count = max(pairs.values())
        best = min(p for p, c in pairs.items() if c == best_count)  # deterministic tie-break
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in known:
            known.add(merged)
            new_tokens.append(merged)
        new_seqs: dict[tuple[str, ...], int] = {}
        for seq, c in seqs.items():
            out: list[str] = []
            i = 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == best[0] and seq[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            t = tuple(out)
            new_seqs[t] = new_seqs.get(t, 0) + c
        seqs = new_seqs
    return tuple(merges), tuple(new_tokens)


def byte_bpe_vocab(vocab_size: int, max_merges: int = 500) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges) of the synthetic byte-level BPE vocabulary.

    ids 0..2 ``<unk>`` ``<s>`` ``</s>`` (CONTROL), 3..258 the 256 bytes in GPT-2 spelling
    (NORMAL), then up to ``max_merges`` merged tokens learned from a fixed English text, then
    ``<unused_N>`` fillers (UNUSED) up to ``vocab_size``.
    """
    n_base = 3 + 256
    if vocab_size < n_base:
        raise ValueError(f"the 'bytes' tokenizer needs vocab_size >= {n_base}, got {vocab_size}")
    b2u = bytes_to_unicode()
    merges, merged_tokens = _learn_merges(min(max_merges, vocab_size - n_base))
    tokens = ["<unk>", "<s>", "</s>"] + [b2u[b] for b in range(256)] + list(merged_tokens)
    types = [int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.NORMAL)] * (256 + len(merged_tokens))
    n_fill = vocab_size - len(tokens)
    tokens += [f"<unused_{i}>" for i in range(n_fill)]
    types += [int(gguf.TokenType.UNUSED)] * n_fill
    return tokens, types, [f"{a} {b}" for a, b in merges]
