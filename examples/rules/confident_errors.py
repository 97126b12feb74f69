"""An example user selection rule (docs/tip.md, "Writing a rule"):

    selection.rule: examples.rules.confident_errors:confident_errors

Weights every response token by how confidently the student disagrees with the teacher:
w = (1 - h) * (1 - exp(-d_fwd)), with h = H(P_S) / log|V| and d_fwd = KL(P_T || P_S), plus a
floor of 0.05 so that no token is ignored entirely; the teacher's argmax tokens (teacher
rank 0 of the sampled token) weigh half. Pure per-token arithmetic: deterministic, the
same in any layout, inputs untouched.
"""
import torch


def confident_errors(signals, *, seed: int, step: int) -> torch.Tensor:
    h = signals.entropy_norm.double()
    d_fwd = signals.forward_kl.double()
    w = 0.05 + 0.95 * (1.0 - h) * -torch.expm1(-d_fwd)
    w = torch.where(signals.teacher_rank == 0, 0.5 * w, w)
    return w.clamp(0.0, 1.0)


confident_errors.signals = ("teacher_rank",)  # optional signals this rule reads
