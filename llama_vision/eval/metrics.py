"""Per-sample metrics of the evaluation harness.

Every metric is a small pure function of strings returning a float in [0, 1]. Each docstring names
the definition it reproduces; where an upstream script has a quirk (a regex that does not do what its
name says, a length taken before normalisation, ...) the quirk is kept, because the point of these
functions is to give the numbers the published scripts give.

``METRICS`` maps the metric names used in task YAMLs to adapters with one signature,
``score(prediction, answers, choices, meta) -> float``, for the runner.
"""

from __future__ import annotations

import random
import re
from typing import Callable, Sequence

__all__ = [
    "METRICS",
    "anls",
    "exact_match",
    "extract_choice",
    "mmmu_accuracy",
    "multiple_choice_accuracy",
    "parse_mmmu_multi_choice",
    "parse_mmmu_open",
    "relaxed_accuracy",
    "vqa_accuracy",
]

# ---------------------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------------------
# Tables copied from GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (commit a013f00,
# "Fixed processing answers bug"); lmms-eval 0.7.3's EvalAIAnswerProcessor carries the same tables.
# The capitalised keys ("Im", "Ive", ...) can never match (the text is lower-cased first): kept as is.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!")
# "(?!<=\d)" is a negative look-ahead for the literal text "<=digit", not a look-behind: the regex
# removes every "." that is not followed by a digit ("5." -> "5", "3.5" kept, ".5" kept).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP_OFFICIAL = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py
_COMMA_STRIP_EVALAI = re.compile(r"(?<=\d)(\,)+(?=\d)")  # lmms-eval / MMF EvalAIAnswerProcessor


