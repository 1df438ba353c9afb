"""scripts/eval_code_model.py: held-out function prompts, the parse rule, and one run on a tiny model."""

import importlib.util
import json
from pathlib import Path

from conftest import tiny_model_with_tokenizer

from nemodiff_jax.training import DOC_SEP

_spec = importlib.util.spec_from_file_location(
    "eval_code_model", Path(__file__).resolve().parents[1] / "scripts" / "eval_code_model.py")
E = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(E)

MODULE_A = '''import os


def short(x):
    return x


def documented(a, b):
    """Add them.

    Really."""
    c = a + b
    d = c * 2
    return d
'''
MODULE_B = '''class K:
    def method(self, items):
        total = 0
        for i in items:
            total += i
        return total
'''


def test_function_prompts_cut_after_the_docstring_or_first_statement():
    prompts = E.function_prompts(DOC_SEP.join([MODULE_A, "def broken(:\n", MODULE_B]), 5)
    assert prompts == ['def documented(a, b):\n    """Add them.\n\n    Really."""\n',
                       "    def method(self, items):\n        total = 0\n"]
    assert E.function_prompts(MODULE_A, 1) == prompts[:1]


def test_function_parses_takes_the_function_until_it_ends():
    p = "def f(x):\n"
    assert E.function_parses(p, "    y = x + 1\n    return y\n\nprint(f(1)\n")  # code after it is not judged
    assert not E.function_parses(p, "    y = (x +\n\nz = 1\n")
    assert E.function_parses(p, "    return x\n    if x:\n        ret")  # a cut-off last line is dropped
    assert E.function_parses("    def m(self):\n", "        return self.v\n    def n(self):\n")
    assert not E.function_parses('def f(x):\n    """Doc."""\n', "\nclass K:\n    pass\n")  # it ended at once


def test_main_on_a_tiny_model(tmp_path):
    model = tiny_model_with_tokenizer(tmp_path / "m", seed=5)
    val = tmp_path / "val.txt"
    val.write_text(DOC_SEP.join([MODULE_A, MODULE_B] * 20))
    out = tmp_path / "r.json"
    report = E.main(["--model", str(model), "--val", str(val), "--num-prompts", "2", "--max-new-tokens", "8",
                     "--quality-rows", "8", "--out", str(out)])
    assert report["linear_spec_equals_ar"] is True
    assert [r["mode"] for r in report["modes"]] == [n for _, _, n in E.RUNS]
    assert all(r["tokens"] == 16 for r in report["modes"])  # no stop in 8 tokens of a random model (no EOS)
    assert 0 <= report["heldout"]["ar_next_token_accuracy"] <= 1 and report["heldout"]["ar_perplexity"] > 1
    assert json.loads(out.read_text())["prompts"] == report["prompts"]
    # one prompt at a time: the same greedy text, the speed measured over every call
    single = E.main(["--model", str(model), "--val", str(val), "--num-prompts", "2", "--max-new-tokens", "8",
                     "--quality-rows", "8", "--batch", "1"])
    assert single["batch"] == 1 and report["batch"] == 2
    assert single["samples"] == report["samples"] and single["linear_spec_equals_ar"] is True
    assert all(r["batch_tokens_per_s"] > 0 for r in single["modes"])
