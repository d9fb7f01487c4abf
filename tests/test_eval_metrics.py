"""Metrics of the evaluation harness against their official definitions and against lmms-eval 0.7.3.

Every case names the normalisation rule it exercises. Expected values were worked out by hand from the
official scripts (GT-Vision-Lab/VQA vqaEval.py at a013f00 and a4f1afd, the RRC InfographicVQA/DocVQA
ANLS script, pix2struct's relaxed_correctness, MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py); the
``*_matches_lmms_eval`` tests run the same cases through lmms-eval's own functions (skipped when
lmms-eval is not installed: ``pip install --no-deps lmms-eval==0.7.3`` plus the dev extras).
"""

from __future__ import annotations

import copy
import math
import random

import pytest

from llama_vision.eval.metrics import (
    METRICS,
    anls,
    exact_match,
    extract_choice,
    mmmu_accuracy,
    multiple_choice_accuracy,
    parse_mmmu_multi_choice,
    parse_mmmu_open,
    relaxed_accuracy,
    vqa_accuracy,
)


def _lmms(module: str):
    pytest.importorskip("lmms_eval")
    return pytest.importorskip(module)


def mix(k: int, answer: str, other: str = "zzz", n: int = 10) -> list[str]:
    """k annotators gave `answer`, the remaining n - k gave `other` (so the annotators disagree)."""
    return [answer] * k + [other] * (n - k)


# ---------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------
# Leave-one-out by hand, k of 10 annotators match: the k matching ones each see k-1 others, the 10-k
# others see k; acc = mean(min(1, m/3)).  k=1: 9*(1/3)/10 = 0.3;  k=2: (2/3 + 8*2/3)/10 = 0.6;
# k=3: (3*2/3 + 7*1)/10 = 0.9;  k>=4: 1.0.
LOO = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}

