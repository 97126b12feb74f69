"""Graders against hand-written cases: equivalent forms, boxed vs unboxed, several boxes,
no box, wrong and unparsable answers; the registry and its errors."""
import pytest

from tip_megatron.eval import GRADERS, Grade, get_grader, normalize_answer, register_grader

pytest.importorskip("math_verify")

BOXED_HALF = r"We simplify and get $\boxed{\frac{1}{2}}$."


@pytest.fixture(scope="module")
def math():
    return get_grader("math")


@pytest.mark.parametrize("answer", [r"\frac{1}{2}", "0.5", "1/2", r"\dfrac12", r"\tfrac{1}{2}"])
@pytest.mark.parametrize("response", [BOXED_HALF, r"Thus \boxed{0.5}", r"\boxed{1/2}",
                                      "The answer is 1/2", r"So the final answer is $\frac12$"])
def test_math_equivalent_forms(math, response, answer):
    grade = math(response, answer)
    assert grade.correct and not grade.unparsed


@pytest.mark.parametrize("response,answer", [
    (r"\boxed{\sqrt{2}}", r"\sqrt2"), (r"\boxed{10\%}", r"10\%"), (r"\boxed{(1,2)}", "(1, 2)"),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}"), ("Answer: 34", "34"), (r"\boxed{34}", 34),
])
def test_math_other_forms(math, response, answer):
    assert math(response, str(answer)).correct


def test_math_boxed_wins_over_later_numbers(math):
    # A number written after the box (a check) does not replace the boxed answer.
    response = r"So the answer is \boxed{5}. Check: 2 + 3 = 5, in 7 steps."
    assert math(response, "5") == Grade(True, False, r"\boxed{5}", "5")
    assert not math(response, "7").correct


@pytest.mark.parametrize("response,raw,normalized", [
    (r"so \boxed{0.5}", r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"The answer is $\frac12$", r"\frac12", r"\frac{1}{2}"),
    ("so x = 1/2", "1/2", "1/2"),
    (r"So it is \boxed{ 0.50 }. Check: 2 + 3 = 5", r"\boxed{ 0.50 }", "0.50"),
    (r"The roots are \boxed{2} and \boxed{3}.", r"\boxed{2} and \boxed{3}", "2,3"),  # one stretch, a set
    (r"\boxed{\foo{}}", r"\boxed{\foo{}}", r"\foo{}"),  # found, does not parse
])
def test_math_keeps_the_raw_extraction_beside_the_normalised(math, response, raw, normalized):
    # `extracted` is the text as written in the response (the stretch math-verify read);
    # `normalized` is math-verify's normalised LaTeX of it (what it parsed).
    grade = math(response, "1/2")
    assert (grade.extracted, grade.normalized) == (raw, normalized)
    assert raw in response


def test_math_unboxed_last_expression(math):
    assert math("I computed it twice and the result is 12", "12").correct
    assert not math("The result is 12, not 13", "12").correct  # the last number counts


def test_math_several_boxes(math):
    # math-verify's choice: boxes in separate paragraphs -> the last one; boxes in one
    # stretch of text -> all of them, as a set (a multi-answer response).
    two_paragraphs = "First I got \\boxed{3}.\n\nThat is wrong. So it is \\boxed{2}."
    assert math(two_paragraphs, "2").correct and not math(two_paragraphs, "3").correct
    in_dollars = r"First $\boxed{3}$, no wait: $\boxed{2}$"
    assert math(in_dollars, "2").correct and not math(in_dollars, "3").correct
    one_line = r"The roots are \boxed{2} and \boxed{3}."
    assert math(one_line, "2, 3").correct
    assert not math(one_line, "2").correct and not math(one_line, "3").correct
    corrected = "I got \\boxed{3}.\nHmm, actually \\boxed{2}."  # one paragraph: a set
    assert math(corrected, "3, 2").correct and not math(corrected, "2").correct


def test_math_wrong_answers(math):
    assert math(r"\boxed{7}", "8") == Grade(False, False, r"\boxed{7}", "7")
    assert not math(r"\boxed{\frac{1}{3}}", "0.5").correct
    assert not math(r"\boxed{x^2}", "x^3").correct


@pytest.mark.parametrize("response", ["", "I do not know.", r"\boxed{}", r"\boxed{1/2",
                                      r"\boxed{\foo{}}"])
def test_math_unparsed_counts_wrong(math, response):
    grade = math(response, "2")
    assert grade.unparsed and not grade.correct


def test_math_missing_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "math_verify", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r"tip_megatron\[eval\]"):
        get_grader("math")


def test_exact_normalisation():
    grade = get_grader("exact")
    assert normalize_answer("  Paris\n\t IS  big ") == "paris is big"
    assert grade("  PARIS  ", "paris") == Grade(True, False, "PARIS", "paris")
    assert grade("New   York", "new york").correct
    assert not grade("New York City", "new york").correct
    assert grade(" \n ", "x") == Grade(False, True, None)


def test_regex_default_and_custom_pattern():
    dapo = get_grader("regex")  # default: DAPO's "Answer: ..." line, the last one
    assert dapo("Work...\nAnswer: 12\nAnswer:  34 ", "34") == Grade(True, False, "34", "34")
    assert dapo("Answer: Paris", "paris") == Grade(True, False, "Paris", "paris")
    assert not dapo("Answer: 12", "34").correct
    assert dapo("no answer line", "34") == Grade(False, True, None)
    custom = get_grader("regex", {"pattern": r"#### (\S+)"})
    assert custom("so #### 42", "42").correct and custom("42", "42").unparsed


def test_registry_errors_and_one_line_registration():
    with pytest.raises(ValueError, match=r"'nope' is not registered.*'exact', 'math', .*'regex'"):
        get_grader("nope")
    with pytest.raises(ValueError, match=r"options \['patern'\] not accepted.*\['pattern'\]"):
        get_grader("regex", {"patern": "x"})
    with pytest.raises(ValueError, match="exactly one"):
        get_grader("regex", {"pattern": r"(a)(b)"})
    with pytest.raises(ValueError, match="does not compile"):
        get_grader("regex", {"pattern": "(unclosed"})
    with pytest.raises(ValueError, match="already registered"):
        register_grader("exact", lambda: None)
    register_grader("_test_len", lambda: lambda r, a: Grade(len(r) == int(a), False, str(len(r))))
    try:
        assert get_grader("_test_len")("abc", "3").correct
    finally:
        del GRADERS["_test_len"]
