"""torchrun with the command lines' convention: a user error ends the job with its one line.

    python -m pkm_lm.torchrun --nproc_per_node 8 -m pkm_lm.train +experiment=12L_1mem

Takes torchrun's arguments and runs torchrun itself. Plain torchrun reports a failed process in
a ``ChildFailedError`` block with its own traceback and exits with status 1, whatever the
process's status. Here, when the first process to fail stopped on a user error (status 2, its
one line in torchrun's error file: ``pkm_lm.cli.report``), that line is printed once and the
launcher exits with status 2; any other failure keeps torchrun's report.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from pkm_lm.cli import USER_ERROR_STATUS


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        message = failure.message
        if failure.exitcode != USER_ERROR_STATUS or not str(message).startswith("error: "):
            raise
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_STATUS) from None


if __name__ == "__main__":
    main(sys.argv[1:])
