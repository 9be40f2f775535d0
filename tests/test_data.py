"""Data: problem files (JSONL / JSON / verl parquet), errors naming file and line, prompts, the loader."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cir.data import (
    INSTRUCTION,
    Problem,
    PromptLoader,
    build_prompt,
    default_problems_path,
    load_problems,
)
from cir.rewards import score
from cir.rewards.math_equal import verify_in_process

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_jsonl_variants(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [
        {"problem": "1+1?", "answer": "2"},
        {"question": "2+2?", "answer": 4},                                            # numeric answer
        {"problem": "3+3?", "solution": r"So $\boxed{5}$, no: $\boxed{6}$."},          # last box
        {"problem": "half?", "solution": r"\boxed{\frac{1}{2}}", "id": "h"},
        {"problem": "bare?", "solution": "948", "unique_id": "u-1"},                  # AMC / OlymMATH style
        {"problem": "verl?", "reward_model": {"ground_truth": "7", "style": "rule"}},
        "",                                                                            # blank lines skipped
    ])
    problems = load_problems(path)
    assert [p.answer for p in problems] == ["2", "4", "6", r"\frac{1}{2}", "948", "7"]
    assert [p.problem for p in problems][:2] == ["1+1?", "2+2?"]
    assert [p.id for p in problems] == ["set-1", "set-2", "set-3", "h", "u-1", "set-6"]
    assert all(p.source == "set" and p.messages is None for p in problems)


def test_json_list(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}]))
    assert [p.answer for p in load_problems(path)] == ["1", "2"]


@pytest.mark.parametrize("line, message", [
    ('{"problem": "x", "answer": ', "invalid JSON: Expecting value at column 28 \\(the end of the line\\)"),
    ('{"problem": "x",, "answer": 1}', "invalid JSON: Expecting property name .* at column 17 \\("),
    ('["problem", "answer"]', "expected a JSON object"),
    ('{"answer": "3"}', "no problem text"),
    ('{"problem": "x"}', "no answer"),
    ('{"problem": "x", "answer": ""}', "`answer` is empty"),
    ('{"problem": "x", "answer": [1, 2]}', "`answer` must be a string or a number"),
    ('{"problem": "x", "solution": "A long worked solution.\\nWith no box at the end."}', r"`solution` has no"),
    ('{"problem": "x", "solution": "ends in \\\\boxed{3"}', r"`solution` has no"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"problem": "ok", "answer": "1"}', line])
    with pytest.raises(ValueError, match=message) as info:
        load_problems(path)
    assert str(info.value).endswith(f"({path}:2)")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown problem-set format '.csv'"):
        load_problems(tmp_path / "set.csv")
    with pytest.raises(ValueError, match="no problems"):
        load_problems(write_jsonl(tmp_path / "empty.jsonl", [""]))


def verl_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows)


def test_verl_parquet(tmp_path):
    rows = [
        {"data_source": "toy", "prompt": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "What is 6*7?"}],
         "ability": "math", "reward_model": {"ground_truth": "42", "style": "rule"},
         "extra_info": {"index": 10, "split": "train"}},
        {"data_source": "toy", "prompt": [{"role": "user", "content": "Half of 1?"}], "ability": "math",
         "reward_model": {"ground_truth": r"\frac{1}{2}", "style": "rule"},
         "extra_info": {"index": 11, "split": "train"}},
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(verl_table(rows), path)
    problems = load_problems(path)
    assert [(p.problem, p.answer, p.id, p.source) for p in problems] == [
        ("What is 6*7?", "42", "10", "toy"), ("Half of 1?", r"\frac{1}{2}", "11", "toy")]
    assert problems[0].messages[0] == {"role": "system", "content": "Be brief."}


def test_verl_parquet_bad_row_names_row(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "1+1?"}], "reward_model": {"ground_truth": "2"}},
            {"prompt": [{"role": "assistant", "content": "hi"}], "reward_model": {"ground_truth": "2"}}]
    path = tmp_path / "bad.parquet"
    pq.write_table(verl_table(rows), path)
    with pytest.raises(ValueError, match=r"`prompt` has no user message \(.*bad.parquet: row 1\)"):
        load_problems(path)


def test_flat_parquet(tmp_path):
    path = tmp_path / "flat.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": ["1", "2"]}), path)
    assert [p.answer for p in load_problems(path)] == ["1", "2"]


def test_shared_benchmark_files_load():
    files = sorted(SHARED_DATA.glob("benchmarks/*.jsonl")) + sorted(SHARED_DATA.glob("verl-parquet/*.parquet"))
    if not files:
        pytest.skip(f"no shared benchmark data at {SHARED_DATA} (only present on the development machine)")
    for path in files:
        problems = load_problems(path)
        assert problems and all(p.problem.strip() and p.answer.strip() for p in problems), path
        assert all("\\boxed" not in p.answer for p in problems), path
        assert all(score(f"\\boxed{{{p.answer}}}", p.answer) == 1.0 for p in problems), path


def test_shipped_problem_set():
    problems = load_problems(default_problems_path())
    assert len(problems) == 240
    assert len({p.id for p in problems}) == 240 and len({p.problem for p in problems}) == 240
    for p in problems:
        assert score(f"\\boxed{{{p.answer}}}", p.answer) == 1.0
        assert verify_in_process(p.answer, p.answer), p  # math-verify itself parses every answer


def test_raw_prompt():
    prompt = build_prompt(Problem("What is 2+3?", "5"))
    assert prompt.startswith(INSTRUCTION) and prompt.endswith("Problem: What is 2+3?\n\nSolution:")
    assert "```python" in prompt and "```output" in prompt and "\\boxed{}" in prompt
    assert build_prompt("Q?", system="SYS").startswith("SYS\n\n" + INSTRUCTION)


class FakeChatTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_chat_prompt():
    tok = FakeChatTokenizer()
    prompt = build_prompt(Problem("What is 2+3?", "5"), tok, mode="chat", system="SYS")
    assert prompt == f"<system>SYS</system><user>{INSTRUCTION}\n\nWhat is 2+3?</user><assistant>"
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_prompt("Q", None, mode="chat")
    with pytest.raises(ValueError, match="'fancy'"):
        build_prompt("Q", tok, mode="fancy")


def test_dataset_messages_are_used_as_is():
    p = Problem("Solve: 1+1", "2", messages=[{"role": "user", "content": "Solve: 1+1"}])
    tok = FakeChatTokenizer()
    assert build_prompt(p, tok, mode="chat") == "<user>Solve: 1+1</user><assistant>"
    assert build_prompt(p, tok, mode="chat", system="S") == "<system>S</system><user>Solve: 1+1</user><assistant>"
    assert build_prompt(p, mode="raw") == "Solve: 1+1"


def make_problems(k: int) -> list[Problem]:
    return [Problem(f"p{i}", str(i), id=str(i)) for i in range(k)]


def ids(batch: list[Problem]) -> list[str]:
    return [p.id for p in batch]


def test_loader_is_deterministic_and_covers_each_epoch():
    problems = make_problems(10)
    a = PromptLoader(problems, batch_size=5, seed=3)
    b = PromptLoader(problems, batch_size=5, seed=3)
    batches = [ids(next(a)) for _ in range(4)]
    assert batches == [ids(next(b)) for _ in range(4)]
    assert sorted(batches[0] + batches[1]) == sorted(ids(problems))          # epoch 0: each once
    assert sorted(batches[2] + batches[3]) == sorted(ids(problems))          # epoch 1: each once
    assert batches[:2] != batches[2:]                                        # reshuffled per epoch
    c = PromptLoader(problems, batch_size=5, seed=4)
    assert [ids(next(c)) for _ in range(2)] != batches[:2]


def test_loader_batches_span_epochs():
    loader = PromptLoader(make_problems(5), batch_size=3, seed=0, shuffle=False)
    assert [ids(next(loader)) for _ in range(3)] == [["0", "1", "2"], ["3", "4", "0"], ["1", "2", "3"]]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 4


def test_loader_resume_equality():
    problems = make_problems(7)
    full = PromptLoader(problems, batch_size=4, seed=1)
    expected = [ids(next(full)) for _ in range(6)]
    first = PromptLoader(problems, batch_size=4, seed=1)
    got = [ids(next(first)) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptLoader(problems, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    got += [ids(next(resumed)) for _ in range(3)]
    assert got == expected
    with pytest.raises(ValueError, match="seed=1"):
        PromptLoader(problems, batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_problems=7"):
        PromptLoader(make_problems(8), batch_size=4, seed=1).load_state_dict(state)


def test_loader_rank_split():
    problems = make_problems(12)
    whole = PromptLoader(problems, batch_size=6, seed=0)
    ranks = [PromptLoader(problems, batch_size=6, seed=0, rank=r, world_size=3) for r in range(3)]
    for _ in range(4):
        shares = [ids(next(loader)) for loader in ranks]
        assert all(len(s) == 2 for s in shares)
        assert sum(shares, []) == ids(next(whole))


def test_loader_rejects_bad_settings():
    with pytest.raises(ValueError, match="does not split evenly"):
        PromptLoader(make_problems(4), batch_size=5, world_size=2)
    with pytest.raises(ValueError, match="rank=2"):
        PromptLoader(make_problems(4), batch_size=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one problem"):
        PromptLoader([], batch_size=1)


# ---- what a damaged or odd file says, and where -----------------------------------------------------

def test_a_bad_byte_is_reported_on_its_own_line(tmp_path):
    """Text-mode reading decodes ahead in chunks, so a bad byte used to be reported lines too early."""
    good = [json.dumps({"problem": f"{i}+{i}? " + "pad " * 30, "answer": str(2 * i)}) for i in range(700)]
    data = "\n".join(good).encode().split(b"\n")
    data[499] = data[499].replace(b"pad", b"p\xffd", 1)  # line 500
    (path := tmp_path / "bad-byte.jsonl").write_bytes(b"\n".join(data) + b"\n")
    with pytest.raises(ValueError, match=r"not UTF-8 text: byte 0xff at column \d+") as info:
        load_problems(path)
    assert str(info.value).endswith(f"({path}:500)")
    two = tmp_path / "two.jsonl"  # in a 2-line file, the bad second line is line 2
    two.write_bytes(b'{"problem": "a", "answer": "1"}\n{"problem": "b\xc3", "answer": "2"}\n')
    with pytest.raises(ValueError, match="not UTF-8") as info:
        load_problems(two)
    assert str(info.value).endswith(f"({two}:2)")


def test_a_byte_order_mark_is_accepted(tmp_path):
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}]
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    assert [p.answer for p in load_problems(path)] == ["2", "4"]
    listed = tmp_path / "bom.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert [p.answer for p in load_problems(listed)] == ["2", "4"]


@pytest.mark.parametrize("answer", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_non_finite_answer_is_refused_with_its_line(tmp_path, answer):
    path = write_jsonl(tmp_path / "nan.jsonl", ['{"problem": "ok", "answer": "1"}',
                                                 '{"problem": "x", "answer": ' + answer + '}'])
    with pytest.raises(ValueError, match="`answer` is .*NaN or infinite") as info:
        load_problems(path)
    assert str(info.value).endswith(f"({path}:2)")


def test_a_non_finite_parquet_answer_is_refused_with_its_row(tmp_path):
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"problem": ["a", "b"], "answer": [1.0, float("nan")]}), path)
    with pytest.raises(ValueError, match=r"NaN or infinite.*nan.parquet: row 1\)"):
        load_problems(path)


def test_duplicate_ids_are_refused_naming_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "p1", "problem": "1+1?", "answer": "2"},
                                                 {"id": "p2", "problem": "2+2?", "answer": "4"},
                                                 {"id": "p1", "problem": "3+3?", "answer": "6"}])
    with pytest.raises(ValueError, match=rf"duplicate id 'p1': also the id of another problem \({path}:1\) "
                                         rf"\({path}:3\)"):
        load_problems(path)


def test_a_repeated_record_is_kept(tmp_path):
    """verl files repeat rows to weight them: the same id with the same problem and answer is no clash."""
    row = {"id": "p1", "problem": "1+1?", "answer": "2"}
    path = write_jsonl(tmp_path / "repeat.jsonl", [row, {"id": "p2", "problem": "2+2?", "answer": "4"}, row])
    assert [p.id for p in load_problems(path)] == ["p1", "p2", "p1"]
