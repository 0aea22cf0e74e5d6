"""What the mesh benchmarks that compare SentinelConfig overrides share: their `--compare`, `--jobs` and `--out`
options, the variants those give, and printing (and saving) the markdown table."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sentinel.config import SentinelConfig
from swarm.routing import ROUTINGS


def add_variant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compare", default=None, metavar="JSON", help="also run with these SentinelConfig overrides")
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--out", default=None, metavar="PATH", help="also write the table (markdown) here")
    p.add_argument("--routing", default="random", choices=ROUTINGS,
                   help="the mesh's routing of a step's micro-batches (MeshConfig.routing), for every variant")


def variants(args: argparse.Namespace) -> list[str]:
    """The defaults (``"{}"``), then ``--compare``'s overrides if given; a bad override fails here, not in a worker."""
    out = ["{}"] + ([args.compare] if args.compare else [])
    for v in out:
        SentinelConfig.from_dict(json.loads(v))
    return out


def emit(lines: list[str], out: str | None) -> None:
    """Print the table and, with ``--out``, save it."""
    table = "\n".join(lines)
    print(table)
    if out:
        Path(out).write_text(table + "\n")
