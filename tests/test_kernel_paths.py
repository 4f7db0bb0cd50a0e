"""The kernel paths (simd.KERNELS: vnni512, avxvnni, avx2, generic) of the row-tile matmuls.

Every path the host can run is checked against the numpy twin (exact integer block dots, f32
scales), and the SIMD paths against each other bit for bit: the VNNI kernels sum the same exact
integers (int32 lanes instead of int16) and scale them with the same f32 operations in the same
order as the AVX2 ones.  Forcing a path with DLLAMA_MPI_KERNELS is checked in a subprocess
(the variable is read once, at import).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from dllama_mpi import kernels as K
from dllama_mpi.errors import DllamaError
from dllama_mpi.kernels import simd
from dllama_mpi.kernels.matmul import _bound_matmul, _matmul_unchecked
from dllama_mpi.kernels.matmul_vnni import VNNI_TAGS
from dllama_mpi.quant import (Q40Matrix, Q41Matrix, Q80Matrix, dequantize_q40, dequantize_q41, dequantize_q80,
                              quantize_q40, quantize_q41, quantize_q80)

from test_kernels import naive_q80_q40, threads  # noqa: F401  (the fixture)

SIMD = [p for p in simd.HOST_PATHS if p != "generic"]
SHAPES = [(1, 32), (7, 96), (17, 160), (33, 576), (50, 1536), (16, 2048), (70, 2080), (600, 576)]
TOKENS = [1, 3, 4, 5, 8, 12, 13, 17, 40]


def _matrix(kind, wf):
    if kind == "q40":
        raw = quantize_q40(wf)
        return Q40Matrix.from_blocks(raw, "rows"), dequantize_q40(raw)
    if kind == "q41":
        raw = quantize_q41(wf)
        return Q41Matrix.from_blocks(raw), dequantize_q41(raw)
    raw = quantize_q80(wf)
    return Q80Matrix.from_blocks(raw), dequantize_q80(raw)


@pytest.mark.parametrize("kind", ["q40", "q41", "q80"])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_row_tile_paths(kind, rows, cols, threads):  # noqa: F811
    r = np.random.default_rng(rows * 11 + cols)
    w, wd = _matrix(kind, (r.standard_normal((rows, cols)) * 0.05 + 0.02).astype(np.float32))
    for T in TOKENS:
        xq = r.integers(-127, 128, (T, cols)).astype(np.int8)      # Q80 activations: |q| <= 127
        xd = (r.random((T, cols // 32)) * 0.1).astype(np.float32)
        ref, mag = naive_q80_q40(xq, xd, wd)
        outs = {}
        for path in SIMD + ["generic"]:
            out = np.full((T, rows), np.nan, np.float32)
            _matmul_unchecked(out, xq, xd, w, path)
            assert np.all(np.abs(out - ref) <= 1e-5 * mag + 1e-30), (path, T)
            outs[path] = out
        for path in SIMD[1:]:                     # the SIMD paths agree bit for bit
            np.testing.assert_array_equal(outs[path], outs[SIMD[0]], err_msg=f"{path} vs {SIMD[0]}, T={T}")


def test_extremes_paths():
    """the largest block sums: nibbles 0 / 15 and |xq| = 127 (int16 lanes would be at their edge)"""
    rows, cols, T = 33, 1024, 9
    r = np.random.default_rng(5)
    wf = np.where(r.random((rows, cols)) < 0.5, -8.0, 7.0).astype(np.float32) * 0.01
    for kind in ("q40", "q41", "q80"):
        w, wd = _matrix(kind, wf)
        xq = np.where(r.random((T, cols)) < 0.5, -127, 127).astype(np.int8)
        xd = np.full((T, cols // 32), 0.5, np.float32)
        ref, mag = naive_q80_q40(xq, xd, wd)
        for path in SIMD + ["generic"]:
            out = np.empty((T, rows), np.float32)
            _matmul_unchecked(out, xq, xd, w, path)
            assert np.all(np.abs(out - ref) <= 1e-5 * mag), (kind, path)


def test_path_names():
    assert simd.KERNELS in simd.HOST_PATHS and simd.HOST_PATHS[-1] == "generic"
    assert K.HAS_AVX2 == (simd.KERNELS in ("vnni512", "avxvnni", "avx2"))
    assert K.HAS_VNNI == (simd.KERNELS in ("vnni512", "avxvnni"))
    assert simd._choose_path(("avxvnni", "avx2", "generic"), "vnni512") == "avxvnni"
    assert simd._choose_path(("vnni512", "avxvnni", "avx2", "generic"), "avxvnni") == "avxvnni"
    assert simd._choose_path(("avx2", "generic"), "vnni512") == "avx2"      # never above the host
    assert simd._choose_path(("vnni512", "avx2", "generic"), "generic") == "generic"
    assert simd._choose_path(("vnni512", "avx2", "generic"), None) == "vnni512"
    assert simd._choose_path(("avx2", "generic"), "auto") == "avx2"
    with pytest.raises(DllamaError, match="DLLAMA_MPI_KERNELS"):
        simd._choose_path(("generic",), "sse9")
    w = Q41Matrix.from_blocks(quantize_q41(np.ones((16, 32), np.float32)))
    with pytest.raises(ValueError, match="this host runs"):      # no kernel the host lacks
        _bound_matmul(np.empty((1, 16), np.float32), np.zeros((1, 32), np.int8), np.ones((1, 1), np.float32),
                      w, "sse9")


def test_bound_kernel_names():
    w = Q41Matrix.from_blocks(quantize_q41(np.ones((64, 64), np.float32)))
    xq, xd, out = np.zeros((8, 64), np.int8), np.ones((8, 2), np.float32), np.empty((8, 64), np.float32)
    names = {p: _bound_matmul(out, xq, xd, w, p).func.__name__ for p in simd.HOST_PATHS}
    assert names["generic"] == "_rows_q4_generic"
    if "avx2" in names:
        assert names["avx2"].startswith("_rows_q4_") and "vnni" not in names["avx2"]
    for vnni in ("vnni512", "avxvnni"):
        if vnni in names:
            assert "vnni" in names[vnni]
            bound = _bound_matmul(out[:1], xq[:1], xd[:1], w, vnni)
            assert "vnni" in bound.func.__name__ and bound.args[0] is VNNI_TAGS[vnni]


_CHILD = """
import numpy as np
from dllama_mpi import kernels as K
from dllama_mpi.kernels import simd
from dllama_mpi.kernels.matmul import _bound_matmul
from dllama_mpi.quant import Q41Matrix, Q80Matrix, dequantize_q41, quantize_q41
r = np.random.default_rng(1)
wf = (r.standard_normal((40, 96)) * 0.05).astype(np.float32)
raw = quantize_q41(wf)
w = Q41Matrix.from_blocks(raw)
xq = r.integers(-127, 128, (5, 96)).astype(np.int8)
xd = (r.random((5, 3)) * 0.1).astype(np.float32)
out = np.empty((5, 40), np.float32)
K.matmul_q80_q41(out, xq, xd, w)
ref = np.zeros((5, 40))
wd = dequantize_q41(raw).astype(np.float64)
for t in range(5):
    xf = (xq[t].reshape(3, 32) * xd[t][:, None].astype(np.float64)).reshape(-1)
    ref[t] = wd @ xf
