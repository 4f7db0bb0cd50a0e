"""Tokenizer tests: GGUF -> tokenizers pipeline, chat templates, streaming decode.

References are computed at test time with transformers (its GGUF tokenizer loader) -- never pasted.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from dllama_mpi.tokenizer import PRE_TOKENIZER_TYPES, IncrementalDecoder, Tokenizer  # noqa: E402


TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    inner   spaces",
    "line one\nline two\n\n\tindented\r\nwindows",
    "Numbers: 0 7 42 12345 3.14159 1,000,000 2024-06-01",
    "def square(x):\n    return x ** 2  # comment\n",
    'for (int i = 0; i < n; ++i) { sum += a[i]; } // C\n',
    "emoji 😀🎉👍🏽 and family 👨‍👩‍👧",
    "中文字符测试，日本語のテキスト。한국어",
    "café naïve façade Ærøskøbing Ünïcödé",
    "I'm sure you're right; they'll say it's OK, we'd've known",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more text",
    "https://example.com/path?q=1&r=two#frag",
    "   \n  \n",
    " ",
    "",
    "Ünïcode — “quotes” ‘single’ … €100 ±5% ∑∫√",
    "MiXeD CaSe WORDS and UPPER",
]


# ---------------------------------------------------------------------------------------------
# SmolLM2 (real GGUF, gpt2 byte-level BPE, pre-tokenizer "smollm")
# ---------------------------------------------------------------------------------------------
def _smollm2_path() -> str:
    """$DLLAMA_SMOLLM2_GGUF, else the cached default model (pulled on first use)."""
    from tiny import smollm2_path as find_or_pull
    return find_or_pull()


@pytest.fixture(scope="module")
def smollm2_path():
    return _smollm2_path()


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def smol_ref(smollm2_path):
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(smollm2_path)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.slow
def test_smollm2_metadata(smol, smol_ref):
    assert smol.vocab_size == 49152
    assert smol.bos_id == smol_ref.convert_tokens_to_ids(smol_ref.bos_token)
    eos = smol_ref.convert_tokens_to_ids(smol_ref.eos_token)
    assert smol.eos_ids[0] == eos
    assert smol.token_to_id("<|im_end|>") in smol.eos_ids
    assert smol.token_to_id("<|endoftext|>") in smol.eos_ids
    assert smol.add_bos is False
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    # special tokens sit at ids 0-16, below the regular vocabulary
    assert smol.encode("<|im_start|>") == [smol.token_to_id("<|im_start|>")]
    assert smol.token_to_id("<|im_start|>") < 17


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_encode_matches_transformers(smol, smol_ref, text):
    ids = smol.encode(text)
    assert ids == smol_ref.encode(text, add_special_tokens=False)
    assert smol.decode(ids) == text
    assert smol.decode(ids) == smol_ref.decode(ids)


@pytest.mark.slow
def test_smollm2_bos_and_special_parsing(smol):
    ids = smol.encode("hi", add_bos=True)
    assert ids[0] == smol.bos_id and ids[1:] == smol.encode("hi")
    text = "<|im_start|>user"
    raw = smol.encode(text, parse_special=False)
    assert smol.bos_id not in raw and len(raw) > 2
    assert smol.decode(raw) == text
    assert smol.decode(smol.encode(text), skip_special_tokens=True) == "user"


@pytest.mark.slow
def test_smollm2_digits_split_one_by_one(smol):
    # llama.cpp's "smollm" pre-tokenizer isolates every digit (as SmolLM2's own tokenizer.json does)
    ids = smol.encode("1234567")
    assert [smol.decode([i]) for i in ids] == list("1234567")


@pytest.mark.slow
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! 👋 Wie geht's?"}],
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi there."},
            {"role": "user", "content": "中文?"},
        ],
    ],
)
def test_smollm2_chat_template_matches_transformers(smol, smol_ref, messages):
    ours = smol.apply_chat_template(messages)
    ref = smol_ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == ref
    assert smol.apply_chat_template(messages, add_generation_prompt=False) == smol_ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )
    # and the rendered prompt tokenizes identically, special tokens included
    assert smol.encode(ours) == smol_ref.encode(ours, add_special_tokens=False)


def _stream(tok: Tokenizer, ids, **kw):
    dec = tok.decoder(**kw)
    assert isinstance(dec, IncrementalDecoder)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS + ["🤖🧠🦾 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✨ 你好👋世界"])
def test_smollm2_incremental_decoder(smol, text):
    ids = smol.encode(text)
    pieces = _stream(smol, ids)
    assert "".join(pieces) == smol.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_smollm2_incremental_decoder_holds_partial_characters(smol):
    text = "😀中"
    ids = smol.encode(text)
    assert len(ids) > 2  # the emoji and the CJK character are split over several byte tokens
    dec = smol.decoder()
    out = [dec.push(i) for i in ids]
    assert out[0] == ""  # first token is an incomplete UTF-8 sequence: held back
    assert "".join(out) == text and dec.flush() == ""
    # an incomplete sequence at the end comes out on flush (as U+FFFD, like decode)
    dec = smol.decoder()
    assert dec.push(ids[0]) == ""
    assert dec.flush() == smol.decode(ids[:1])


@pytest.mark.slow
def test_from_hf_files(smol, smol_ref, tmp_path):
    smol_ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_files(tmp_path / "tokenizer.json", tmp_path / "tokenizer_config.json")
    assert tok.bos_id == smol.bos_id and tok.eos_ids[0] == smol.eos_ids[0] and tok.add_bos == smol.add_bos
    assert tok.chat_template == smol.chat_template
    for text in TEXTS:
        assert tok.encode(text) == smol_ref.encode(text, add_special_tokens=False)
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == smol.apply_chat_template(msgs)


# ---------------------------------------------------------------------------------------------
# Small generated GGUF vocabularies
# ---------------------------------------------------------------------------------------------
def _write_gguf(path, kv: dict | None = None, tokenizer=None, arch="llama"):
    """A tiny GGUF: a few llama.* keys, the given tokenizer.* writer calls, one dummy tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(4)
    n = 4
    if tokenizer is not None:
        n = tokenizer(w)
    w.add_tensor("token_embd.weight", np.zeros((n, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPM_PIECES = [
    "▁t", "he", "▁the", "in", "ing", "▁a", "▁th", "er", "▁w", "or", "ld", "▁wor", "▁world", "ll", "▁he",
    "▁hell", "▁hello", "▁▁", "▁▁▁", "▁s", "is", "▁is", "▁T", "▁Th", "▁This", "hi", "▁thing", "th", "ng",
    "▁i", "on", "▁on", "es", "▁I",
]  # fmt: skip
SPM_CHARS = list("abcdefghijklmnopqrstuvwxyz") + ["▁", ".", ",", "!", "?", "'", "A", "T", "H", "I"]


def _spm_vocab():
    """Llama-style SentencePiece vocabulary: <unk> <s> </s>, 256 byte tokens, scored pieces, chars,
    a user-defined and a control token.  Higher score = merged earlier."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for k, piece in enumerate(SPM_PIECES):
        tokens.append(piece), types.append(1), scores.append(-float(k))
    for k, c in enumerate(SPM_CHARS):
        tokens.append(c), types.append(1), scores.append(-1000.0 - k)
    tokens += ["<|user|>", "<|end|>"]
    types += [4, 3]
    scores += [0.0, 0.0]
    return tokens, scores, types


def _spm_writer(add_space_prefix=None, add_bos=None, template=None):
    def write(w):
        tokens, scores, types = _spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        if add_space_prefix is not None:
            w.add_add_space_prefix(add_space_prefix)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
        if template is not None:
            w.add_chat_template(template)
        return len(tokens)

    return write


SPM_TEXTS = [
    "hello world",
    "This is the thing",
    "the  thing on it",
    "hello world!",
    "hello\nworld",
    "Ünïcödé 中 😀",
    "THIS IS",
    "hello ",
    "zebra quiz",
]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    return _write_gguf(folder / "spm.gguf", tokenizer=_spm_writer())


@pytest.fixture(scope="module")
def spm(spm_file):
    return Tokenizer.from_gguf(spm_file)


@pytest.fixture(scope="module")
def spm_ref(spm_file):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(spm_file.parent), gguf_file=spm_file.name)


def test_spm_metadata(spm):
    tokens, _, _ = _spm_vocab()
    assert spm.vocab_size == len(tokens)
    assert spm.bos_id == 1 and spm.eos_ids[0] == 2
    assert tokens.index("<|end|>") in spm.eos_ids
    assert spm.add_bos is True  # llama/spm default when the file does not say
    assert spm.chat_template is None


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_spm_encode_matches_transformers(spm, spm_ref, text):
    ids = spm.encode(text, add_bos=False)
    assert ids == spm_ref.encode(text, add_special_tokens=False)
    assert spm.decode(ids) == spm_ref.decode(ids) == text
    assert spm.encode(text) == [spm.bos_id] + ids


def _llama_cpp_reference(ref, text, specials):
    """What llama.cpp's SPM tokenizer gives, from transformers' tokenizer of the same GGUF.

    llama.cpp prepends "▁" to every stretch of raw text -- also one that already starts with a space
    and one that follows a special token -- like the original SentencePiece (add_dummy_prefix).
    transformers uses Metaspace(prepend_scheme="first"), which adds it only at the very start and
    only when the text does not already begin with a space.  Giving transformers each stretch with
    one explicit leading space yields llama.cpp's "▁" + text for it.
    """
    out, rest = [], text
    while rest:
        hits = [(rest.find(s), s) for s in specials if s in rest]
        if not hits:
            out += ref.encode(" " + rest, add_special_tokens=False)
            break
        pos, s = min(hits)
        if pos:
            out += ref.encode(" " + rest[:pos], add_special_tokens=False)
        out.append(ref.convert_tokens_to_ids(s))
        rest = rest[pos + len(s) :]
    return out


@pytest.mark.parametrize("text", [" hello", "  hi there", "x<|user|>hello", "a<|end|>b", "<s>the thing</s>", ""])
def test_spm_llama_cpp_spacing(spm, spm_ref, text):
    ids = spm.encode(text, add_bos=False)
    assert ids == _llama_cpp_reference(spm_ref, text, ["<|user|>", "<|end|>", "<s>", "</s>"])


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_from_open_reader_equals_from_path(tmp_path, kind):
    writer = _spm_writer(template="{{ messages[0]['content'] }}") if kind == "spm" else _bpe_writer("llama-bpe")
    path = _write_gguf(tmp_path / f"{kind}.gguf", tokenizer=writer)
    a = Tokenizer.from_gguf(path)
    b = Tokenizer.from_gguf(gguf.GGUFReader(str(path), "r"))
    assert (a.vocab_size, a.bos_id, a.eos_ids, a.add_bos, a.chat_template) == (
        b.vocab_size, b.bos_id, b.eos_ids, b.add_bos, b.chat_template
    )
    assert a.hf_tokenizer.to_str() == b.hf_tokenizer.to_str()


def test_spm_special_and_user_defined(spm):
    user, end = spm.token_to_id("<|user|>"), spm.token_to_id("<|end|>")
    ids = spm.encode("a<|end|>b<|user|>c")
    assert end in ids and user in ids
    raw = spm.encode("a<|end|>b<|user|>c", parse_special=False)
    assert end not in raw and user in raw  # user-defined tokens always match, as in llama.cpp
    assert spm.decode(raw, skip_special_tokens=True) == "a<|end|>b<|user|> c"


def test_spm_without_space_prefix(tmp_path):
    """add_space_prefix = false: no "▁" is prepended (llama.cpp).  transformers' GGUF loader
    ignores this flag, so its backend gets Metaspace(prepend_scheme="never") -- the file's
    setting -- while its vocabulary and merges stay the reference."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers

    path = _write_gguf(tmp_path / "spm_noprefix.gguf", tokenizer=_spm_writer(add_space_prefix=False, add_bos=False))
    tok = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    backend = HFTokenizer.from_str(ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    assert tok.add_bos is False
    for text in SPM_TEXTS + [" hello", "  hi"]:
        ids = tok.encode(text)
        assert ids == backend.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == backend.decode(ids) == text
        assert "".join(_stream(tok, ids)) == text
    assert tok.encode("hello") != tok.encode(" hello")


@pytest.mark.parametrize("text", SPM_TEXTS + [" hello", "x<|user|>hello"])
def test_spm_incremental_decoder(spm, text):
    ids = spm.encode(text, add_bos=False)
    pieces = _stream(spm, ids)
    assert "".join(pieces) == spm.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_spm_incremental_decoder_spacing_and_bytes(spm):
    dec = spm.decoder()
    assert [dec.push(i) for i in spm.encode("hello world", add_bos=False)] == ["hello", " world"]
    dec = spm.decoder()
    ids = spm.encode("中", add_bos=False)  # "▁" then three byte-fallback tokens
    out = [dec.push(i) for i in ids]
    assert "".join(out) == "中" and out[-1] == "中"
    assert dec.flush() == ""


def test_chat_template_rendering_and_errors(spm_file):
    tok = Tokenizer.from_gguf(spm_file)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}{{ strftime_now('%Y')[:0] }}"
    )
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "<s>[user] hi</s>\n[assistant]"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<s>[user] hi</s>\n"
    with pytest.raises(ValueError, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    tok.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template(msgs)
    tok.chat_template = "{{ messages.append(1) }}"  # immutable sandbox: templates cannot mutate input
    with pytest.raises(ValueError):
        tok.apply_chat_template(msgs)


# ---------------------------------------------------------------------------------------------
# byte-level BPE with other pre-tokenizers (tiny generated vocabulary)
# ---------------------------------------------------------------------------------------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b), cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


BPE_MERGES = ["Ġ t", "Ġt h", "Ġth e", "h e", "i n", "in g", "1 2", "12 3", "' s", "Ġ w", "o r", "Ġw or",
              "l d", "Ġwor ld", "Ġ Ġ", "Ċ Ċ", "e r", "Ġ 4"]  # fmt: skip


def _bpe_writer(pre):
    def write(w):
        tokens = bytes_to_unicode()
        for m in BPE_MERGES:
            tokens.append(m.replace(" ", ""))
        tokens += ["<|begin_of_text|>", "<|eot_id|>"]
        types = [1] * (len(tokens) - 2) + [3, 3]
        w.add_tokenizer_model("gpt2")
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(BPE_MERGES)
        w.add_bos_token_id(len(tokens) - 2)
        w.add_eos_token_id(len(tokens) - 1)
        return len(tokens)

    return write


BPE_TEXTS = [
    "the thing's world",
    "1234 12 123456 x1234y",
    "  the\n\n\nworld  ",
    "It'S tHE World!! ok?? 42 4",
    "héllo wörld 中文 😀",
    "a\r\nb\tc",
]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_byte_level_pre_tokenizers_match_transformers(tmp_path, pre):
    transformers = pytest.importorskip("transformers")
    path = _write_gguf(tmp_path / f"bpe-{pre}.gguf", tokenizer=_bpe_writer(pre))
    tok = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert tok.eos_ids[0] == tok.token_to_id("<|eot_id|>")
    assert tok.add_bos is (pre == "llama-bpe")  # llama.cpp forces BOS for Llama 3 unless told
    for text in BPE_TEXTS + ["<|begin_of_text|>the<|eot_id|>"]:
        ids = tok.encode(text, add_bos=False)
        assert ids == ref.encode(text, add_special_tokens=False), (pre, text)
        assert tok.decode(ids) == text
        assert "".join(_stream(tok, ids)) == text


def test_pre_tokenizer_digit_handling(tmp_path):
    """llama-bpe groups up to 3 digits, qwen2 and smollm split every digit."""
    pieces = {}
    for pre in ("llama-bpe", "qwen2", "smollm"):
        tok = Tokenizer.from_gguf(_write_gguf(tmp_path / f"d-{pre}.gguf", tokenizer=_bpe_writer(pre)))
        pieces[pre] = [tok.decode([i]) for i in tok.encode("123456", add_bos=False)]
    assert pieces["llama-bpe"] == ["123", "4", "5", "6"]  # chunks "123" "456"; only "123" is a token
    assert pieces["qwen2"] == pieces["smollm"] == list("123456")
    assert {"smollm", "llama-bpe", "qwen2", "gpt2", "default"} <= set(PRE_TOKENIZER_TYPES)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_gguf_without_tokenizer(tmp_path):
    path = _write_gguf(tmp_path / "notok.gguf")
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf(path)
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf(gguf.GGUFReader(str(path), "r"))


def test_unsupported_tokenizer_model(tmp_path):
    def bert(w):
        w.add_tokenizer_model("bert")
        w.add_token_list(["[PAD]", "[UNK]", "a", "b"])
        return 4

    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "bert.gguf", tokenizer=bert))


def test_unsupported_pre_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="no-such-pre"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "pre.gguf", tokenizer=_bpe_writer("no-such-pre")))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"definitely not a gguf file")
    with pytest.raises(ValueError):
        Tokenizer.from_gguf(bad)
    truncated = tmp_path / "trunc.gguf"
    good = _write_gguf(tmp_path / "ok.gguf", tokenizer=_spm_writer())
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError):
        Tokenizer.from_gguf(truncated)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
