"""Problem sets: load math problems with reference answers from JSONL, JSON or verl-style parquet.

A record is read as
- problem: `problem`, else `question`, else the last user message of `prompt` (verl: a list of
  chat messages; the whole list is kept in `Problem.messages` so chat mode can use it as is);
- answer: `answer`, else `reward_model.ground_truth` (verl), else `solution`: the content of its
  last `\\boxed{}`; a solution without a box counts as a bare answer when it is one short line
  (the AMC23 / OlymMATH files store answers that way), and is an error otherwise;
- id: `id`, `unique_id`, `extra_info.index`, else `<file stem>-<line or row number>`.

A malformed record or file raises `cir.errors.UserError` (a ValueError) saying what is wrong and
where: `invalid JSON: Expecting ',' delimiter at column 42 (data/train.jsonl:3)`, `... (x.parquet: row 7)`;
a missing file raises MissingPathError (a FileNotFoundError). JSONL is read and decoded line by line,
so a byte that is not UTF-8 is reported on its own line; a UTF-8 byte-order mark is skipped. A numeric
answer that is NaN or infinite (JSON `NaN`, `Infinity`, or a number too large for a float, like 1e400)
is refused. Two records with one id are refused (naming both places) unless they are the same record
repeated: verl files repeat rows to weight them (the shared aime24.parquet holds each row twice).

    problems = load_problems("data/train.jsonl")      # or .parquet
"""
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cir.errors import MissingPathError, UserError, location
from cir.rewards.boxed import extract_boxed

MAX_BARE_SOLUTION_CHARS = 100  # longest un-boxed `solution` taken as the answer (OlymMATH's longest: 49)


@dataclass
class Problem:
    """A math problem and its reference answer (LaTeX, as written in the data set)."""

    problem: str
    answer: str
    id: str = ""
    source: str = ""
    messages: list[dict[str, str]] | None = None  # the data set's own chat prompt (verl), if any


def _problem_text(record: dict[str, Any]) -> tuple[str, list[dict[str, str]] | None]:
    for key in ("problem", "question"):
        if key in record and record[key] is not None:
            if not isinstance(record[key], str) or not record[key].strip():
                raise ValueError(f"`{key}` must be a non-empty string, got {record[key]!r:.80}")
            return record[key], None
    prompt = record.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return prompt, None
    if isinstance(prompt, list):
        messages = []
        for m in prompt:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise ValueError(f"`prompt` must be a list of {{role, content}} messages, got {m!r:.80}")
            messages.append({"role": str(m["role"]), "content": m["content"]})
        user = [m["content"] for m in messages if m["role"] == "user"]
        if not user:
            raise ValueError("`prompt` has no user message")
        return user[-1], messages
    raise ValueError(f"no problem text: expected `problem`, `question` or `prompt`, found keys {sorted(record)}")


def _as_answer(value: Any, key: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"`{key}` must be a string or a number, got {value!r:.80}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"`{key}` is {value} (NaN or infinite: not an answer a response can match)")
    text = str(value).strip()
    if not text:
        raise ValueError(f"`{key}` is empty")
    return text


def _answer(record: dict[str, Any]) -> str:
    if record.get("answer") is not None:
        return _as_answer(record["answer"], "answer")
    reward_model = record.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        return _as_answer(reward_model["ground_truth"], "reward_model.ground_truth")
    if record.get("solution") is not None:
        solution = _as_answer(record["solution"], "solution")
        boxed = extract_boxed(solution)
        if boxed is not None and boxed.strip():
            return boxed.strip()
        if "\n" not in solution and len(solution) <= MAX_BARE_SOLUTION_CHARS and "\\boxed" not in solution:
            return solution
        raise ValueError("`solution` has no (balanced, non-empty) \\boxed{} answer")
    raise ValueError("no answer: expected `answer`, `solution` or `reward_model.ground_truth`, "
                     f"found keys {sorted(record)}")


def _record_id(record: dict[str, Any], fallback: str) -> str:
    for key in ("id", "unique_id"):
        if record.get(key) is not None:
            return str(record[key])
    extra = record.get("extra_info")
    if isinstance(extra, dict) and extra.get("index") is not None:
        return str(extra["index"])
    return fallback


def parse_record(record: Any, source: str, fallback_id: str) -> Problem:
    """One data-set record -> Problem; ValueError (without location) when it is malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    problem, messages = _problem_text(record)
    return Problem(problem=problem, answer=_answer(record), id=_record_id(record, fallback_id),
                   source=str(record.get("data_source") or source), messages=messages)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; invalid JSON or a line that is not UTF-8
    is a UserError naming the file, the line and the column. A leading UTF-8 byte-order mark is skipped."""
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported on its own line
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1} (a binary file?)",
                                where=location(path, line_no)) from None
            text = line.rstrip("\r\n")  # with the newline, an error at its end reads "line 2 column 1"
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                end = " (the end of the line)" if e.pos >= len(text) else ""
                raise UserError(f"invalid JSON: {e.msg} at column {e.pos + 1}{end}",
                                where=location(path, line_no)) from None
            yield line_no, value


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    for line_no, record in iter_jsonl(path):
        yield f"line {line_no}", record


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8-sig") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON: {e.msg} at column {e.colno}", where=location(path, e.lineno)) from None
        except UnicodeDecodeError:
            raise UserError("not UTF-8 text (a binary file?)", where=str(path)) from None
    if not isinstance(records, list):
        raise UserError(f"expected a JSON list of records, got {type(records).__name__}", where=str(path))
    for i, record in enumerate(records):
        yield f"record {i}", record


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        for batch in batches:
            for record in batch.to_pylist():
                yield f"row {row}", record
                row += 1
    except (pa.ArrowException, OSError) as e:  # a truncated or foreign file: pyarrow's message lacks the name
        raise UserError(f"cannot read the parquet file ({type(e).__name__}: {e})", where=str(path)) from None


_READERS = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}


def load_problems(path: str | Path) -> list[Problem]:
    """All problems of a `.jsonl`, `.json` (a list of records) or `.parquet` file."""
    path = Path(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"unknown problem-set format {path.suffix!r}; expected one of {sorted(_READERS)}",
                        where=str(path))
    if path.is_dir():
        raise UserError("a directory, not a problem-set file", where=str(path))
    if not path.is_file():
        raise MissingPathError(f"problem set not found: {path}")
    problems, first_seen = [], {}
    for where, record in reader(path):
        line = where.removeprefix("line ")
        place = location(path, int(line)) if line.isdigit() else f"{path}: {where}"
        try:
            problem = parse_record(record, source=path.stem, fallback_id=f"{path.stem}-{where.split()[-1]}")
        except ValueError as e:
            raise UserError(str(e), where=place) from None
        if problem.id in first_seen:
            earlier_place, earlier = first_seen[problem.id]
            if (earlier.problem, earlier.answer) != (problem.problem, problem.answer):
                raise UserError(f"duplicate id {problem.id!r}: also the id of another problem ({earlier_place})",
                                where=place, hint="ids must be unique (drop the `id` field to number records by line)")
        else:
            first_seen[problem.id] = (place, problem)
        problems.append(problem)
    if not problems:
        raise UserError("no problems in file", where=str(path))
    return problems


def default_problems_path() -> str:
    """The problem set shipped with the project: 240 multi-digit arithmetic problems (`cir.data.arithmetic`)."""
    return str(Path(__file__).with_name("arith.jsonl"))
