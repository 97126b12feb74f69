"""Replay a counted rule's selection on token dumps under each `selection.normalize` mode.

    python tools/replay_selection_norm.py RUN_DIR [RUN_DIR ...] [--rule q3] [--rho 0.1] \
        [--json out.json]

For every dump `RUN_DIR/token_dumps/step_*.npz` that holds all of its step's response
tokens (no `dump_tokens_max` sample), the rule's kept set is recomputed with the engine's
own `tip.select` on those tokens as one group (scope `microbatch` over the whole step: the
global scope of a one-rank run) under `batch` and under `absolute` (`running` needs the
run's moving average, which a dump does not hold). Per dump and mode: the share of the
step's forward KL on the kept tokens, whether the step's largest-forward-KL token is kept,
and its h^ (`tip.scores`). Used for docs/tip.md, "Normalisation at small batches".
Shapes: each dump's columns are [tokens].
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tip_megatron.tip import SelectionConfig, TokenSignals, select  # noqa: E402
from tip_megatron.tip.scores import compute_norm_stats, compute_scores  # noqa: E402
from tip_megatron.train.dump_file import TokenDump, read_token_dump  # noqa: E402

MODES = ("batch", "absolute")


def signals_of(dump: TokenDump) -> TokenSignals:
    n = dump.num_tokens
    return TokenSignals(entropy_norm=torch.as_tensor(dump.entropy_norm, dtype=torch.float32),
                        reverse_kl=torch.as_tensor(dump.reverse_kl, dtype=torch.float32),
                        forward_kl=torch.as_tensor(dump.forward_kl, dtype=torch.float32),
                        response_mask=torch.ones(n, dtype=torch.bool),
                        rollout_ids=torch.as_tensor(dump.rollout_id, dtype=torch.int64))


def replay(dump: TokenDump, rule: str, rho: float) -> dict:
    """{mode: {fkl_share, top_kept, top_h_hat, kept}} for one whole-step dump."""
    signals = signals_of(dump)
    fkl = dump.forward_kl.astype(np.float64)
    top = int(np.argmax(fkl))
    out = {}
    for mode in MODES:
        cfg = SelectionConfig(rule=rule, rho=rho, scope="microbatch", normalize=mode)
        kept = select(cfg, signals).numpy()
        h_hat = compute_scores(signals, compute_norm_stats(signals, "microbatch"), mode).entropy_hat
        out[mode] = {"fkl_share": float(fkl[kept].sum() / fkl.sum()) if fkl.sum() > 0 else float("nan"),
                     "top_kept": bool(kept[top]), "top_h_hat": float(h_hat[top]),
                     "kept": int(kept.sum())}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run dirs holding token_dumps/")
    p.add_argument("--rule", default="q3")
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--json", default=None, help="write the rows and the summary here")
    args = p.parse_args(argv)
    rows = []
    for run in args.runs:
        for path in sorted(Path(run, "token_dumps").glob("step_*.npz")):
            dump = read_token_dump(path)
            if dump.num_tokens != dump.num_response_tokens or dump.num_tokens == 0:
                continue  # a sample of the step: its normalisation would differ
            rows.append({"dump": str(path), "tokens": dump.num_tokens,
                         "max_forward_kl": float(dump.forward_kl.max()),
                         **replay(dump, args.rule, args.rho)})
    if not rows:
        print("error: no whole-step token dumps under the given run dirs "
              "(logging.dump_tokens_every, with dump_tokens_max >= the step's tokens)")
        return 1
    print(f"{'dump':<60}{'max fKL':>9}" + "".join(f"{m + ' share':>16}{m + ' top kept':>18}" for m in MODES))
    for r in rows:
        print(f"{r['dump'][-60:]:<60}{r['max_forward_kl']:>9.3f}"
              + "".join(f"{r[m]['fkl_share']:>16.2f}{str(r[m]['top_kept']):>18}" for m in MODES))
    summary = {m: {"mean_fkl_share": float(np.mean([r[m]["fkl_share"] for r in rows])),
                   "top_kept": sum(r[m]["top_kept"] for r in rows),
                   "top_h_hat_1": sum(r[m]["top_h_hat"] >= 1.0 for r in rows)} for m in MODES}
    summary["dumps"] = len(rows)
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"rule": args.rule, "rho": args.rho,
                                               "summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