def _process_punctuation(text: str, comma_strip: re.Pattern) -> str:
    """``processPunctuation`` of vqaEval.py: each punctuation mark is deleted when it touches a space
    somewhere in the input, or when the input holds a digit-comma-digit ("1,000"); otherwise it becomes
    a space. Then periods not followed by a digit are deleted. The scripts pass ``re.UNICODE`` as the
    ``count`` argument of ``sub``, so at most 32 periods go: kept."""
    out = text
    has_digit_comma = comma_strip.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _process_digit_article(text: str) -> str:
    """``processDigitArticle`` of vqaEval.py: lower-case, split on whitespace, number words zero..ten
    (and "none") to digits, drop the articles a/an/the, restore apostrophes of the contraction table."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def _clean_ws(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _leave_one_out(pred: str, answers: Sequence[str]) -> float:
    """The VQA accuracy loop: for each annotator, min(1, #other annotators matching / 3); mean over
    annotators. Annotators are told apart by position (the scripts compare answer dicts that carry a
    unique ``answer_id``)."""
    if not answers:
        return 0.0
    accs = []
    for i in range(len(answers)):
        matching = sum(1 for j, a in enumerate(answers) if j != i and a == pred)
        accs.append(min(1.0, matching / 3))
    return sum(accs) / len(accs)


def vqa_accuracy(prediction: str, answers: Sequence[str], style: str = "official") -> float:
    """VQA accuracy, Antol et al. 2015 / Goyal et al. 2017: min(1, #humans that gave the answer / 3),
    averaged over the leave-one-out subsets of the (usually 10) annotator answers.

    ``style`` picks whose normalisation is used:

    * ``"official"``: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at its latest
      commit a013f00 ("Fixed processing answers bug", 2021). Prediction and answers get ``\\n``/``\\t``
      -> space and ``strip``; then, *only when the annotators disagree* (``len(set(answers)) > 1``),
      both the answers and the prediction get processPunctuation then processDigitArticle. When all
      annotators agree nothing else is normalised (so "Two" or "2." never match ten "2"s).
    * ``"official_2017"``: the same file before that commit (a4f1afd, "updated for v2.0", 2017): the
      prediction is always normalised (whitespace, punctuation, digits/articles/contractions), the
      answers are not whitespace-cleaned and get processPunctuation only when they disagree.
    * ``"lmms_eval"``: lmms-eval 0.7.3 ``tasks/vqav2/utils.py::vqav2_process_results``: both sides
      always get whitespace cleaning, ``EvalAIAnswerProcessor.process_punctuation`` (whose comma regex
      is ``(?<=\\d)(\\,)+(?=\\d)``) and ``process_digit_article``.
    """
    answers = list(answers)
    if style == "official":
        pred, gts = _clean_ws(prediction), [_clean_ws(a) for a in answers]
        if len(set(gts)) > 1:
            gts = [_process_digit_article(_process_punctuation(a, _COMMA_STRIP_OFFICIAL)) for a in gts]
            pred = _process_digit_article(_process_punctuation(pred, _COMMA_STRIP_OFFICIAL))
    elif style == "official_2017":
        pred = _process_digit_article(_process_punctuation(_clean_ws(prediction), _COMMA_STRIP_OFFICIAL))
        gts = answers
        if len(set(gts)) > 1:
            gts = [_process_punctuation(a, _COMMA_STRIP_OFFICIAL) for a in gts]
    elif style == "lmms_eval":
        pred = _process_digit_article(_process_punctuation(_clean_ws(prediction), _COMMA_STRIP_EVALAI))
        gts = [_process_digit_article(_process_punctuation(_clean_ws(a), _COMMA_STRIP_EVALAI))
               for a in answers]
    else:
        raise ValueError(f"unknown VQA accuracy style {style!r} (official, official_2017, lmms_eval)")
    return _leave_one_out(pred, gts)


# ---------------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA, ST-VQA)
# ---------------------------------------------------------------------------------------------------
def _levenshtein(s1: str, s2: str) -> int:
    if len(s1) > len(s2):
        s1, s2 = s2, s1
    prev = list(range(len(s1) + 1))
    for i2, c2 in enumerate(s2):
        cur = [i2 + 1]
        for i1, c1 in enumerate(s1):
            cur.append(prev[i1] if c1 == c2 else 1 + min(prev[i1], prev[i1 + 1], cur[-1]))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question (Biten et al. 2019, ST-VQA; DocVQA,
    Mathew et al. 2021): max over answers of 1 - NL(answer, prediction), 0 below the threshold.

    Follows the RRC / docvqa.org evaluation script (``evaluate_method`` of ``infographicsvqa_eval.py``,
    copied verbatim into lmms-eval 0.7.3 ``api/metrics.py::anls``): both strings are stripped,
    lower-cased and inner whitespace collapsed before the edit distance, but the normaliser is
    ``max(len(answer.upper()), len(prediction.upper()))`` of the *raw* strings, and the score is zeroed
    only when ``1 - NL < threshold``, so NL == 0.5 exactly scores 0.5 (the paper writes "0 if NL >= tau";
    the script is what leaderboards ran).
    """
    if not answers:
        return 0.0
    det = " ".join(prediction.strip().lower().split())
    values = []
    for answer in answers:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else _levenshtein(gt, det) / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else float(score)


# ---------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------------
def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Masry et al. 2022, sec. 5.1, after Methani et al. 2020): a numeric
    answer is right within ``tolerance`` relative error of the target, anything else needs a
    case-insensitive exact match.

    Same code as pix2struct's / Qwen-VL's ``relaxed_correctness`` and lmms-eval 0.7.3
    ``tasks/chartqa/utils.py``: ``float()`` of each side, a trailing "%" divides by 100 (so "50%" is 0.5
    and does not match "50"); the relative test is ``<=``; a target of 0 (falsy) or a non-numeric
    prediction falls back to ``prediction.lower() == target.lower()`` with no stripping; "1,000" is not
    a float.
    """
    pred_f, target_f = _to_float(prediction), _to_float(answer)
    if pred_f is not None and target_f:
        return float(abs(pred_f - target_f) / abs(target_f) <= tolerance)
    return float(prediction.lower() == answer.lower())


# ---------------------------------------------------------------------------------------------------
# Generic exact match
# ---------------------------------------------------------------------------------------------------
def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when ``prediction.strip().lower()`` equals some ``answer.strip().lower()``, else 0.0."""
    pred = prediction.strip().lower()
    return float(any(pred == a.strip().lower() for a in answers))


# ---------------------------------------------------------------------------------------------------
# Multiple choice (A-OKVQA MC, AI2D, ScienceQA, MMBench, ...)
# ---------------------------------------------------------------------------------------------------
def _letters(choices: Sequence[str] | None) -> list[str]:
    n = len(choices) if choices else 26
    return [chr(ord("A") + i) for i in range(min(n, 26))]


def _norm_option(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!").split())


def extract_choice(prediction: str, choices: Sequence[str] | None) -> str | None:
    """The option letter a free-form answer picks, or None.

    Tried in order (letters are upper-case, limited to the first ``len(choices)``; markdown ``*``/
    backticks are ignored): (1) the whole answer is a letter, bare or as "(B)", "[B]", "B.", "B)",
    "B:"; (2) ``\\boxed{B}``; (3) the last "answer" phrase followed by a letter, e.g. "Answer: B",
    "The answer is (C) dog", failing that the last "option"/"choice" one ("the correct option is
    D."); (4) a leading marked letter, "B. dog", "(B) dog", "B) dog"; (5) the answer is one option's
    text (case, surrounding space and a final "."/"!" ignored) and no other option's, or is "X <the
    text of option X>" ("B dog"); (6) exactly one distinct "(X)" anywhere. A bare leading capital ("A dog is ...") is never read as a letter.
    """
    letters = _letters(choices)
    text = re.sub(r"[*`]+", "", prediction).strip()
    if not text or not letters:
        return None
    cls = "[" + "".join(letters) + "]"
    m = re.fullmatch(rf"[(\[]?({cls})[)\]]?[.:)]?", text)
    if m:
        return m.group(1)
    m = re.search(rf"\\boxed\{{\s*\(?({cls})\)?\s*\}}", text)
    if m:
        return m.group(1)
    for words in ("answer", "option|choice"):
        hits = list(re.finditer(
            rf"(?i:\b(?:{words})\b(?:\s+is)?)\s*[:\-]?\s*[(\[]?({cls})(?![A-Za-z0-9])", text))
        if hits:
            return hits[-1].group(1)
    m = re.match(rf"(?:[(\[]({cls})[)\]]|({cls})[.:)])(?=\s|$)", text)
    if m:
        return m.group(1) or m.group(2)
    if choices:
        norm = _norm_option(text)
        same = [letter for letter, c in zip(letters, choices) if _norm_option(c) == norm]
        if len(same) == 1:
            return same[0]
        m = re.match(rf"({cls})\s+(.+)", text)  # "B dog" where option B is "dog"
        if m and _norm_option(m.group(2)) == _norm_option(choices[ord(m.group(1)) - ord("A")]):
            return m.group(1)
    paren = {m.group(1) for m in re.finditer(rf"\(({cls})\)", text)}
    if len(paren) == 1:
        return paren.pop()
    return None


def multiple_choice_accuracy(prediction: str, answer: str, choices: Sequence[str] | None) -> float:
    """1.0 when ``extract_choice(prediction, choices)`` is the gold letter ``answer``, else 0.0."""
    return float(extract_choice(prediction, choices) == answer.strip().upper())


# ---------------------------------------------------------------------------------------------------
# MMMU (Yue et al. 2024), MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py
# ---------------------------------------------------------------------------------------------------
def parse_mmmu_multi_choice(response: str, all_choices: Sequence[str], index2ans: dict[str, str],
                            style: str = "official", seed: int = 42) -> str:
    """MMMU's ``parse_multi_choice_response``: the option letter of a response.

    Strip ``,.!?;:'`` from the ends, pad with spaces; candidates are the letters written "(A)"; failing
    that, letters standing alone (" A "); failing that, and only for responses of more than 5 words,
    options whose text occurs in the response (case-insensitive). Several candidates: the one whose
    last occurrence is rightmost (first on ties).

    Deviation: where the official code returns ``random.choice(all_choices)`` (nothing found; the module
    seeds the global RNG with 42 once, so the pick depends on how many responses came before), this
    returns ``random.Random(seed).choice(all_choices)``, the official pick for the first such response
    of a run, the same for every call.

    ``style="lmms_eval"`` reproduces lmms-eval 0.7.3 ``_task_utils/mmmu_mcq_utils.py``, which differs:
    its second rule is "A " with no space before (so "DNA " yields A), then a rule "A." before the
    content rule.
    """
    if style not in ("official", "lmms_eval"):
        raise ValueError(f"unknown MMMU parser style {style!r} (official, lmms_eval)")
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    index_ans, with_brackets = True, False
    candidates = [c for c in all_choices if f"({c})" in response]
    if candidates:
        with_brackets = True
    elif style == "official":
        candidates = [c for c in all_choices if f" {c} " in response]
    else:  # lmms_eval
        candidates = [c for c in all_choices if f"{c} " in response]
        if not candidates:
            candidates = [c for c in all_choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        candidates = [k for k, ans in index2ans.items() if ans.lower() in response.lower()]
        index_ans = not candidates
    if not candidates:
        return random.Random(seed).choice(list(all_choices))
    if len(candidates) == 1:
        return candidates[0]
    if not index_ans:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    elif with_brackets:
        starts = [response.rfind(f"({c})") for c in candidates]
    else:
        starts = [response.rfind(f" {c} ") for c in candidates]
    return candidates[max(range(len(starts)), key=starts.__getitem__)]


def _check_is_number(string: str) -> bool:
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def _normalize_str(string: str) -> list:
    """MMMU ``normalize_str``: numbers (commas dropped) become floats rounded to 2 decimals; other
    strings are lower-cased, and a one-character string becomes [" x", "x "] to avoid trivial matches."""
    string = string.strip()
    if _check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]
    return [string]


def _extract_numbers(string: str) -> list[str]:
    """MMMU ``extract_numbers``: numbers with thousands commas, then scientific, then plain ones."""
    commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", string)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", string)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", string)
    return commas + scientific + simple


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # The official split also tries r"\.\s(?=[A-Z])", which can never match the lower-cased text.
    sub_responses = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    keys = []
    for index, resp in enumerate(sub_responses):
        if index == len(sub_responses) - 1:
            indicators.append("=")  # the last sub-response may be an equation
        shortest = None
        for indicator in indicators:
            if indicator in resp:
                tail = resp.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_mmmu_open(response: str) -> list:
    """MMMU ``parse_open_response``: the candidate answers of an open response.

    The tail after the last of "could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
    "result " (and "=" in the last line), shortest over indicators, per line; every number found in
    those tails; all passed through ``normalize_str`` (numbers -> floats rounded to 2 decimals, text
    lower-cased); duplicates removed. Returned sorted-free (a list built from a set, as upstream).
    """
    keys = _key_subresponses(response)
    preds = list(keys)
    for resp in keys:
        preds.extend(_extract_numbers(resp))
    normalized = []
    for p in preds:
        normalized.extend(_normalize_str(p))
    return list(set(normalized))


def _eval_open(gold, parsed: Sequence) -> bool:
    """MMMU ``eval_open``: a parsed string is right when some normalised gold string is a substring of
    it; a parsed number when it equals some normalised gold number."""
    golds = gold if isinstance(gold, (list, tuple)) else [gold]
    norm = [n for g in golds for n in _normalize_str(g)]
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(n, str) and n in pred for n in norm):
                return True
        elif pred in norm:
            return True
    return False


