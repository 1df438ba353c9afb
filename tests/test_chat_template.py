"""Chat templates render and encode exactly as transformers' `apply_chat_template` (spec §11).

The expected texts, ids and errors in tests/fixtures/chat_templates.json were made by transformers 5.17 itself
(scripts/chat_template_fixtures.py): the released NLD format with its thinking options, a template with
`{% generation %}`, one that raises, one that prints the variables it is given (tools, documents, set and unset
special tokens, extra kwargs, non-ASCII tojson, loop controls, whitespace rules) and named templates. Every case
is replayed through nemodiff_jax.tokenizer from the same tokenizer directory. Where transformers is importable
(the GPU machine), every case is also rendered live by it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_template_cases import CASES, TEMPLATES, write_tokenizer_dir

from nemodiff_jax.tokenizer import Tokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "chat_templates.json").read_text(encoding="utf-8"))
IDS = [(name, i) for name, t in FIXTURE["templates"].items() for i in range(len(t["cases"]))]


def ours(name: str, folder: Path) -> Tokenizer:
    return Tokenizer.from_dir(write_tokenizer_dir(TEMPLATES[name], folder))


def outcome(tok, case: dict, **extra) -> dict:
    kw = dict(case.get("kwargs", {}))
    try:
        text = tok.apply_chat_template(case["messages"], tokenize=False, **kw)
        ids = tok.apply_chat_template(case["messages"], tokenize=True, **extra, **kw)
        return {"text": text, "ids": list(ids)}
    except Exception as e:  # noqa: BLE001 - errors are compared by type and message
        return {"error": type(e).__name__, "message": str(e)}


def test_fixture_cases_are_the_current_cases():
    """The committed expectations cover exactly the cases defined now (regenerate them after editing)."""
    for name, t in FIXTURE["templates"].items():
        assert t["spec"] == TEMPLATES[name] and [{k: v for k, v in c.items() if k != "expect"} for c in t["cases"]] \
            == CASES[name], f"{name}: run scripts/chat_template_fixtures.py"


@pytest.mark.parametrize("name, i", IDS)
def test_equals_transformers(name, i, tmp_path):
    case = FIXTURE["templates"][name]["cases"][i]
    assert outcome(ours(name, tmp_path), case) == case["expect"]


def test_defaults_are_transformers(tmp_path):
    """No generation prompt unless asked; tokenize=True gives ids without a BOS (the template has none)."""
    tok = ours("nld", tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.endswith("<|im_end|>\n") and "assistant" not in text
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}, ], add_generation_prompt=True)
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.bos_token_id not in ids
    assert ids[-2:] == [tok.token_to_id("<think>"), tok.token_to_id("</think>")]


def test_template_sources(tmp_path):
    """chat_template.jinja wins over the config; additional_chat_templates/*.jinja are named templates."""
    d = write_tokenizer_dir(TEMPLATES["raises"], tmp_path)
    (d / "chat_template.jinja").write_text("FILE {{ messages[0]['content'] }}")
    assert Tokenizer.from_dir(d).apply_chat_template(CASES["raises"][0]["messages"], tokenize=False) == \
        "FILE Who is Hamlet?"
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "short.jinja").write_text("SHORT")
    tok = Tokenizer.from_dir(d)
    assert sorted(tok.chat_template) == ["default", "short"]
    assert tok.apply_chat_template(USER_MSG, chat_template="short", tokenize=False) == "SHORT"
    (d / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="several chat templates and no default"):
        Tokenizer.from_dir(d).apply_chat_template(USER_MSG)


USER_MSG = [{"role": "user", "content": "Who is Hamlet?"}]


def test_bad_conversations(tmp_path):
    tok = ours("nld", tmp_path)
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="final message has no 'content'"):
        tok.apply_chat_template([{"role": "user"}], continue_final_message=True)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_live_against_transformers(name, tmp_path):
    """Every case rendered and encoded by transformers now (skipped where it is not installed)."""
    pytest.importorskip("transformers")
    from chat_template_cases import hf_tokenizer

    hf, mine = hf_tokenizer(TEMPLATES[name], tmp_path / "hf"), ours(name, tmp_path / "ours")
    for case in CASES[name]:
        assert outcome(mine, case) == outcome(hf, case, return_dict=False), case
