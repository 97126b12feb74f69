"""`plot`'s per-teacher and per-domain curves: drawn from exactly the logged values, only
for runs that logged them."""
import pytest

pytest.importorskip("matplotlib")

from tip_megatron.apps.plots.curves import curve_figures  # noqa: E402


def _records():
    out = []
    for step in (1, 2, 3):
        r = {"step": step, "loss": 1.0 / step, "kept_fraction": 0.5}
        for name, k in (("math", 0.4), ("code", 0.6)):
            r.update({f"teacher/{name}/kept_fraction": k * step / 3, f"teacher/{name}/loss_share": k,
                      f"teacher/{name}/mean_reverse_kl_all": k / step})
        if step == 3:
            r.update({"eval/mean_at_k": 0.5, "eval/math/mean_at_k": 0.25, "eval/code/mean_at_k": 0.75})
        out.append(r)
    return out


def test_teacher_and_domain_curves_hold_the_logged_values():
    records = _records()
    figures, _ = curve_figures(records)
    assert {"teachers", "teachers_divergence", "eval_domains"} <= set(figures)
    lines = {line.get_gid(): line for name in ("teachers", "teachers_divergence", "eval_domains")
             for ax in figures[name].axes for line in ax.lines}
    for key in ("teacher/math/kept_fraction", "teacher/code/loss_share", "teacher/code/mean_reverse_kl_all"):
        assert list(lines[key].get_ydata()) == pytest.approx([r[key] for r in records])
    assert list(lines["eval/code/mean_at_k"].get_xdata()) == [3]
    assert list(lines["eval/code/mean_at_k"].get_ydata()) == [0.75]


def test_a_single_teacher_run_has_no_teacher_panels():
    figures, _ = curve_figures([{"step": 1, "loss": 1.0, "eval/mean_at_k": 0.5}])
    assert not {"teachers", "teachers_divergence", "eval_domains"} & set(figures)
