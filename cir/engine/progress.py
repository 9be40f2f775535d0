"""Progress of a generate call, counted in tokens: tokens/s and an estimate of the time left.

    progress = GenerationProgress("evaluate aime24")         # shown on stderr
    trajs = engine.generate(prompts, params, n=16, progress=progress)
    # evaluate aime24: 3/32 seqs, 1,204 tok, 41.7 tok/s, ~2:31 left

The engine calls `start(num_seqs, max_tokens)` (max_tokens: the sum of the sequences' response
limits), `set_counts(tokens, finished, finished_tokens)` with its totals after each step (or, fed by
hand, `add_tokens(k)` and `update(1)`) and `close()` at the end; the bar appears at `start`, whatever
the batch size.

The estimate of the time left: the tokens still to come over the recent token rate (tqdm's
smoothed one). Before any sequence finishes, the tokens to come are the limits' remainder (an upper
bound: the estimate starts long and falls). After that, each open sequence is taken to end at the
finished ones' mean length or at twice its own length, whichever is longer (open sequences are the
long ones: the finished mean alone would say they are done), the whole capped by the limits.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

BAR_FORMAT = "{desc}"  # the whole line is ours (_refresh)


class GenerationProgress:
    """A one-line tqdm display of a generate call: finished sequences, tokens, tokens/s, time left."""

    def __init__(self, desc: str = "generate", enabled: bool = True, file=None, mininterval: float = 0.5):
        self.desc, self.enabled, self.mininterval = desc, enabled, mininterval
        self.file = file
        self.num_seqs = self.max_tokens = self.num_tokens = self.num_finished = 0
        self._bar = None

    # the engine's side ------------------------------------------------------------------------------
    def start(self, num_seqs: int, max_tokens: int) -> None:
        self.num_seqs, self.max_tokens = num_seqs, max_tokens
        self.num_tokens = self.num_finished = 0
        self._finished_tokens, self._last_draw = 0, time.monotonic()
        if self.enabled:
            self._bar = tqdm(total=max_tokens, unit="tok", leave=False, dynamic_ncols=True,
                             file=self.file or sys.stderr, mininterval=self.mininterval, bar_format=BAR_FORMAT)
            self._refresh(force=True)

    def add_tokens(self, num_tokens: int) -> None:
        """Called once per engine step: an integer add, and a redraw at most every `mininterval` s."""
        self.num_tokens += num_tokens
        if self._bar is not None and time.monotonic() - self._last_draw >= self.mininterval:
            self._refresh(force=True)

    def update(self, num_finished: int = 1, num_tokens: int | None = None) -> None:
        """`num_finished` sequences ended; `num_tokens` their response tokens (when known)."""
        self.num_finished += num_finished
        if num_tokens is not None:
            self._finished_tokens += num_tokens

    def set_counts(self, num_tokens: int, num_finished: int, finished_tokens: int) -> None:
        """The engine's totals after a step: tokens sampled, sequences ended and their response tokens."""
        self.num_finished, self._finished_tokens = num_finished, finished_tokens
        self.add_tokens(num_tokens - self.num_tokens)

    def close(self) -> None:
        if self._bar is not None:
            self._refresh(force=True)
            self._bar.close()
            self._bar = None

    # the estimate -----------------------------------------------------------------------------------
    def tokens_left(self) -> int:
        """Tokens still to come (see the module docstring)."""
        num_open = self.num_seqs - self.num_finished
        if num_open <= 0:
            return 0
        cap = max(self.max_tokens - self.num_tokens, 0)
        if not self.num_finished or not self._finished_tokens:
            return cap
        open_tokens = max(self.num_tokens - self._finished_tokens, 0)
        expected = max(self._finished_tokens / self.num_finished, 2 * open_tokens / num_open)
        return int(min(max(expected * num_open - open_tokens, 0), cap))

    def seconds_left(self) -> float | None:
        rate = self._rate()
        return self.tokens_left() / rate if rate else None

    def _rate(self) -> float | None:
        if self._bar is None:
            return None
        return self._bar.format_dict.get("rate") or None

    def _refresh(self, force: bool = False) -> None:
        bar = self._bar
        if bar is None:
            return
        self._last_draw = time.monotonic()
        rate, left = self._rate(), self.seconds_left()  # tqdm's smoothed rate as of the last draw
        parts = [f"{self.num_finished}/{self.num_seqs} seqs", f"{self.num_tokens:,} tok",
                 f"{rate:.1f} tok/s" if rate else "? tok/s",
                 f"~{tqdm.format_interval(left)} left" if left is not None else "time left: ?"]
        bar.set_description_str(f"{self.desc}: " + ", ".join(parts), refresh=False)
        bar.total = self.num_tokens + self.tokens_left()
        drawn = bar.last_print_n
        bar.update(self.num_tokens - bar.n)  # tqdm updates its rate and redraws when its interval passed
        if force and bar.last_print_n == drawn:
            bar.refresh()