def mmmu_accuracy(prediction: str, answer, question_type: str, choices: Sequence[str] | None,
                  style: str = "official") -> float:
    """MMMU accuracy of one response: ``parse_mmmu_multi_choice`` + ``eval_multi_choice`` (exact letter
    match, ``answer`` a letter or a list of letters) for ``question_type == "multiple-choice"``, else
    ``parse_mmmu_open`` + ``eval_open`` (``answer`` a string or a list of accepted strings). Options
    are lettered from "A" as in MMMU ``get_multi_choice_info``."""
    if question_type == "multiple-choice":
        letters = _letters(choices)
        index2ans = dict(zip(letters, choices or []))
        pred = parse_mmmu_multi_choice(prediction, letters, index2ans, style=style)
        golds = answer if isinstance(answer, (list, tuple)) else [answer]
        return float(pred in golds)
    return float(_eval_open(answer, parse_mmmu_open(prediction)))


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------
Score = Callable[[str, Sequence[str], "Sequence[str] | None", dict], float]


def _shapes_caption(pred, answers, choices, meta):
    from llama_vision.data.synthetic.shapes import caption_accuracy

    return caption_accuracy(pred, answers[0])


def _shapes_direction(pred, answers, choices, meta):
    from llama_vision.data.synthetic.shapes import direction_accuracy

    return direction_accuracy(pred, answers[0])


