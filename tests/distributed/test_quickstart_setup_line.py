"""The quickstart's set-up line says what the set-up will do: with both built-ins in the
cache (TIP_MEGATRON_CACHE filled with random models where pre-training puts them) it
names the cache and no pre-training, and `pretrained_model` then indeed reads both from
it; with a model missing it announces that model's pre-training only."""
from tip_megatron.testing.assets import fill_quickstart_cache
from tip_megatron.testing.distributed import run_distributed


def _lines_and_cached(cache_dir: str) -> tuple[str, list[bool], str, str, str]:
    from tip_megatron.runtime import parallel
    from tip_megatron.apps.quickstart import pretrain
    from tip_megatron.apps.quickstart.builtin_models import cache_dir as builtin_cache_dir
    from tip_megatron.apps.quickstart.builtin_models import set_up_line

    empty = set_up_line()
    fill_quickstart_cache(cache_dir)
    groups = parallel.initialize(parallel.ParallelLayout())
    hit = set_up_line()
    cached = [pretrain.pretrained_model(builtin_cache_dir(), name, arch, recipe, groups)[1]["cached"]
              for name, arch, recipe in (("teacher", pretrain.teacher_arch(), pretrain.TEACHER_RECIPE),
                                         ("student", pretrain.student_arch(), pretrain.STUDENT_RECIPE))]
    pretrain.cache_path(cache_dir, "student", pretrain.student_arch(), pretrain.STUDENT_RECIPE).unlink()
    # the chain task shares the cached teacher; its own student is not in the cache
    chain = set_up_line("quickstart-teacher", "quickstart-chain-student", "chain")
    return hit, cached, empty, set_up_line(), chain


def test_cache_hit_announces_no_pre_training(tmp_path):
    cache = tmp_path / "cache"
    hit, cached, empty, student_missing, chain = run_distributed(
        _lines_and_cached, 1, args=(str(cache),), env={"TIP_MEGATRON_CACHE": str(cache)})[0]
    assert cached == [True, True]
    assert "pre-training" not in hit and str(cache) in hit, hit
    assert "teacher and student pre-training" in empty, empty
    assert "student pre-training" in student_missing and "teacher" not in student_missing, student_missing
    assert "student pre-training on the chain task" in chain and "teacher" not in chain, chain
