"""`python -m dllama_mpi`: an error on any rank ends the whole job, never a hang; SIGINT and
SIGTERM end it cleanly (runtime/interrupt.py)."""
from __future__ import annotations

import os
import sys
import traceback

from .launch import world_rank, world_size


def _abort(code: int) -> None:
    """Take every rank down: a rank left waiting in a collective would hang the job."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if world_size() > 1:
        try:
            from .comm import abort_world
            abort_world(code)
        except Exception:
            pass
    os._exit(code)


def main(argv=None) -> int:
    from .errors import DllamaError, StartupFailed
    from .runtime import interrupt
    interrupt.install()
    try:
        from .cli import main as cli_main
        code = cli_main(argv)
        interrupt.finish()            # done: a late signal must not break the exit
        return code
    except StartupFailed as e:        # the root already said why; every rank leaves
        interrupt.finish()
        return int(e.code or 1)
    except KeyboardInterrupt as e:    # outside an engine session (convert, info, ...)
        e = e if isinstance(e, interrupt.Interrupted) else interrupt.Interrupted(2)
        if world_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        _abort(e.exit_code)
    except DllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        _abort(1)
    except BrokenPipeError:           # the reader of stdout left (`| head`): as a killed pipe
        try:                          # writer would, quietly; no flush to the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        _abort(128 + 13)
    except Exception:
        print(f"rank {world_rank()}: internal error, aborting the job:", file=sys.stderr)
        traceback.print_exc()
        _abort(1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
