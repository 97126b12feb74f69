"""The memory plan (`tip-megatron plan`) against measured peaks of real short runs (CPU).

    python tools/plan_check.py --json runs/plan_check.json

Three sizes and one with the teacher on a rank of its own (tip_megatron/testing/memory.py
`SIZES + SEPARATE_SIZES`): random student/teacher checkpoints,
2 OPD steps each, every rank's resident-set rise over its level after set-up against the
plan's CPU total for the same config. Prints a table, writes JSON (docs/plan.md).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from tip_megatron.testing.memory import SEPARATE_SIZES, SIZES, format_rows, measure_sizes, write_json

ALL = SIZES + SEPARATE_SIZES


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--sizes", nargs="*", type=int, default=list(range(len(ALL))),
                   help="indices into SIZES + SEPARATE_SIZES (default all)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure_sizes(Path(tmp), [ALL[i] for i in args.sizes])
    print(format_rows(rows))
    print(f"load average {os.getloadavg()[0]:.1f}")
    write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
