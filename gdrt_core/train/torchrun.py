"""`python -m gdrt_core.train.torchrun ARGS`: torch's launcher (`torch.distributed.run`, the `torchrun` command)
with ARGS, except that a stop by a signal ends it with exit code 128 + the signal's number and one line, not
torchrun's traceback.

torchrun turns SIGINT / SIGTERM into a `SignalException` that it raises through its agent after stopping the
workers. Ctrl-C reaches the launcher and `gdrt train` at once, and `gdrt train` then sends SIGTERM
(`deepspeed.stop_launcher`): the second signal arrived during the first one's shutdown and printed two
chained tracebacks under the stage's "interrupted" line.
"""

from __future__ import annotations

import signal
import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun()
    except SignalException as e:
        for sig in (signal.SIGINT, signal.SIGTERM):  # the workers are stopped: a further stop changes nothing
            signal.signal(sig, signal.SIG_IGN)
        print(f"torchrun: stopped by signal {int(e.sigval)}; its workers were stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
