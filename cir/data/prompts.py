"""Prompt templates: the text a rollout starts from.

Two modes:
- "raw" (the paper's setting, for base models such as Qwen2.5-Math-7B): instruction, problem and a
  "Solution:" cue as plain text, no chat template.
- "plain": the problem text and a newline, nothing else (synthetic tasks, custom formats).
- "chat" (for instruct models): the instruction and the problem as one user message, rendered by
  the tokenizer's chat template with the generation prompt appended.

A problem that carries its own chat prompt (verl parquet: `Problem.messages`) is used as the data set
wrote it: its messages in chat mode, their system and user texts in raw mode.

The instruction says what the engine does: a ```python block is run as soon as it is closed, and
what it prints comes back in an ```output block.
"""
from typing import Protocol

from cir.data.problems import Problem

INSTRUCTION = (
    "Solve the following math problem step by step. While reasoning you may write Python code in a "
    "```python code block; an executor runs each block as soon as you close it and shows you what the "
    "code printed in an ```output block, which you can use in the rest of your reasoning. "
    "Put the final answer in \\boxed{}."
)
MODES = ("raw", "chat", "plain")


class ChatTemplate(Protocol):
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...


def raw_prompt(problem_text: str) -> str:
    """The paper-style plain-text prompt for a base model."""
    return f"{INSTRUCTION}\n\nProblem: {problem_text}\n\nSolution:"


def chat_messages(problem: Problem | str, system: str | None = None) -> list[dict[str, str]]:
    """The messages of a chat-mode prompt (the data set's own messages when it has them)."""
    if isinstance(problem, Problem) and problem.messages is not None:
        messages = [dict(m) for m in problem.messages]
    else:
        text = problem.problem if isinstance(problem, Problem) else problem
        messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{text}"}]
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def build_prompt(problem: Problem | str, tokenizer: ChatTemplate | None = None, mode: str = "raw",
                 system: str | None = None) -> str:
    """The prompt text for one problem.

    mode: "raw" (plain text; `system`, if given, goes first followed by a blank line) or "chat"
        (needs `tokenizer` with `apply_chat_template(messages, add_generation_prompt=True) -> str`).
    """
    if mode not in MODES:
        raise ValueError(f"prompt mode must be one of {MODES}, got {mode!r}")
    if mode == "chat":
        if tokenizer is None:
            raise ValueError("prompt mode 'chat' needs a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(chat_messages(problem, system), add_generation_prompt=True)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template must return the prompt text (str), got {type(text).__name__}")
        return text
    if mode == "plain":  # the problem text alone: synthetic tasks, models trained on their own format
        return (problem.problem if isinstance(problem, Problem) else problem) + "\n"
    if isinstance(problem, Problem) and problem.messages is not None:
        return "\n\n".join(m["content"] for m in chat_messages(problem, system) if m["role"] in ("system", "user"))
    body = raw_prompt(problem.problem if isinstance(problem, Problem) else problem)
    return body if system is None else f"{system}\n\n{body}"
