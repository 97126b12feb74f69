"""The tools task's multi-turn evaluation (the quickstart's before/after accuracies and its
mid-run validation: `evaluation.evaluate` -> `train.validation.evaluate_in_engine` -> the
sharded loop with the task's environment) against a plain-Python agent loop: greedy argmax
of the model's full forward over each row's whole history (no cache), the environment
called by hand after every `?`, the transcript graded by decimal strings.

The model is a small one trained here for a few steps on the teacher's transcripts (it
learns the calls at once, not yet the sums), so the transcripts hold calls and
observations. Checked: the engine's transcripts equal the plain loop's token for token;
the task's accuracy report equals the plain loop's transcripts graded by decimal strings;
and, so that grading is seen to count right answers, a benchmark whose answers are the
digits the plain loop wrote for every other prompt scores exactly those prompts. TP2 must
give TP1's per-prompt results.
"""
import dataclasses

import torch

from tip_megatron.testing.distributed import run_distributed

N_EVAL = 48


def _trained_state():
    from tip_megatron.apps.quickstart import pretrain, tools_task
    from tip_megatron.models.state import gather_full_state_dict
    from tip_megatron.runtime import parallel

    g = parallel.initialize(parallel.ParallelLayout())
    arch = pretrain._arch(hidden=64, layers=2, data=tools_task, positions=24)
    recipe = pretrain.SFTRecipe(source="teacher", steps=120, batch_size=64, lr=3e-3, warmup_steps=10)
    chunks, losses = pretrain.sft(arch, g, recipe, data=tools_task, log_every=0)
    return gather_full_state_dict(chunks, g, arch), arch, losses


def _engine_and_plain_loop(full, arch, tp):
    from tip_megatron.apps.quickstart import tools_task
    from tip_megatron.apps.quickstart.evaluation import AdditionBenchmark, evaluate, spec_of
    from tip_megatron.models import BuildOptions, build_model
    from tip_megatron.models.state import load_full_state_dict, unwrap
    from tip_megatron.rollout.env import Turn
    from tip_megatron.runtime import parallel
    from tip_megatron.eval.sharded import generate_shard
    from tip_megatron.train.validation import evaluate_in_engine

    g = parallel.initialize(parallel.ParallelLayout(tp=tp))
    chunks = build_model(arch, g, BuildOptions(params_dtype=torch.float32, init_weights=False))
    load_full_state_dict(chunks, full, g, arch)
    tok = tools_task.tokenizer()
    bench = AdditionBenchmark(tools_task.eval_set(N_EVAL), data=tools_task)
    spec = spec_of(tools_task)
    lines = generate_shard(chunks, g, arch, tok, bench, evaluation_config(spec, tok), seed=spec.seed,
                           batch_size=16)
    texts = [line["text"] for line in lines]
    report = evaluate(chunks, g, arch, n=N_EVAL, data=tools_task)
    if tp > 1:
        return texts, report, None
    # The plain loop: no cache, no engine; the environment called by hand.
    model = unwrap(chunks[0]).eval()
    transcripts = []
    with torch.no_grad():
        for record in bench.records(range(N_EVAL)):
            env = tools_task.RegisterEnv(record)
            ids, turn, turn_ids, budget = list(record.token_ids), 0, [], tools_task.RESPONSE_LEN
            while len(ids) - len(record.token_ids) < budget:
                x = torch.tensor([ids])
                logits = model(x, torch.arange(len(ids))[None], None)[0, -1, :arch.vocab_size]
                nxt = int(logits.argmax())
                ids.append(nxt)
                turn_ids.append(nxt)
                if nxt in tok.stop_ids:
                    break
                if "?" in tok.decode(turn_ids):
                    if turn + 1 >= 3:  # max_turns: the last turn's call gets no answer
                        break
                    obs = env.step(Turn(turn, tuple(turn_ids), tok.decode(turn_ids)))
                    if obs is None:
                        break
                    room = budget - (len(ids) - len(record.token_ids))
                    ids += tok.encode(obs.text)[:room]
                    turn, turn_ids = turn + 1, []
            transcripts.append((record, tok.decode(ids[len(record.token_ids):], skip_special_tokens=True)))
    plain = []
    for record, text in transcripts:
        a, b = tools_task.operands_of_text(record.text)
        ok = (len(text) == 14 and text[:2] == "a?" and text[5:7] == "b?"
              and text[2:5] == f"{a:03d}"[::-1] and text[7:10] == f"{b:03d}"[::-1]
              and text[10:] == f"{a + b:04d}"[::-1])
        plain.append(int(ok))
    calls = sum(t.startswith("a?") and t[5:7] == "b?" for _, t in transcripts)
    # Answers the plain loop wrote (every other prompt) or a number it did not write.
    written = [t[10:] if k % 2 == 0 else ("9999" if t[10:] != "9999" else "0000")
               for k, (_, t) in enumerate(transcripts)]

    class Written(AdditionBenchmark):
        def records(self, indices):
            return [dataclasses.replace(r, answer=written[i])
                    for r, i in zip(super().records(indices), indices)]

    scored = evaluate_in_engine(chunks, g, arch, tok, Written(bench.prompts, data=tools_task), spec)
    graded = [c.num_correct for c in scored.counts]
    parsed = [int(tools_task.parse_answer(t) is not None) for _, t in transcripts]
    return texts, report, (plain, calls, [t for _, t in transcripts], graded, parsed)


def evaluation_config(spec, tok):
    from tip_megatron.rollout.generate import GenerationConfig

    return GenerationConfig(n=1, max_new_tokens=spec.max_new_tokens, temperature=0.0,
                            stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id,
                            vocab_limit=tok.vocab_size, **dict(spec.multi_turn))


def test_multi_turn_evaluation_matches_a_plain_agent_loop_at_tp1_and_tp2():
    full, arch, losses = run_distributed(_trained_state, 1)[0]
    assert losses[-1] < losses[0]
    texts1, report1, (plain, calls, transcripts, graded, parsed) = run_distributed(
        _engine_and_plain_loop, 1, args=(full, arch, 1))[0]
    assert calls >= N_EVAL // 2, "the model should call both registers in most rows"
    assert texts1 == transcripts
    assert report1["exact"] == sum(plain) / N_EVAL and report1["n"] == N_EVAL
    assert sum(parsed) >= N_EVAL // 2
    assert graded == [p if k % 2 == 0 else 0 for k, p in enumerate(parsed)]
    texts2, report2, _ = run_distributed(_engine_and_plain_loop, 2, args=(full, arch, 2))[0]
    assert texts2 == texts1 and report2 == report1
