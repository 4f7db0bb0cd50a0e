"""The real program behind the official `openai` client: `serve` under mpiexec on 1 and 2
ranks answers what the engine alone generates (greedy), streams the same text, rejects a
bad request with a 400 and keeps serving, and leaves cleanly on SIGINT; `chat` keeps a
conversation across turns. The HTTP layer itself is tested with a fake scheduler in
test_serve.py."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig, SamplingParams
from dllama_mpi.runtime.startup import scheduler_for, start
from tiny import write_cli_gguf

TIMEOUT = 240
KEY = "test-key"          # given through DLLAMA_API_KEY, not the command line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a byte-level BPE tokenizer and a chat template."""
    return write_cli_gguf(str(tmp_path_factory.mktemp("serve") / "tiny.gguf"), context_length=256)


def _alone(path, prompt_text, max_tokens, chat=False):
    """What the engine generates alone (greedy), in this process."""
    s = start(SerialComm(), path, RunConfig(max_seq_len=256, nthreads=1))
    tok = s.tokenizer
    if chat:
        prompt_text = tok.apply_chat_template([{"role": "user", "content": prompt_text}])
    c = scheduler_for(s).generate(tok.encode(prompt_text),
                                  SamplingParams(temperature=0, max_tokens=max_tokens))
    return c.text


class Server:
    """`serve` in a subprocess (its own process group), on a free port, until stop()."""

    def __init__(self, path, ranks, extra=("--parallel", "3", "--nthreads", "1",
                                           "--max-seq-len", "256")):
        cmd = [sys.executable, "-m", "dllama_mpi", "serve", "--model", path, "--port", "0",
               *extra]
        if ranks > 1:
            cmd = [shutil.which("mpiexec") or "mpiexec", "-n", str(ranks), *cmd]
        env = dict(os.environ, DLLAMA_API_KEY=KEY)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True, env=env)
        self.err = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.err.append(line)
            m = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+/v1)", line)
            if m:
                self.url = m.group(1)
                return
        self.stop()
        raise AssertionError("the server did not start:\n" + "".join(self.err))

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        self.err.append(self.proc.stderr.read())
        return code


@pytest.mark.parametrize("ranks", [1, 2])
def test_serve_answers_what_the_engine_generates(tiny, ranks):
    server = Server(tiny, ranks)
    try:
        assert httpx.get(server.url + "/models").status_code == 401
        client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        r = client.completions.create(model="tiny", prompt="hello world", max_tokens=12,
                                      temperature=0)
        assert r.choices[0].text == _alone(tiny, "hello world", 12)
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "abc"}], max_tokens=10,
            temperature=0)
        assert chat.choices[0].message.content == _alone(tiny, "abc", 10, chat=True)
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "abc"}], max_tokens=10,
            temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == chat.choices[0].message.content
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=[], max_tokens=4)
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="tiny", prompt="x" * 400, max_tokens=4)
        assert "context" in str(bad.value)
        again = client.completions.create(model="tiny", prompt="hello world", max_tokens=12,
                                          temperature=0)
        assert again.choices[0].text == r.choices[0].text
        # the second request reused the first one's KV (prefix cache)
        assert again.usage.prompt_tokens_details.cached_tokens > 0
    finally:
        code = server.stop()
    assert code == 0, "".join(server.err)
    assert "Traceback" not in "".join(server.err)


def test_chat_keeps_the_conversation(tiny):
    p = subprocess.run([sys.executable, "-m", "dllama_mpi", "chat", "--model", tiny,
                        "--temperature", "0", "--steps", "8", "--nthreads", "1",
                        "--max-seq-len", "256"],
                       input="abc\nhello\n/exit\n", capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    first = _alone(tiny, "abc", 8, chat=True)
    assert first in p.stdout
    assert p.stdout.count("> ") >= 3 and "Traceback" not in p.stderr


def test_chat_says_when_the_context_is_full(tiny):
    """The first answer runs into the context end (the random model does not stop by
    itself); the next turn cannot fit: one error line, and the chat goes on after /reset."""
    p = subprocess.run([sys.executable, "-m", "dllama_mpi", "chat", "--model", tiny,
                        "--temperature", "0", "--steps", "500", "--nthreads", "1",
                        "--max-seq-len", "48"],
                       input="abc\nmore\n/reset\nabc\n", capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("reached the end of the context (48 tokens)") == 2, p.stdout
    assert p.stderr.count("error:") == 1 and "the context holds 48" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
