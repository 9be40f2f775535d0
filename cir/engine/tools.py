"""Tool interleaving: find a closed ```python block in what a sequence generated, build the feedback.

The text is only ever *read* here, to find the code. The trajectory's tokens stay exactly as
sampled; the feedback block is encoded once and appended (loss mask 0). Format, as in the paper's
rollout: newline, ```output, the sandbox's formatted result, the closing fence, newline.
"""
from __future__ import annotations

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
        self.ids.append(token_id)
        new, self.prefix_offset, self.read_offset = decode_incremental(
            self.tokenizer, self.ids, self.prefix_offset, self.read_offset)
        self.text += new
        return new


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
    for token, m in zip(traj.response_ids + [None], traj.loss_mask + [None]):
        if m != span_mask and span:
            text = tokenizer.decode(span)
            out.append(text if span_mask == 1 else f"<<<feedback{text}>>>")
            span = []
        span_mask = m
        if token is not None:
            span.append(token)
    return "".join(out)
