"""A study's grid: one cell per (rule, rho, mix, teacher, seed), and where each cell's run lives.

`--rules` specs: `all`; `RULE@RHO` (a counted rule: random@0.1, q3@0.1, teachability@0.05);
`RULE` alone at rho 1.0 (rules that weigh every token: tip_soft, propose_verify, a user
rule `package.module:function`); `mix:NAME` (rule all with `loss.mix=NAME`, e.g.
mix:entropy_aware); `SPEC+mix:NAME` (a rule and a mix together, e.g. q3@0.1+mix:entropy_aware);
`SPEC+norm:MODE` (the rule with `selection.normalize=MODE`, e.g. q3@0.1+norm:running; after
a mix too: q3@0.1+mix:entropy_aware+norm:absolute).

A task with several teachers (`multi`) adds a teacher axis (`--teachers`): `both` (every
teacher, each prompt routed to its domain's) or one teacher's name (that teacher on every
prompt); the cell's name ends with `+teacher:NAME`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cell:
    """One grid cell: a rule at a budget, one seed."""

    rule: str
    rho: float
    seed: int
    mix: str = "none"
    """`loss.mix` of this cell (`none`: the run's own)."""
    normalize: str = "none"
    """`selection.normalize` of this cell (`none`: the run's own)."""
    teacher: str = ""
    """A task with several teachers: `both` (routed by domain) or one teacher's name; "" on
    a one-teacher task."""

    @property
    def name(self) -> str:
        label = rule_label(self.rule, self.rho)
        label = label if self.mix == "none" else f"{label}+mix:{self.mix}"
        label = label if self.normalize == "none" else f"{label}+norm:{self.normalize}"
        return f"{label}+teacher:{self.teacher}" if self.teacher else label

    @property
    def overrides(self) -> list[str]:
        """The cell's keys beyond rule, rho and seeds (its `loss.mix`, `selection.normalize`)."""
        return ([] if self.mix == "none" else [f"loss.mix={self.mix}"]) + (
            [] if self.normalize == "none" else [f"selection.normalize={self.normalize}"])


def rule_label(rule: str, rho: float) -> str:
    return "all" if rule == "all" else f"{rule}@{rho:g}"


MIXES = ("entropy_aware", "custom")
#: `selection.normalize` values (tip.rules.NORMALIZE_MODES, written out: this module is
#: imported by `study --help`, which loads no torch; a test keeps the two equal).
NORMALIZE_MODES = ("batch", "running", "absolute")


def parse_rule(spec: str) -> tuple[str, float, str, str]:
    """(rule, rho, mix, normalize) of one `--rules` spec (module docstring): `all` ->
    ("all", 1.0, "none", "none"); `random@0.1` -> ("random", 0.1, "none", "none");
    `tip_soft` -> ("tip_soft", 1.0, "none", "none"); `mix:entropy_aware` -> ("all", 1.0,
    "entropy_aware", "none"); `q3@0.1+norm:running` -> ("q3", 0.1, "none", "running")."""
    spec_wo_norm, has_norm, normalize = spec.partition("+norm:")
    if not has_norm:
        normalize = "none"
    elif normalize not in NORMALIZE_MODES:
        raise ValueError(f"--rules {spec!r}: norm:{normalize} is not a selection.normalize; "
                         f"accepted: {', '.join('norm:' + m for m in NORMALIZE_MODES)} "
                         "(last, after the rule and any mix)")
    return (*_parse_rule_mix(spec, spec_wo_norm), normalize)


def _parse_rule_mix(full: str, spec: str) -> tuple[str, float, str]:
    """(rule, rho, mix) of a spec without its `+norm:` part (`full`: the spec as written)."""
    rule_spec, _, mix = spec.partition("+mix:")
    if rule_spec.startswith("mix:"):
        rule_spec, mix = "all", rule_spec[len("mix:"):]
    if "+mix:" in spec or spec.startswith("mix:"):
        if mix not in MIXES:
            raise ValueError(f"--rules {full!r}: mix:{mix} is not a loss.mix; accepted: "
                             f"{', '.join('mix:' + m for m in MIXES)}")
    else:
        mix = "none"
    name, at, rho = rule_spec.partition("@")
    if name and not at:
        return name, 1.0, mix
    try:
        value = float(rho)
    except ValueError:
        value = float("nan")
    if not name or not 0.0 < value <= 1.0:
        raise ValueError(f"--rules {full!r}: expected RULE@RHO with 0 < RHO <= 1 "
                         "(e.g. random@0.1), RULE alone (rho 1), 'all', mix:NAME, SPEC+mix:NAME "
                         "or SPEC+norm:MODE")
    return name, value, mix


#: The teacher-axis value of a multi-teacher run (every teacher, routed by domain).
BOTH = "both"


def cells(rules: list[str], seeds: int, teachers: tuple[str, ...] = ("",)) -> list[Cell]:
    """Rules x teachers x seeds, in that order (`teachers`: ("",) on a one-teacher task)."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be >= 1")
    parsed = [parse_rule(r) for r in rules]
    return [Cell(rule, rho, seed, mix, norm, teacher) for rule, rho, mix, norm in parsed
            for teacher in teachers for seed in range(seeds)]


def teacher_axis(requested: list[str] | None, names: tuple[str, ...], task: str) -> tuple[str, ...]:
    """The `--teachers` values of a task whose teachers are `names` (empty: a one-teacher
    task, where only no `--teachers` is accepted). Default: each teacher alone, then both."""
    if not names:
        if requested:
            raise ValueError(f"--teachers {' '.join(requested)}: --task {task} has one teacher; "
                             "--teachers applies to a task with several (multi)")
        return ("",)
    accepted = (*names, BOTH)
    bad = [t for t in requested or () if t not in accepted]
    if bad:
        raise ValueError(f"--teachers {bad[0]}: accepted for --task {task}: {', '.join(accepted)}")
    return tuple(dict.fromkeys(requested)) if requested else accepted


def run_dir(out: Path, cell: Cell) -> Path:
    return out / "runs" / cell.name / f"seed_{cell.seed}"
