"""What the launcher (mpiexec, mpirun, srun) told this process through its environment,
readable before MPI is initialised: for messages that must come from one rank only, and
for taking the whole job down when one rank fails."""
from __future__ import annotations

import os

_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def _first_int(names) -> int | None:
    for var in names:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def world_size() -> int:
    return _first_int(_SIZE_VARS) or 1


def world_rank() -> int:
    return _first_int(_RANK_VARS) or 0
