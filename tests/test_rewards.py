"""Rewards: boxed-answer extraction and math equivalence (+1 / -1), thread safety, the timing guard."""
import threading
import time

import pytest

from cir.rewards import MathVerifier, extract_boxed, normalize_reference, score, score_many


@pytest.mark.parametrize("text, expected", [
    (r"The answer is \boxed{42}.", "42"),
    (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),                  # nested braces
    (r"first \boxed{1}, then \boxed{2}, finally \boxed{3}", "3"),             # the last box wins
    (r"\boxed{\boxed{7}}", "7"),                                              # nested boxes
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                                       # escaped braces
    (r"so \boxed 5 is it", "5"),                                              # \boxed x
    (r"\boxed {12}", "12"),
    (r"\fbox{x+1}", "x+1"),
    (r"\boxed{}", ""),
    ("no box here", None),
    (r"\boxed{3} and then \boxed{\frac{1}{2}", None),                         # last box unbalanced
    (r"\boxedfoo{3}", None),
    ("", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_from_code_integrated_response():
    response = (
        "Let me compute.\n```python\nprint(sum(range(1, 11)))\n```\n```output\n55\n```\n"
        "The sum is $\\boxed{55}$."
    )
    assert extract_boxed(response) == "55"


@pytest.mark.parametrize("reference, expected", [
    ("42", "42"), (r"\boxed{42}", "42"), ("$42$", "42"), (r"$\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),
    (r"\(x+1\)", "x+1"), (" 7 ", "7"),
])
def test_normalize_reference(reference, expected):
    assert normalize_reference(reference) == expected


EQUIVALENT = [
    ("0.5", r"\frac{1}{2}"),                                   # decimal vs fraction
    ("1/2", r"\frac{1}{2}"),                                   # / vs \frac
    (r"\dfrac{3}{4}", "0.75"),
    (r"\frac12", "1/2"),
    (r"\sqrt{8}", r"2\sqrt{2}"),                               # radicals
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
    ("[1, 2)", "[1,2)"),                                       # intervals
    (r"(-\infty,3]", r"(-\infty, 3]"),
    (r"\{3, 2, 1\}", r"\{1,2,3\}"),                            # sets
    ("(3, \\pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),       # tuples, \left \right noise
    ("Evelyn", r"\text{Evelyn}"),                              # text answers
    ("C", r"\text{(C)}"),
    ("15", r"15^{\circ}"),                                     # degrees
    (r"15^\circ", "15"),
    ("1000", "1,000"),
    ("10.0", "10"),
    ("x = 5", "5"),
    (r"\pi - \arccos(1/8)", r"\pi -\arccos \frac{1}{8}"),
    ("2^{2019} \\cdot 2", "2^{2020}"),
    (r"\ 42\,", "42"),                                         # spacing commands
]

NOT_EQUIVALENT = [
    ("3", "4"),
    ("0.333", r"\frac{1}{3}"),
    ("[1,2]", "(1,2)"),
    (r"\{1,3\}", r"\{1,2\}"),
    (r"\text{no}", r"\text{yes}"),
    ("0.05", "5"),
    (r"\sqrt{2}", "2"),
    ("-1", "1"),
]


@pytest.mark.parametrize("answer, reference", EQUIVALENT)
def test_score_equivalent(answer, reference):
    assert score(f"so the answer is $\\boxed{{{answer}}}$", reference) == 1.0


@pytest.mark.parametrize("answer, reference", NOT_EQUIVALENT)
def test_score_not_equivalent(answer, reference):
    assert score(f"\\boxed{{{answer}}}", reference) == -1.0


@pytest.mark.parametrize("response", ["the answer is 42", r"\boxed{42", r"\boxed{}", ""])
def test_score_missing_or_broken_box_is_wrong(response):
    assert score(response, "42") == -1.0


def test_score_reference_given_boxed_or_in_dollars():
    assert score(r"\boxed{\frac{1}{2}}", r"\boxed{0.5}") == 1.0
    assert score(r"\boxed{\frac{1}{2}}", "$0.5$") == 1.0
    assert score(r"\boxed{\boxed{0.5}}", r"\frac{1}{2}") == 1.0


def test_score_only_the_last_box_counts():
    assert score(r"maybe \boxed{3}, no: \boxed{4}", "4") == 1.0
    assert score(r"maybe \boxed{4}, no: \boxed{3}", "4") == -1.0


def test_score_from_threads():
    results: dict[int, float] = {}

    def work(i: int) -> None:
        results[i] = score(r"\boxed{\frac{2}{4}}", "0.5") if i % 2 else score(r"\boxed{\sqrt{8}}", "3")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: -1.0, 1: 1.0, 2: -1.0, 3: 1.0}


def test_in_process_verifier_works_off_the_main_thread():
    verifier = MathVerifier(num_workers=0)
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(verifier.score(r"\boxed{\dfrac{6}{8}}", "0.75")))
    t.start()
    t.join()
    assert out == [1.0]


def test_score_many_matches_score():
    responses = [r"\boxed{0.5}", r"\boxed{2}", "no box", r"\boxed{[0, 1]}", r"\boxed{\sqrt{4}}"]
    references = [r"\frac{1}{2}", "3", "1", "[0,1]", "2"]
    with MathVerifier(num_workers=2, timeout_s=30) as verifier:
        assert verifier.score_many(responses, references) == [1.0, -1.0, -1.0, 1.0, 1.0]
    assert score_many(responses, references) == [1.0, -1.0, -1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        score_many(["a", "b"], ["a"])


def test_timing_guard_stops_a_pathological_answer():
    # sympy does not finish 9^(9^(9^9)) in minutes; the worker is killed at the deadline
    with MathVerifier(num_workers=1, timeout_s=1.0) as verifier:
        assert verifier.score(r"\boxed{1}", r"\frac{2}{2}") == 1.0  # worker started and warm
        start = time.monotonic()
        assert verifier.score(r"\boxed{9^{9^{9^{9}}}}", "1") == -1.0
        assert time.monotonic() - start < 10
        assert verifier.num_timeouts == 1
        # the replacement worker serves the next request
        assert verifier.score(r"\boxed{\frac{4}{8}}", "0.5") == 1.0
        assert verifier.num_timeouts == 1


def test_verifier_rejects_bad_settings():
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=-1)
