"""The memory plan against real runs on the CPU: the parameters each rank of a TP=2 x PP=2
model holds, and the peak resident-set rise of 2-step OPD runs at three sizes and one with
the teacher on a rank of its own (each rank) within 15% of the plan's CPU total
(tip_megatron/testing/memory.py; docs/plan.md)."""
import pytest

from tip_megatron.config import load_config
from tip_megatron.testing.distributed import run_distributed
from tip_megatron.testing.memory import SEPARATE_SIZES, SIZES, format_rows, measure_sizes
from tip_megatron.testing.models import tiny_arch
from tip_megatron.train.memory_plan import plan_memory

ARCHS = {"tied qwen3": tiny_arch("qwen3", tie_word_embeddings=True),
         "untied qwen2": tiny_arch("qwen2")}


def _numel_per_rank(archs: dict) -> dict:
    """Rank body: each model built at TP=2 x PP=2; this rank's parameter count."""
    import torch.distributed as dist

    from tip_megatron.models import build_model
    from tip_megatron.runtime import parallel

    groups = parallel.initialize(parallel.ParallelLayout(tp=2, pp=2), seed=0)
    counts = {name: sum(p.numel() for c in build_model(arch, groups) for p in c.parameters())
              for name, arch in archs.items()}
    return dict(rank=dist.get_rank(), **counts)


def test_parameters_per_rank_equal_the_built_model():
    built = run_distributed(_numel_per_rank, 4, args=(ARCHS,), env={"TIP_MEGATRON_DEVICE": "cpu"})
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2", "data.prompts=[x.jsonl]"])
    for name, arch in ARCHS.items():
        plan = plan_memory(cfg, arch, arch, 4, device="cpu")
        for stage in plan.stages:
            planned = next(t.mib for t in stage.terms if t.name == "student.params") * 2**20 / 4
            for rank in stage.ranks:
                assert planned == built[rank][name], (name, rank)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    rows = measure_sizes(tmp_path_factory.mktemp("plan"), SIZES)
    print(format_rows(rows))
    return rows


def test_plan_within_15_percent_of_measured_peaks(measured):
    assert {r["size"] for r in measured} == {s.name for s in SIZES}
    assert len(measured) == sum(s.world for s in SIZES)
    bad = [r for r in measured if not 0.85 <= r["ratio"] <= 1.15]
    assert not bad, format_rows(measured)


def test_separate_placement_within_15_percent_of_measured_peaks(tmp_path):
    """The teacher on a rank of its own: the student's rank (no teacher weights; the
    teacher's output-weight rows and the step's hidden states) and the teacher's (its
    weights, one micro-batch's forward pass, queue_depth hidden states in flight)."""
    rows = measure_sizes(tmp_path, SEPARATE_SIZES)
    print(format_rows(rows))
    assert [r["rank"] for r in rows] == list(range(SEPARATE_SIZES[0].job_world))
    bad = [r for r in rows if not 0.85 <= r["ratio"] <= 1.15]
    assert not bad, format_rows(rows)
