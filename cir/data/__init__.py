"""Problem sets (JSONL / JSON / verl parquet), prompt templates and the prompt-batch loader."""
from cir.data.loader import PromptLoader
from cir.data.problems import Problem, default_problems_path, load_problems, parse_record
from cir.data.prompts import INSTRUCTION, build_prompt, chat_messages, raw_prompt

__all__ = [
    "INSTRUCTION",
    "Problem",
    "PromptLoader",
    "build_prompt",
    "chat_messages",
    "default_problems_path",
    "load_problems",
    "parse_record",
    "raw_prompt",
]
