"""`python -m dllama_mpi`: an error on any rank ends the whole job, never a hang."""
from __future__ import annotations

import os
import sys
import traceback

from .launch import world_rank, world_size


def _abort(code: int) -> None:
    """Take every rank down: a rank left waiting in a collective would hang the job."""
    if world_size() > 1:
        try:
            from .comm import abort_world
            sys.stdout.flush()
            sys.stderr.flush()
            abort_world(code)
        except Exception:
            pass
    os._exit(code)


def main(argv=None) -> int:
    from .errors import DllamaError
    from .runtime.startup import StartupFailed
    try:
        from .cli import main as cli_main
        return cli_main(argv)
    except StartupFailed as e:        # the root already said why; every rank leaves
        return int(e.code or 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _abort(130)
    except DllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        _abort(1)
    except Exception:
        print(f"rank {world_rank()}: internal error, aborting the job:", file=sys.stderr)
        traceback.print_exc()
        _abort(1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
