"""The thinking budget (spec §6: max_thinking_tokens / end_think_token_id) and the thinking template options,
end to end. One rule in every mode: the first output position at or past the budget holds </think> unless the
row emitted one before it. Greedy linear_spec still equals greedy ar under any budget, and the device loop
equals its Python-loop twin."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import nemodiff_jax
from nemodiff_jax.decoding.common import RowSettings, force_think_end
from nemodiff_jax.embedded import DEMO_PROMPTS, default_model
from nemodiff_jax.engine import Engine, Request

END = 13  # the embedded tokenizer's </think>


@pytest.fixture(scope="module")
def gen():
    return nemodiff_jax.load(default_model(), dtype="float32", progress=False)


def rows(budget, end=END, n=1):
    return RowSettings.make([64] * n, [0.0] * n, [None] * n, [None] * n, [()] * n, [0.0] * n, [32] * n,
                            [budget] * n, [end] * n)


def forced(tokens, start, out, n_out, budget, end=END):
    t, f = force_think_end(jnp.asarray([tokens]), jnp.asarray([start]), jnp.asarray([out]), jnp.asarray([n_out]),
                           rows(budget, end))
    return np.asarray(t)[0].tolist(), np.asarray(f)[0].tolist()


def test_rule():
    out = [7, 7, 7, 0, 0, 0, 0, 0]
    assert forced([5, 6, 8], 3, out, 3, budget=4) == ([5, END, 8], [False, True, False])  # index 4
    assert forced([5, 6, 8], 3, out, 3, budget=1)[0] == [END, 6, 8]  # past the budget: the first new position
    assert forced([5, 6, 8], 3, out, 3, budget=9)[0] == [5, 6, 8]  # not reached in these tokens
    assert forced([5, 6, 8], 3, out, 3, budget=-1)[0] == [5, 6, 8]  # no budget
    assert forced([5, 6, 8], 3, out, 3, budget=4, end=-1)[0] == [5, 6, 8]  # no </think> id
    assert forced([END, 6, 8], 3, out, 3, budget=4)[0] == [END, 6, 8]  # one came first among the new tokens
    assert forced([5, 6, 8], 3, [7, END, 7, 0, 0, 0, 0, 0], 3, budget=4)[0] == [5, 6, 8]  # one already out
    assert forced([5, 6, 8], 3, [7, 7, 7, END, 0, 0, 0, 0], 3, budget=4)[0] == [5, END, 8]  # past n_out: not out


@pytest.mark.parametrize("budget", [0, 5, 31, 40])
def test_every_mode_forces_at_the_budget(gen, budget):
    """Budgets at the first token, inside a block, at a block's seed (31: diffusion's slot 0 of block 2) and
    past it; the unbudgeted text has no </think> (so every one below is forced)."""
    free = gen.generate(DEMO_PROMPTS, mode="ar", max_new_tokens=48)
    assert all(END not in r.tokens for r in free)
    got = {m: gen.generate(DEMO_PROMPTS, mode=m, max_new_tokens=48, max_thinking_tokens=budget)
           for m in ("ar", "linear_spec", "diffusion")}
    for m, res in got.items():
        for r in res:
            assert r.tokens.index(END) == budget and r.tokens.count(END) == 1, (m, budget)
    for a, f in zip(got["ar"], free):
        assert a.tokens[:budget] == f.tokens[:budget]  # the budget changes nothing before it
    assert [r.tokens for r in got["linear_spec"]] == [r.tokens for r in got["ar"]]


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec"])
def test_python_twin_and_engine(gen, mode):
    want = gen.generate(DEMO_PROMPTS[:2], mode=mode, max_new_tokens=40, max_thinking_tokens=9)
    twin = gen.generate(DEMO_PROMPTS[:2], mode=mode, max_new_tokens=40, max_thinking_tokens=9, loop="python")
    assert [r.tokens for r in twin] == [r.tokens for r in want]
    with Engine(gen, slots=2, max_prompt_tokens=64, max_new_tokens=64) as e:
        hs = [e.submit(Request(p, mode=mode, max_new_tokens=40, max_thinking_tokens=9)) for p in DEMO_PROMPTS[:2]]
        assert [h.wait().tokens for h in hs] == [r.tokens for r in want]
    streamed = [x for x in gen.stream(DEMO_PROMPTS[0], mode=mode, max_new_tokens=40, max_thinking_tokens=9)
                if isinstance(x, list)]
    assert sum(streamed, []) == want[0].tokens


def test_bad_budgets(gen):
    with pytest.raises(ValueError, match=r"max_thinking_tokens must be an int in \[0, 2\*\*31\)"):
        gen.generate(["x"], max_new_tokens=2, max_thinking_tokens=-1)
    no_tok = nemodiff_jax.generate.Generator(gen.model, tokenizer=None)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        no_tok.generate([[5, 6]], max_new_tokens=2, max_thinking_tokens=3)


def test_thinking_template_options(gen):
    """enable_thinking opens the answer inside <think>; history thinking is dropped unless asked to keep it."""
    tok = gen.tokenizer
    user = [{"role": "user", "content": "Speak."}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=True) \
        .endswith("<|im_start|>assistant\n<think>\n")
    hist = user + [{"role": "assistant", "content": "<think>hm</think>Peace."}] + user
    assert "hm" not in tok.apply_chat_template(hist, tokenize=False)
    assert "<think>hm</think>Peace." in tok.apply_chat_template(hist, tokenize=False, truncate_history_thinking=False)


def test_closed_thinking_takes_no_budget_and_big_budgets_fail_alone(gen):
    """With thinking off the prompt ends in <think></think>: a budget then forces nothing. A budget past int32
    is the request's own ValueError, not its pool's failure."""
    tok = gen.tokenizer
    user = [{"role": "user", "content": "Speak."}]
    closed = tok.apply_chat_template(user, add_generation_prompt=True)
    opened = tok.apply_chat_template(user, add_generation_prompt=True, enable_thinking=True)
    free = gen.generate([closed], max_new_tokens=8)[0].tokens
    assert gen.generate([closed], max_new_tokens=8, max_thinking_tokens=2)[0].tokens == free
    assert gen.generate([opened], max_new_tokens=8, max_thinking_tokens=2)[0].tokens[2] == END
    with pytest.raises(ValueError, match=r"max_thinking_tokens must be an int in \[0, 2\*\*31\)"):
        gen.generate([opened], max_new_tokens=8, max_thinking_tokens=2 ** 31)
    with Engine(gen, slots=2, max_prompt_tokens=64, max_new_tokens=64) as e:
        ok = e.submit(Request(opened, max_new_tokens=8, max_thinking_tokens=2))
        bad = e.submit(Request(opened, max_new_tokens=8, max_thinking_tokens=2 ** 31))
        assert ok.wait().tokens[2] == END
        with pytest.raises(ValueError, match="max_thinking_tokens"):
            bad.wait()
