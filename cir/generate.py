"""Generate from the command line with the engine (paged KV cache), optionally with the interpreter.

    python -m cir.generate --prompt "What is 2+3?"
    python -m cir.generate --prompt "What is 123456789 * 987654321? Use python." --tools
    python -m cir.generate --prompt "def fib(n):" --no-chat --temperature 0.7 --n 4
    python -m cir.generate --model path/to/hf_dir --prompt "..." --max-new-tokens 512

The default model is the embedded SmolLM2-135M-Instruct (`cir.model.default_model_path()`, built from
its GGUF file on first use). The prompt goes through the checkpoint's chat template unless --no-chat
(or the checkpoint has none). With --tools, closed ```python blocks run in the sandbox and their
output is fed back; feedback is shown between <<<feedback and >>>. While it generates, stderr shows
the progress (sequences, tokens, tokens/s, time left); the torch thread count is printed once
(--threads to choose it, cir/threads.py).

A mistake (a bad value, a missing model, a prompt longer than the model's context, --device cuda
without CUDA) is one `error:` line and exit status 2; --debug (or CIR_DEBUG=1) shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.engine.progress import GenerationProgress
from cir.engine.tools import marked_text
from cir.errors import ArgumentParser, UserError, run_main
from cir.model import default_model_path, from_pretrained
from cir.threads import configure_threads
from cir.tokenizer import Tokenizer, load_tokenizer


SANDBOX_WORKERS = 2


def build_prompt(tokenizer: Tokenizer, prompt: str, chat: bool | None) -> str:
    """The prompt text: through the chat template when `chat` (default: when the tokenizer has one)."""
    if chat is None:
        chat = tokenizer.has_chat_template
    if not chat:
        return prompt
    if not tokenizer.has_chat_template:
        raise UserError("--chat: this model has no chat template (a base model?)", hint="use --no-chat")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)


def resolve_device(name: str) -> torch.device:
    """The --device argument as a torch.device; a UserError when it is malformed or not present here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name", hint="use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available (torch {torch.__version__})",
                        hint="use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_prompt_fits(num_prompt_tokens: int, max_model_len: int) -> None:
    if num_prompt_tokens >= max_model_len:
        raise UserError(f"the prompt is {num_prompt_tokens} tokens, the model's context {max_model_len}: "
                        "no room left to generate", hint="shorten the prompt")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m cir.generate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--n", type=int, default=1, help="samples of the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tools", action="store_true", help="run closed ```python blocks in the sandbox")
    parser.add_argument("--max-tool-calls", type=int, default=4)
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="apply the chat template (default: when the checkpoint has one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the usable CPUs less the sandbox workers)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show generation progress on stderr")
    args = parser.parse_args(argv)
    for name, value, low in (("--n", args.n, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--max-tool-calls", args.max_tool_calls, 0),
                             ("--threads", 1 if args.threads is None else args.threads, 1)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens)
    except ValueError as e:
        parser.error(f"{e} (from --temperature, --top-p, --max-new-tokens)")
    device = resolve_device(args.device)  # before the sandbox starts or the model loads

    sandbox = None
    if args.tools:  # the fork-server starts before the model is loaded
        from cir_sandbox import Sandbox

        sandbox = Sandbox(workers=SANDBOX_WORKERS, timeout=10.0)
    try:
        path = args.model or default_model_path()
        tokenizer = load_tokenizer(path)
        model = from_pretrained(path, dtype=getattr(torch, args.dtype), device=device)
        prompt_ids = tokenizer.encode(build_prompt(tokenizer, args.prompt, args.chat))
        engine = Engine(model, tokenizer, EngineConfig(kv_cache_memory_gb=0.5, seed=args.seed,
                                                       max_num_seqs=max(args.n, EngineConfig().max_num_seqs)))
        check_prompt_fits(len(prompt_ids), engine.max_model_len)
        configure_threads(args.threads, reserved=SANDBOX_WORKERS if sandbox is not None else 0)  # after every check
        tools = ToolConfig(sandbox, max_calls=args.max_tool_calls) if sandbox is not None else None
        start = time.perf_counter()
        trajs = engine.generate([prompt_ids], params, n=args.n, tools=tools,
                                progress=GenerationProgress("generate", enabled=args.progress))
        seconds = time.perf_counter() - start
    finally:
        if sandbox is not None:
            sandbox.close()
    for traj in trajs:
        if args.n > 1:
            print(f"--- sample {traj.sample_index} ---")
        print(marked_text(traj, tokenizer), flush=True)
    num_new = sum(len(t.response_ids) for t in trajs)
    calls = sum(t.num_tool_calls for t in trajs)
    print(f"[{len(prompt_ids)} prompt + {num_new} new tokens in {seconds:.1f} s ({num_new / seconds:.1f} tokens/s); "
          f"{calls} tool calls; finish: {', '.join(t.finish_reason for t in trajs)}]", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
