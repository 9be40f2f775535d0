"""What one sandboxed call returns (`Result`), and the feedback text the model sees.

`format_feedback` reproduces the interpreter feedback of the paper's executor (the Qwen2.5-Math /
ToRA `python_executor`, which the CIR code uses):

    stdout, stripped, when the code ran and printed something   (ok, output_limit)
    "Done" when it ran and printed nothing                      (ok)
    the last line of the traceback when it failed               (error, memory, denied, killed)
    "Timeout Error" when it ran out of time                     (timeout)

and every text longer than 400 characters is cut to its first 200 + "..." + its last 200.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed", "denied")
"""ok: ran to the end. error: raised an exception (or exited non-zero). timeout: wall or CPU time
limit. memory: raised MemoryError (address-space limit). output_limit: stdout+stderr passed the byte
cap, the process was killed. killed: died of a signal it did not get from the time/output limits
(segfault, abort, OOM killer, a crashed sandbox server). denied: an uncaught PermissionError, i.e.
the seccomp filter, Landlock or file permissions refused something and the code did not handle it."""

FEEDBACK_MAX_CHARS = 400
TIMEOUT_FEEDBACK = "Timeout Error"
NO_OUTPUT_FEEDBACK = "Done"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Result:
    status: str
    stdout: str = ""
    stderr: str = ""
    error_line: str = ""
    """Last line of the traceback (e.g. "NameError: name 'x' is not defined"); a description of
    the limit or signal for timeout / output_limit / killed; "" when ok."""
    wall_ms: float = 0.0
    """Wall time of the snippet, from hand-over to the child to its report (or its death)."""
    cpu_ms: float = 0.0
    """CPU time (user + system) the snippet used."""
    note: str = ""
    """Set when something outside the snippet happened, e.g. the sandbox server was restarted."""
    infrastructure: bool = False
    """True when the sandbox failed, not the code (children fail to start, the server died): set
    only by the server and client, never from what a snippet reports or prints, so a count of these
    cannot be forged by code that raises an exception named SandboxError."""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        self.stdout, self.stderr = valid_text(self.stdout), valid_text(self.stderr)
        self.error_line, self.note = valid_text(self.error_line), valid_text(self.note)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def valid_text(text: object) -> str:
    """`text` as a str that encodes as UTF-8: lone surrogates (which a snippet can put in an
    exception message) become U+FFFD, so every consumer (a tokenizer, a JSON file) can take it."""
    text = text if isinstance(text, str) else str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


def truncate(text: str, max_chars: int = FEEDBACK_MAX_CHARS) -> str:
    """First max_chars // 2 characters + "..." + last max_chars // 2, when longer than max_chars."""
    if len(text) <= max_chars:
        return text
    half = max_chars // 2
    return text[:half] + "..." + text[-half:]


def format_feedback(result: Result) -> str:
    """The text that goes into the ```output block (see the module docstring)."""
    if result.status == "timeout":
        return TIMEOUT_FEEDBACK
    if result.status in ("ok", "output_limit"):
        out = result.stdout.strip()
        return truncate(out) if out else NO_OUTPUT_FEEDBACK
    return truncate(result.error_line.strip())
