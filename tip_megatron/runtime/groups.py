"""Size and rank of an optional process group: `None` means "not parallel" (one process).

The one definition shared by the vocab-parallel ops (TP groups) and the selection layer's
DP collectives; neither reads megatron's global groups.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def group_size(group: Any) -> int:
    """World size of `group`; 1 for None."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Any) -> int:
    """This process's rank in `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)
