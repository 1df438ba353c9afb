"""Batch generation jobs: JSONL in -> JSONL out, on the serving engine, resumable, one file per process.

Input lines: {"id": ..., "prompt": str | [int] | "messages": [...], optional "images", "mode", "max_new_tokens",
"temperature", "seed", "max_thinking_tokens", "chat_template_kwargs"}. Images (VLM checkpoints): "images" beside a
text prompt (each at the prompt's "<image>" markers, in order, or all before its text), or image parts in the
messages' content; each a file path relative to the input file, a data: URL or bare base64 data. An image that
cannot be read fails its own line (reported, skipped), as any malformed line. Output lines: {"id", "text", "tokens",
"stats"}, appended and flushed one result at a time, so a killed job loses nothing it finished; on restart, ids
already in the output are skipped and a torn last line is cut off. Malformed input lines are reported with their line number and the job goes on.

The requests run as one continuous job on engine.Engine: one pool of decode slots per program (mode, block
size, policy), the pools taking turns, every row with its own temperature, budget, seed and stop ids as
traced values (a new value never compiles). When a row finishes its result is written and its slot is
refilled with the next request by a prefill of the new rows alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import sys
import time
from pathlib import Path

import jax
from jinja2.exceptions import TemplateError
from tqdm.auto import tqdm

from nemodiff_jax import multimodal
from nemodiff_jax.engine import Engine, Handle
from nemodiff_jax.engine import Request as EngineRequest
from nemodiff_jax.generate import MODE_OPTIONS, MODES, Generator
from nemodiff_jax.multimodal import Prompt
from nemodiff_jax.slots import RowPlan
from nemodiff_jax.tokenizer import RESERVED_TEMPLATE_KEYS

REQUEST_KEYS = {"id", "prompt", "messages", "images", "mode", "max_new_tokens", "temperature", "seed",
                "chat_template_kwargs", "max_thinking_tokens"}


class BadRequest(ValueError):
    pass


@dataclasses.dataclass
class Request:
    line: int
    id: str
    ids: list[int]
    mode: str
    max_new_tokens: int
    temperature: float
    seed: int
    max_thinking_tokens: int | None = None
    prompt: Prompt | None = None  # a prompt with images (read and sized; their pixels are made at admission)


def template_kwargs(line_no: int, obj: dict) -> dict:
    """A line's chat_template_kwargs (e.g. {"enable_thinking": true}), passed to the chat template."""
    kw = obj.get("chat_template_kwargs", {})
    if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
        raise BadRequest(f"line {line_no}: chat_template_kwargs must be an object")
    reserved = sorted(set(kw) & RESERVED_TEMPLATE_KEYS)
    if reserved:
        raise BadRequest(f"line {line_no}: chat_template_kwargs may not set {reserved}")
    if "messages" not in obj and kw:
        raise BadRequest(f"line {line_no}: chat_template_kwargs needs 'messages'")
    return kw


