"""A real batch under `mpiexec -n 2` stopped mid-run — SIGUSR1 and SIGTERM (what SLURM sends
before the time limit: exit code 75, resumable) and SIGKILL of the whole job — then rerun with
the same command: exactly one record per custom_id, and the greedy texts of an uninterrupted
run."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_batch_cli import F32, by_id, text_of, write_tiny

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(shutil.which("mpiexec") is None, reason="no mpiexec")]

N = 48
EXIT_RESUMABLE = 75


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signals")
    tiny = write_tiny(folder / "tiny.gguf")
    inp = folder / "prompts.txt"
    inp.write_text("".join(f"request {i}: tell me about the number {i * 7}\n" for i in range(N)))
    return tiny, inp


def command(tiny, inp, out, *extra):
    return [shutil.which("mpiexec"), "-n", "2", sys.executable, "-m", "dllama_mpi", "batch",
            "--model", tiny, "--input", str(inp), "--output", str(out), *F32,
            "--temperature", "0", "--steps", "24", "--ignore-eos", "--max-batch", "4",
            "--progress-seconds", "1", *extra]


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory):
    """The uninterrupted run's texts by custom_id."""
    out = tmp_path_factory.mktemp("reference") / "out.jsonl"
    p = subprocess.run(command(*job, out), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    records = by_id(out)
    assert len(records) == N
    return {k: text_of(v) for k, v in records.items()}


def lines_in(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def start_and_wait(cmd, out, log, at_least: int):
    """Start the job in its own process group; return it once `out` holds at_least records."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while lines_in(out) < at_least:
        assert proc.poll() is None, open(log).read()
        assert time.monotonic() < deadline, "no records after 300 s"
        time.sleep(0.05)
    return proc


def resume_and_check(job, out, reference):
    p = subprocess.run(command(*job, out), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "already done" in p.stderr
    records = by_id(out)                        # asserts one record per custom_id
    assert {k: text_of(v) for k, v in records.items()} == reference
    assert all(r["error"] is None for r in records.values())


@pytest.mark.parametrize("sig,extra", [(signal.SIGUSR1, ("--stop-timeout", "30")),
                                       (signal.SIGTERM, ("--stop-timeout", "0"))])
def test_stop_signal_exits_resumable_then_resumes(job, reference, tmp_path, sig, extra):
    out, log = tmp_path / "out.jsonl", tmp_path / "log"
    proc = start_and_wait(command(*job, out, *extra), out, log, at_least=3)
    os.kill(proc.pid, sig)                      # to mpiexec, which forwards it to every rank
    assert proc.wait(timeout=120) == EXIT_RESUMABLE, open(log).read()
    stderr = open(log).read()
    assert signal.Signals(sig).name in stderr and "rerun the same command" in stderr
    assert "Traceback" not in stderr
    done = lines_in(out)
    assert 3 <= done < N
    resume_and_check(job, out, reference)


def _tree(pid: int) -> list[int]:
    """pid and its descendants (hydra's proxy and the ranks run in sessions of their own, so
    a process group does not hold them)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += parents.get(p, [])
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_of_the_whole_job_then_rerun(job, reference, tmp_path):
    out, log = tmp_path / "out.jsonl", tmp_path / "log"
    proc = start_and_wait(command(*job, out), out, log, at_least=5)
    pids = _tree(proc.pid)
    assert len(pids) >= 4                       # mpiexec, its proxy, two ranks
    for pid in pids:                            # every process of the job at once, as SLURM
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert lines_in(out) < N
    resume_and_check(job, out, reference)


def test_signal_while_loading_exits_resumable(job, tmp_path):
    """A stop signal before the first request: nothing done, exit 75, no traceback."""
    out, log = tmp_path / "out.jsonl", tmp_path / "log"
    proc = subprocess.Popen(command(*job, out), stdout=subprocess.DEVNULL,
                            stderr=open(log, "w"), start_new_session=True)
    deadline = time.monotonic() + 120
    while "requests in" not in open(log).read():      # the root has read the input: loading
        assert proc.poll() is None and time.monotonic() < deadline, open(log).read()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_RESUMABLE, open(log).read()
    stderr = open(log).read()
    assert "Traceback" not in stderr and "0 ok, 0 failed" in stderr
    assert lines_in(out) == 0
