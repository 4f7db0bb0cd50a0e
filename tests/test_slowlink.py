"""The emulated slow link of bench/bench_slowlink.py: two ranks in two network namespaces
joined by a rate-limited veth really cross it (a 1 MiB Allgather at 100 Mbit/s takes at
least the 84 ms the bytes need). Needs root, `ip`, `tc`, `unshare` and mpiexec: skipped,
with the reason, where a namespace cannot be made."""
import importlib.util
import pathlib

import pytest


def _bench():
    path = pathlib.Path(__file__).parents[1] / "bench" / "bench_slowlink.py"
    spec = importlib.util.spec_from_file_location("bench_slowlink", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_allgather_crosses_the_rate_limited_link():
    bench = _bench()
    why = bench.can_run()
    if why:
        pytest.skip(f"cannot emulate a slow link here: {why}")
    with bench.slow_link("100mbit") as prefix:
        t = bench.allgather_times(prefix)
    assert len(set(t["hosts"])) == 2                  # two hostnames: hydra saw two hosts
    assert t[str(1 << 20)] >= (1 << 20) * 8 / 100e6   # >= 84 ms: the bytes crossed the link
    assert t[str(1 << 20)] < 1.0
