"""jobs/batch.sbatch under a real SLURM (brought up by tests/slurm_ci.sh, see slurm_up.sh):

1. sbatch --wait with 2 tasks (LAUNCHER=mpiexec: hydra starts the ranks through srun) on a
   small prompts file: one record per request, the greedy texts of a local run;
2. a job with a two-minute time limit and --signal=B:USR1@30 on a file too big for one run
   (LAUNCHER=srun --mpi=pmi2): SLURM signals it mid-run, the batch exits 75, the script
   requeues the job, the next runs resume; sbatch --wait returns when the job is done, and the
   output holds exactly one record per request.

Without a SLURM these tests are skipped, with the reason (slurm_up.sh writes why it could not
bring one up)."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
from test_batch_cli import by_id, text_of, write_tiny  # noqa: E402

SLURM_DIR = os.environ.get("DLLAMA_SLURM_DIR", "/tmp/dllama-slurm")
EXTRA = ("--temperature 0 --max-seq-len 64 --weights-float-type f32 --ignore-eos "
         "--progress-seconds 5")
STEPS = 24


def _skip_reason() -> str | None:
    if not os.environ.get("SLURM_CONF"):
        try:
            with open(os.path.join(SLURM_DIR, "skip_reason")) as f:
                return f"SLURM could not be brought up: {f.read().strip()}"
        except OSError:
            return "no SLURM is up (SLURM_CONF is not set): bash tests/slurm_ci.sh brings one up"
    if shutil.which("sbatch") is None:
        return "sbatch is not installed"
    p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if p.returncode != 0 or not p.stdout.strip():
        return f"SLURM does not answer (sinfo: {p.stderr.strip() or 'no nodes'})"
    return None


_reason = _skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""),
              pytest.mark.timeout(2400)]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def local_batch(tiny, inp, out) -> subprocess.CompletedProcess:
    """The same batch under a plain mpiexec -n 2 (also warms the numba cache the jobs use)."""
    cmd = [shutil.which("mpiexec") or "mpiexec", "-n", "2", sys.executable, "-m", "dllama_mpi",
           "batch", "--model", tiny, "--input", str(inp), "--output", str(out),
           "--steps", str(STEPS), "--max-batch", "8", *EXTRA.split()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=REPO, env=_env())
    assert p.returncode == 0, p.stderr
    return p


def sbatch(log, timeout, *options, **env) -> subprocess.CompletedProcess:
    """sbatch --wait jobs/batch.sbatch from the repository; its exit code is the job's."""
    exports = ",".join(["ALL"] + [f"{k}={v}" for k, v in env.items()])
    cmd = ["sbatch", "--wait", f"--output={log}", f"--export={exports}", *options,
           "jobs/batch.sbatch"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=_env(VENV=os.path.dirname(os.path.dirname(sys.executable))))


def prompts(path, n: int) -> str:
    path.write_text("".join(f"request {i}: tell me about the number {i * 7}\n" for i in range(n)))
    return str(path)


def _fresh(name: str) -> pathlib.Path:
    """A folder for one test beside the SLURM's own (not pytest's basetemp: other pytest
    sessions prune old ones while a job may still be running)."""
    folder = pathlib.Path(SLURM_DIR) / "work" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def tiny():
    return write_tiny(_fresh("model") / "tiny.gguf")


@pytest.fixture
def tmp_path(request):
    return _fresh(request.node.name)


def test_batch_job_with_two_tasks(tiny, tmp_path):
    inp = prompts(tmp_path / "prompts.txt", 16)
    reference = tmp_path / "reference.jsonl"
    local_batch(tiny, inp, reference)
    out, log = tmp_path / "out.jsonl", tmp_path / "job.log"
    p = sbatch(log, 900, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
               MODEL=tiny, INPUT=inp, OUTPUT=out, STEPS=STEPS, MAX_BATCH=4, LAUNCHER="mpiexec",
               EXTRA=EXTRA)
    text = log.read_text() if log.exists() else ""
    assert p.returncode == 0, p.stderr + text
    assert "2 ranks x 1 threads" in text and "16 ok, 0 failed" in text, text
    got = by_id(out)
    assert {k: text_of(v) for k, v in got.items()} == \
        {k: text_of(v) for k, v in by_id(reference).items()}


def test_time_limit_signal_requeue_resume(tiny, tmp_path):
    # Size the file from this machine's speed: ~200 s of work. SLURM checks time limits every
    # 30 s and sends --signal up to a period early: with --time=2 and @30, USR1 comes 60-90 s
    # into a run, so one run cannot do it all and a few do.
    calibration = prompts(tmp_path / "calibration.txt", 120)
    p = local_batch(tiny, calibration, tmp_path / "calibration.jsonl")
    loop = float(re.search(r"tokens in ([\d.]+) s", p.stderr).group(1))
    n = max(400, min(40000, int(200 / (loop / 120))))
    inp = prompts(tmp_path / "prompts.txt", n)
    out, log = tmp_path / "out.jsonl", tmp_path / "job.log"
    p = sbatch(log, 2100, "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
               "--time=2", "--signal=B:USR1@30", "--requeue", "--open-mode=append",
               MODEL=tiny, INPUT=inp, OUTPUT=out, STEPS=STEPS, MAX_BATCH=8, LAUNCHER="srun",
               STOP_TIMEOUT=10, MAX_REQUEUES=30, EXTRA=EXTRA)
    text = log.read_text() if log.exists() else ""
    assert p.returncode == 0, p.stderr + text
    runs = [int(r) for r in re.findall(r"run (\d+) on", text)]
    assert len(runs) >= 2 and "SIGUSR1" in text and "requeueing job" in text, text
    assert "exit code 75" in text
    got = by_id(out)                                   # exactly one record per custom_id
    assert sorted(got) == sorted(f"line-{i}" for i in range(1, n + 1))
    assert all(r["error"] is None for r in got.values())
    # the first requests' greedy texts are those of a local, uninterrupted run
    head = tmp_path / "head.txt"
    head.write_text("".join(open(inp).readlines()[:24]))
    local_batch(tiny, head, tmp_path / "head.jsonl")
    want = {k: text_of(v) for k, v in by_id(tmp_path / "head.jsonl").items()}
    assert {k: text_of(got[k]) for k in want} == want
    print(f"{n} requests, {len(runs)} runs; log:\n{text}")
