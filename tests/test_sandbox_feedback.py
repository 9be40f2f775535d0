"""cir_sandbox.Result and format_feedback: the interpreter feedback text of the paper, no server needed."""
import pytest

from cir_sandbox import STATUSES, Result, format_feedback, truncate


def test_truncate_keeps_first_200_and_last_200_characters():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    out = truncate(text)
    assert out == text[:200] + "..." + text[-200:]
    assert len(out) == 403


def test_truncate_leaves_400_characters_alone():
    text = "x" * 400
    assert truncate(text) == text
    assert truncate(text + "y") == "x" * 200 + "..." + "x" * 199 + "y"


def test_feedback_of_ok_is_stripped_stdout():
    assert format_feedback(Result("ok", stdout="  42\n\n")) == "42"


def test_feedback_of_long_stdout_is_truncated_to_400_characters():
    stdout = "".join(f"{i}\n" for i in range(1000))
    feedback = format_feedback(Result("ok", stdout=stdout))
    assert feedback == stdout.strip()[:200] + "..." + stdout.strip()[-200:]


def test_feedback_without_output_is_done():
    assert format_feedback(Result("ok", stdout="")) == "Done"


def test_feedback_of_error_is_last_traceback_line_not_stdout():
    result = Result("error", stdout="partial\n", error_line="ZeroDivisionError: division by zero")
    assert format_feedback(result) == "ZeroDivisionError: division by zero"


def test_feedback_of_timeout_is_timeout_error():
    result = Result("timeout", stdout="started\n", error_line="TimeoutError: wall time limit of 1 s exceeded")
    assert format_feedback(result) == "Timeout Error"


@pytest.mark.parametrize("status", ["memory", "denied", "killed"])
def test_feedback_of_other_failures_is_the_error_line(status):
    assert format_feedback(Result(status, error_line=f"{status} happened")) == f"{status} happened"


def test_feedback_of_output_limit_is_the_captured_stdout():
    result = Result("output_limit", stdout="x" * 5000, error_line="OutputLimitError: ...")
    assert format_feedback(result) == "x" * 200 + "..." + "x" * 200


def test_unknown_status_is_rejected():
    with pytest.raises(ValueError, match="bogus"):
        Result("bogus")
    assert len(STATUSES) == 7


def test_result_round_trips_through_a_dict():
    result = Result("error", "out", "err", "E: x", 1.5, 0.5, "note", True)
    assert Result.from_dict(result.to_dict()) == result