def parse_request(line_no: int, raw: str, gen: Generator, job: Job) -> Request:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRequest(f"line {line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"line {line_no}: expected a JSON object")
    unknown = set(obj) - REQUEST_KEYS
    if unknown:
        raise BadRequest(f"line {line_no}: unknown field(s) {sorted(unknown)}")
    if "id" not in obj or not isinstance(obj["id"], (str, int)):
        raise BadRequest(f"line {line_no}: missing or invalid 'id'")
    if ("prompt" in obj) == ("messages" in obj):
        raise BadRequest(f"line {line_no}: give exactly one of 'prompt' or 'messages'")
    mode = obj.get("mode", job.mode)
    if mode not in MODES:
        raise BadRequest(f"line {line_no}: unknown mode {mode!r}")
    max_new = obj.get("max_new_tokens", job.max_new_tokens)
    if not isinstance(max_new, int) or not 1 <= max_new <= job.cap:
        raise BadRequest(f"line {line_no}: max_new_tokens must be an int in [1, {job.cap}]")
    temperature = obj.get("temperature", job.temperature)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest(f"line {line_no}: temperature must be a number >= 0")
    seed = obj.get("seed", job.seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
        raise BadRequest(f"line {line_no}: seed must be an int in [0, 2**32)")
    chat_kwargs = template_kwargs(line_no, obj)
    images = obj.get("images")
    if images is not None and (not isinstance(images, list) or "messages" in obj):
        raise BadRequest(f"line {line_no}: 'images' must be a list beside a 'prompt' string (with 'messages', "
                         "images go in the content parts)")
    if images and not isinstance(obj["prompt"], str):
        raise BadRequest(f"line {line_no}: 'images' needs a text 'prompt' (images go at its '<image>' markers, or "
                         "before its text)")
    base = Path(job.input).parent  # image paths are relative to the input file
    name = f"line {line_no}"

    def resolve(source, label):
        return multimodal.file_or_base64(source, base, label)

    try:
        if "messages" in obj:
            if gen.tokenizer is None:
                raise ValueError("'messages' needs a tokenizer with a chat template")
            prompt = gen.encode_chat(obj["messages"], add_generation_prompt=True, resolve=resolve, deferred=True,
                                     name=name, **chat_kwargs)
            prompt = gen.prepare([prompt], deferred=True, names=[name])[0]
        elif images:
            sources = [resolve(src, f"{name} image {j}") for j, src in enumerate(images)]
            prompt = gen.prepare([{"text": obj["prompt"], "images": sources}], deferred=True, names=[name])[0]
        else:
            prompt = gen.prepare([obj["prompt"]], names=[name])[0]
    except (ValueError, TypeError, TemplateError) as e:  # a template's raise_exception too; a bad image
        raise BadRequest(f"{e}" if str(e).startswith(name) else f"{name}: {e}") from None
    ids = prompt.ids
    if len(ids) > job.max_prompt_tokens:
        raise BadRequest(f"line {line_no}: prompt of {len(ids)} tokens{prompt.describe_images()} exceeds the job's "
                         f"limit {job.max_prompt_tokens} (--max-prompt-tokens)")
    think = obj.get("max_thinking_tokens")
    if think is not None and (not isinstance(think, int) or isinstance(think, bool) or not 0 <= think < 2 ** 31):
        raise BadRequest(f"line {line_no}: max_thinking_tokens must be an int in [0, 2**31)")
    return Request(line_no, str(obj["id"]), ids, mode, max_new, float(temperature), seed, think,
                   prompt if prompt.images else None)


def read_done_ids(path: Path, repair: bool = True) -> set[str]:
    """Ids already in an output file. A torn last line (killed mid-write) is cut off first when `repair`
    (this process's own file), else ignored (another process may be writing it right now)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(keep)
        data = data[:keep]
    done = set()
    for line in data.decode().splitlines():
        if line.strip():
            done.add(str(json.loads(line)["id"]))
    return done


def shard_output(path: Path, index: int, count: int) -> Path:
    """Process `index` of `count` writes its own file: the output itself for one process, else
    `<stem>.part<index><suffix>` beside it."""
    return path if count == 1 else path.with_name(f"{path.stem}.part{index}{path.suffix}")


def done_ids(path: Path, mine: Path) -> set[str]:
    """Ids in every shard of the output (the plain file and all `.part<k>` files, whatever process count
    wrote them), so a restart with another process count neither redoes nor duplicates an id."""
    shards = [path] + sorted(path.parent.glob(f"{path.stem}.part*{path.suffix}"))
    return set().union(*(read_done_ids(p, repair=p == mine) for p in shards))


@dataclasses.dataclass(frozen=True)
class Job:
    """A batch job's settings (the `nemodiff batch` flags). `mode`, `max_new_tokens`, `temperature` and `seed`
    are the defaults of lines that do not set them; `mode_options` (block_size, threshold, policy) apply to
    every request whose mode takes them, and one that no request's mode takes is an error."""

    input: Path
    output: Path
    batch_size: int = 8
    mode: str = "linear_spec"
    max_new_tokens: int = 128
    max_new_tokens_cap: int | None = None  # the largest a line may ask for (default: max_new_tokens)
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    max_prompt_tokens: int = 1024
    mode_options: dict = dataclasses.field(default_factory=dict)
    progress: bool = True

    @property
    def cap(self) -> int:
        return max(self.max_new_tokens, self.max_new_tokens_cap or self.max_new_tokens)


def run_batch_job(gen: Generator, job: Job) -> int:
    """Runs the job (this process's share of the lines under jax.distributed); returns the exit status: 0,
    or 1 when a request failed on the device (it is not written, so a restart retries it)."""
    if job.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {job.batch_size}")
    in_path = Path(job.input)
    if not in_path.exists():
        raise FileNotFoundError(f"{in_path}: input file not found")
    shard, num_shards = jax.process_index(), jax.process_count()
    out_path = shard_output(Path(job.output), shard, num_shards)
    done = done_ids(Path(job.output), out_path)

    pending: list[Request] = []
    seen: set[str] = set()
    modes: set[str] = set()
    errors = 0
    with open(in_path) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip() or (line_no - 1) % num_shards != shard:
                continue
            try:
                r = parse_request(line_no, raw, gen, job)
                if r.id in seen:
                    raise BadRequest(f"line {line_no}: duplicate id {r.id!r} (first seen earlier)")
                request_plan(gen, r, job)  # a line the engine would refuse is reported with its number now
            except BadRequest as e:
                errors += 1
                print(f"nemodiff batch: skipped {e}", file=sys.stderr)
                continue
            seen.add(r.id)
            modes.add(r.mode)
            if r.id not in done:
                pending.append(r)
    check_flags_used(job.mode_options, modes)  # every valid line's mode: a finished job reruns as a no-op
    finished: queue.Queue[Handle] = queue.Queue()
    engine = Engine(gen, slots=max(1, min(job.batch_size, len(pending))), max_queue=max(1, len(pending)),
                    max_prompt_tokens=job.max_prompt_tokens, max_new_tokens=job.cap, segment_steps=1 << 30,
                    on_finish=finished.put)
    tokens, failed = 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(pending), desc="batch", unit="req", disable=not job.progress)
    for r in pending:  # all queued before the engine starts: its first admissions fill every slot
        engine.submit(EngineRequest(prompt=r.prompt or r.ids, mode=r.mode, max_new_tokens=r.max_new_tokens,
                                    temperature=r.temperature, top_k=job.top_k, top_p=job.top_p, seed=r.seed,
                                    options=plan_options(r.mode, job), max_thinking_tokens=r.max_thinking_tokens,
                                    id=r.id))
    with engine, open(out_path, "a") as out:
        for _ in pending:
            h = next_finished(finished, engine)
            if h.error is not None:
                failed += 1
                print(f"nemodiff batch: request {h.id!r} failed: {h.error}", file=sys.stderr)
                continue
            write_result(out, h.id, h.result)
            tokens += len(h.result.tokens)
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.1f}")
    bar.close()
    wall = time.perf_counter() - t0
    print(f"nemodiff batch: {len(pending)} requests ({len(done)} already done, {errors} malformed lines skipped"
          f"{f', {failed} failed' if failed else ''}), {tokens} tokens in {wall:.1f}s = "
          f"{tokens / wall if wall else 0:.1f} tok/s -> {out_path}", file=sys.stderr)
    return 1 if failed else 0


