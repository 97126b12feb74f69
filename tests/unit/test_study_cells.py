"""`tip-megatron study --rules`: every rule and mix is a cell (apps/study/cells.py)."""
import pytest

from tip_megatron.apps.study import cells as cells_module
from tip_megatron.apps.study.cells import Cell, cells, parse_rule, run_dir


@pytest.mark.parametrize("spec, want", [
    ("all", ("all", 1.0, "none", "none")),
    ("random@0.1", ("random", 0.1, "none", "none")),
    ("teachability@0.05", ("teachability", 0.05, "none", "none")),
    ("tip_soft", ("tip_soft", 1.0, "none", "none")),
    ("propose_verify", ("propose_verify", 1.0, "none", "none")),
    ("my_pkg.rules:my_rule", ("my_pkg.rules:my_rule", 1.0, "none", "none")),
    ("mix:entropy_aware", ("all", 1.0, "entropy_aware", "none")),
    ("q3@0.1+mix:entropy_aware", ("q3", 0.1, "entropy_aware", "none")),
    ("tip_soft+mix:custom", ("tip_soft", 1.0, "custom", "none")),
    ("q3@0.1+norm:running", ("q3", 0.1, "none", "running")),
    ("q3@0.1+norm:absolute", ("q3", 0.1, "none", "absolute")),
    ("soft_or@0.5+mix:entropy_aware+norm:batch", ("soft_or", 0.5, "entropy_aware", "batch")),
])
def test_specs(spec, want):
    assert parse_rule(spec) == want


@pytest.mark.parametrize("spec, match", [
    ("q3@0", "RULE@RHO"), ("q3@x", "RULE@RHO"), ("@0.1", "RULE@RHO"),
    ("mix:fancy", "mix:fancy is not a loss.mix"), ("q3@0.1+mix:", "is not a loss.mix"),
    ("q3@0.1+norm:ema", "norm:ema is not a selection.normalize; accepted: norm:batch, "
                        "norm:running, norm:absolute"),
    ("q3@0.1+norm:running+mix:entropy_aware", "last, after the rule and any mix"),
    ("q3@x+norm:running", "'q3@x\\+norm:running': expected RULE@RHO"),
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


def test_normalize_modes_are_the_configs():
    from tip_megatron.tip.rules import NORMALIZE_MODES

    assert cells_module.NORMALIZE_MODES == NORMALIZE_MODES


def test_cells_carry_the_normalisation(tmp_path):
    grid = cells(["q3@0.1", "q3@0.1+norm:running", "q3@0.1+mix:entropy_aware+norm:absolute"], seeds=1)
    assert [c.name for c in grid] == ["q3@0.1", "q3@0.1+norm:running",
                                      "q3@0.1+mix:entropy_aware+norm:absolute"]
    assert [c.overrides for c in grid] == [
        [], ["selection.normalize=running"],
        ["loss.mix=entropy_aware", "selection.normalize=absolute"]]
    assert run_dir(tmp_path, grid[1]) == tmp_path / "runs" / "q3@0.1+norm:running" / "seed_0"


def test_a_cells_normalisation_reaches_its_run(monkeypatch, tmp_path):
    """The embedded study hands the cell's keys to its quickstart run (before the user's)."""
    from tip_megatron.apps.study import command

    seen = []
    monkeypatch.setattr(command, "run_local", lambda nproc, module, args: seen.append(args) or 0)
    cell = cells(["q3@0.1+norm:absolute"], seeds=1)[0]
    assert command.run_cell(cell, tmp_path, steps=4, tp=1, overrides=["train.lr=1e-4"], task="chain") == 0
    args = seen[0]
    assert args[args.index("--rule") + 1] == "q3" and args[args.index("--rho") + 1] == "0.1"
    assert args.index("selection.normalize=absolute") < args.index("train.lr=1e-4")


def test_a_task_with_several_teachers_adds_a_teacher_axis(monkeypatch, tmp_path):
    """`--teachers` (default: each teacher alone, then both) multiplies the rules; a single
    teacher's cell runs the quickstart with `--teacher NAME`, `both` with none (its default:
    every teacher, routed by domain)."""
    from tip_megatron.apps.study import command
    from tip_megatron.apps.study.cells import teacher_axis

    axis = teacher_axis(None, ("add", "sub"), "multi")
    assert axis == ("add", "sub", "both") and teacher_axis(["both", "add", "both"], ("add", "sub"),
                                                            "multi") == ("both", "add")
    assert teacher_axis(None, (), "addition") == ("",)
    grid = cells(["all", "q3@0.1"], seeds=2, teachers=axis)
    assert [c.name for c in grid[::2]] == ["all+teacher:add", "all+teacher:sub", "all+teacher:both",
                                           "q3@0.1+teacher:add", "q3@0.1+teacher:sub", "q3@0.1+teacher:both"]
    assert run_dir(tmp_path, grid[1]) == tmp_path / "runs" / "all+teacher:add" / "seed_1"
    seen = []
    monkeypatch.setattr(command, "run_local", lambda nproc, module, args: seen.append(args) or 0)
    for cell in (grid[0], grid[4]):
        command.run_cell(cell, tmp_path, steps=2, tp=1, overrides=[], task="multi")
    assert seen[0][seen[0].index("--teacher") + 1] == "add" and "--teacher" not in seen[1]
    # the ranks run the quickstart's worker, which reads the run's prompt file: written first
    assert (run_dir(tmp_path, grid[0]) / "prompts.jsonl").is_file()
    assert seen[0][seen[0].index("--task") + 1] == "multi"
