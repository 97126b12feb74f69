"""A study's grid: one cell per (rule, rho, seed), and where each cell's run lives."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cell:
    """One grid cell: a rule at a budget, one seed."""

    rule: str
    rho: float
    seed: int

    @property
    def name(self) -> str:
        return rule_label(self.rule, self.rho)


def rule_label(rule: str, rho: float) -> str:
    return "all" if rule == "all" else f"{rule}@{rho:g}"


def parse_rule(spec: str) -> tuple[str, float]:
    """`all` -> ("all", 1.0); `random@0.1` -> ("random", 0.1)."""
    name, _, rho = spec.partition("@")
    if name == "all" and not rho:
        return "all", 1.0
    try:
        value = float(rho)
    except ValueError:
        value = float("nan")
    if not name or not 0.0 < value <= 1.0:
        raise ValueError(f"--rules {spec!r}: expected RULE@RHO with 0 < RHO <= 1 "
                         "(e.g. random@0.1), or 'all'")
    return name, value


def cells(rules: list[str], seeds: int) -> list[Cell]:
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be >= 1")
    parsed = [parse_rule(r) for r in rules]
    return [Cell(rule, rho, seed) for rule, rho in parsed for seed in range(seeds)]


def run_dir(out: Path, cell: Cell) -> Path:
    return out / "runs" / cell.name / f"seed_{cell.seed}"
