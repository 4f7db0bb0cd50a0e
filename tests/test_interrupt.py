"""Signals inside the program (runtime/interrupt.py): outside a session they raise at once;
inside one they are recorded and the root acts at the next step boundary, so no rank leaves
a collective half done. (The real program under mpiexec: tests/faults.)"""
import signal

import numpy as np
import pytest

from dllama_mpi.comm import SerialComm
from dllama_mpi.config import RunConfig
from dllama_mpi.runtime import interrupt
from dllama_mpi.runtime.generation import generate
from dllama_mpi.runtime.startup import run_root, start
from tiny import write_tiny_gguf


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    monkeypatch.setattr(interrupt, "_received", None)
    monkeypatch.setattr(interrupt, "_defer", 0)
    monkeypatch.setattr(interrupt, "_interruptible", False)
    yield


def test_outside_a_session_a_signal_raises_at_once():
    with pytest.raises(interrupt.Interrupted) as e:
        interrupt._handler(signal.SIGTERM, None)
    assert e.value.exit_code == 143 and str(e.value) == "interrupted by SIGTERM"
    assert isinstance(e.value, KeyboardInterrupt)     # try/finally and except KeyboardInterrupt


def test_in_a_deferred_block_it_is_recorded_and_duplicates_ignored():
    with interrupt.deferred():
        interrupt._handler(signal.SIGINT, None)
        interrupt._handler(signal.SIGINT, None)      # the launcher's copy: ignored
    assert interrupt.pending() == signal.SIGINT
    with pytest.raises(interrupt.Interrupted, match="SIGINT"):
        interrupt.check()


def test_interruptible_raises_inside_a_session():
    interrupt.enter_session()
    with pytest.raises(interrupt.Interrupted):
        with interrupt.interruptible():
            interrupt._handler(signal.SIGTERM, None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("int") / "m.gguf"), "gqa6", "f32")


def test_the_root_stops_at_the_next_step_and_exits_128_plus_signal(model, capsys):
    s = start(SerialComm(), model, RunConfig(weights_float_type="f32", max_seq_len=64,
                                            nthreads=1), want_tokenizer=False)
    seen = []

    def body(session):
        def sample(logits):
            seen.append(len(seen))
            if len(seen) == 3:                       # a signal between two steps
                interrupt._handler(signal.SIGTERM, None)
            return int(np.argmax(logits))
        return generate(session.engine, [1, 2, 3], 20, sample, set(), 64)

    code = run_root(s, body)
    err = capsys.readouterr().err
    assert code == 143
    assert len(seen) == 3                            # no step after the signal
    assert err.count("error:") == 1 and "error: interrupted by SIGTERM" in err


def test_a_signal_during_start_up_ends_it_together(model, capsys, monkeypatch):
    from dllama_mpi.errors import StartupFailed
    import importlib
    startup = importlib.import_module("dllama_mpi.runtime.startup")
    real_load = startup.load_with_progress

    def load_and_signal(*a, **k):
        interrupt._handler(signal.SIGINT, None)     # recorded: loading is not interrupted
        return real_load(*a, **k)
    monkeypatch.setattr(startup, "load_with_progress", load_and_signal)
    with pytest.raises(StartupFailed) as e:
        start(SerialComm(), model, RunConfig(weights_float_type="f32", max_seq_len=64,
                                            nthreads=1), want_tokenizer=False, progress=False)
    assert e.value.code == 130 and e.value.message == "interrupted by SIGINT"
    assert capsys.readouterr().err.strip() == "error: interrupted by SIGINT"
