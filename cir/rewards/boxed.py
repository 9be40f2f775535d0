"""Find the final answer of a response: the content of its last `\\boxed{...}`.

Accepted forms: `\\boxed{...}` (braces may nest, `\\{` and `\\}` inside are literal), `\\boxed 5`
(a space-separated single token, as some models write it) and `\\fbox{...}`. The last box in the
text wins, since models often box intermediate results before the final one. A box that is opened
but never closed (a response cut off at the length limit) gives None, as does a text with no box.

    >>> extract_boxed(r"so $x = \\boxed{\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
"""
import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{}` / `\\boxed x` / `\\fbox{}` in `text`; None if missing or unbalanced."""
    matches = list(_BOX_RE.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    # 1) skip spaces between the command and its argument
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    # 2) `\boxed 5`: one token up to the next space, `$` or line end
    if text[i] != "{":
        if i == start:  # `\boxed5` is not a box, `\boxed 5` is
            return None
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    # 3) `\boxed{...}`: match braces, a backslash escapes the next character
    depth = 0
    j = i
    while j < len(text):
        ch = text[j]
        if ch == "\\":
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def strip_math_delimiters(answer: str) -> str:
    """`$x$`, `$$x$$`, `\\(x\\)`, `\\[x\\]` -> `x`; the answer itself when it has no delimiters."""
    s = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            return s[len(left) : len(s) - len(right)].strip()
    return s
