"""torchrun for `rlhf`: the same launch, but when a process fails its own one-sentence error is all
that is shown, and the launcher exits with that process's code (2 for bad input, 130 when stopped)."""

from __future__ import annotations

import logging
import sys


def main() -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # no per-failure log lines
    try:
        run(get_args_parser().parse_args(sys.argv[1:]))
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        sys.exit(next((c for c in codes if c > 0), 1))


if __name__ == "__main__":
    main()