def next_finished(finished: queue.Queue, engine: Engine) -> Handle:
    """The next finished request; an error if the engine stopped with requests still open."""
    while True:
        try:
            return finished.get(timeout=1.0)
        except queue.Empty:
            if not engine.alive and finished.empty():
                raise RuntimeError("the engine stopped before the job finished") from None


def write_result(out, rid: str, result) -> None:
    """One output line, flushed to disk before the next (a kill loses nothing already written)."""
    out.write(json.dumps({"id": rid, "text": result.text, "tokens": result.tokens, "stats": result.stats}) + "\n")
    out.flush()
    os.fsync(out.fileno())


def plan_options(mode: str, job: Job) -> dict:
    """The job's mode options that this request's mode takes."""
    return {k: v for k, v in job.mode_options.items() if k in MODE_OPTIONS[mode]}


def request_plan(gen: Generator, r: Request, job: Job) -> RowPlan:
    """The request's validated settings: the job's flags where its mode takes them (block size, threshold,
    policy), the line's own temperature, budget and seed."""
    try:
        return gen.check_request(r.mode, r.max_new_tokens, len(r.ids), r.temperature, job.top_k, job.top_p,
                                 None, None, plan_options(r.mode, job), r.max_thinking_tokens)
    except ValueError as e:
        raise BadRequest(f"line {r.line}: {e}") from None


def check_flags_used(mode_options: dict, modes: set[str]) -> None:
    """A mode flag (--block-size, --threshold, --policy) that no request's mode takes is an error, not a
    silent no-op."""
    unused = [k for k in mode_options if not any(k in MODE_OPTIONS[m] for m in modes)]
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise ValueError(f"{flags} given, but no request's mode ({', '.join(sorted(modes)) or 'none'}) takes it")
