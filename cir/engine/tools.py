"""Tool interleaving: find a closed ```python block in what a sequence generated, build the feedback.

The text is only ever *read* here, to find the code. The trajectory's tokens stay exactly as
sampled; the feedback block is encoded once and appended (loss mask 0). Format, as in the paper's
rollout: newline, ```output, the sandbox's formatted result, the closing fence, newline.

Whatever a snippet prints or raises becomes feedback text: `tool_outcome` never raises, and its text
is valid UTF-8 (a lone surrogate, e.g. from `raise ValueError(chr(0xD800))`, is replaced, so the
tokenizer can encode it). A call the sandbox itself failed (the executor's future raised, or the
client answered `killed` with a `SandboxError:` line: a server that died and could not run the call
again) is an infrastructure failure: its feedback is that error line, it is counted, and
`InfraFailures` stops the rollout with one error line once `limit` such calls came back in a row.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from cir.errors import UserError
from cir.tokenizer import decode_incremental
from cir_sandbox import format_feedback
from cir_sandbox.result import valid_text  # lone surrogates -> U+FFFD, as the sandbox writes its own text

SANDBOX_ERROR = "SandboxError: "  # how the sandbox client starts the error line of a call it could not run

CODE_OPEN = "```python"
CODE_CLOSE = "```"


def feedback_text(formatted_result: str) -> str:
    return f"\n```output\n{valid_text(formatted_result)}\n```\n"


@dataclass
class ToolOutcome:
    text: str  # the formatted feedback (valid_text)
    ok: bool  # the code ran to its end
    infra: bool  # the sandbox failed, not the code


def is_infra_failure(result) -> bool:
    """Whether a Result says the sandbox could not run the call (`Result.infrastructure`: set only by the
    sandbox's server and client, never from anything a snippet reports), as opposed to anything the code
    itself did. A snippet raising its own `SandboxError` is the code's failure."""
    return getattr(result, "infrastructure", False) is True


def tool_outcome(future: Future) -> ToolOutcome:
    """The feedback of one finished call; never raises (an executor's exception is an infra failure)."""
    try:
        result = future.result()
    except Exception as e:  # the executor itself failed: the sequence goes on with the error as feedback
        return ToolOutcome(valid_text(f"{SANDBOX_ERROR}{type(e).__name__}: {e}")[:400], ok=False, infra=True)
    try:
        text = format_feedback(result)
    except Exception as e:  # a Result with fields of the wrong type: the sandbox's fault, not the code's
        return ToolOutcome(valid_text(f"{SANDBOX_ERROR}malformed result ({type(e).__name__})"), ok=False, infra=True)
    return ToolOutcome(valid_text(text), ok=getattr(result, "status", None) == "ok", infra=is_infra_failure(result))


class SandboxFailingError(UserError):
    """Tool calls keep failing for infrastructure reasons: the run cannot go on."""


class InfraFailures:
    """Infrastructure failures: counted per rollout (`num`), and `limit` of them in a row (across
    rollouts, no other result in between) raise SandboxFailingError."""

    def __init__(self, limit: int = 32):
        self.limit, self.num, self.in_a_row = limit, 0, 0

    def record(self, outcome: ToolOutcome) -> None:
        if not outcome.infra:
            self.in_a_row = 0
            return
        self.num += 1
        self.in_a_row += 1
        if self.limit and self.in_a_row >= self.limit:
            self.in_a_row = 0
            raise SandboxFailingError(
                f"the sandbox failed {self.limit} tool calls in a row (last: {outcome.text.splitlines()[0][:200]})",
                hint="it restarted itself and still fails: check the machine (free space in the temp dir, "
                     "process limits); resume with --resume, or train without tools (rollout.tool_budget {0: 0})")


class SegmentDecoder:
    """Incremental detokenisation of the tokens a sequence sampled since its last feedback block
    (`cir.tokenizer.decode_incremental`: O(window) per token, incomplete UTF-8 held back)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        return self.extend([token_id])

    def extend(self, token_ids: list[int]) -> str:
        """Several tokens in one decode: the same text as pushing them one by one."""
        self.ids.extend(token_ids)
        new, self.prefix_offset, self.read_offset = decode_incremental(
            self.tokenizer, self.ids, self.prefix_offset, self.read_offset)
        self.text += new
        return new

    @property
    def is_holding_back(self) -> bool:
        """Whether some pushed tokens are not in `text` yet (an incomplete UTF-8 character)."""
        return self.read_offset < len(self.ids)


def fence_token_table(tokenizer) -> np.ndarray | None:
    """(V + 1,) bool: whether a token's text holds a backtick. A code block closes only when the text
    gains its last backtick, so the engine decodes a sequence's segment (all tokens since the last
    decode, at once) and scans it only at such tokens, or while the decoder holds back an incomplete
    character (which may hide a backtick). The last entry (any id beyond the tokenizer's vocabulary)
    is True. None when the tokenizer has no `vocab_size`: then every token is checked."""
    size = getattr(tokenizer, "vocab_size", None)
    if not isinstance(size, int) or size <= 0:
        return None
    table = np.ones(size + 1, dtype=bool)
    for i in range(size):
        table[i] = "`" in tokenizer.decode([i])
    return table


def check_table(stop_ids: list[int], fence_table: np.ndarray | None, tools: bool, size: int = 1) -> np.ndarray:
    """(L >= size,) bool: whether a sampled token is looked at one by one (a stop id; with tools, a
    token that may close a code block, see fence_token_table). Index min(id, L - 1): the last entry
    stands for every larger id."""
    vocab = 0 if not tools else 1 if fence_table is None else len(fence_table) - 1
    table = np.zeros(max(size, 1 + vocab, max(stop_ids, default=-1) + 2), dtype=bool)
    if tools:
        if fence_table is None:
            table[:] = True
        else:
            table[:vocab] = fence_table[:vocab]
            table[vocab:] = fence_table[vocab]
    table[stop_ids] = True
    return table


def find_closed_code(text: str, start: int = 0) -> tuple[str, int] | None:
    """The code of the first ```python block opened at or after `start` and closed, and the index
    just past its closing fence; None while no block is closed."""
    open_at = text.find(CODE_OPEN, start)
    if open_at < 0:
        return None
    body = text.find("\n", open_at + len(CODE_OPEN))
    if body < 0:
        return None
    close_at = text.find(CODE_CLOSE, body + 1)
    if close_at < 0:
        return None
    return text[body + 1 : close_at], close_at + len(CODE_CLOSE)


def scan_start_hint(text: str, start: int) -> int:
    """Where the next scan can begin when no block closed: an unclosed opening, or near the end."""
    open_at = text.find(CODE_OPEN, start)
    if open_at >= 0:
        return open_at
    return max(start, len(text) - len(CODE_OPEN))


def marked_text(traj, tokenizer) -> str:
    """The response with feedback segments marked, decoded span by span (display only)."""
    out, span, span_mask = [], [], None
    for token, m in zip(traj.response_ids + [None], traj.loss_mask + [None], strict=True):
        if m != span_mask and span:
            text = tokenizer.decode(span)
            out.append(text if span_mask == 1 else f"<<<feedback{text}>>>")
            span = []
        span_mask = m
        if token is not None:
            span.append(token)
    return "".join(out)
