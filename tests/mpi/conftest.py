"""Fixtures shared by the MPI tests (`mpiexec -n N bash tests/mpi/run_rank.sh tests/mpi`):
the world communicator and a temporary directory every rank can see (the root makes it,
broadcasts its path and removes it once every rank is done)."""
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/


@pytest.fixture(scope="session")
def comm():
    from dllama_mpi.comm import Comm
    return Comm()


@pytest.fixture(scope="module")
def shared_dir(comm, request):
    name = request.module.__name__.rsplit(".", 1)[-1]
    path = tempfile.mkdtemp(prefix=f"dllama-{name}-") if comm.is_root else None
    path = comm.bcast_obj(path)
    yield path
    comm.barrier()
    if comm.is_root:
        shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """pytest-mpi ends every run with a 17-line "MPI Information" section (MPI's version and
    build flags) on each rank: the suite runs under mpiexec three times, and the pass/fail
    line is what matters. Its own flag for that section is turned off here (--with-mpi, which
    the tests need, keeps working)."""
    for plugin in config.pluginmanager.get_plugins():
        if type(plugin).__name__ == "MPIPlugin" and hasattr(plugin, "_is_testing_mpi"):
            plugin._is_testing_mpi = False
