"""torchrun for `rlhf`: the same launch, but when a process fails its own one-sentence error is all
that is shown, and the launcher exits with that process's code (2 for bad input, 130 when stopped)."""

from __future__ import annotations

import logging
import sys


def main() -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # no per-failure or per-signal log lines: torch sets each elastic module's logger level itself
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(sys.argv[1:]))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        sys.exit(next((c for c in codes if c > 0), 1))
    except SignalException:  # SIGINT / SIGTERM: the workers got it too, saved a checkpoint and stopped
        sys.exit(130)


if __name__ == "__main__":
    main()
