"""PromptSampler / PromptLoader: DP sharding, seeded shuffling, epochs, resumable cursor."""
import json

import pytest

from tip_megatron.data.prompts import PromptDataset
from tip_megatron.data.sampler import PromptLoader, PromptSampler
from tip_megatron.data.tokenizers import CharTokenizer


def take(it, n):
    return [next(it) for _ in range(n)]


def ranks(n, dp_size, ppr, seed=0, **kw):
    return [PromptSampler(n, prompts_per_rank=ppr, dp_rank=r, dp_size=dp_size, seed=seed, **kw)
            for r in range(dp_size)]


def test_dp2_global_batches_are_disjoint_permutation_slices():
    r0, r1 = ranks(23, dp_size=2, ppr=3)  # global batch 6, 3 batches per epoch, 5 dropped
    assert r0.batches_per_epoch == 3
    for epoch in range(2):
        seen = []
        for b in range(3):
            a, c = next(r0), next(r1)
            assert len(a) == len(c) == 3 and not set(a) & set(c)
            perm = r0.permutation(epoch)
            assert a + c == perm[6 * b:6 * b + 6].tolist()
            seen += a + c
        assert len(set(seen)) == 18 and set(seen) <= set(range(23))
    assert (r0.epoch, r0.batch_in_epoch, r0.num_batches_done) == (2, 0, 6)


def test_dp2_covers_dataset_when_divisible():
    r0, r1 = ranks(12, dp_size=2, ppr=2)
    idx = [i for _ in range(3) for i in next(r0) + next(r1)]
    assert sorted(idx) == list(range(12))


def test_shuffle_reproducible_by_seed_and_new_each_epoch():
    a, b, c = (PromptSampler(50, prompts_per_rank=50, seed=s) for s in (7, 7, 8))
    ea, eb, ec = take(a, 2), take(b, 2), take(c, 2)
    assert ea == eb and ea[0] != ec[0]
    assert ea[0] != ea[1] and sorted(ea[0]) == sorted(ea[1]) == list(range(50))
    assert next(PromptSampler(5, prompts_per_rank=5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("stop", [1, 3, 4, 7])
def test_resume_yields_the_same_batches(stop):
    ref = take(PromptSampler(10, prompts_per_rank=2, dp_rank=1, dp_size=2, seed=3), 9)
    first = PromptSampler(10, prompts_per_rank=2, dp_rank=1, dp_size=2, seed=3)
    take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # plain ints survive any checkpoint
    assert all(type(v) is int for v in state.values())
    resumed = PromptSampler(10, prompts_per_rank=2, dp_rank=1, dp_size=2, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 9 - stop) == ref[stop:]


def test_resume_with_another_dp_size_keeps_global_batches():
    two = ranks(16, dp_size=2, ppr=4, seed=1)
    for r in two:
        take(r, 3)
    one = PromptSampler(16, prompts_per_rank=8, seed=1)
    one.load_state_dict(two[0].state_dict())
    assert next(one) == next(two[0]) + next(two[1])


def test_cursor_mismatch_and_bad_config_fail_loud():
    s = PromptSampler(10, prompts_per_rank=2, seed=0)
    with pytest.raises(ValueError, match="seed=1.*seed=0"):
        s.load_state_dict({**s.state_dict(), "seed": 1})
    with pytest.raises(ValueError, match="num_prompts=11"):
        s.load_state_dict({**s.state_dict(), "num_prompts": 11})
    with pytest.raises(ValueError, match="out of range"):
        s.load_state_dict({**s.state_dict(), "batch_in_epoch": 5})
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        PromptSampler(3, prompts_per_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank=2"):
        PromptSampler(10, prompts_per_rank=1, dp_rank=2, dp_size=2)


def test_loader_yields_records_and_resumes(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n"
                            for i in range(9)))
    ds = PromptDataset(path, CharTokenizer())
    ref = [[(r.prompt_id, r.answer) for r in b]
           for b in take(PromptLoader(ds, prompts_per_rank=2, dp_size=2, dp_rank=1, seed=5), 5)]
    loader = PromptLoader(ds, prompts_per_rank=2, dp_size=2, dp_rank=1, seed=5)
    take(loader, 2)
    resumed = PromptLoader(ds, prompts_per_rank=2, dp_size=2, dp_rank=1, seed=5)
    resumed.load_state_dict(loader.state_dict())
    assert [[(r.prompt_id, r.answer) for r in b] for b in take(resumed, 3)] == ref[2:]
    rec = next(resumed)[0]
    assert rec.answer == str(2 * int(rec.text.split("+")[0]))


def _prompt_file(path, values):
    path.write_text("".join(json.dumps({"prompt": str(v)}) + "\n" for v in values))
    return path


def _batches(loader, n):
    return [[r.text for r in b] for b in take(loader, n)]


def test_touch_keeps_running_and_resumed_loaders_going(tmp_path):
    """A new mtime with the same bytes is no change: the running loader reads on, and a
    loader over the re-read file resumes the saved cursor with the same batches."""
    import os

    path = _prompt_file(tmp_path / "p.jsonl", range(9))
    ref = _batches(PromptLoader(PromptDataset(path, CharTokenizer()), prompts_per_rank=2, seed=3), 5)
    loader = PromptLoader(PromptDataset(path, CharTokenizer()), prompts_per_rank=2, seed=3)
    assert _batches(loader, 2) == ref[:2]
    state = loader.state_dict()
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touch
    assert _batches(loader, 3) == ref[2:]
    resumed = PromptLoader(PromptDataset(path, CharTokenizer()), prompts_per_rank=2, seed=3)
    resumed.load_state_dict(state)
    assert _batches(resumed, 3) == ref[2:]


def test_edited_prompt_file_is_named_with_its_prompt_counts(tmp_path):
    path = _prompt_file(tmp_path / "p.jsonl", range(8))
    loader = PromptLoader(PromptDataset(path, CharTokenizer()), prompts_per_rank=2)
    state = loader.state_dict()
    _prompt_file(path, range(1, 9))  # same size, same count, other prompts
    with pytest.raises(RuntimeError, match=r"p\.jsonl changed after it was loaded"):
        next(loader)
    with pytest.raises(ValueError, match=r"prompt file p\.jsonl changed since the cursor was "
                                         r"saved \(8 -> 8 prompts, 128 -> 128 bytes"):
        PromptLoader(PromptDataset(path, CharTokenizer()), prompts_per_rank=2).load_state_dict(state)
    _prompt_file(path, range(7))
    with pytest.raises(ValueError, match=r"p\.jsonl changed since the cursor was saved \(8 -> 7 prompts"):
        PromptLoader(PromptDataset(path, CharTokenizer()), prompts_per_rank=2).load_state_dict(state)


def test_loader_refuses_cursor_over_other_tokenization(tmp_path):
    path = _prompt_file(tmp_path / "p.jsonl", [10 * i for i in range(8)])
    state = PromptLoader(PromptDataset(path, CharTokenizer()), prompts_per_rank=2).state_dict()
    other = PromptLoader(PromptDataset(path, CharTokenizer(), max_prompt_len=1), prompts_per_rank=2)
    with pytest.raises(ValueError, match="prompt files are unchanged but tokenize differently"):
        other.load_state_dict(state)
    extra = _prompt_file(tmp_path / "q.jsonl", [1])
    with pytest.raises(ValueError, match=r"saved over prompt files \['p.jsonl'\], this run reads "
                                         r"\['p.jsonl', 'q.jsonl'\]"):
        PromptLoader(PromptDataset([path, extra], CharTokenizer()), prompts_per_rank=2).load_state_dict(state)
