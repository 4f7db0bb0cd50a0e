"""Helpers for the MPI tests (fixtures are in conftest.py)."""


def agree(comm, ok, message: str = "") -> None:
    """The root computed the verdict `ok` (None elsewhere): every rank asserts it alike."""
    ok, message = comm.bcast_obj((ok, message))
    assert ok, message


def on_root(comm, make):
    """`make()` on the root only; every rank gets its result (e.g. a path it wrote). If it
    raises, every rank fails with the root's error instead of waiting for it."""
    result = error = None
    if comm.is_root:
        try:
            result = make()
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            error = f"on the root: {type(e).__name__}: {e}"
    result, error = comm.bcast_obj((result, error))
    if error is not None:
        raise RuntimeError(error)
    return result
