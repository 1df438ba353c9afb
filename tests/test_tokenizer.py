"""Tokenizer wrapper + the shipped tiny tokenizer asset (spec §4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nemodiff_jax.tokenizer import DEFAULT_TOKENIZER_DIR, MissingChatTemplateError, Tokenizer

TEXTS = [
    "To be, or not to be: that is the question.",
    "naïve café — 東京 🙂 Ärger, ßtraße!",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.default()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_bos_added_once(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world")
    assert ids[0] == tok.bos_token_id == 1
    assert ids.count(1) == 1
    assert tok.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids, skip_special_tokens=False).startswith("<s>Hello")


def test_special_id_layout(tok: Tokenizer) -> None:
    assert tok.vocab_size == 4096  # scripts/code_corpus.py VOCAB_SIZE
    assert (tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (1, 11, 100)
    expected = {0: "<unk>", 1: "<s>", 2: "</s>", 10: "<|im_start|>", 11: "<|im_end|>",
                12: "<think>", 13: "</think>", 3: "<SPECIAL_3>", 100: "<SPECIAL_100>", 127: "<SPECIAL_127>"}
    for i, s in expected.items():
        assert tok.id_to_token(i) == s
    assert not tok.id_to_token(128).startswith("<SPECIAL")
    # specials in text are single tokens, the reasoning-budget path takes the last id of "</think>"
    assert tok.encode("</think>", add_special_tokens=False) == [13]
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [11]


def test_chat_template(tok: Tokenizer) -> None:
    """The bundled template is the released NLD format (spec §11); its cases against transformers are in
    test_chat_template.py."""
    want = ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWho is Hamlet?<|im_end|>\n"
            "<|im_start|>assistant\n<think></think>")
    msgs = [{"role": "user", "content": "Who is Hamlet?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids == tok.encode(want, add_special_tokens=False) and 1 not in ids  # no BOS, as NVIDIA encodes it
    with pytest.raises(Exception, match="Unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_stream_decoder_multibyte(tok: Tokenizer) -> None:
    text = "naïve café — 東京 🙂 done"
    ids = tok.encode(text)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # the test really splits chars
    dec = tok.stream_decoder()
    pieces = [dec.step(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    assert "".join(tok.decode_stream(ids)) == text
    assert "".join(tok.decode_stream(ids, skip_special_tokens=False)) == "<s>" + text


def test_stream_decoder_equals_decode_on_any_ids(tok: Tokenizer) -> None:
    """tokenizers' DecodeStream under StreamDecoder: over random id sequences (specials, split characters and
    invalid tails included) the pieces concatenate to decode(ids), and nothing but the tail waits for flush."""
    import random

    rng = random.Random(0)
    emoji = tok.encode("🙂", add_special_tokens=False)
    assert len(emoji) > 1
    for n in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        if n % 4 == 0:
            ids += emoji[:-1]  # ends inside a character
        for skip in (True, False):
            dec = tok.stream_decoder(skip)
            pieces = [dec.step(i) for i in ids]
            tail = dec.flush()
            assert "".join(pieces) + tail == tok.decode(ids, skip), ids
            if n % 4 == 0:
                assert tail.endswith("\ufffd")


def test_from_dir_empty_returns_none(tmp_path: Path) -> None:
    assert Tokenizer.from_dir(tmp_path) is None


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_missing_chat_template(tmp_path: Path) -> None:
    shutil.copy(DEFAULT_TOKENIZER_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    t = Tokenizer.from_dir(tmp_path)
    assert t is not None and t.chat_template is None
    assert t.bos_token_id == 1 and t.mask_token_id == 100  # defaults without a config
    with pytest.raises(MissingChatTemplateError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])


def test_config_template_and_llama_bos_flag(tmp_path: Path) -> None:
    shutil.copy(DEFAULT_TOKENIZER_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": {"content": "<s>"}, "eos_token": "</s>",
           "add_bos_token": False, "add_eos_token": True,
           "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ eos_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(tmp_path)
    assert t is not None and t.eos_token_id == 2
    assert t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi</s>"
    ids = t.encode("hi")
    assert ids[0] != 1 and ids[-1] == 2
