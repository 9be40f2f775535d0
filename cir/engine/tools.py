"""Tool interleaving: find a closed ```python block in what a sequence generated, build the feedback.

The text is only ever *read* here, to find the code. The trajectory's tokens stay exactly as
sampled; the feedback block is encoded once and appended (loss mask 0). Format, as in the paper's
rollout: newline, ```output, the sandbox's formatted result, the closing fence, newline.
"""
from __future__ import annotations

import numpy as np

from cir.tokenizer import decode_incremental

CODE_OPEN = "```python"
CODE_CLOSE = "```"


def feedback_text(formatted_result: str) -> str:
    return f"\n```output\n{formatted_result}\n```\n"


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
