"""User rules by import path (`selection.rule: package.module:function`, tip/user_rules.py):
the documented example loads and computes its formula; bad rules (wrong shape, NaN, out of
range, non-deterministic, mutating, layout-dependent, failing import) are refused with one
line when the config is built, before any training. A template for testing your own rule:
`test_example_rule` (copy it, change the import path and the reference formula)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tip_megatron.testing.synthetic_signals import pack, synthetic_rollouts
from tip_megatron.tip import SelectionConfig, select_weighted

ROOT = Path(__file__).resolve().parents[2]


def test_example_rule(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    config = SelectionConfig(rule="examples.rules.confident_errors:confident_errors")
    assert config.weighted and config.signals_needed == ("teacher_rank",)
    signals = pack(synthetic_rollouts(seed=2, num_rollouts=5, max_response=20))
    kept, w = select_weighted(config, signals, step=4)
    # reference: the formula of the example, in numpy
    h, f = signals.entropy_norm.numpy(), signals.forward_kl.numpy()
    rank, resp = signals.teacher_rank.numpy(), signals.response_mask.numpy()
    want = 0.05 + 0.95 * (1 - h) * (1 - np.exp(-f))
    want = np.where(resp, np.clip(np.where(rank == 0, 0.5 * want, want), 0, 1), 0)
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-6)
    assert torch.equal(kept, signals.response_mask)  # every weight > 0 (floor 0.05)


BAD_RULES = {
    "wrong_shape": ("return torch.ones(3)", "must return \\[tokens\\] = \\["),
    "nan": ("return torch.full_like(signals.entropy_norm, float('nan'))", "NaN or inf"),
    "out_of_range": ("return signals.reverse_kl + 1.5", "weights must be in \\[0, 1\\]"),
    "not_float": ("return signals.response_mask", "must return a float tensor"),
    "random": ("return torch.rand(signals.num_tokens, dtype=torch.float64)", "not deterministic"),
    "mutating": ("signals.entropy_norm.mul_(0.5)\n    return signals.entropy_norm.clamp(0, 1)",
                 "modified its input signals"),
    "batch_dependent": ("h = signals.entropy_norm\n    return (h / h[signals.response_mask].max()).clamp(0, 1)",
                        "split into micro-batches"),
    "raises": ("raise RuntimeError('boom')", "raised RuntimeError: boom"),
}


@pytest.fixture()
def rules_module(tmp_path, monkeypatch):
    body = "import torch\n\n" + "\n\n".join(
        f"def {name}(signals, *, seed, step):\n    {code}\n"
        for name, (code, _) in BAD_RULES.items())
    (tmp_path / "my_bad_rules.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_bad_rules"
    sys.modules.pop("my_bad_rules", None)


@pytest.mark.parametrize("name", sorted(BAD_RULES))
def test_bad_rule_refused_in_one_line(rules_module, name):
    with pytest.raises(ValueError, match=BAD_RULES[name][1]) as err:
        SelectionConfig(rule=f"{rules_module}:{name}")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"selection.rule='{rules_module}:{name}'")


def test_unloadable_paths(rules_module):
    for path, match in (("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
                        (f"{rules_module}:missing", "has no function 'missing'"),
                        (":f", "'package.module:function'")):
        with pytest.raises(ValueError, match=match):
            SelectionConfig(rule=path)
    with pytest.raises(ValueError, match="selection.rho"):
        SelectionConfig(rule="examples.rules.confident_errors:confident_errors", rho=0.5)
