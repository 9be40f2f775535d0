"""cir.tokenizer on the converted SmolLM2 tokenizer, against transformers (GGUF-loaded and from our dir).

    pytest tests/test_tokenizer.py
"""
import json
import os
import shutil

import jinja2
import pytest

from cir.tokenizer import IncrementalDecoder, Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "def f(x):\n    return x**2 + 12345\n",
    "3.14159 and 2024-01-01; 1,000,000 x5 5x -7",
    "héllo wörld — ünïcödé 世界 日本語の文章",
    "emoji 🙂👍🏽 🇫🇷 family 👨‍👩‍👧 end",
    "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
    "   leading\t\ttabs\n\n\n   trailing   ",
    "",
    " ",
    "I'm sure it's  they'll WE'LL",
    "\\boxed{\\frac{1}{2}} $x^2+y^2=z^2$",
    "```python\nprint(sum(range(10)))\n```\n```output\n45\n```",
    "<repo_name>a<file_sep>b<|endoftext|><jupyter_code>",
    "\u00a0non-breaking\u2009thin\u200bzero-width \r\n crlf",
]

CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 🙂"}, {"role": "user", "content": "Sum 1..10?"}],
]


@pytest.fixture(scope="module")
def ours(smollm2_dir) -> Tokenizer:
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    """transformers' own tokenizer built from the GGUF metadata (independent of our conversion)."""
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf))


@pytest.fixture(scope="module")
def converted(smollm2_dir):
    """transformers loading the tokenizer files we wrote."""
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours, reference, converted, text):
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ids == converted.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text == reference.decode(ids)


def test_special_tokens(ours):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.eos_token_ids == [2]
    assert ours.vocab_size == 49152
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
                "<jupyter_script>", "<empty_output>"]
    assert [ours.encode(s) for s in specials] == [[i] for i in range(17)]
    assert ours.decode([1, 4093, 2], skip_special_tokens=True) == "user"


def test_digits_one_per_token(ours):
    ids = ours.encode("x = 1234567890")
    assert [ours.decode([i]) for i in ids[-10:]] == list("1234567890")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_matches_transformers(ours, reference, converted, chat, add_generation_prompt):
    messages = CHATS[chat]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    for tok in (reference, converted):
        assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_template_environment_matches_transformers(ours, tmp_path):
    """A template using the transformers extras: tojson without HTML escaping, bos/eos variables,
    loop controls, trim/lstrip blocks, raise_exception."""
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}\n"
        "  {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
        "{{ m['role'] }}: {{ m['content'] | tojson }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    custom = Tokenizer(ours.backend, chat_template=template, special_tokens=ours.special_tokens)
    custom.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "<a href='x'>&</a> é"}, {"role": "skip", "content": "-"}]
    text = custom.apply_chat_template(messages)
    assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<a href='x'>&</a> é" in text and "skip" not in text
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools here"):
        custom.apply_chat_template([{"role": "tool", "content": "x"}])


def test_no_template_mode(ours, tmp_path):
    base = Tokenizer(ours.backend, chat_template=None, special_tokens=ours.special_tokens)
    base.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert not loaded.has_chat_template
    assert loaded.encode("Solve 2+3.") == ours.encode("Solve 2+3.")
    with pytest.raises(ValueError, match="no chat template"):
        loaded.apply_chat_template(CHATS[0])


def test_save_roundtrip(ours, tmp_path):
    ours.save(tmp_path)
    again = load_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert again.apply_chat_template(CHATS[1]) == ours.apply_chat_template(CHATS[1])
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_config_files_precedence(smollm2_dir, tmp_path):
    """eos ids gathered from generation_config.json; chat_template.jinja wins over tokenizer_config.json."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(smollm2_dir, name), tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == [2, 0]
    assert tok.apply_chat_template(CHATS[0]) == "[What is 2+3?]"


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("text", [t for t in TEXTS if any(ord(c) > 127 for c in t)] + ["a🙂b" * 5])
def test_incremental_decoder_matches_full_decode(ours, text):
    ids = ours.encode(text)
    full = ours.decode(ids)
    stream = IncrementalDecoder(ours)
    pieces = []
    for n in range(1, len(ids) + 1):
        piece = stream.step(ids[:n])
        assert "\ufffd" not in piece
        pieces.append(piece)
        assert full.startswith("".join(pieces))
    pieces.append(stream.flush(ids))
    assert "".join(pieces) == full == text


def test_incremental_decoder_holds_back_split_characters(ours):
    ids = ours.encode("🙂")
    assert len(ids) > 1 and ours.decode(ids[:1]).endswith("\ufffd")  # a token ends inside the character
    stream = IncrementalDecoder(ours)
    assert [stream.step(ids[:n]) for n in range(1, len(ids) + 1)] == [""] * (len(ids) - 1) + ["🙂"]
    cut = IncrementalDecoder(ours)
    assert cut.step(ids[:1]) == "" and cut.flush(ids[:1]) == ours.decode(ids[:1])


def test_incremental_decoder_skips_special_tokens(ours):
    ids = ours.encode("<|im_start|>assistant\nhé 🙂<|im_end|>")
    stream = IncrementalDecoder(ours, skip_special_tokens=True)
    text = "".join(stream.step(ids[:n]) for n in range(1, len(ids) + 1)) + stream.flush(ids)
    assert text == ours.decode(ids, skip_special_tokens=True) == "assistant\nhé 🙂"