def _mmmu_score(pred, answers, choices, meta):
    answer = answers[0] if len(answers) == 1 else list(answers)
    return mmmu_accuracy(pred, answer, meta["question_type"], choices)


METRICS: dict[str, Score] = {
    "vqa_accuracy": lambda pred, answers, choices, meta: vqa_accuracy(pred, answers),
    "vqa_accuracy_lmms_eval": lambda pred, answers, choices, meta: vqa_accuracy(pred, answers, "lmms_eval"),
    "anls": lambda pred, answers, choices, meta: anls(pred, answers),
    "relaxed_accuracy": lambda pred, answers, choices, meta: max(
        (relaxed_accuracy(pred, a) for a in answers), default=0.0),
    "multiple_choice": lambda pred, answers, choices, meta: multiple_choice_accuracy(
        pred, answers[0] if answers else "", choices),
    "mmmu": _mmmu_score,
    "exact_match": lambda pred, answers, choices, meta: exact_match(pred, answers),
    # The CPU demo's shapes world (llama_vision/data/synthetic/shapes.py): the caption's set of
    # (colour, kind, position) triples, and a video caption's direction.
    "shapes_caption": _shapes_caption,
    "shapes_direction": _shapes_direction,
}
"""Metric name (as written in task YAMLs) -> ``score(prediction, answers, choices, meta) -> float``.
``multiple_choice`` reads the gold letter from ``answers[0]``; ``relaxed_accuracy`` takes the max over
answers; ``mmmu`` reads ``meta["question_type"]`` ("multiple-choice" or "open")."""
