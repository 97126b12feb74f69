"""The README's first command (`bash install.sh && tip-megatron quickstart`) gives the plots
it promises: matplotlib is in the default install (setup.py's install_requires, which
install.sh's `pip install -e .` installs), and the quickstart prints the paths it wrote."""
import json
import runpy
from pathlib import Path

import pytest

from tip_megatron.apps.quickstart.command import _plots

ROOT = Path(__file__).resolve().parents[2]


def test_matplotlib_is_in_the_default_install(monkeypatch):
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    runpy.run_path(str(ROOT / "setup.py"))
    assert any(r.startswith("matplotlib") for r in captured["install_requires"])
    assert captured["extras_require"]["plot"]  # the extra stays, for `pip install '...[plot]'`


def test_quickstart_prints_the_paths_of_the_plots_it_wrote(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    records = [{"step": s, "loss": 1.0 / s, "kept_fraction": 0.5, "q1_fraction_all": 0.1,
                "q1_fraction_kept": 0.2, "q3_fraction_all": 0.1, "q3_fraction_kept": 0.2,
                **({"eval/mean_at_k": s / 40} if s % 20 == 0 else {})} for s in range(10, 41, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _plots(str(tmp_path))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[quickstart] plots:"
    paths = [Path(line.strip()) for line in out[1:] if not line.strip().startswith("(")]
    assert paths and all(p.parent == tmp_path / "plots" for p in paths)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert sorted(paths) == sorted((tmp_path / "plots").glob("*.png"))
