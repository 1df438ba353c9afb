"""The `nemodiff` command line on a tiny random model that carries the shipped tokenizer."""

import io
import json
import sys

import pytest
from conftest import tiny_model_with_tokenizer

from nemodiff_jax.convert.hf import read_hf_tensors
from nemodiff_jax import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny_tok"), seed=3)


def test_generate_streams_text_and_stats(model_dir, capsys):
    rc = cli.main(["generate", "--model", str(model_dir), "--dtype", "float32", "--mode", "linear_spec",
                   "--prompt", "HAMLET:", "--max-new-tokens", "12", "--compact"])
    out, err = capsys.readouterr()
    assert rc == 0
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["mode"] == "linear_spec" and 1 <= stats["generated_tokens"] <= 12
    assert stats["rounds"] >= 1 and stats["mean_accepted_per_round"] >= 1
    assert len(out.strip()) > 0


def test_generate_reads_stdin_and_matches_api(model_dir, capsys, monkeypatch):
    import nemodiff_jax

    monkeypatch.setattr(sys, "stdin", io.StringIO("To be, or not"))
    assert cli.main(["generate", "--model", str(model_dir), "--dtype", "float32", "--mode", "ar", "--prompt", "-",
                     "--max-new-tokens", "8"]) == 0
    out, _ = capsys.readouterr()
    gen = nemodiff_jax.load(model_dir, dtype="float32", progress=False)
    want = gen.generate(["To be, or not"], mode="ar", max_new_tokens=8)[0].text
    assert out.rstrip("\n") == want


def test_generate_tensor_parallel_matches_one_device(model_dir, capsys):
    import jax

    if len(jax.devices()) < 2:
        pytest.skip("needs the fake multi-device CPU platform")
    text = []
    for extra in ([], ["--tensor-parallel-size", "2"]):
        assert cli.main(["generate", "--model", str(model_dir), "--dtype", "float32", "--mode", "linear_spec",
                         "--prompt", "To be, or not", "--max-new-tokens", "10", *extra]) == 0
        text.append(capsys.readouterr().out)
    assert text[0] == text[1] and text[0].strip()


def test_convert_to_orbax_and_hf(model_dir, tmp_path, capsys):
    import nemodiff_jax
    import numpy as np

    assert cli.main(["convert", str(model_dir), str(tmp_path / "ob"), "--dtype", "float32"]) == 0
    assert cli.main(["convert", str(tmp_path / "ob"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "float32"]) == 0
    a, b = read_hf_tensors(model_dir), read_hf_tensors(tmp_path / "hf")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    gen = nemodiff_jax.load(tmp_path / "ob", dtype="float32", progress=False)
    assert gen.tokenizer is not None  # tokenizer files travel with the orbax checkpoint
    # refusing to overwrite is an error message and exit code 2, not a traceback
    assert cli.main(["convert", str(model_dir), str(tmp_path / "ob")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_bad_mode_option_is_a_clear_error(model_dir, capsys):
    rc = cli.main(["generate", "--model", str(model_dir), "--mode", "ar", "--policy", "leftmost", "--prompt", "x"])
    assert rc == 2
    assert "unknown option(s) ['policy'] for mode 'ar'" in capsys.readouterr().err


def test_chat_thinking_and_budget_match_the_api(model_dir, capsys):
    """--chat renders one user turn with the generation prompt, --thinking sets enable_thinking, and
    --max-thinking-tokens is the API's budget: the printed text equals the API's."""
    import nemodiff_jax

    assert cli.main(["generate", "--model", str(model_dir), "--dtype", "float32", "--mode", "ar", "--chat",
                     "--thinking", "--max-thinking-tokens", "2", "--prompt", "Hail!", "--max-new-tokens", "6"]) == 0
    out, _ = capsys.readouterr()
    gen = nemodiff_jax.load(model_dir, dtype="float32", progress=False)
    ids = gen.tokenizer.apply_chat_template([{"role": "user", "content": "Hail!"}], add_generation_prompt=True,
                                            enable_thinking=True)
    want = gen.generate([ids], mode="ar", max_new_tokens=6, max_thinking_tokens=2)[0]
    assert want.tokens[2] == gen.tokenizer.token_to_id("</think>")
    assert out.rstrip("\n") == want.text


@pytest.mark.parametrize("flags, message", [
    (["--mode", "diffusion", "--block-size", "0"], "block_size must be an int in [2, 256], got 0"),
    (["--seed", "-1"], "seed must be an int in [0, 2**32)"),
    (["--top-k", "1000000"], "top_k must be an int in [1, vocab_size="),
    (["--max-thinking-tokens", "-1"], "max_thinking_tokens must be an int in [0, 2**31)"),
    (["--thinking"], "--thinking turns on the chat template's thinking: it needs --chat"),
])
def test_bad_request_flags_are_clear_errors(model_dir, capsys, flags, message):
    rc = cli.main(["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "2", *flags])
    assert rc == 2 and message in capsys.readouterr().err


def test_demo_prints_one_table_with_dashes_and_the_lossless_check(model_dir, capsys):
    """`nemodiff demo` (make run): one row per mode, a statistic a mode lacks is "-" (never nan), and it ends
    with the greedy linear_spec == ar and quadratic_spec == ar checks, which are its exit status."""
    rc = cli.main(["demo", "--model", str(model_dir), "--max-new-tokens", "8", "--num-prompts", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "nan" not in out
    lines = out.strip().splitlines()
    assert lines[-1] == "greedy linear_spec == greedy ar: True; greedy quadratic_spec == greedy ar: True"
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["mode", "tokens"])
    rows = {line.split()[0]: line.split() for line in lines[head + 1:head + 5]}
    assert sorted(rows) == ["ar", "diffusion", "linear_spec", "quadratic_spec"]
    assert float(rows["quadratic_spec"][-2]) >= 1 and rows["quadratic_spec"][-1] == "-"
    assert rows["ar"][-2:] == ["-", "-"]
    assert rows["diffusion"][-2] == "-" and float(rows["diffusion"][-1]) >= 1
    assert float(rows["linear_spec"][-2]) >= 1 and rows["linear_spec"][-1] == "-"
    assert "drafter: none" in out  # model_dir has no linear_spec_lora/: the demo says what linear_spec drafts with
