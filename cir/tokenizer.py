"""Tokenizer: a `tokenizers` backend plus the checkpoint's chat template and special tokens.

    tok = load_tokenizer("path/to/hf_dir")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}]))
    text = tok.decode(ids)

Reads `tokenizer.json` through the `tokenizers` library, and the special tokens / chat template from
`tokenizer_config.json`, `chat_template.jinja`, `special_tokens_map.json`, `generation_config.json`
and `config.json`, the way transformers does. A checkpoint without a chat template (a base model)
is used with raw prompts; asking it for a chat template is an error.

`IncrementalDecoder` turns a growing list of token ids into text pieces for streaming: byte-level BPE
tokens can end inside a UTF-8 character, so text is released only once its characters are complete,
and the pieces always join up to exactly `decode(ids)`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cir.errors import MissingPathError, UserError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: object) -> str | None:
    """A special-token entry as written in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: object) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value if isinstance(value, int) else None


def _select_template(value: object) -> str | None:
    """`chat_template` is a string, or (older files) a list of named templates: take "default"."""
    if isinstance(value, list):
        named = {t["name"]: t["template"] for t in value}
        return named.get("default")
    return value if isinstance(value, str) else None


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by some templates for assistant masks)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: object, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template with the environment transformers uses (sandboxed, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)



def decode_incremental(tokenizer, ids: Sequence[int], prefix_offset: int, read_offset: int,
                       skip_special_tokens: bool = False) -> tuple[str, int, int]:
    """`Tokenizer.decode_incremental` for anything with `decode(ids)`: the text
    completed by the ids after `read_offset`, and the offsets to feed back (start with (0, 0))."""
    flags = {"skip_special_tokens": True} if skip_special_tokens else {}  # plain decode(ids) suffices
    prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], **flags)
    new_text = tokenizer.decode(ids[prefix_offset:], **flags)
    if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
        return new_text[len(prefix_text):], read_offset, len(ids)
    return "", prefix_offset, read_offset

class Tokenizer:
    """A `tokenizers.Tokenizer` with the special tokens and chat template of its checkpoint."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        fallback_ids: dict[str, int | None] | None = None,
        config: dict | None = None,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.config = dict(config or {})  # the tokenizer_config.json it came with, re-written by save()
        self._template: jinja2.Template | None = None
        fallback_ids = fallback_ids or {}
        self.bos_token_id = self._id_of("bos_token", fallback_ids.get("bos_token_id"))
        eos = self._id_of("eos_token", fallback_ids.get("eos_token_id"))
        self.eos_token_ids = list(dict.fromkeys([i for i in [eos, *extra_eos_token_ids] if i is not None]))
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        pad = self._id_of("pad_token", fallback_ids.get("pad_token_id"))
        self.pad_token_id = pad if pad is not None else self.eos_token_id

    def _id_of(self, name: str, fallback: int | None) -> int | None:
        token = self.special_tokens.get(name)
        if token is not None:
            token_id = self.backend.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
            return token_id
        return fallback

    # -- text <-> ids ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token markup in the text (e.g. `<|im_end|>`) becomes one id."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def decode_incremental(
        self, ids: Sequence[int], prefix_offset: int, read_offset: int, skip_special_tokens: bool = False
    ) -> tuple[str, int, int]:
        """The text completed by the ids after `read_offset`: `(new_text, prefix_offset, read_offset)`.

        Start with offsets (0, 0) and feed back the returned ones. `ids[prefix_offset:read_offset]` is
        already released text, decoded again as context (decoders such as Metaspace treat the first
        token specially); text ending in U+FFFD (an unfinished UTF-8 character) is held back.
        """
        return decode_incremental(self, ids, prefix_offset, read_offset, skip_special_tokens)

    # -- chat ------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
        **kwargs: object,
    ) -> str:
        """Render `messages` with the checkpoint's chat template, as transformers does (text, not ids)."""
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (a base model?): pass the raw prompt to encode() instead"
            )
        if self._template is None:
            self._template = compile_chat_template(self.chat_template)
        for message in messages:
            if not isinstance(message, dict):
                raise ValueError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        variables = {**self.special_tokens, **kwargs}
        return self._template.render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **variables,
        )

    # -- files -----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (loadable by
        transformers' AutoTokenizer and by `load_tokenizer`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update(self.config)
        config.update(self.special_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        else:
            config.pop("chat_template", None)
        with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        with open(path / "special_tokens_map.json", "w", encoding="utf-8") as f:
            json.dump(self.special_tokens, f, indent=2, ensure_ascii=False)


class IncrementalDecoder:
    """Streams text for a growing token list: `step(ids_so_far)` returns the newly completed text.

    The pieces returned by `step` and the final `flush` join up to exactly `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0

    def step(self, ids: Sequence[int]) -> str:
        text, self.prefix_offset, self.read_offset = self.tokenizer.decode_incremental(
            ids, self.prefix_offset, self.read_offset, self.skip_special_tokens
        )
        return text

    def flush(self, ids: Sequence[int]) -> str:
        """Whatever `step` held back (an unfinished character decodes as U+FFFD, as decode() does)."""
        prefix_text = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        new_text = self.tokenizer.decode(ids[self.prefix_offset:], self.skip_special_tokens)
        self.prefix_offset = self.read_offset = len(ids)
        return new_text[len(prefix_text):]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of an HF checkpoint directory (or the directory of a tokenizer.json)."""
    path = Path(path)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        if not path.exists():
            raise MissingPathError(f"model directory not found: {str(path)!r}")
        from cir.model.checkpoint import model_dir_hint

        raise MissingPathError(f"no tokenizer.json in {str(path)!r}", hint=model_dir_hint(path))
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception on bad json
        raise UserError(f"cannot read {str(tokenizer_file)!r}: {e}") from e

    config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    generation = _read_json(path / "generation_config.json")
    model_config = _read_json(path / "config.json")

    # 1) special tokens: tokenizer_config.json first, special_tokens_map.json second
    special_tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = _token_content(config.get(name))
        special_tokens[name] = token if token is not None else _token_content(special_map.get(name))

    # 2) ids the tokenizer files don't name: generation_config.json, then config.json
    fallback_ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = generation.get(key, model_config.get(key))
        fallback_ids[key] = _first_id(value)
    extra_eos = generation.get("eos_token_id", model_config.get("eos_token_id"))
    extra_eos = extra_eos if isinstance(extra_eos, list) else [extra_eos] if isinstance(extra_eos, int) else []

    # 3) chat template: chat_template.jinja (transformers >= 4.50 writes it) over tokenizer_config.json
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")
    else:
        chat_template = _select_template(config.get("chat_template"))

    kept_config = {k: v for k, v in config.items() if k not in ("chat_template", "added_tokens_decoder")}
    return Tokenizer(
        backend, chat_template=chat_template, special_tokens=special_tokens, extra_eos_token_ids=extra_eos,
        fallback_ids=fallback_ids, config=kept_config,
    )
