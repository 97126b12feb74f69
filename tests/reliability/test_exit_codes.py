"""Exit codes and the one error line, as the user sees them (slow tier: real torchrun jobs).

- `tip-megatron train` returns the ranks' code, not torchrun's (torchrun returns 1 after
  any failed worker, and after a signal however its workers ended): 3 when the run
  diverged, 0 after a SIGTERM save, 2 for a bad input found in the ranks; the rank's
  one line is the LAST line of the output, after torchrun's failure dump, and is printed
  once.
- Under a bare torchrun the line is printed exactly once whatever order the ranks fail in
  (the first rank to fail prints it before torchrun kills the others), under CPU load.
"""
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from _reliability_assets import make_assets, overrides
from tip_megatron.checkpoint.layout import list_checkpoints
from tip_megatron.testing.distributed import free_port

from signal_helpers import ENV, gone, kill_leftovers, spawn, tree, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("exit_codes"))


def _last_line(text: str) -> str:
    return [x for x in text.splitlines() if x.strip()][-1]


def test_diverged_run_exits_3_with_its_line_last(assets, tmp_path):
    args = overrides(assets, **{"optim.lr": 1e10, "optim.warmup_steps": 2, "train.steps": 8,
                                "train.max_skipped_steps": 2, "parallel.tp": 2,
                                "checkpoint.dir": tmp_path / "ck", "checkpoint.save_every": 1})
    proc = subprocess.run([sys.executable, "-m", "tip_megatron.apps.cli", "train", *args], env=ENV,
                          capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3, text[-3000:]
    assert re.match(r"tip-megatron train: stopped at step \d+: 2 consecutive updates skipped",
                    _last_line(proc.stderr)), proc.stderr[-3000:]
    assert text.count("tip-megatron train: stopped at step") == 1, text[-3000:]
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == ["step_000001"]


def test_sigterm_save_exits_0(assets, tmp_path):
    """SIGTERM to the command: the ranks save at the next step and exit 0; so does it
    (torchrun, signalled, returns 1)."""
    ckdir, log = tmp_path / "ck", tmp_path / "log.txt"
    args = overrides(assets, **{"train.steps": 400, "checkpoint.dir": ckdir, "checkpoint.save_every": 100})
    cmd = spawn([sys.executable, "-m", "tip_megatron.apps.cli", "train", "--nproc", "2", *args], log)
    seen: set[int] = set()
    metrics = ckdir / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, cmd, 600,
                   seen, "step 2", log)
        cmd.send_signal(signal.SIGTERM)
        cmd.wait(timeout=120)
    finally:
        kill_leftovers({p for p in seen if not gone(p)})
    text = log.read_text()
    assert cmd.returncode == 0, text[-3000:]
    saved = list_checkpoints(ckdir)
    assert len(saved) == 1 and f"received SIGTERM: stopped after step" in text, text[-3000:]
    assert all(gone(p) for p in seen)


def test_a_bad_input_found_in_the_ranks_exits_2_with_one_line_last(assets, tmp_path):
    """The launcher's own preflight skipped (`run_local` called directly, as for an error
    only a rank can find): the ranks' ValueError comes back as exit 2 and one line, last."""
    script = ("import sys; from tip_megatron.apps.launch import run_local; "
              "sys.exit(run_local(2, 'tip_megatron.train', sys.argv[1:]))")
    args = overrides(assets, **{"data.prompts": f"[{tmp_path / 'none.jsonl'}]"})
    proc = subprocess.run([sys.executable, "-c", script, *args], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _last_line(proc.stderr).startswith("error: data.prompts[0]="), proc.stderr[-3000:]
    assert proc.stderr.count("error: data.prompts[0]=") == 1, proc.stderr[-3000:]


# ------------------------------------------------------------------ bare torchrun
#: rank 0 sleeps before it runs the real entry point, so rank 1 fails first and torchrun
#: kills rank 0 before it could print (the order a loaded machine produced by chance).
_LATE_RANK0 = textwrap.dedent("""
    import os, sys, time
    if os.environ["RANK"] == "0":
        time.sleep(float(os.environ["RANK0_DELAY"]))
    from tip_megatron.train.main import _main_module
    sys.exit(_main_module())
""")


def _busy(n):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


@pytest.mark.parametrize("rank0_delay", [0.0, 20.0], ids=["together", "rank1_first"])
def test_bare_torchrun_prints_the_line_once_whatever_order_under_load(assets, tmp_path, rank0_delay):
    entry = tmp_path / "entry.py"
    entry.write_text(_LATE_RANK0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(entry),
           *overrides(assets, **{"data.prompts": f"[{tmp_path / 'none.jsonl'}]"})]
    busy = _busy(3)  # a loaded machine: the ranks' order is anyone's
    try:
        proc = subprocess.run(cmd, env=dict(ENV, RANK0_DELAY=str(rank0_delay)), capture_output=True,
                              text=True, timeout=600)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert text.count("error: data.prompts[0]=") == 1, text[-3000:]