assert np.allclose(out, ref, rtol=1e-4, atol=1e-5), np.abs(out - ref).max()
print(simd.KERNELS, K.HAS_AVX2, _bound_matmul(out, xq, xd, w, True).func.__name__)
"""


@pytest.mark.parametrize("force", ["generic", "avx2"])
def test_forced_fallback(force, tmp_path):
    """DLLAMA_MPI_KERNELS forces a lower path (and never a higher one than the host's)."""
    env = dict(os.environ, DLLAMA_MPI_KERNELS=force)
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-2000:]
    path, has_avx2, name = res.stdout.split()
    want = force if force in simd.HOST_PATHS else simd.HOST_PATHS[0]
    assert path == want
    assert has_avx2 == str(want != "generic")
    assert ("generic" in name) == (want == "generic") and "vnni" not in name


def test_unknown_forced_path_is_one_error_line():
    """A DLLAMA_MPI_KERNELS the program does not know: one `error:` line, exit 1, no traceback."""
    env = dict(os.environ, DLLAMA_MPI_KERNELS="sse9")
    res = subprocess.run([sys.executable, "-m", "dllama_mpi", "inference", "--help"], env=env,
                         capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.splitlines() == ["error: DLLAMA_MPI_KERNELS='sse9': expected one of auto, "
                                       + ", ".join(simd.KERNEL_PATHS)]


def test_warmup_compiles_the_kernels_of_this_path():
    """every kernel the host's path runs (kernels._wanted) is compiled by the warmup: the VNNI
    ones on a VNNI host"""
    needs = {"q80act", "attention", "fused", "q4rows", "q8rows"}
    K.warmup(needs)
    for name, _, dispatchers, _ in K._steps(needs, skip_warmed=False):
        if name == "q80 activations":      # (lists both quantisers; _wanted does not sort those)
            continue
        for d in dispatchers:
            if K._wanted(d):
                assert d.signatures, (name, d.__name__)


@pytest.mark.parametrize("cls", [Q40Matrix, Q41Matrix, Q80Matrix])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_a_slice_with_no_columns_contributes_zero(cls, T):
    """A rank whose share of a split is empty (an expert's 96 units in 32-blocks over 4 ranks:
    the last rank holds none of them) has rows x 0 matrices: every path writes zeros."""
    w = cls.from_blocks(np.zeros((96, 0), np.uint8))
    assert (w.rows, w.cols, w.nb) == (96, 0, 0)
    for path in simd.HOST_PATHS:
        out = np.full((T, 96), 7.0, np.float32)
        _matmul_unchecked(out, np.zeros((T, 0), np.int8), np.zeros((T, 0), np.float32), w, path)
        assert not out.any(), (path, out)


_RETARGET = """
import re, sys
import numpy as np
from llvmlite import binding as llvm
from dllama_mpi.kernels.matmul import _matmul_unchecked
from dllama_mpi.kernels.matmul_vnni import _rows_q4_serial_vnni, _rows_q8_serial_vnni
from dllama_mpi import kernels as K
from dllama_mpi.quant import Q41Matrix, Q80Matrix, quantize_q41, quantize_q80
K.set_num_threads(1)
r = np.random.default_rng(0)
xq, xd, out = np.zeros((3, 64), np.int8), np.ones((3, 2), np.float32), np.empty((3, 64), np.float32)
for w in (Q41Matrix.from_blocks(quantize_q41(r.standard_normal((64, 64)).astype(np.float32))),
          Q80Matrix.from_blocks(quantize_q80(r.standard_normal((64, 64)).astype(np.float32)))):
    _matmul_unchecked(out, xq, xd, w, "avxvnni")          # compiled here (a fresh cache folder)
llvm.initialize_native_target()
llvm.initialize_native_asmprinter()
for cpu in sys.argv[1:]:
    tm = llvm.Target.from_triple(llvm.get_process_triple()).create_target_machine(cpu=cpu, opt=3)
    for kernel in (_rows_q4_serial_vnni, _rows_q8_serial_vnni):
        for ir_text in kernel.inspect_llvm().values():
            # the IR as compiled for this host, less its per-function CPU attributes
            ir_text = re.sub(r'"(target-cpu|target-features|tune-cpu)"="[^"]*"', "", ir_text)
            asm = tm.emit_assembly(llvm.parse_assembly(ir_text))
            print(cpu, kernel.__name__, asm.count("{vex}\\tvpdpbusd"), asm.count("%zmm"))
"""


@pytest.mark.skipif("avxvnni" not in simd.HOST_PATHS, reason="compiling the VNNI kernels needs a VNNI host")
def test_avxvnni_kernels_compile_for_cpus_without_avx512(tmp_path):
    """The avxvnni path is meant for CPUs with AVX-VNNI and no AVX-512 (Alder Lake and later
    Intel client cores, Sierra Forest E-core Xeons), which this host may not be: its kernels'
    LLVM IR, compiled for those CPUs, selects the VEX-encoded vpdpbusd and no 512-bit register
    (a CPU without the instruction aborts LLVM instead: hence a subprocess)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", _RETARGET, "alderlake", "sierraforest"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln.split() for ln in out.stdout.splitlines()]
    assert {(cpu, kernel) for cpu, kernel, *_ in lines} == {
        (cpu, k) for cpu in ("alderlake", "sierraforest") for k in ("_rows_q4_serial_vnni", "_rows_q8_serial_vnni")}
    for cpu, kernel, vex_dots, zmm in lines:
        assert int(vex_dots) > 0 and int(zmm) == 0, (cpu, kernel, vex_dots, zmm)
