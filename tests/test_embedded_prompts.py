"""The embedded model's prompts are held-out Python: the functions eval_code_model cuts from the modules that
scripts/code_corpus.py keeps out of training (checked against this interpreter's standard library)."""

import importlib.util
import platform
import sys
from pathlib import Path

import pytest

from nemodiff_jax import embedded
from nemodiff_jax.training import DOC_SEP

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name):
    sys.path.insert(0, str(SCRIPTS))  # code_corpus imports its sibling train_tokenizer
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(platform.python_version() != "3.12.1", reason="the corpus was cut from CPython 3.12.1's stdlib")
def test_prompts_are_the_held_out_functions():
    cc, ev = _script("code_corpus"), _script("eval_code_model")
    docs, _, _ = cc.load_documents(cc.default_stdlib())
    held_out = DOC_SEP.join(text for name, text in docs if name in cc.HELD_OUT)
    want = ev.function_prompts(held_out, len(embedded.PROMPTS))
    assert len(embedded.PROMPTS) == len(set(embedded.PROMPTS)) == 12
    assert sorted(embedded.PROMPTS) == sorted(want)
    assert embedded.DEMO_PROMPTS == embedded.PROMPTS[:4]
    train = "".join(text for name, text in docs if name not in cc.HELD_OUT)
    assert not any(p in train for p in embedded.PROMPTS)  # none of them is in the training text
