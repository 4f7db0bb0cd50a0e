"""Can this Python stack reach AMX tiles? (run by hand: python bench/amx_probe.py)

Intel's AMX (Sapphire Rapids and later Xeons) multiplies int8 tiles: ``tdpbssd`` adds a
16 x 64 int8 tile times a 16 x 64 int8 tile (the second in VNNI layout: rows of 4-byte groups)
into a 16 x 16 int32 tile. Using it takes three things, each checked here:

1. LLVM must select the instructions. llvmlite's LLVM declares them as intrinsics on tile
   register numbers (``llvm.x86.tileloadd64(i8 tile, ptr, i64 stride)``, ``llvm.x86.tdpbssd``,
   ``llvm.x86.ldtilecfg``...), which numba's ``@intrinsic`` can call like the VNNI ones: the
   probe compiles one tile product for ``sapphirerapids`` on any host and prints its assembly.
2. Linux must grant the process the tile data state: ``arch_prctl(ARCH_REQ_XCOMP_PERM,
   XFEATURE_XTILEDATA)`` (syscall 158, 0x1023, 18) once, before any tile instruction, or the
   first one faults (SIGILL).
3. On an AMX host the probe then runs the product (llvmlite's JIT, called through ctypes) and
   compares it with numpy's int32 product of the same bytes.

Prints one line per step and exits 0 where the host has no AMX (steps 2 and 3 are skipped and
say so), 1 if a step that could run failed.
"""
from __future__ import annotations

import ctypes
import sys

import llvmlite.binding as llvm
import numpy as np

IR = r"""
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilerelease()
declare void @llvm.x86.tilezero(i8)
declare void @llvm.x86.tileloadd64(i8, ptr, i64)
declare void @llvm.x86.tilestored64(i8, ptr, i64)
declare void @llvm.x86.tdpbssd(i8, i8, i8)
define void @tile_dot(ptr %cfg, ptr %a, ptr %b, ptr %c) {
  call void @llvm.x86.ldtilecfg(ptr %cfg)
  call void @llvm.x86.tilezero(i8 0)
  call void @llvm.x86.tileloadd64(i8 1, ptr %a, i64 64)
  call void @llvm.x86.tileloadd64(i8 2, ptr %b, i64 64)
  call void @llvm.x86.tdpbssd(i8 0, i8 1, i8 2)
  call void @llvm.x86.tilestored64(i8 0, ptr %c, i64 64)
  call void @llvm.x86.tilerelease()
  ret void
}
"""
SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


def tile_config() -> np.ndarray:
    """The 64-byte tile configuration: palette 1; tiles 0, 1, 2 of 16 rows x 64 bytes."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    colsb = cfg[16:48].view(np.uint16)
    colsb[:3] = 64
    cfg[48:51] = 16
    return cfg


def reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """tdpbssd's C[m, n] = sum over k of A[m, k] * B[k // 4, 4 n + k % 4], in int32."""
    bk = b.reshape(16, 16, 4).transpose(0, 2, 1).reshape(64, 16)    # [k, n]
    return a.astype(np.int32) @ bk.astype(np.int32)


def main() -> int:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(IR)
    module.verify()
    target = llvm.Target.from_triple(llvm.get_process_triple())
    spr = target.create_target_machine(cpu="sapphirerapids", opt=3)
    asm = spr.emit_assembly(module)
    found = [op for op in ("ldtilecfg", "tileloadd", "tdpbssd", "tilestored", "tilerelease") if op in asm]
    print(f"1. LLVM {'.'.join(map(str, llvm.llvm_version_info))} compiles the tile product for "
          f"sapphirerapids: {', '.join(found)}")
    if len(found) != 5:
        return 1
    features = llvm.get_host_cpu_features()
    if not (features.get("amx-tile") and features.get("amx-int8")):
        print(f"2. this CPU ({llvm.get_host_cpu_name()}) has no AMX-INT8: the permission "
              "request and the run are skipped")
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    print(f"2. arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) = {rc}"
          + (f" (errno {ctypes.get_errno()})" if rc else ""))
    if rc:
        return 1
    host = target.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                        features=features.flatten(), opt=3)
    engine = llvm.create_mcjit_compiler(module, host)
    engine.finalize_object()
    run = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 4)(engine.get_function_address("tile_dot"))
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (16, 64)).astype(np.int8)
    b = rng.integers(-128, 128, (16, 64)).astype(np.int8)
    c = np.zeros((16, 16), np.int32)
    cfg = tile_config()
    run(cfg.ctypes.data, a.ctypes.data, b.ctypes.data, c.ctypes.data)
    ok = np.array_equal(c, reference(a, b))
    print(f"3. tdpbssd on this CPU {'equals' if ok else 'DIFFERS FROM'} numpy's int32 product")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
