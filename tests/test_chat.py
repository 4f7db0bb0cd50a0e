"""The interactive chat (dllama_mpi.apps.chat) with the fake scheduler and StringIO."""
from __future__ import annotations

import io
import os
import signal

import pytest

from dllama_mpi.apps.chat import run_chat
from dllama_mpi.config import SamplingParams
from fake_scheduler import FakeScheduler, FakeTokenizer

pytestmark = pytest.mark.timeout(60)

TOK = FakeTokenizer()
PARAMS = SamplingParams(temperature=0.0, max_tokens=50)


def enc(text):
    return TOK.encode(text)


def chat(lines: str, scheduler=None, tokenizer=TOK, **kwargs):
    scheduler = scheduler or FakeScheduler(max_seq_len=512, reply=lambda p: enc("Hi there"))
    out = io.StringIO()
    assert run_chat(scheduler, tokenizer, PARAMS, input=io.StringIO(lines), output=out,
                    **kwargs) == 0
    return scheduler, out.getvalue()


def test_two_turns_reuse_the_previous_turn():
    s, out = chat("hello\nagain\n")
    assert out == "> hello\nHi there\n> again\nHi there\n> \n"
    (_, p0, _), (_, p1, _) = s.submitted
    assert p0 == enc(TOK.apply_chat_template([{"role": "user", "content": "hello"}]))
    answer = s.finished[0].generated_tokens
    assert answer == enc("Hi there")
    assert p1[:len(p0) + len(answer)] == p0 + answer
    assert p1 == enc(TOK.apply_chat_template([
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "again"}]))
    assert s.finished[1].cached_tokens == len(p0) + len(answer)


def test_system_prompt_reset_and_exit():
    s, out = chat("one\n/reset\ntwo\n/exit\nthree\n", system="Be terse.")
    assert [p for _, p, _ in s.submitted] == [
        enc(TOK.apply_chat_template([{"role": "system", "content": "Be terse."},
                                     {"role": "user", "content": m}])) for m in ("one", "two")]
    assert "[conversation cleared]" in out
    assert "three" not in out


def test_eof_without_newline_and_blank_lines():
    s, out = chat("\n   \nlast words")
    assert len(s.submitted) == 1
    assert s.submitted[0][1] == enc(TOK.apply_chat_template([{"role": "user", "content": "last words"}]))
    assert out.endswith("Hi there\n> \n")
    s, out = chat("")
    assert s.submitted == [] and out == "> \n"


def test_answer_streams_through_callbacks_and_stop_strings():
    s = FakeScheduler(max_seq_len=512, reply=lambda p: enc("abc STOP def"))
    params = SamplingParams(temperature=0.0, max_tokens=50, stop=("STOP",))
    out = io.StringIO()
    run_chat(s, TOK, params, input=io.StringIO("go\nmore\n"), output=out)
    assert out.getvalue().count("abc \n") == 2
    assert s.submitted[0][2] is params
    # the answer kept in the history is the cut text: the next prompt renders it so
    _, p1, _ = s.submitted[1]
    assert TOK.decode(p1).startswith("<user>go</><assistant>abc </><user>more</>")


def test_template_that_rewrites_history_falls_back_to_full_encoding():
    class Shouting(FakeTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=True, **kw):
            messages = [dict(m, content=m["content"].upper()) if m["role"] == "assistant" else m
                        for m in messages]
            return super().apply_chat_template(messages, add_generation_prompt, **kw)

    tok = Shouting()
    s, out = chat("a\nb\n", tokenizer=tok)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "Hi there"},
            {"role": "user", "content": "b"}]
    assert s.submitted[1][1] == enc(tok.apply_chat_template(msgs))


def test_errors_do_not_end_the_chat(capsys):
    s = FakeScheduler(max_seq_len=40, reply=lambda p: enc("ok"))
    out = io.StringIO()
    run_chat(s, TOK, PARAMS, input=io.StringIO("x" * 50 + "\nshort\n"), output=out)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "/reset" in err
    assert out.getvalue().endswith("> short\nok\n> \n")
    # the failed turn left no trace in the conversation
    assert s.submitted[0][1] == enc(TOK.apply_chat_template([{"role": "user", "content": "short"}]))


def test_ctrl_c_cancels_the_answer_not_the_chat():
    s = FakeScheduler(max_seq_len=512, reply=lambda p: enc("z" * 400))
    step, count = s.step, [0]

    def step_then_interrupt():
        count[0] += 1
        if count[0] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return step()

    s.step = step_then_interrupt
    before = signal.getsignal(signal.SIGINT)
    out = io.StringIO()
    run_chat(s, TOK, SamplingParams(max_tokens=300), input=io.StringIO("go\nnext\n"), output=out)
    assert signal.getsignal(signal.SIGINT) is before
    first = s.finished[0]
    assert first.finish_reason == "cancelled" and 0 < len(first.generated_tokens) < 20
    assert "[answer cancelled]" in out.getvalue()
    assert len(s.submitted) == 2                     # the chat went on with the next line
    assert s.finished[1].finish_reason == "length"


@pytest.mark.slow
def test_real_tokenizer_turns_extend_the_kv_tokens():
    """SmolLM2's ChatML template and BPE: the second prompt is the first prompt + the answer's
    tokens + the new turn, and stands for exactly the re-rendered conversation."""
    from dllama_mpi.tokenizer import Tokenizer
    from tiny import smollm2_path
    tok = Tokenizer.from_gguf(smollm2_path())
    answer = tok.encode("The capital of France is Paris.", add_bos=False)
    s = FakeScheduler(max_seq_len=2048, reply=lambda p: answer,
                      token_text=lambda t: tok.decode([t]))
    out = io.StringIO()
    run_chat(s, tok, PARAMS, system="You are brief.", input=io.StringIO("Capital of France?\nWhy?\n"),
             output=out)
    assert out.getvalue().count("The capital of France is Paris.\n") == 2
    (_, p0, _), (_, p1, _) = s.submitted
    assert p1[:len(p0) + len(answer)] == p0 + answer
    full = tok.apply_chat_template([
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "Why?"}])
    assert tok.decode(p1) == tok.decode(tok.encode(full))
    assert s.finished[1].cached_tokens == len(p0) + len(answer)
