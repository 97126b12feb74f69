"""Answer graders, registered by name: a response and the prompt's answer in, a Grade out.

    grade = get_grader("math")          # or "exact", or get_grader("regex", {"pattern": ...})
    grade(r"... so the answer is \\boxed{\\frac12}", "0.5")   # Grade(correct=True, ...)

A registry entry is a factory: keyword options (strings, from `--grader-option KEY=VALUE`)
-> `GradeFn`. Factories run at setup, so a bad option or a missing package stops there.
Registering a grader is one line:

    register_grader("addition", lambda: grade_addition)     # grade_addition: GradeFn

A response whose answer cannot be extracted or parsed is wrong and flagged `unparsed`;
grading never raises on a response. Docs: docs/eval.md.
"""
from __future__ import annotations

import functools
import inspect
import logging
import re
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Callable, Mapping, Optional

logger = logging.getLogger(__name__)

__all__ = ["GRADERS", "Grade", "GradeFn", "get_grader", "normalize_answer", "register_grader"]


@dataclass(frozen=True)
class Grade:
    """The verdict on one response."""

    correct: bool
    unparsed: bool  # no answer could be extracted/parsed (then correct is False)
    extracted: Optional[str]  # the answer's text as it stands in the response, None when absent
    normalized: Optional[str] = None  # the form the grader compared (see each grader), None when absent


GradeFn = Callable[[str, str], Grade]  # (response, answer) -> Grade
GraderFactory = Callable[..., GradeFn]  # keyword options -> GradeFn
GRADERS: dict[str, GraderFactory] = {}


def register_grader(name: str, factory: Optional[GraderFactory] = None):
    """Make `factory` available as grader `name`; usable as a decorator over the factory."""
    def add(fn: GraderFactory) -> GraderFactory:
        if name in GRADERS:
            raise ValueError(f"grader {name!r} is already registered")
        GRADERS[name] = fn
        return fn
    return add if factory is None else add(factory)


def get_grader(name: str, options: Optional[Mapping[str, Any]] = None) -> GradeFn:
    """The grade function of grader `name` built with `options`; ValueError naming what is
    accepted when the name or an option is unknown."""
    if name not in GRADERS:
        raise ValueError(f"grader {name!r} is not registered; registered graders: {sorted(GRADERS)}")
    factory, options = GRADERS[name], dict(options or {})
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        accepted = list(inspect.signature(factory).parameters) or ["none"]
        raise ValueError(f"grader {name!r}: options {sorted(options)} not accepted; its options: "
                         f"{accepted}") from None
    return factory(**options)


def normalize_answer(text: str) -> str:
    """The `exact` normalisation: strip, collapse every whitespace run to one space, case-fold."""
    return " ".join(text.split()).casefold()


@register_grader("exact")
def exact_grader() -> GradeFn:
    """The whole response, normalised, equals the normalised answer."""
    def grade(response: str, answer: str) -> Grade:
        got = normalize_answer(response)
        if not got:
            return Grade(False, True, None)
        return Grade(got == normalize_answer(answer), False, response.strip(), got)
    return grade


DEFAULT_REGEX = r"(?i)answer\s*:\s*([^\n]+)"  # DAPO's last line "Answer: $Answer"


@register_grader("regex")
def regex_grader(pattern: str = DEFAULT_REGEX) -> GradeFn:
    """The last match's one group, normalised like `exact`, equals the normalised answer."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"grader 'regex': pattern {pattern!r} does not compile ({err})") from None
    if compiled.groups != 1:
        raise ValueError(f"grader 'regex': pattern {pattern!r} has {compiled.groups} groups; "
                         "it needs exactly one, the answer, e.g. 'Answer:\\s*(\\S+)'")

    def grade(response: str, answer: str) -> Grade:
        matches = list(compiled.finditer(response))
        raw = (matches[-1].group(1) or "") if matches else ""
        got = normalize_answer(raw)
        if not got:
            return Grade(False, True, None)
        return Grade(got == normalize_answer(answer), False, raw.strip(), got)
    return grade


def _import_math_verify():
    # math-verify parses LaTeX through latex2sympy2's ANTLR grammar: both halves needed.
    try:
        import antlr4  # noqa: F401
        # optional extra: math-verify, for the math grader only
        import math_verify
    except ImportError as err:
        raise ImportError(f"grader 'math' needs the math-verify package ({err.name} is missing): "
                          "pip install 'tip_megatron[eval]' (math-verify[antlr4-13-2])") from None
    return math_verify


@register_grader("math")
def math_grader() -> GradeFn:
    """math-verify: the response's answer (a \\boxed{} first, else the last LaTeX or plain
    expression) is mathematically equal to the answer (numbers, fractions, sets, ...)."""
    mv = _import_math_verify()
    # Boxed answers first: the instruction asks for \boxed{}; without one the last
    # "final answer"-anchored or plain expression counts (math-verify's own order).
    pred_config = (mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig())

    @functools.lru_cache(maxsize=4096)
    def gold(answer: str) -> tuple:
        # Dataset answers are bare LaTeX ("\frac{1}{2}", "(3, \pi)"): math-verify reads LaTeX
        # inside math delimiters, so wrap them unless they carry their own.
        text = answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
        parsed = mv.parse(text)
        if not parsed:
            logger.warning("math grader: answer %r does not parse; compared as a string", answer)
            return (answer,)
        return tuple(parsed)

    def grade(response: str, answer: str) -> Grade:
        pred = mv.parse(response, pred_config)
        # parse returns the parsed values, then math-verify's normalised text of the match
        # (`\frac{1}{2}` for `\boxed{0.5}`); text alone means the match did not parse
        # (e.g. \boxed{\foo{}}).
        parsed = [p for p in pred if not isinstance(p, str)]
        text = next((p for p in pred if isinstance(p, str)), None)
        raw = _raw_match(mv, response, pred_config) if pred else None  # the text as written
        if not parsed:
            return Grade(False, True, raw, text)
        normalized = text if text is not None else str(parsed[0])
        return Grade(bool(mv.verify(list(gold(answer)), pred)), False, raw, normalized)
    return grade


def _raw_match(mv, response: str, config: tuple) -> Optional[str]:
    """The response's text math-verify read its answer from, before its normalisation
    (`\\boxed{0.5}`, `\\frac12` of `$\\frac12$`, `1/2`): the match `parse` settles on, found
    the way `math_verify.parser.extract_target_from_pred` finds it (priority groups in
    order, rightmost match first, the first that parses; else the first match tried).
    Under math-verify's own 5 s timeout, as `parse`; None when it runs out."""
    try:
        return mv.utils.timeout(timeout_seconds=5)(_find_raw_match)(mv.parser, response, config)
    except Exception:  # noqa: BLE001 - a timeout or a parser error: no raw text, never a raise
        return None


def _find_raw_match(parser, response: str, config: tuple) -> Optional[str]:
    patterns = sorted(((pattern, target, priority)
                       for target_patterns, target in parser.get_extraction_regexes(config)
                       for pattern, priority in target_patterns), key=lambda x: x[2])
    first = None
    for _, group in groupby(patterns, key=lambda x: x[2]):
        found = [(m, target) for pattern, target, _ in group for m in pattern.finditer(response)]
        for match, target in sorted(found, key=lambda x: (x[0].end(), -x[0].start()), reverse=True):
            text = " and ".join(v.strip() for v in match.groupdict().values() if v)
            first = first or text
            if parser.extract_match(match, target)[0] is not None:
                return text
    return first
