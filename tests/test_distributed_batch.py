"""`nemodiff batch --distributed` as a 2-host job on the CPU: two real OS processes joined by a real
jax.distributed coordinator, each a "host" with 2 fake CPU devices. Tensor parallel 2 inside each process (its
own local devices), data parallel across the processes (each takes every other input line); nothing crosses
processes in the decode loop. README.md ("Batch jobs, many GPUs") gives the same launch for 2 GPU hosts."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from conftest import tiny_model_with_tokenizer

import nemodiff_jax
from nemodiff_jax import cli

# short greedy requests, two modes: process 0 takes lines 1, 3 (ar, ar), process 1 lines 2, 4 (linear_spec twice)
REQUESTS = [{"id": "a", "prompt": "ROMEO:", "mode": "ar", "max_new_tokens": 5},
            {"id": "b", "prompt": "To be, or not to be", "mode": "linear_spec", "max_new_tokens": 6},
            {"id": "c", "prompt": "Now is the winter", "mode": "ar", "max_new_tokens": 4},
            {"id": "d", "prompt": "KING:", "mode": "linear_spec", "max_new_tokens": 5}]
TIMEOUT_S = 180
LOG = re.compile(r"nemodiff batch: process (\d) of (\d): mesh \{'data': (\d+), 'model': (\d+)\} over local devices "
                 r"\[([\d, ]+)\] \((\d+) local, (\d+) in all\)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("dist_model"), seed=7)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir, inp, out, tensor_parallel: int, num_processes: int = 2):
    """Starts the job's processes at once, as a launcher would on each host; returns [(exit code, stderr)]."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "nemodiff_jax.cli", "batch", "--model", str(model_dir), "--dtype", "float32",
         "--input", str(inp), "--output", str(out), "--batch-size", "2", "--max-new-tokens", "8",
         "--max-prompt-tokens", "32", "--no-progress", "--tensor-parallel-size", str(tensor_parallel),
         "--distributed", "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(num_processes),
         "--process-id", str(k)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(num_processes)]
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=TIMEOUT_S)  # alone ~20 s; a job that hangs (e.g. a mesh over the
            results.append((p.returncode, err))       # devices of both processes) fails here, not CI
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the job did not finish in {TIMEOUT_S} s:\n"
                    + "\n".join(f"process {k}: {p.communicate()[1][-3000:]}" for k, p in enumerate(procs)))
    return results


def test_two_hosts_tensor_parallel_inside_data_parallel_across(model_dir, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    results = launch(model_dir, inp, out, tensor_parallel=2)
    for k, (rc, err) in enumerate(results):
        assert rc == 0, f"process {k} exited {rc}:\n{err[-4000:]}"

    # each process saw the 4 devices of both "hosts" and ran on a (1, 2) mesh of its own 2
    meshes = {}
    for k, (_, err) in enumerate(results):
        found = LOG.findall(err)
        assert len(found) == 1, err[-4000:]
        index, count, data, model, ids, local, total = found[0]
        assert (int(index), int(count), int(data), int(model), int(local), int(total)) == (k, 2, 1, 2, 2, 4)
        meshes[k] = {int(i) for i in ids.split(",")}
    assert len(meshes[0]) == len(meshes[1]) == 2 and not meshes[0] & meshes[1], meshes

    # process k wrote out.part<k>.jsonl with lines k, k + 2; together every id exactly once
    assert not out.exists()
    parts = {k: [json.loads(line) for line in (tmp_path / f"out.part{k}.jsonl").read_text().splitlines()]
             for k in range(2)}
    assert sorted(r["id"] for r in parts[0]) == ["a", "c"] and sorted(r["id"] for r in parts[1]) == ["b", "d"]
    got = {r["id"]: r["tokens"] for part in parts.values() for r in part}

    # the tokens of a single-process, single-device run of the same requests
    gen = nemodiff_jax.load(model_dir, dtype="float32", progress=False)
    assert gen.mesh is None
    for req in REQUESTS:
        want = gen.generate([req["prompt"]], mode=req["mode"], max_new_tokens=req["max_new_tokens"])[0]
        assert got[req["id"]] == want.tokens, req["id"]
        assert len(want.tokens) > 0


def test_tensor_parallel_beyond_the_local_devices_is_a_clear_error(model_dir, tmp_path):
    """TP 4 fits the 4 devices of the whole job but not one process's 2: both processes say so and exit 2."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    for k, (rc, err) in enumerate(launch(model_dir, inp, out, tensor_parallel=4)):
        assert rc == 2, f"process {k} exited {rc}:\n{err[-4000:]}"
        assert (f"nemodiff batch: error: --tensor-parallel-size 4 must be >= 1 and divide this process's 2 local "
                f"devices (process {k} of 2, 4 devices in all)") in err, err[-4000:]
    assert not list(tmp_path.glob("out*.jsonl"))


@pytest.mark.parametrize("flags", [("--num-processes", "2"), ("--coordinator-address", "127.0.0.1:1", "--process-id",
                                                               "0")])
def test_coordinator_flags_need_distributed(model_dir, tmp_path, capsys, flags):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(REQUESTS[0]) + "\n")
    assert cli.main(["batch", "--model", str(model_dir), "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                     *flags]) == 2
    names = ", ".join(f for f in flags if f.startswith("--"))
    assert f"{names} given without --distributed" in capsys.readouterr().err


def test_distributed_without_a_coordinator_is_a_clear_error(model_dir, tmp_path):
    """Outside SLURM / Open MPI, with neither the flags nor JAX_COORDINATOR_ADDRESS, the job says what to give."""
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(REQUESTS[0]) + "\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMIX_", "JAX_COORDINATOR"))} | {"JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "nemodiff_jax.cli", "batch", "--model", str(model_dir), "--input",
                        str(inp), "--output", str(tmp_path / "o.jsonl"), "--distributed"],
                       env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 2, p.stderr[-3000:]
    assert ("nemodiff batch: error: --distributed: coordinator_address should be defined. (give "
            "--coordinator-address HOST:PORT, --num-processes N and --process-id K, or run under SLURM or Open "
            "MPI, where JAX finds them)") in p.stderr, p.stderr[-3000:]
