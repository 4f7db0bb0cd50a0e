"""Start-up's stage lines (runtime/progress.py) and the kernels a run compiles (kernels.needed,
kernels.warmup): what a new user sees in the first minute."""
import io

import pytest

from dllama_mpi import kernels
from dllama_mpi.comm import SerialComm
from dllama_mpi.runtime import progress


def test_needed_kernels_follow_the_run():
    # SmolLM2 on one rank: Q41 layers (576 / 1536 columns), the 8-bit output matrix
    smol = kernels.needed([("q41", 576), ("q41", 576), ("q41", 1536), ("q80", 576)], 1536, 2)
    fused_tokens = {"q4tokens"} if kernels.KERNELS in ("vnni512", "avx2") else set()   # not portable
    assert smol == {"q80act", "attention", "fused", "q4rows", "q8rows"} | fused_tokens
    # a 1.1B Q4_0 model: every width takes the row tiles now (ROW_TILE_MAX_COLS), no slab
    # kernel; its 8192-unit FFN on 2 threads splits silu·mul over them
    big = kernels.needed([("q40", 2048), ("q40", 8192), ("q40", 2048)], 8192, 2)
    assert {"q4rows", "silu_split", "fused"} <= big and not {"q40slab", "q8rows"} & big
    assert "q4rows" in kernels.needed([("q40", 2048), ("q40", 1024)], 1024, 2)
    assert "silu_split" not in kernels.needed([("q40", 2048)], 8192, 1)
    f32 = kernels.needed([("f32", 96), ("f32", 160)], 160, 1, qk_norm=True)
    assert f32 == {"q80act", "attention", "f32", "qk_norm"}


def test_warmup_runs_only_the_steps_asked_and_reports_them(monkeypatch):
    monkeypatch.setattr(kernels, "_WARMED", set())
    calls = []
    kernels.warmup({"q80act", "attention"}, progress=lambda *a: calls.append(a))
    assert [c[2] for c in calls] == ["q80 activations", "attention block", ""]
    assert [c[:2] for c in calls] == [(0, 2), (1, 2), (2, 2)]
    assert kernels.warmup_is_cached({"q80act", "attention"}) == (True, 0)
    # once warmed in a process, a second start-up runs nothing again
    again = []
    kernels.warmup({"q80act", "attention"}, progress=lambda *a: again.append(a))
    assert again == [(0, 0, "")]


def test_every_step_has_a_name_an_estimate_and_kernels():
    steps = kernels._steps(kernels.ALL_NEEDS, skip_warmed=False)
    assert len({s[0] for s in steps}) == len(steps)
    assert all(s[1] > 0 and s[2] for s in steps)


def test_plain_counter_prints_lines_not_a_bar():
    out = io.StringIO()
    stages = progress.Stages(True, out)
    c = stages.counter("loading", 4, "tensors", every=0)
    for _ in range(4):
        c.update(1)
    c.close()
    assert out.getvalue().splitlines() == [f"loading: {i}/4 tensors ({25 * i}%, 0 s)" for i in (1, 2, 3)]
    quiet = io.StringIO()
    progress.Stages(False, quiet).counter("x", 3, "y").update(3)
    progress.Stages(False, quiet).line("nothing")
    assert quiet.getvalue() == ""


def test_compile_stage_says_first_run_with_an_estimate_and_counts(monkeypatch):
    """A cold cache: one line with the estimate and the cache's place, a line per step done
    (stderr is not a terminal here), then the time it took."""
    out = io.StringIO()
    monkeypatch.setattr(kernels, "_WARMED", set())          # as in a new process
    monkeypatch.setattr(kernels, "warmup_is_cached", lambda needs: (False, 21.0))
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere/numba")
    monkeypatch.setattr(progress.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    progress.warm_kernels(SerialComm(), {"q80act", "attention"}, progress.Stages(True, out),
                          "q41 weights, q80 output")
    lines = out.getvalue().splitlines()
    assert lines[0] == ("compiling numba kernels for q41 weights, q80 output: first run only, "
                        "about 21 s; cached afterwards in /somewhere/numba")
    monkeypatch.setattr(progress.os, "getloadavg", lambda: (9.5, 9.0, 9.0))
    monkeypatch.setattr(progress, "cores", lambda: 2)
    busy = io.StringIO()
    progress.warm_kernels(SerialComm(), {"q80act"}, progress.Stages(True, busy))
    assert "about 21 s on a free core (load here 9.5 on 2 cores: longer);" in busy.getvalue()
    assert lines[1].startswith("compiling kernels: 1/2 steps (50%,") and "q80 activations done" in lines[1]
    assert lines[-1].startswith("kernels compiled in ")
    # a warm cache: nothing to say
    monkeypatch.setattr(kernels, "warmup_is_cached", lambda needs: (True, 0))
    quiet = io.StringIO()
    progress.warm_kernels(SerialComm(), {"q80act"}, progress.Stages(True, quiet))
    assert quiet.getvalue() == ""


def test_numba_cache_defaults_to_the_user_cache(tmp_path):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["DLLAMA_MPI_CACHE"] = str(tmp_path)
    code = "import dllama_mpi, numba; print(numba.config.CACHE_DIR)"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    import dllama_mpi
    assert p.stdout.strip() == str(tmp_path / "numba" / dllama_mpi._kernels_digest()), p.stderr
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.stdout.strip() == str(tmp_path / "mine"), p.stderr


def test_numba_cache_folder_changes_with_any_kernel_source(tmp_path):
    """A kernel inlines helpers from other files, which numba's own check does not see: the
    cache folder is named by a digest of every kernel and quant source."""
    import os
    import shutil
    import dllama_mpi
    here = os.path.dirname(dllama_mpi.__file__)
    for sub in ("kernels", "quant"):
        shutil.copytree(os.path.join(here, sub), tmp_path / sub,
                        ignore=shutil.ignore_patterns("__pycache__"))
    first = dllama_mpi._kernels_digest(str(tmp_path))
    assert first == dllama_mpi._kernels_digest()
    with open(tmp_path / "kernels" / "simd.py", "a") as f:
        f.write("\n# an edit of a helper only\n")
    assert dllama_mpi._kernels_digest(str(tmp_path)) != first


@pytest.mark.parametrize("asked,expect", [(0, "2 cores / 1 rank here"), (3, "--nthreads")])
def test_first_line_says_ranks_threads_and_why(monkeypatch, asked, expect):
    monkeypatch.setattr(progress, "cores", lambda: 2)
    line = progress.first_line(1, 1, asked or 2, asked)
    assert line.startswith("dllama_mpi: 1 rank x ") and expect in line


def test_first_line_warns_when_the_node_is_oversubscribed(monkeypatch):
    monkeypatch.setattr(progress, "cores", lambda: 2)
    line = progress.first_line(4, 4, 1, 0)
    assert line.startswith("dllama_mpi: 4 ranks x 1 thread (2 cores / 4 ranks here)")
    assert "\nnote: 4 ranks x 1 thread on 2 cores: oversubscribed" in line
    assert "note" not in progress.first_line(2, 2, 1, 0)
