"""`nemodiff batch`: continuous batching equals one-at-a-time generation; kill + restart loses and duplicates
nothing; malformed lines are reported with their line numbers and skipped."""

import json

import pytest
from conftest import tiny_model_with_tokenizer

import nemodiff_jax
from nemodiff_jax import batch, cli

PROMPTS = ["ROMEO:", "To be, or not to be", "Of Man's first disobedience", "HAMLET: What a piece of work",
           "Now is the winter", "O", "KING:", "Friends, Romans, countrymen, lend me your ears"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("batch_model"), seed=5)


def requests():
    reqs = []
    for i, p in enumerate(PROMPTS):
        mode = ("ar", "linear_spec", "diffusion")[i % 3]
        r = {"id": f"r{i}", "prompt": p, "mode": mode, "max_new_tokens": 6 + 3 * (i % 4)}
        if i % 4 == 1:
            r |= {"temperature": 0.7, "seed": 100 + i}
        reqs.append(r)
    reqs.append({"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 5})
    reqs.append({"id": "think", "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 6,
                 "chat_template_kwargs": {"enable_thinking": True}, "max_thinking_tokens": 2, "mode": "diffusion"})
    return reqs


def write_input(path, with_bad=True):
    lines = [json.dumps(r) for r in requests()]
    if with_bad:
        lines.insert(2, "{not json")                                        # line 3
        lines.insert(4, json.dumps({"prompt": "no id"}))                     # line 5
        lines.insert(6, json.dumps({"id": "m", "prompt": "x", "mode": "beam"}))  # line 7
        lines.append(json.dumps({"id": "r0", "prompt": "dup"}))            # duplicate id
        lines.append(json.dumps({"id": "long", "prompt": "word " * 400}))  # over --max-prompt-tokens
        lines.append(json.dumps({"id": "f", "prompt": [[5.5, 6]]}))
        lines.append(json.dumps({"id": "s", "prompt": "x", "seed": -1}))
        lines.append(json.dumps({"id": "t", "prompt": "x", "max_thinking_tokens": -1}))
        lines.append(json.dumps({"id": "k", "messages": [{"role": "user", "content": "x"}],
                                 "chat_template_kwargs": {"add_generation_prompt": False}}))
        lines.append(json.dumps({"id": "r", "messages": [{"role": "wizard", "content": "x"}]}))
        lines.append("")                                                   # blank lines are ignored
    path.write_text("\n".join(lines) + "\n")


def run_job(model_dir, inp, out, *extra):
    return cli.main(["batch", "--model", str(model_dir), "--dtype", "float32", "--input", str(inp), "--output",
                     str(out), "--batch-size", "3", "--max-new-tokens", "8", "--max-new-tokens-cap", "16",
                     "--max-prompt-tokens", "64", "--no-progress", *extra])


def read_out(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_results_equal_single_generation_and_bad_lines_reported(model_dir, tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp)
    assert run_job(model_dir, inp, out) == 0
    err = capsys.readouterr().err
    for needle in ("line 3: not valid JSON", "line 5: missing or invalid 'id'", "line 7: unknown mode 'beam'",
                   "duplicate id 'r0'", "exceeds the job's limit 64", "token ids must be integers",
                   "seed must be an int in [0, 2**32)", "max_thinking_tokens must be an int in [0, 2**31)",
                   "chat_template_kwargs may not set ['add_generation_prompt']", "Unknown role: wizard",
                   "10 malformed lines skipped"):
        assert needle in err, needle
    results = {r["id"]: r for r in read_out(out)}
    assert sorted(results) == sorted(r["id"] for r in requests())
    gen = nemodiff_jax.load(model_dir, dtype="float32", progress=False)
    for req in requests():
        got = results[req["id"]]
        prompt = (gen.tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True,
                                                    **req.get("chat_template_kwargs", {}))
                  if "messages" in req else req["prompt"])
        want = gen.generate([prompt], mode=req.get("mode", "linear_spec"), max_new_tokens=req["max_new_tokens"],
                            temperature=req.get("temperature", 0.0), seed=req.get("seed", 0),
                            max_thinking_tokens=req.get("max_thinking_tokens"))[0]
        assert got["tokens"] == want.tokens, req["id"]
        assert got["text"] == want.text
        assert got["stats"]["generated_tokens"] == len(want.tokens)


def test_kill_and_restart_gives_exactly_one_result_per_id(model_dir, tmp_path, monkeypatch):
    inp = tmp_path / "in.jsonl"
    write_input(inp, with_bad=False)
    full = tmp_path / "full.jsonl"
    assert run_job(model_dir, inp, full) == 0

    out = tmp_path / "out.jsonl"
    real = batch.write_result
    calls = {"n": 0}

    def dying(*a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the job is killed between two results
        return real(*a)

    monkeypatch.setattr(batch, "write_result", dying)
    with pytest.raises(KeyboardInterrupt):
        run_job(model_dir, inp, out)
    partial = read_out(out)
    assert len(partial) == 3
    with open(out, "a") as f:
        f.write('{"id": "r7", "text": "torn wri')  # and a write torn by a kill
    monkeypatch.setattr(batch, "write_result", real)
    assert run_job(model_dir, inp, out) == 0
    ids = [r["id"] for r in read_out(out)]
    assert sorted(ids) == sorted(r["id"] for r in requests()) and len(ids) == len(set(ids))
    by_id = {r["id"]: r["tokens"] for r in read_out(full)}
    assert {r["id"]: r["tokens"] for r in read_out(out)} == by_id
    # a finished job restarted does nothing, also with a mode flag that only finished lines' modes take
    assert run_job(model_dir, inp, out) == 0
    assert run_job(model_dir, inp, out, "--policy", "leftmost") == 0
    assert len(read_out(out)) == len(ids)


def test_same_seeds_same_outputs(model_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    write_input(inp, with_bad=False)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run_job(model_dir, inp, a, "--batch-size", "2") == 0
    assert run_job(model_dir, inp, b) == 0
    assert sorted((r["id"], r["tokens"]) for r in read_out(a)) == sorted((r["id"], r["tokens"]) for r in read_out(b))


def test_missing_input_is_a_clear_error(model_dir, tmp_path, capsys):
    assert run_job(model_dir, tmp_path / "nope.jsonl", tmp_path / "o.jsonl") == 2
    assert "input file not found" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [("--data-parallel",), ("--tensor-parallel-size", "2"),
                                   ("--tensor-parallel-size", "2", "--data-parallel")])
def test_parallel_job_matches(model_dir, tmp_path, flags):
    """Rows over the 8 fake CPU devices (data parallel), the model over 2 of them (tensor parallel), or both
    (a (4, 2) mesh) give the same results as one device."""
    import jax

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8-device CPU platform")
    inp = tmp_path / "in.jsonl"
    write_input(inp, with_bad=False)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert run_job(model_dir, inp, a) == 0
    assert run_job(model_dir, inp, b, *flags) == 0
    assert sorted((r["id"], r["tokens"]) for r in read_out(a)) == sorted((r["id"], r["tokens"]) for r in read_out(b))


def test_mesh_from_flags(capsys, model_dir, tmp_path):
    import jax

    if len(jax.devices()) < 8:
        pytest.skip("needs the 8-device CPU platform")
    assert cli.mesh_from_args(1, False) is None
    assert dict(cli.mesh_from_args(2, True).shape) == {"data": 4, "model": 2}
    assert dict(cli.mesh_from_args(4, False).shape) == {"data": 1, "model": 4}
    inp = tmp_path / "in.jsonl"
    write_input(inp, with_bad=False)
    assert run_job(model_dir, inp, tmp_path / "o.jsonl", "--tensor-parallel-size", "3") == 2
    assert "--tensor-parallel-size 3 must be >= 1 and divide the 8 devices" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_linear_spec_job_with_drafter_refills_slots(model_dir, tmp_path):
    """A drafter LoRA has no batch dimension: refilling a slot keeps it as is (it once crashed the refill),
    and every result equals a one-at-a-time generate with the same drafter."""
    import jax

    from nemodiff_jax.lora import random_lora, save_lora

    gen = nemodiff_jax.load(model_dir, dtype="float32", progress=False)
    drafter = save_lora(random_lora(gen.config, jax.random.key(11), rank=4, std=0.3), tmp_path / "lora",
                        gen.config)
    reqs = [{"id": f"d{i}", "prompt": p, "mode": "linear_spec", "max_new_tokens": 5 + 2 * i}
            for i, p in enumerate(PROMPTS[:5])]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    assert run_job(model_dir, inp, out, "--drafter", str(drafter)) == 0  # 5 requests through 3 slots
    got = {r["id"]: r["tokens"] for r in read_out(out)}
    gen.attach_drafter(drafter)
    for r in reqs:
        want = gen.generate([r["prompt"]], mode="linear_spec", max_new_tokens=r["max_new_tokens"])[0]
        assert got[r["id"]] == want.tokens, r["id"]


def test_process_count_change_neither_redoes_nor_duplicates(model_dir, tmp_path, monkeypatch):
    """Multi-process jobs write one file per process (`out.part<k>.jsonl`); a restart with another process
    count reads the done ids of every shard. Processes run one after another here, each told its index and
    count the way jax.distributed tells it (jax.process_index / process_count)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, with_bad=False)

    def run_as(index, count, die_after=None):
        monkeypatch.setattr(batch.jax, "process_index", lambda: index)
        monkeypatch.setattr(batch.jax, "process_count", lambda: count)
        if die_after is None:
            return run_job(model_dir, inp, out)
        real, calls = batch.write_result, {"n": 0}

        def dying(*a):
            calls["n"] += 1
            if calls["n"] > die_after:
                raise KeyboardInterrupt
            return real(*a)

        monkeypatch.setattr(batch, "write_result", dying)
        with pytest.raises(KeyboardInterrupt):
            run_job(model_dir, inp, out)
        monkeypatch.setattr(batch, "write_result", real)

    run_as(0, 2, die_after=2)  # a 2-process job: process 0 killed part way, process 1 never ran
    first = read_out(tmp_path / "out.part0.jsonl")
    assert 0 < len(first) < len(requests()) and not out.exists()
    for k in range(3):  # restarted as 3 processes
        assert run_as(k, 3) == 0
    assert run_as(0, 1) == 0  # and once more as one: nothing left to do
    shards = [out] + sorted(tmp_path.glob("out.part*.jsonl"))
    ids = [r["id"] for p in shards if p.exists() for r in read_out(p)]
    assert sorted(ids) == sorted(r["id"] for r in requests()), "every id exactly once over all shards"
    assert not out.exists() or read_out(out) == []