# (rule, prediction, answers, official (a013f00), lmms_eval, official_2017 (a4f1afd))
VQA_CASES = [
    ("leave-one-out, 1 of 10 match", "dog", mix(1, "dog"), 0.3, 0.3, 0.3),
    ("leave-one-out, 2 of 10 match", "dog", mix(2, "dog"), 0.6, 0.6, 0.6),
    ("leave-one-out, 3 of 10 match", "dog", mix(3, "dog"), 0.9, 0.9, 0.9),
    ("leave-one-out, 4 of 10 match caps at 1", "dog", mix(4, "dog"), 1.0, 1.0, 1.0),
    ("leave-one-out, no match", "cat", mix(3, "dog"), 0.0, 0.0, 0.0),
    ("leave-one-out, 3 answers (TextVQA-like count): (2/3+1/3+1/3)/3", "b", ["a", "b", "b"], 4 / 9, 4 / 9, 4 / 9),
    ("punctuation not touching a space becomes a space: 'dog!' -> 'dog'", "dog!", mix(3, "dog"), 0.9, 0.9, 0.9),
    ("punctuation not touching a space becomes a space: 'e-mail' -> 'e mail'", "e-mail", mix(3, "e mail"), 0.9, 0.9, 0.9),
    ("punctuation touching a space is deleted everywhere: 'e-mail -' -> 'email'", "e-mail -", mix(3, "email"), 0.9, 0.9, 0.9),
    ("comma inside a number deleted: '1,000' -> '1000'", "1,000", mix(3, "1000", "100"), 0.9, 0.9, 0.9),
    ("comma between words becomes a space: 'red,blue' -> 'red blue'", "red,blue", mix(3, "red blue", "red"), 0.9, 0.9, 0.9),
    ("a digit comma deletes every mark: '1,000-2,000' -> '10002000'", "1,000-2,000", mix(3, "1000 2000"), 0.0, 0.0, 0.0),
    ("period between digits kept: '3.5' stays, does not match '35'", "3.5", mix(3, "3.5", "35"), 0.9, 0.9, 0.9),
    ("period not followed by a digit removed: 'end.' -> 'end'", "end.", mix(3, "end", "start"), 0.9, 0.9, 0.9),
    ("period before a digit kept: '.5' is not '5'", ".5", mix(3, "5", "6"), 0.0, 0.0, 0.0),
    ("trailing period of a number removed: '5.' -> '5'", "5.", mix(3, "5", "6"), 0.9, 0.9, 0.9),
    ("number word to digit: 'two' -> '2'", "two", mix(3, "2", "3"), 0.9, 0.9, 0.9),
    ("number word to digit: 'none' -> '0'", "none", mix(3, "0", "1"), 0.9, 0.9, 0.9),
    ("number words only up to ten: 'eleven' stays", "eleven", mix(3, "11", "12"), 0.0, 0.0, 0.0),
    ("articles removed: 'a dog' -> 'dog'", "a dog", mix(3, "dog", "cat"), 0.9, 0.9, 0.9),
    ("articles removed: 'The Eiffel tower' -> 'eiffel tower'", "The Eiffel tower", mix(3, "eiffel tower"), 0.9, 0.9, 0.9),
    ("contraction restored: 'dont' -> \"don't\"", "dont", mix(3, "don't", "no"), 0.9, 0.9, 0.9),
    ("contraction restored after lower-casing: 'Isnt' -> \"isn't\"", "Isnt", mix(3, "isn't", "is"), 0.9, 0.9, 0.9),
    ("lower-casing (annotators disagree): 'Yes' -> 'yes'", "Yes", mix(3, "yes", "no"), 0.9, 0.9, 0.9),
    ("newline/tab to space and strip", "\tyes\n", ["yes"] * 10, 1.0, 1.0, 1.0),
    # -- the styles disagree --------------------------------------------------------------------------
    ("annotators agree -> official normalises nothing: 'two' vs ten '2'", "two", ["2"] * 10, 0.0, 1.0, 1.0),
    ("annotators agree -> official does not lower-case: 'Yes' vs ten 'yes'", "Yes", ["yes"] * 10, 0.0, 1.0, 1.0),
    ("annotators agree -> official keeps the period: 'yes.' vs ten 'yes'", "yes.", ["yes"] * 10, 0.0, 1.0, 1.0),
    ("double comma: official commaStrip needs one comma ('1  000'), EvalAI's takes ',+' ('1000')",
     "1,,000", mix(3, "1000", "10"), 0.0, 0.9, 0.0),
    ("annotators disagree -> answers get digits/articles too (a013f00), only punctuation (a4f1afd)",
     "2", mix(3, "two", "three"), 0.9, 0.9, 0.0),
    ("annotators disagree -> answers lose articles (a013f00 and lmms), not in a4f1afd",
     "dog", mix(3, "the dog", "cat"), 0.9, 0.9, 0.0),
    ("answers whitespace-stripped in a013f00 and lmms, not in a4f1afd", "yes", [" yes"] * 10, 1.0, 1.0, 0.0),
]


@pytest.mark.parametrize("rule,pred,answers,official,lmms,official_2017", VQA_CASES, ids=[c[0] for c in VQA_CASES])
def test_vqa_accuracy_official_definition(rule, pred, answers, official, lmms, official_2017):
    assert vqa_accuracy(pred, answers) == pytest.approx(official)
    assert vqa_accuracy(pred, answers, style="official") == pytest.approx(official)
    assert vqa_accuracy(pred, answers, style="lmms_eval") == pytest.approx(lmms)
    assert vqa_accuracy(pred, answers, style="official_2017") == pytest.approx(official_2017)


def test_vqa_styles_disagree_on_real_inputs():
    diff = [c for c in VQA_CASES if not math.isclose(c[3], c[4])]
    assert len(diff) >= 2
    assert vqa_accuracy("two", ["2"] * 10) == 0.0 and vqa_accuracy("two", ["2"] * 10, "lmms_eval") == 1.0
    assert vqa_accuracy("1,,000", mix(3, "1000", "10")) == 0.0
    assert vqa_accuracy("1,,000", mix(3, "1000", "10"), "lmms_eval") == pytest.approx(0.9)


def test_vqa_accuracy_edge_cases():
    assert vqa_accuracy("yes", []) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("yes", ["yes"], style="nope")
    answers = mix(3, "Two")
    vqa_accuracy("2", answers)
    assert answers == mix(3, "Two")  # pure: the input list is not normalised in place


