"""Answer graders (math-verify, exact, regex), mean@k / pass@k, and `tip-megatron eval`.

    from tip_megatron.eval import Sample, evaluate
    result = evaluate([Sample(0, 0, r"... \\boxed{2}", "2")], grader="math")

The package root imports no torch (`tip-megatron eval --samples` stays light); the
in-engine loop `eval.sharded` (generate, eval --ckpt and validation sample there) and the
run config's section `eval.config` do. docs/eval.md.
"""
from tip_megatron.eval.evaluate import EvalResult, Sample, count_prompts, evaluate, grade_samples
from tip_megatron.eval.graders import GRADERS, Grade, get_grader, normalize_answer, register_grader
from tip_megatron.eval.metrics import EvalSummary, PromptCounts, pass_at_k, summarize

__all__ = ["GRADERS", "EvalResult", "EvalSummary", "Grade", "PromptCounts", "Sample",
           "count_prompts", "evaluate", "get_grader", "grade_samples", "normalize_answer",
           "pass_at_k", "register_grader", "summarize"]
