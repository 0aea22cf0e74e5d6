"""The ``sentinel-node`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from node import bootstrap_cmd, demo, join, keygen, status
from node import simulate as simulate_cmd
from node.common import DHTDied

log = logging.getLogger("sentinel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentinel-node",
        description="SENTINEL swarm: pipeline-parallel training across untrusted peers, guarded by validators.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    simulate_cmd.add_parser(sub)
    keygen.add_parser(sub)
    bootstrap_cmd.add_parser(sub)
    join.add_parser(sub)
    status.add_parser(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (DHTDied, ConnectionError) as e:  # the node's own machinery failed mid-run: a supervisor restarts it
        print(f"sentinel-node {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # bad input, and files that cannot be read or written (a path that is a
        # directory, a folder that is a file, no permission): a line saying so, not a traceback
        print(f"sentinel-node {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
