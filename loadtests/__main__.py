"""``python -m splitgate.loadtests``: the same as ``splitgate loadtest``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from splitgate.loadtests._options import add_arguments, run_from_args
from splitgate.errors import SplitgateError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m splitgate.loadtests", description="Locust load test of the splitgate cloud tier (OIP over gRPC)."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except (SplitgateError, FileNotFoundError, TimeoutError) as exc:
        print(f"loadtests: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
