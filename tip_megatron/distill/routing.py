"""Several teachers: which teacher scores each prompt's rollouts, from the value of the
prompt record's `data.route_field` (docs/teacher.md, "Several teachers").

    table = route_table(teachers, dataset.route_where)   # {value: teacher index}; stops on
                                                          # a value nobody serves, naming it
    ids = teacher_ids_of_rows([table[v] for v in values], n)   # [prompts x n] per rollout
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from tip_megatron.distill.teacher_config import TeacherConfig


def route_table(teachers: Sequence[TeacherConfig], where: Mapping[str, str]) -> dict[str, int]:
    """{route value: index of its teacher} for every value of the prompts (`where`: each
    value -> the first "<file>, line <n>" holding it). A single teacher serves every value.
    A value no teacher lists goes to the `default` teacher, else ValueError naming the
    value, where it is and what the teachers serve."""
    if len(teachers) == 1:
        return dict.fromkeys(where, 0)
    served = {v: i for i, t in enumerate(teachers) for v in t.serves}
    default = next((i for i, t in enumerate(teachers) if t.default), None)
    table = {}
    for value, at in where.items():
        if value in served:
            table[value] = served[value]
        elif default is not None:
            table[value] = default
        else:
            listed = ", ".join(f"{t.name}: {list(t.serves)}" for t in teachers)
            raise ValueError(f"{at}: route value {value!r} (data.route_field) is served by no teacher "
                             f"and no teacher has default: true (teachers serve {listed})")
    return table


def teacher_ids_of_rows(prompt_teachers: Sequence[int], n: int) -> torch.Tensor:
    """[prompts x n] int64 teacher index of each rollout row (prompt-major, n per prompt)."""
    return torch.tensor(list(prompt_teachers), dtype=torch.int64).repeat_interleave(n)