def _lmms_vqav2(pred: str, answers: list[str]) -> float:
    utils = _lmms("lmms_eval.tasks.vqav2.utils")
    # lmms-eval (like vqaEval.py) tells annotators apart by comparing answer dicts: give each its id,
    # as the VQAv2 annotations do.
    doc = {"question_id": 1,
           "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
    return utils.vqav2_process_results(doc, [pred])["exact_match"]


@pytest.mark.parametrize("rule,pred,answers,official,lmms,official_2017", VQA_CASES, ids=[c[0] for c in VQA_CASES])
def test_vqa_accuracy_matches_lmms_eval(rule, pred, answers, official, lmms, official_2017):
    ref = _lmms_vqav2(pred, copy.deepcopy(answers))
    assert ref == pytest.approx(lmms)
    assert vqa_accuracy(pred, answers, style="lmms_eval") == pytest.approx(ref)


def test_vqa_lmms_eval_processor_functions_match():
    mod = _lmms("lmms_eval.tasks._task_utils.vqa_eval_metric")
    from llama_vision.eval import metrics as m

    proc = mod.EvalAIAnswerProcessor()
    for text in ["1,000", "1,,000", "e-mail -", "Dont!", "The 2 dogs.", "3.5", "a/b", "x ; y", "Two cats"]:
        assert m._process_punctuation(text, m._COMMA_STRIP_EVALAI) == proc.process_punctuation(text)
        assert m._process_digit_article(text) == proc.process_digit_article(text)


# ---------------------------------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------------------------------
# (rule, prediction, answers, threshold, expected)
ANLS_CASES = [
    ("exact after lower/strip/space-collapse", "  The  Cat ", ["the cat"], 0.5, 1.0),
    ("one substitution: 1 - 1/7", "the cat", ["the bat"], 0.5, 6 / 7),
    ("max over answers", "cat", ["dog", "cat"], 0.5, 1.0),
    ("threshold boundary: NL = 0.5 exactly is kept (script uses score < tau)", "ab", ["ac"], 0.5, 0.5),
    ("below threshold: NL = 2/3 -> 0", "abc", ["axy"], 0.5, 0.0),
    ("custom threshold zeroes 0.5", "ab", ["ac"], 0.6, 0.0),
    ("normaliser uses raw lengths: 'ab   ' vs 'abcd' is 1 - 2/5", "ab   ", ["abcd"], 0.5, 0.6),
    ("normaliser uses len(upper()): 'ß' has length 2", "ß", ["s"], 0.5, 0.5),
    ("both empty: NL 0", "", [""], 0.5, 1.0),
    ("empty prediction vs non-empty answer", "", ["abc"], 0.5, 0.0),
]


@pytest.mark.parametrize("rule,pred,answers,tau,expected", ANLS_CASES, ids=[c[0] for c in ANLS_CASES])
def test_anls_official_definition(rule, pred, answers, tau, expected):
    assert anls(pred, answers, threshold=tau) == pytest.approx(expected)


@pytest.mark.parametrize("rule,pred,answers,tau,expected", ANLS_CASES, ids=[c[0] for c in ANLS_CASES])
def test_anls_matches_lmms_eval(rule, pred, answers, tau, expected):
    metrics = _lmms("lmms_eval.api.metrics")
    ref = metrics.anls(answers, [pred], thresh_hold=tau)["anls"]
    assert anls(pred, answers, threshold=tau) == pytest.approx(ref)


def test_anls_no_answers():
    assert anls("x", []) == 0.0


# ---------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------------
RELAXED_CASES = [
    ("numeric exact", "12", "12", 1.0),
    ("5% boundary above is inclusive: 105 vs 100", "105", "100", 1.0),
    ("5% boundary below is inclusive: 95 vs 100", "95", "100", 1.0),
    ("just over 5%: 105.01 vs 100", "105.01", "100", 0.0),
    ("just under -5%: 94.9 vs 100", "94.9", "100", 0.0),
    ("float rounding at the boundary: |1.05 - 1| is 0.05000000000000004", "1.05", "1", 0.0),
    ("negative numbers: -5.2 vs -5 is 4%", "-5.2", "-5", 1.0),
    ("'%' divides by 100: '50%' vs '0.5'", "50%", "0.5", 1.0),
    ("'%' divides by 100: '50%' is not '50'", "50%", "50", 0.0),
    ("'%' on both sides: 52% vs 50% is 4%", "52%", "50%", 1.0),
    ("target 0 is falsy -> string match: '0' vs '0'", "0", "0", 1.0),
    ("target 0 is falsy -> string match: '0.0' vs '0'", "0.0", "0", 0.0),
    ("non-numeric: case-insensitive exact match", "Yes", "yes", 1.0),
    ("non-numeric: no stripping", " yes", "yes", 0.0),
    ("thousands comma is not a float -> string match", "1,000", "1000", 0.0),
    ("float() accepts surrounding spaces", " 100 ", "100", 1.0),
]


@pytest.mark.parametrize("rule,pred,target,expected", RELAXED_CASES, ids=[c[0] for c in RELAXED_CASES])
def test_relaxed_accuracy_official_definition(rule, pred, target, expected):
    assert relaxed_accuracy(pred, target) == expected


@pytest.mark.parametrize("rule,pred,target,expected", RELAXED_CASES, ids=[c[0] for c in RELAXED_CASES])
def test_relaxed_accuracy_matches_lmms_eval(rule, pred, target, expected):
    chartqa = _lmms("lmms_eval.tasks.chartqa.utils")
    assert relaxed_accuracy(pred, target) == float(chartqa.relaxed_correctness(pred, target))


def test_relaxed_accuracy_tolerance_argument():
    assert relaxed_accuracy("108", "100", tolerance=0.1) == 1.0
    assert relaxed_accuracy("108", "100") == 0.0


# ---------------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------------
CHOICES = ["cat", "dog", "blue whale", "red"]
# (rule, prediction, expected letter, lmms-eval's extract_mcq_answer agrees)
MC_CASES = [
    ("bare letter", "B", "B", True),
    ("letter in parentheses", "(B)", "B", True),
    ("letter in brackets", "[B]", "B", True),
    ("letter with period", "B.", "B", True),
    ("letter with right paren", "B)", "B", True),
    ("letter with colon", "B:", "B", True),
    ("markdown bold", "**B**", "B", True),
    ("'Answer: X'", "Answer: B", "B", True),
    ("'The answer is (X) text'", "The answer is (C) dog", "C", True),
    ("'The correct answer is X.'", "The correct answer is D.", "D", True),
    ("'the correct option is X.'", "the correct option is D.", "D", True),
    ("answer phrase beats a later option phrase", "Answer: B. Option A is incorrect", "B", True),
    ("last answer phrase wins", "The answer is not A; the correct answer is C", "C", True),
    ("\\boxed{X}", "\\boxed{C}", "C", True),
    ("leading 'X. text'", "B. dog", "B", True),
    ("leading '(X) text'", "(B) dog", "B", True),
    ("leading 'X) text'", "B) dog", "B", True),
    ("one '(X)' in a sentence", "I think (C) is right", "C", True),
    ("option text alone", "dog", "B", False),
    ("option text alone, case and final period ignored", "Blue whale.", "C", False),
    ("letter, space, that option's text", "B dog", "B", False),
    ("a leading capital word is not a letter", "A dog is sitting", None, False),
    ("letter, space, another option's text is not read", "A dog", None, False),
    ("letter out of range", "The answer is E", None, True),
    ("lower-case letter is not an option letter", "b", None, True),
    ("nothing found", "none of these", None, True),
]


@pytest.mark.parametrize("rule,pred,expected,lmms_agrees", MC_CASES, ids=[c[0] for c in MC_CASES])
def test_extract_choice(rule, pred, expected, lmms_agrees):
    assert extract_choice(pred, CHOICES) == expected
    gold = expected or "A"
    assert multiple_choice_accuracy(pred, gold, CHOICES) == float(expected is not None)


@pytest.mark.parametrize("rule,pred,expected,lmms_agrees", [c for c in MC_CASES if c[3]], ids=[c[0] for c in MC_CASES if c[3]])
def test_extract_choice_matches_lmms_eval(rule, pred, expected, lmms_agrees):
    mcq = _lmms("lmms_eval.tasks._task_utils.mcq_extract")
    ref = mcq.extract_mcq_answer(pred, ["A", "B", "C", "D"])
    assert extract_choice(pred, CHOICES) == (ref or None)


def test_extract_choice_ambiguous_option_text_and_no_choices():
    assert extract_choice("dog", ["dog", "Dog", "cat"]) is None  # matches two options
    assert extract_choice("(F)", None) == "F"  # no choices: any letter A-Z
    assert multiple_choice_accuracy("(b)", "B", CHOICES) == 0.0
    assert multiple_choice_accuracy("Answer: B", " b ", CHOICES) == 1.0


# ---------------------------------------------------------------------------------------------------
# MMMU
# ---------------------------------------------------------------------------------------------------
MMMU_LETTERS = ["A", "B", "C", "D"]
MMMU_OPTIONS = dict(zip(MMMU_LETTERS, CHOICES))
# (rule, response, official, lmms_eval 0.7.3)
MMMU_MC_CASES = [
    ("letter in parentheses", "(B)", "B", "B"),
    ("trailing punctuation stripped, standalone letter", "The answer is B.", "B", "B"),
    ("several standalone letters: last one", "A is wrong; the answer is C", "C", "C"),
    ("parenthesised letters beat standalone ones", "A or (C)", "C", "C"),
    ("several parenthesised: last one", "(A) looks right but (D) is", "D", "D"),
    ("option text, response longer than 5 words", "I think it shows a blue whale here", "C", "C"),
    ("several option texts: rightmost", "not the red one, it is the dog for sure", "B", "B"),
    ("lmms-eval reads 'DNA ' as the letter A (official needs ' A ')", "the DNA sample came from a dog", "B", "A"),
    ("lmms-eval adds a 'X.' rule before option text", "see figure C.2 which shows a red cat", "A", "C"),
]


@pytest.mark.parametrize("rule,resp,official,lmms", MMMU_MC_CASES, ids=[c[0] for c in MMMU_MC_CASES])
def test_mmmu_multi_choice_parsing(rule, resp, official, lmms):
    assert parse_mmmu_multi_choice(resp, MMMU_LETTERS, MMMU_OPTIONS) == official
    assert parse_mmmu_multi_choice(resp, MMMU_LETTERS, MMMU_OPTIONS, style="lmms_eval") == lmms


@pytest.mark.parametrize("rule,resp,official,lmms", MMMU_MC_CASES, ids=[c[0] for c in MMMU_MC_CASES])
def test_mmmu_multi_choice_matches_lmms_eval(rule, resp, official, lmms):
    utils = _lmms("lmms_eval.tasks.mmmu.utils")
    index2ans, all_choices = utils.get_multi_choice_info(CHOICES)
    assert (index2ans, all_choices) == (MMMU_OPTIONS, MMMU_LETTERS)
    assert utils.parse_multi_choice_response(resp, all_choices, index2ans) == lmms


def test_mmmu_multi_choice_fallback_is_deterministic():
    # Nothing found (short response, no letter, no option text): MMMU calls random.choice after a
    # one-time random.seed(42); here it is random.Random(42).choice on every call.
    expected = random.Random(42).choice(MMMU_LETTERS)
    assert parse_mmmu_multi_choice("no idea", MMMU_LETTERS, MMMU_OPTIONS) == expected
    assert parse_mmmu_multi_choice("no idea", MMMU_LETTERS, MMMU_OPTIONS) == expected
    assert parse_mmmu_multi_choice("no idea", MMMU_LETTERS, MMMU_OPTIONS, seed=7) == random.Random(7).choice(MMMU_LETTERS)


# (rule, response, parsed (as a set), gold, correct)
MMMU_OPEN_CASES = [
    ("tail after 'is ', number rounded to 2 decimals", "The answer is 3.14159", {3.14}, "3.14", True),
    ("wrong number", "The answer is 3.2", {3.2}, "3.14", False),
    ("thousands comma number, plus the '000' the simple regex also finds", "so the total is 1,000 dollars",
     {"1,000 dollars", 1000.0, 0.0}, "1000", True),
    ("'=' in the last line, scientific notation (and the exponent digit)", "x = 2e5", {200000.0, 5.0}, "200000", True),
    ("shortest tail over indicators", "so the final answer is paris", {"paris"}, "Paris", True),
    ("string gold is a substring of the parsed string", "The capital is Paris.", {"paris"}, "paris", True),
    ("one-character gold padded with a space", "the answer is x", {" x", "x "}, "x", True),
    ("round(0.125, 2) is 0.12", "the result is 0.125", {0.12}, "0.12", True),
    ("per line: each line's tail", "Step 1 is 7\nso it is 12", {7.0, 12.0}, "12", True),
    ("no indicator: whole response, lower-cased", "Forty-two", {"forty-two"}, "forty-two", True),
    ("gold given as a list of accepted answers", "it is 24/7", {"24/7", 24.0, 7.0}, ["twenty four seven", "24/7"], True),
]


@pytest.mark.parametrize("rule,resp,parsed,gold,correct", MMMU_OPEN_CASES, ids=[c[0] for c in MMMU_OPEN_CASES])
def test_mmmu_open_parsing(rule, resp, parsed, gold, correct):
    assert set(parse_mmmu_open(resp)) == parsed
    assert mmmu_accuracy(resp, gold, "open", None) == float(correct)


@pytest.mark.parametrize("rule,resp,parsed,gold,correct", MMMU_OPEN_CASES, ids=[c[0] for c in MMMU_OPEN_CASES])
def test_mmmu_open_matches_lmms_eval(rule, resp, parsed, gold, correct):
    utils = _lmms("lmms_eval.tasks.mmmu.utils")
    ref = utils.parse_open_response(resp)
    assert set(parse_mmmu_open(resp)) == set(ref)
    assert mmmu_accuracy(resp, gold, "open", None) == float(utils.eval_open(gold, ref))


def test_mmmu_accuracy_multiple_choice():
    assert mmmu_accuracy("The answer is (B).", "B", "multiple-choice", CHOICES) == 1.0
    assert mmmu_accuracy("The answer is (B).", "C", "multiple-choice", CHOICES) == 0.0
    assert mmmu_accuracy("the DNA sample came from a dog", "B", "multiple-choice", CHOICES) == 1.0
    assert mmmu_accuracy("the DNA sample came from a dog", "B", "multiple-choice", CHOICES, style="lmms_eval") == 0.0


# ---------------------------------------------------------------------------------------------------
# exact match and the registry
# ---------------------------------------------------------------------------------------------------
def test_exact_match():
    assert exact_match("  Paris ", ["paris"]) == 1.0
    assert exact_match("Paris.", ["paris"]) == 0.0
    assert exact_match("x", ["y", "X"]) == 1.0
    assert exact_match("x", []) == 0.0


def test_registry_adapters():
    assert set(METRICS) == {"vqa_accuracy", "vqa_accuracy_lmms_eval", "anls", "relaxed_accuracy",
                            "multiple_choice", "mmmu", "exact_match", "shapes_caption", "shapes_direction"}
    assert METRICS["vqa_accuracy"]("two", ["2"] * 10, None, {}) == 0.0
    assert METRICS["vqa_accuracy_lmms_eval"]("two", ["2"] * 10, None, {}) == 1.0
    assert METRICS["anls"]("the cat", ["the bat"], None, {}) == pytest.approx(6 / 7)
    assert METRICS["relaxed_accuracy"]("104", ["20", "100"], None, {}) == 1.0
    assert METRICS["relaxed_accuracy"]("104", [], None, {}) == 0.0
    assert METRICS["multiple_choice"]("The answer is (C) dog", ["C"], CHOICES, {}) == 1.0
    assert METRICS["mmmu"]("(B)", ["B"], CHOICES, {"question_type": "multiple-choice"}) == 1.0
    assert METRICS["mmmu"]("it is 24/7", ["nope", "24/7"], None, {"question_type": "open"}) == 1.0
    assert METRICS["mmmu"]("so it is 12", ["12"], None, {"question_type": "open"}) == 1.0
    assert METRICS["exact_match"](" Yes ", ["yes"], None, {}) == 1.0
    # The CPU demo's shapes world: the caption's set of shapes (any order), a video's direction.
    two = "a red circle at the top left and a blue square at the bottom right."
    assert METRICS["shapes_caption"](two, [two], None, {}) == 1.0
    assert METRICS["shapes_caption"](two.replace("blue", "green"), [two], None, {}) == 0.0
    assert METRICS["shapes_direction"]("the red circle moves up.", ["the blue square moves up."], None, {}) == 1.0
    assert METRICS["shapes_direction"]("the red circle moves up.", ["the red circle moves left."], None, {}) == 0.0
