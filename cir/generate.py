"""Generation smoke command: greedy or sampled decoding with the plain forward (no KV cache).

    python -m cir.generate --prompt "What is 2+3?"
    python -m cir.generate --prompt "def fib(n):" --no-chat --temperature 0.7 --max-new-tokens 64
    python -m cir.generate --model path/to/hf_dir --prompt "..."

The default model is the embedded SmolLM2-135M-Instruct (`cir.model.default_model_path()`, built from
its GGUF file on first use). The prompt goes through the checkpoint's chat template unless --no-chat
(or the checkpoint has none); the completion is printed as it is generated.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from cir.model import default_model_path, from_pretrained
from cir.model.transformer import Transformer
from cir.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_token_ids: list[int] | None = None,
    seed: int | None = None,
    on_token: Callable[[list[int]], None] | None = None,
) -> list[int]:
    """New token ids after `prompt_ids`: greedy at temperature 0, else sampled from softmax(logits / T).

    Each step re-runs the full forward over the whole sequence (no cache: the engine does that).
    Stops after a token in `stop_token_ids`, which is kept. `on_token(ids_so_far)` sees every step.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    stop = set(stop_token_ids or ())
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # (T,)
    new_ids: list[int] = []
    for _ in range(max_new_tokens):
        cu_seqlens = torch.tensor([0, ids.shape[0]], dtype=torch.int32, device=device)
        hidden = model.forward_packed(ids, cu_seqlens)  # (T, D): the whole sequence, every step
        logits = model.compute_logits(hidden[-1]).float()  # (V,): the LM head on the last position only
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        new_ids.append(token)
        if on_token is not None:
            on_token(new_ids)
        if token in stop:
            break
        ids = torch.cat([ids, ids.new_tensor([token])])
    return new_ids


def build_prompt(tokenizer: Tokenizer, prompt: str, chat: bool | None) -> str:
    """The prompt text: through the chat template when `chat` (default: when the tokenizer has one)."""
    if chat is None:
        chat = tokenizer.has_chat_template
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate a completion with the plain forward (no cache).")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="apply the chat template (default: when the checkpoint has one)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    path = args.model or default_model_path()
    tokenizer = load_tokenizer(path)
    model = from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device)
    prompt_ids = tokenizer.encode(build_prompt(tokenizer, args.prompt, args.chat))

    stream = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    start = time.perf_counter()
    new_ids = generate(
        model, prompt_ids, args.max_new_tokens, args.temperature, stop_token_ids=tokenizer.eos_token_ids,
        seed=args.seed, on_token=lambda ids: print(stream.step(ids), end="", flush=True),
    )
    print(stream.flush(new_ids), flush=True)
    seconds = time.perf_counter() - start
    print(f"[{len(prompt_ids)} prompt + {len(new_ids)} new tokens, {len(new_ids) / seconds:.1f} tokens/s]",
          file=sys.stderr)


if __name__ == "__main__":
    main()
