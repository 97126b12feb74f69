"""`tip-megatron study --rules`: every rule and mix is a cell (apps/study/cells.py)."""
import pytest

from tip_megatron.apps.study.cells import Cell, cells, parse_rule, run_dir


@pytest.mark.parametrize("spec, want", [
    ("all", ("all", 1.0, "none")),
    ("random@0.1", ("random", 0.1, "none")),
    ("teachability@0.05", ("teachability", 0.05, "none")),
    ("tip_soft", ("tip_soft", 1.0, "none")),
    ("propose_verify", ("propose_verify", 1.0, "none")),
    ("my_pkg.rules:my_rule", ("my_pkg.rules:my_rule", 1.0, "none")),
    ("mix:entropy_aware", ("all", 1.0, "entropy_aware")),
    ("q3@0.1+mix:entropy_aware", ("q3", 0.1, "entropy_aware")),
    ("tip_soft+mix:custom", ("tip_soft", 1.0, "custom")),
])
def test_specs(spec, want):
    assert parse_rule(spec) == want


@pytest.mark.parametrize("spec, match", [
    ("q3@0", "RULE@RHO"), ("q3@x", "RULE@RHO"), ("@0.1", "RULE@RHO"),
    ("mix:fancy", "mix:fancy is not a loss.mix"), ("q3@0.1+mix:", "is not a loss.mix"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_rule(spec)


def test_cells_carry_the_mix(tmp_path):
    grid = cells(["q3@0.1", "mix:entropy_aware", "tip_soft"], seeds=2)
    assert [c.name for c in grid[::2]] == ["q3@0.1", "all+mix:entropy_aware", "tip_soft@1"]
    assert grid[2] == Cell("all", 1.0, 0, "entropy_aware")
    assert grid[2].overrides == ["loss.mix=entropy_aware"] and grid[0].overrides == []
    assert run_dir(tmp_path, grid[3]) == tmp_path / "runs" / "all+mix:entropy_aware" / "seed_1"
