"""The training loop as library code (nemodiff_jax/trainer.py) through `nemodiff train`: a tiny CPU run whose loss
falls and whose JSONL log parses, an exact resume after a kill, another tokenizer's vocab, the CLI's errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from nemodiff_jax import cli, trainer
from nemodiff_jax.config import Config
from nemodiff_jax.embedded import ASSETS
from nemodiff_jax import training as T
from nemodiff_jax.sharding import make_mesh
from nemodiff_jax.tokenizer import Tokenizer

N = 8  # steps of the straight run; checkpoints every 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    text = "\n".join(f"Line {i}: the quality of mercy is not strained." for i in range(300))
    (d / "train.txt").write_text(text + T.DOC_SEP + text[::-1])
    (d / "val.txt").write_text(text[:4000])
    return d


def _args(corpus, out, *extra):
    return ["train", "--preset", "micro", "--train", str(corpus / "train.txt"), "--val", str(corpus / "val.txt"),
            "--out", str(out), "--steps", str(N), "--eval-every", "2", "--ckpt-every", "2", "--log-every", "1",
            "--sample-tokens", "0", "--export", "final", "--no-progress", *extra]


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    assert cli.main(_args(corpus, out)) == 0
    return out


def test_train_cli_lowers_the_loss_and_logs_jsonl(straight):
    log = _log(straight.with_name("out.work") / "log.jsonl")
    train = [r for r in log if r["split"] == "train"]
    val = [r for r in log if r["split"] == "val"]
    assert [r["step"] for r in train] == list(range(1, N + 1))
    assert [r["step"] for r in val] == list(range(2, N + 1, 2))
    for r in train:
        assert np.isfinite([r["loss"], r["l_ar"], r["l_diff"]]).all() and r["tokens_per_s"] > 0
    for r in val:
        assert np.isfinite([r["loss"], r["l_ar"], r["l_diff"], r["acc_ar"]]).all()
    assert train[-1]["loss"] < 0.8 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    assert val[-1]["loss"] < val[0]["loss"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_log.jsonl", "train_summary.json"):
        assert (straight / name).is_file(), name
    assert _log(straight / "train_log.jsonl") == log
    summary = json.loads((straight / "train_summary.json").read_text())
    assert summary["step"] == N and summary["export_step"] == N
    assert summary["vocab_size"] == Tokenizer.default().vocab_size  # the package tokenizer's


def _final_checkpoint(work, step):
    job = trainer.TrainJob("t", "v", "o", preset="micro")
    p = job.settings()
    cfg = trainer.model_config(p, Tokenizer.default())
    opt = T.make_optimizer(p.lr, warmup_steps=p.warmup, total_steps=N, weight_decay=job.weight_decay)
    _, state, opt_state = T.init_train_state(cfg, opt, make_mesh(jax.device_count()), seed=123)
    return T.restore_checkpoint(work / "ckpt", state, opt_state, step=step)


def test_resume_after_a_kill_is_bitwise_exact(straight, corpus, tmp_path):
    out = tmp_path / "out"
    work = tmp_path / "out.work"
    # Killed after step 5: the last checkpoint is step 4, the log already holds step 5 (dropped on resume).
    assert cli.main(_args(corpus, out, "--stop-after", "5")) == 0
    assert T.latest_checkpoint_step(work / "ckpt") == 4 and not out.exists()
    assert max(r["step"] for r in _log(work / "log.jsonl")) == 5
    with open(work / "log.jsonl", "a") as f:
        f.write('{"split": "train", "st')  # a line torn by the kill
    assert cli.main(_args(corpus, out, "--resume")) == 0

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["step"] == N
    ref_state, ref_opt, _ = _final_checkpoint(straight.with_name("out.work"), N)
    state, opt_state, meta = _final_checkpoint(work, N)
    assert meta["step"] == N
    for a, b in zip(jax.tree.leaves((ref_state, ref_opt)), jax.tree.leaves((state, opt_state))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert (out / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()

    log, ref = _log(work / "log.jsonl"), _log(straight.with_name("out.work") / "log.jsonl")
    keys = [(r["split"], r["step"]) for r in log]
    assert keys == [(r["split"], r["step"]) for r in ref] and len(set(keys)) == len(keys)  # no step twice
    for a, b in zip(log, ref):
        assert all(a[k] == b[k] for k in ("loss", "l_ar", "l_diff")), (a, b)


def test_another_tokenizer_sets_the_vocab(corpus, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<unk>", "<s>", "</s>"] + [f"<r{i}>" for i in range(3, 101)]  # NLD layout: mask 100
    tok.train([str(corpus / "train.txt")], trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))

    out = tmp_path / "out"
    summary = trainer.run(trainer.TrainJob(corpus / "train.txt", corpus / "val.txt", out, preset="micro",
                                           tokenizer=tok_dir, steps=1, sample_tokens=0, progress=False))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == summary["vocab_size"] == tok.get_vocab_size() != Tokenizer.default().vocab_size
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["mask_token_id"]) == (1, 2, 100)
    assert (out / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()


def test_job_settings_and_presets():
    job = trainer.TrainJob("t", "v", "o", layers=3, val_rows=0, lr=1e-3)
    s = job.settings()
    assert (s.hidden, s.layers, s.seq_len, s.batch, s.lr, s.val_rows) == (384, 3, 256, 64, 1e-3, None)
    assert job.work.name == "o.work" and job.out.name == "o"
    # the default preset is the embedded model's recipe: its geometry is the shipped config's
    d, emb = trainer.PRESETS["default"], Config.from_file(ASSETS / "config.json")
    assert (d.hidden, d.layers, d.heads, d.kv_heads, d.head_dim, d.intermediate, 4 * d.seq_len) == (
        emb.hidden_size, emb.num_layers, emb.num_heads, emb.num_kv_heads, emb.head_dim, emb.intermediate_size,
        emb.max_position_embeddings)
    assert (d.batch, d.steps, d.lr, d.warmup, d.eval_every, d.ckpt_every, d.log_every, d.val_rows) == (
        64, 2000, 2e-3, 100, 200, 1000, 20, 256)
    with pytest.raises(ValueError, match="unknown preset"):
        trainer.TrainJob("t", "v", "o", preset="nope")


def test_train_cli_errors(capsys):
    assert cli.main(["train", "--drafter", "--train", "t.txt"]) == 2
    assert "--drafter needs --model" in capsys.readouterr().err
    assert cli.main(["train", "--drafter", "--model", "m", "--train", "t.txt", "--minutes", "3", "--resume"]) == 2
    assert "--minutes, --resume do not apply to drafter training" in capsys.readouterr().err
    assert cli.main(["train", "--train", "t", "--val", "v", "--out", "o", "--rank", "4"]) == 2
    assert "--rank does not apply to model training" in capsys.readouterr().err
    assert cli.main(["train", "--train", "t.txt"]) == 2
    assert "--val, --out required" in capsys.readouterr().err
