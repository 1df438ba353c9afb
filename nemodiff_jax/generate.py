"""The user-facing object: load a checkpoint once, then score or generate with any mode per call."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nemodiff_jax import multimodal, slots, vision
from nemodiff_jax.cache import KVCache
from nemodiff_jax.config import Config
from nemodiff_jax.decoding import diffusion, quadratic
from nemodiff_jax.decoding.common import MAX_STOP_IDS, Options, State
from nemodiff_jax.lora import ADAPTER_CONFIG, DRAFTER_DIR, LoRA, load_lora
from nemodiff_jax.model import Transformer, abstract_model, quantize_weights, tile_quantized
from nemodiff_jax.multimodal import Prompt
from nemodiff_jax.quant import FORMATS as QUANT_FORMATS
from nemodiff_jax.sampling import Sampling
from nemodiff_jax.slots import (MODES, Pool, RowPlan, Runtime, buffer_sizes, chunk_width, host_rows, round_up,
                                row_tokens)
from nemodiff_jax.tokenizer import Tokenizer

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# Per-mode options (**mode_options of generate) and their defaults; block_size defaults to config.block_size.
MODE_OPTIONS = {
    "ar": {"deterministic": False},  # True: each step at linear_spec's verify shape (decoding/ar.py)
    "diffusion": {"block_size": None, "policy": "threshold", "threshold": 0.9, "steps": None},
    "linear_spec": {"block_size": None, "threshold": 0.0},
    "quadratic_spec": {"block_size": quadratic.DEFAULT_CHAIN},  # block_size: the chain (a canvas of J(J+1))
}
DRAFTING_MODES = ("linear_spec", "quadratic_spec")  # the modes that run the drafter LoRA


@dataclasses.dataclass
class Result:
    tokens: list[int]  # new tokens only (a stop token that ended the row included)
    text: str | None
    stats: dict


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class Generator:
    """A loaded NLD model: `.config`, `.model`, `.tokenizer` (or None), `.logits(...)`, `.generate(...)`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None = None, path: Path | None = None,
                 mesh=None, attention: str = "auto"):
        self.mesh = mesh
        if mesh is not None:
            from nemodiff_jax.sharding import ShardedMatmul, matmul_impl, shard_model

            model = shard_model(model, mesh)
            kept = isinstance(model.matmul_impl, ShardedMatmul) and model.matmul_impl.mesh == mesh
            if not kept:  # quantized matmuls per device (kernel) or partitioned (reference), for this mesh
                model.matmul_impl = matmul_impl(mesh)
        self.model = model
        self.config: Config = model.config
        self.tokenizer = tokenizer
        self.path = path
        self.dtype = model.dtype
        self.runtime = Runtime.of(model, mesh)  # what the compiled programs take (slots.Runtime)
        self.drafter: LoRA | None = None
        self.attn_impl = attention_impl(self.config, self.dtype, attention, mesh)

    def make_options(self, mode: str, options: dict) -> Options:
        return decoding_options(self.config, mode, options, self.attn_impl)

    def attach_drafter(self, path_or_lora) -> None:
        """Attaches the linear-spec drafter LoRA (a PEFT directory or a LoRA); used by default in drafts."""
        self.drafter = self._lora(path_or_lora)

    def _lora(self, spec) -> LoRA | None:
        if spec is None or spec is False:
            return None
        if isinstance(spec, LoRA):
            lora = spec
        else:
            lora = load_lora(spec, self.config, self.dtype)
        cfg, r = self.config, lora.rank
        want_a, want_b = (cfg.num_heads, cfg.head_dim, r), (r, cfg.hidden_size)
        bad = [i for i, (a, b) in enumerate(zip(lora.a, lora.b)) if a.shape != want_a or b.shape != want_b]
        if len(lora.a) != cfg.num_layers or len(lora.b) != cfg.num_layers or bad:
            got = (len(lora.a), tuple(lora.a[0].shape), tuple(lora.b[0].shape))
            raise ValueError(f"LoRA shape does not fit this model: (layers, A, B) = {got}, model needs "
                             f"({cfg.num_layers}, {want_a}, {want_b})")
        return lora

    def logits(self, token_ids, causal: bool = True) -> np.ndarray:
        """float32 [B, T, V] logits for token ids [B, T] at positions 0..T-1 with a fresh cache.

        Prompts with images (a VLM): instead of token ids, a list of prompts as `generate` takes them (at least
        one a {"text", "images"} dict, a {"messages"} chat or a multimodal.Prompt; strings and token-id lists
        may stand beside them), all of one token length T (no padding is added; `encode_prompts` gives their
        ids, the image blocks included), or one such prompt. Their images are encoded by the tower and take
        the placeholders' embeddings, as at a generate prefill; T counts the image blocks.

        causal=True: logits[t] predicts token t+1; causal=False: bidirectional over the whole input,
        logits[t] predicts token t itself (the diffusion head's semantics)."""
        if isinstance(token_ids, (dict, Prompt)):
            token_ids = [token_ids]
        if isinstance(token_ids, Sequence) and any(isinstance(p, (dict, Prompt)) for p in token_ids):
            return self._prompt_logits(token_ids, causal)
        tokens = np.asarray(token_ids)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be a non-empty [B, T] integer array, got shape {tokens.shape} "
                             f"dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got [{tokens.min()}, "
                             f"{tokens.max()}]")
        rt = self.runtime
        with jax.default_matmul_precision(rt.precision):
            out = _logits_fn(rt.graphdef, rt.params, jnp.asarray(tokens, jnp.int32), causal, self.attn_impl)
        return np.asarray(out, dtype=np.float32)

    def _prompt_logits(self, prompts, causal: bool) -> np.ndarray:
        prompts = self.prepare(list(prompts))
        lengths = [len(p.ids) for p in prompts]
        if len(set(lengths)) > 1:
            i = next(i for i, n in enumerate(lengths) if n != lengths[0])
            raise ValueError(f"logits takes prompts of one length (no padding is added): prompt {i} has "
                             f"{lengths[i]} tokens, prompt 0 has {lengths[0]} (image blocks included)")
        rt = self.runtime
        tokens = jnp.asarray([p.ids for p in prompts], jnp.int32)
        with jax.default_matmul_precision(rt.precision):
            images = ()
            if any(p.images for p in prompts):
                features, starts = slots.encode_images(rt, prompts)
                images = (features, jnp.asarray(slots.feature_index(prompts, starts, lengths[0],
                                                                     self.config.vision.image_token_id)))
            out = _logits_fn(rt.graphdef, rt.params, tokens, causal, self.attn_impl, *images)
        return np.asarray(out, dtype=np.float32)


    # ------------------------------------------------------------------ generation

    def encode_prompts(self, prompts) -> list[list[int]]:
        """The token ids of each prompt (`prepare`; a prompt with images gives its ids with the image blocks)."""
        return [p.ids for p in self.prepare(prompts)]

    def prepare(self, prompts, deferred: bool = False, names: Sequence[str] | None = None) -> list[Prompt]:
        """Validated, encoded prompts (multimodal.Prompt: ids, images). A prompt is a string (the tokenizer's
        encoding, as it always was), token ids, a dict {"text": str, "images": [...]} (images placed at the
        text's IMAGE_MARKERs, or before the text when it has none: multimodal.split_markers), a dict
        {"messages": [...], "chat_template_kwargs"?: {...}} (encode_chat), or a Prompt. Images are PIL images,
        paths, bytes or data: URLs (preprocessed here; with `deferred` only read and sized, their pixels made at
        admission: multimodal.ImageRef). Errors name the prompt (`names[i]`, default "prompt i") and the image."""
        if isinstance(prompts, (str, bytes, dict, Prompt)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings, token-id lists or {'text', 'images'} "
                             "dicts")
        out = []
        for i, p in enumerate(prompts):
            name = f"prompt {i}" if names is None else names[i]
            out.append(self._check_prompt(self._encode_one(p, name, deferred), name))
        return out

    def _encode_one(self, p, name: str, deferred: bool) -> Prompt:
        if isinstance(p, Prompt):
            vcfg = self.config.vision
            images = p.images
            if images and vcfg is not None:
                images = tuple(multimodal.prepare_image(im, vcfg, f"{name} image {j}", deferred)
                               for j, im in enumerate(images))
            return Prompt([int(t) for t in p.ids], images)
        if isinstance(p, dict):
            return self._encode_dict(p, name, deferred)
        if isinstance(p, str):
            if not p:
                raise ValueError(f"{name} is empty")
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer: pass token-id lists, not strings")
            return Prompt(self.tokenizer.encode(p))
        if isinstance(p, bytes) or not isinstance(p, Sequence | np.ndarray):
            raise ValueError(f"{name} must be a string, a list of token ids or a {{'text', 'images'}} dict, got "
                             f"{type(p).__name__}")
        if not all(_is_int(t) for t in p):
            bad = next(t for t in p if not _is_int(t))
            raise ValueError(f"{name}: token ids must be integers, got {bad!r}")
        return Prompt([int(t) for t in p])

    def _encode_dict(self, p: dict, name: str, deferred: bool) -> Prompt:
        if "messages" in p:
            unknown = set(p) - {"messages", "chat_template_kwargs"}
            if unknown:
                raise ValueError(f"{name}: unknown key(s) {sorted(unknown)} beside 'messages' (images go in the "
                                 "messages' content parts)")
            kwargs = p.get("chat_template_kwargs") or {}
            if not isinstance(kwargs, dict):
                raise ValueError(f"{name}: chat_template_kwargs must be a dict")
            return self.encode_chat(p["messages"], deferred=deferred, name=name, **kwargs)
        unknown = set(p) - {"text", "images"}
        if unknown or not isinstance(p.get("text"), str):
            raise ValueError(f"{name}: a dict prompt is {{'text': str, 'images': [...]}} or {{'messages': [...]}}"
                             f"{f', got unknown key(s) {sorted(unknown)}' if unknown else ''}")
        sources = p.get("images") or []
        if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
            raise ValueError(f"{name}: 'images' must be a list of images (PIL images, paths, bytes or data: URLs)")
        if self.tokenizer is None:
            raise ValueError("this model directory has no tokenizer: a text prompt needs one")
        pieces = multimodal.split_markers(p["text"], len(sources), name)
        if not sources:
            if not p["text"]:
                raise ValueError(f"{name} is empty")
            return Prompt(self.tokenizer.encode(p["text"]))
        images = self._images(sources, name, deferred, [f"{name} image {j}" for j in range(len(sources))])
        return multimodal.encode_pieces(self.tokenizer, pieces, images, self.config.vision, add_special_tokens=True)

    def _images(self, sources, name: str, deferred: bool, labels: Sequence[str]) -> list:
        vcfg = self.config.vision
        if vcfg is None:
            raise ValueError(f"{name}: {len(sources)} image(s) given, but this checkpoint is text-only (its "
                             "config.json has no vision_config): images need a VLM checkpoint")
        return [multimodal.prepare_image(src, vcfg, label, deferred) for src, label in zip(sources, labels)]

    def encode_chat(self, messages, add_generation_prompt: bool = True, resolve: multimodal.Resolver | None = None,
                    deferred: bool = False, name: str = "messages", **template_kwargs) -> Prompt:
        """A chat (OpenAI-style messages) rendered with the model's chat template, as `generate` takes it. Content
        may be a string or a list of parts: text parts, and image parts (`{"type": "image_url", "image_url":
        {"url": ...}}` or `{"type": "image", "image" | "url" | "path": ...}`) placed where they are
        (multimodal.flatten_messages). `resolve(source, label)` turns an image part's source into something
        load_image reads (the server's media policy, a batch job's relative paths); default: as given. Errors name
        the part: `messages[i].content[j]`, after `name` unless it is the default.
        A chat without images is encoded exactly as `tokenizer.apply_chat_template(..., tokenize=True)`."""
        if self.tokenizer is None:
            raise ValueError("chat messages need a tokenizer with a chat template")
        flat, parts = multimodal.flatten_messages(messages)
        if not parts:
            return Prompt(self.tokenizer.apply_chat_template(messages, tokenize=True,
                                                             add_generation_prompt=add_generation_prompt,
                                                             **template_kwargs))
        labels = [label if name == "messages" else f"{name} {label}" for _, label in parts]
        sources = [src if resolve is None else resolve(src, label) for (src, _), label in zip(parts, labels)]
        images = self._images(sources, name, deferred, labels)
        text = self.tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **template_kwargs)
        count = text.count(multimodal.IMAGE_MARKER)
        if count != len(images):
            raise multimodal.MarkerCountError(
                f"{name}: the rendered chat has {count} image marker(s) {multimodal.IMAGE_MARKER!r} for "
                f"{len(images)} image part(s) (a marker typed in the text, or a template that dropped a message)")
        return multimodal.encode_pieces(self.tokenizer, text.split(multimodal.IMAGE_MARKER), images,
                                        self.config.vision, add_special_tokens=False)

    def _check_prompt(self, p: Prompt, name: str) -> Prompt:
        cfg = self.config
        if not p.ids:
            raise ValueError(f"{name} is empty")
        bad = [t for t in p.ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"{name}: token id(s) {bad[:5]} outside [0, {cfg.vocab_size})")
        if p.images and cfg.vision is None:
            raise ValueError(f"{name}: {len(p.images)} image(s) given, but this checkpoint is text-only (its "
                             "config.json has no vision_config): images need a VLM checkpoint")
        if cfg.vision is not None:
            pads = sum(1 for t in p.ids if t == cfg.vision.image_token_id)
            if pads != p.num_image_tokens:
                raise multimodal.MarkerCountError(
                    f"{name}: the prompt holds {pads} image placeholder token(s) (id {cfg.vision.image_token_id}) "
                    f"but its {len(p.images)} image(s) fill {p.num_image_tokens}: place images with "
                    f"{multimodal.IMAGE_MARKER!r} markers (or image parts), not by writing image tokens")
        if p.images and len(p.ids) >= cfg.max_position_embeddings:
            raise ValueError(f"{name}: {len(p.ids)} tokens{p.describe_images()} do not fit the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}: use fewer or smaller images")
        return p

    def prompt_plan(self, plan: RowPlan, ids: Sequence[int]) -> RowPlan:
        """The plan for one prompt: a prompt whose thinking is already closed (its last think tag is </think>,
        as a template with thinking off writes it) takes no thinking budget, so none is forced into the
        answer."""
        if plan.think_budget < 0:
            return plan
        start = self.tokenizer.token_to_id("<think>") if self.tokenizer is not None else None
        last = next((t for t in reversed(ids) if t in (start, plan.think_end)), None)
        return dataclasses.replace(plan, think_budget=-1, think_end=-1) if last == plan.think_end else plan

    def think_end_id(self) -> int:
        """The </think> id, as the reference finds it: the last id of the tokenized string."""
        ids = self.tokenizer.encode("</think>", add_special_tokens=False) if self.tokenizer is not None else []
        if not ids:
            raise ValueError("max_thinking_tokens needs a tokenizer that knows '</think>'")
        return ids[-1]

    def check_request(self, mode: str, max_new_tokens, longest: int, temperature, top_k, top_p, stop_token_ids,
                      lora, mode_options: dict, max_thinking_tokens=None) -> RowPlan:
        """Validates one request's settings (every error names the field) and resolves its defaults."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {sorted(MODES)}")
        unknown = set(mode_options) - set(MODE_OPTIONS[mode])
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for mode {mode!r}; "
                             f"allowed: {sorted(MODE_OPTIONS[mode]) or 'none'}")
        o = {**MODE_OPTIONS[mode], **mode_options}
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        cfg = self.config
        opts = self.make_options(mode, o)
        block = opts.block
        if mode != "ar" and (not _is_int(block) or not 2 <= block <= 256):
            raise ValueError(f"block_size must be an int in [2, 256], got {block!r}")
        if mode == "quadratic_spec" and block > quadratic.MAX_CHAIN:
            raise ValueError(f"quadratic_spec block_size (the chain) must be <= {quadratic.MAX_CHAIN} (a canvas "
                             f"of J(J+1) tokens per forward), got {block}")
        if mode == "ar" and not isinstance(o["deterministic"], bool):
            raise ValueError(f"deterministic must be true or false, got {o['deterministic']!r}")
        if mode == "diffusion" and o["policy"] not in diffusion.POLICIES:
            raise ValueError(f"unknown diffusion policy {o['policy']!r}; choose from {diffusion.POLICIES}")
        if mode == "diffusion" and o["steps"] is not None and (not _is_int(o["steps"]) or not 1 <= o["steps"] <= block):
            raise ValueError(f"steps must be an int in [1, block_size={block}], got {o['steps']!r}")
        threshold = o.get("threshold", 0.0)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        # a block (a canvas: two chains) may run past the last kept token
        extra = {"ar": block if opts.deterministic else 0, "quadratic_spec": 2 * block}.get(mode, block)
        if longest + max_new_tokens + extra > cfg.max_position_embeddings:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} (+{extra} block "
                             f"slack) exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
        if lora is not None and lora is not False and mode not in DRAFTING_MODES:
            raise ValueError(f"lora is only used by modes {DRAFTING_MODES} (draft passes), not {mode!r}")
        for name, v in (("temperature", temperature), ("top_p", top_p)):
            if v is not None and (not isinstance(v, (int, float, np.number)) or isinstance(v, bool)):
                raise ValueError(f"{name} must be a number, got {v!r}")
        if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= cfg.vocab_size):
            raise ValueError(f"top_k must be an int in [1, vocab_size={cfg.vocab_size}] or None, got {top_k!r}")
        Sampling.make(temperature, top_k, top_p)  # checks the values
        stops = cfg.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        bad = [t for t in stops if not _is_int(t) or not 0 <= t < cfg.vocab_size]
        if bad or len(stops) > MAX_STOP_IDS:
            raise ValueError(f"stop_token_ids must be at most {MAX_STOP_IDS} ints in [0, {cfg.vocab_size}), got "
                             f"{list(stops)[:MAX_STOP_IDS + 1]}")
        stops = tuple(int(t) for t in stops)
        think = {}
        if max_thinking_tokens is not None:
            if not _is_int(max_thinking_tokens) or not 0 <= max_thinking_tokens < 2 ** 31:
                raise ValueError(f"max_thinking_tokens must be an int in [0, 2**31) or None, got "
                                 f"{max_thinking_tokens!r}")
            think = {"think_budget": int(max_thinking_tokens), "think_end": self.think_end_id()}
        return RowPlan(**think, opts=opts, block=block, max_new=max_new_tokens,
                       temperature=float(temperature), top_k=top_k, top_p=top_p, stop_ids=stops,
                       threshold=float(threshold), steps=o.get("steps") or block)

    def _start(self, prompts, mode, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, lora,
               mode_options, max_thinking_tokens=None) -> tuple[Pool, int]:
        """A pool of one row per prompt (padded to a whole number of rows per mesh "data" device), every
        prompt admitted (prefilled); returns it and the number of real prompts."""
        prompts = self.prepare(prompts)
        n_real = len(prompts)
        if not _is_int(seed) and not (isinstance(seed, Sequence | np.ndarray) and not isinstance(seed, str)):
            raise ValueError(f"seed must be an int or one int per prompt, got {seed!r}")
        seeds = [seed + i for i in range(n_real)] if _is_int(seed) else list(seed)
        if len(seeds) != n_real:
            raise ValueError(f"got {len(seeds)} seeds for {n_real} prompts")
        if not all(_is_int(x) and 0 <= x < 2 ** 32 for x in seeds):
            raise ValueError(f"seed must be an int in [0, 2**32) (row i uses seed + i), got {seed!r}")
        pad = round_up(n_real, self.runtime.data_rows) - n_real  # copies of the first prompt, results dropped
        prompts, seeds = prompts + [prompts[0]] * pad, seeds + [seeds[0]] * pad
        longest = max(len(p.ids) for p in prompts)
        plan = self.check_request(mode, max_new_tokens, longest, temperature, top_k, top_p, stop_token_ids, lora,
                                  mode_options, max_thinking_tokens)
        lora_obj = (self.drafter if lora is None else self._lora(lora)) if mode in DRAFTING_MODES else None
        capacity, out_len = buffer_sizes(longest, max_new_tokens, chunk_width(plan.opts))
        pool = Pool(self.runtime, plan.opts, lora_obj, len(prompts), capacity, out_len)
        pool.admit({i: (i, p if p.images else p.ids, s, self.prompt_plan(plan, p.ids))
                    for i, (p, s) in enumerate(zip(prompts, seeds))})
        return pool, n_real

    def generate(self, prompts, mode: str = "ar", max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | Sequence[int] = 0,
                 stop_token_ids: Sequence[int] | None = None, lora=None, loop: str = "device",
                 max_thinking_tokens: int | None = None, **mode_options) -> list[Result]:
        """Generates for a batch of prompts with the chosen mode: strings, token-id lists, {"text": ...,
        "images": [...]} dicts (VLM checkpoints: images as PIL images, paths, bytes or data: URLs, placed at the
        text's "<image>" markers, or before the text when it has none), {"messages": [...]} chats (image parts
        where they are) or multimodal.Prompt objects (`prepare`, `encode_chat`). Images enter the prefill only.

        mode_options: diffusion: block_size, policy ('threshold' | 'low_confidence' | 'leftmost'), threshold,
        steps; linear_spec: block_size, threshold (0 = one draft pass). `seed`: an int (row i uses seed+i) or
        one per prompt. `lora`: None = the attached drafter, False = none, or a PEFT dir / LoRA.
        `loop`: 'device' (one on-device while loop) or 'python' (the step-by-step twin).
        `max_thinking_tokens`: the thinking budget; the first output position at or past it holds `</think>`
        unless one came earlier (every mode; greedy linear_spec still equals greedy ar); a prompt whose
        thinking is closed already takes none (prompt_plan).

        It runs on the engine's decode slots (slots.Pool): one row per prompt, all admitted at once, then
        one on-device loop until every row is done."""
        if loop not in ("device", "python"):
            raise ValueError(f"loop must be 'device' or 'python', got {loop!r}")
        t0 = time.perf_counter()
        pool, n_rows = self._start(prompts, mode, max_new_tokens, temperature, top_k, top_p, seed,
                                   stop_token_ids, lora, mode_options, max_thinking_tokens)
        if loop == "device":
            pool.advance(until_all=True)
        else:
            for _ in pool.steps():
                pass
        jax.block_until_ready(pool.st)  # dispatch is asynchronous: time the work, not the launch
        return self._results(host_rows(pool.st), pool.opts, time.perf_counter() - t0, n_rows)

    def stream(self, prompt, mode: str = "ar", max_new_tokens: int = 128, **kw) -> Iterator[list[int]]:
        """Yields the new tokens of one prompt as each step (token / block / round) lands; the last item is
        the full Result. One pool row, advanced a step per on-device segment (one host read per step)."""
        t0 = time.perf_counter()
        think = kw.pop("max_thinking_tokens", None)
        pool, _ = self._start([prompt], mode, max_new_tokens, kw.pop("temperature", 0.0), kw.pop("top_k", None),
                              kw.pop("top_p", None), kw.pop("seed", 0), kw.pop("stop_token_ids", None),
                              kw.pop("lora", None), kw, think)
        emitted = 0
        host = host_rows(pool.st)
        while True:
            tokens = row_tokens(host, 0)
            if len(tokens) > emitted:
                yield tokens[emitted:]
                emitted = len(tokens)
            if bool(host.done[0]):
                break
            host = pool.run(max_steps=1)
        yield self._results(host, pool.opts, time.perf_counter() - t0, 1)[0]

    def row_result(self, st: State, opts: Options, i: int, wall: float) -> Result:
        toks = row_tokens(st, i)
        text = self.tokenizer.decode(toks) if self.tokenizer is not None else None
        return Result(tokens=toks, text=text, stats=row_stats(st, opts, i, len(toks), wall))

    def _results(self, st: State, opts: Options, wall: float, n_rows: int) -> list[Result]:
        """The first n_rows rows' Results from a host state; batch stats count the admission's prefill."""
        results = []
        total = 0
        for i in range(n_rows):
            results.append(self.row_result(st, opts, i, wall))
            total += len(results[-1].tokens)
        for r in results:
            r.stats["batch_forward_passes"] = int(st.total_passes)
            r.stats["batch_tokens_per_s"] = total / wall if wall > 0 else float("nan")
        return results


def decoding_options(cfg: Config, mode: str, options: dict, attn_impl="auto") -> Options:
    """The static decoding options (what changes the program) from a mode's validated options merged over
    MODE_OPTIONS defaults; the values (threshold, steps) go per row into RowSettings."""
    o = {**MODE_OPTIONS[mode], **options}
    block = cfg.block_size if o.get("block_size") is None else o["block_size"]
    return Options(mode=mode, block=block, policy=o.get("policy", "threshold"),
                   mask_id=cfg.mask_token_id, attn_impl=attn_impl, deterministic=bool(o.get("deterministic")))


def attention_impl(cfg: Config, dtype, attention: str, mesh=None):
    """The attention impl a Generator runs: `attention` ("auto" = attention.choose_impl's table per call, or
    a forced "pallas" / "cudnn" / "xla") on one device, or per device under a mesh (attention.mesh_impl).
    A forced path that cannot run on this device is an error now, not at the first compile."""
    from nemodiff_jax import attention as attn

    if attention not in attn.IMPLS:
        raise ValueError(f"attention must be one of {attn.IMPLS}, got {attention!r}")
    if mesh is not None:
        return attn.mesh_impl(mesh, cfg.num_kv_heads, attention)
    if attention != "auto":
        device = attn.DeviceInfo.of()
        reason = attn.why_not(attention, device, dtype, cfg.head_dim, 128)  # capacities are multiples of 128
        if reason is not None:
            raise ValueError(f"attention {attention!r} cannot run on {device}: {reason}")
    return attention


def row_stats(st: State, opts: Options, i: int, n_tokens: int, wall: float) -> dict:
    """Per-row stats. tokens_per_forward counts the prefill, so plain AR gives exactly 1.0."""
    passes, rounds, work = int(st.passes[i]), int(st.rounds[i]), int(st.work[i])
    stats = {"mode": opts.mode, "generated_tokens": n_tokens, "forward_passes": passes + 1,
             "decode_forward_passes": passes, "tokens_per_forward": n_tokens / (passes + 1),
             "wall_time_s": wall, "tokens_per_s": n_tokens / wall if wall > 0 else float("nan")}
    if opts.mode == "diffusion":
        stats["blocks"] = rounds
        stats["denoise_steps_per_block"] = work / rounds if rounds else 0.0
    if opts.mode in DRAFTING_MODES:
        stats["rounds"] = rounds
        stats["mean_accepted_per_round"] = work / rounds if rounds else 0.0
    return stats


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _logits_fn(graphdef, params, tokens, causal, attn_impl, features=None, index=None):
    """The logits of `tokens`; with image `features` [M, D] and their `index` [B, T] (slots.feature_index) the
    placeholders' embeddings replaced by the features (vision.place_image_features)."""
    model = nnx.merge(graphdef, params)
    b, t = tokens.shape
    cache = KVCache.init(model.config, b, round_up(t, 128), model.dtype)  # capacities as in decoding
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    extra = {} if features is None else {"embeds": vision.place_image_features(model.embed(tokens), features, index)}
    logits, _ = model(tokens, positions, cache, causal=causal, attn_impl=attn_impl, **extra)
    return logits


def load(path: str | Path, dtype: str = "bfloat16", drafter: str | Path | bool | None = None, progress: bool = True,
         mesh=None, attention: str = "auto", quantize: str | None = None) -> Generator:
    """Loads an HF NLD directory (config.json + safetensors) or a nemodiff orbax directory.

    `drafter`: the linear-spec drafter LoRA (a PEFT directory) used by default in draft passes. None attaches
    `<path>/linear_spec_lora` when the model directory has one (`nemodiff train --drafter` writes it there),
    False attaches none, a path attaches that adapter.

    `mesh` (see sharding.make_mesh): weights stream straight into their shardings (tensor parallel over
    "model"), batches are split over "data". `attention`: "auto" (the fastest path this device runs, per
    shape: nemodiff_jax.attention.choose_impl) or a forced "pallas" | "cudnn" | "xla". `quantize`: "int8" or
    "int4" quantizes the matmul weights as they load (nemodiff_jax/quant.py, docs/QUANTIZATION.md); a
    checkpoint written by `nemodiff convert --quantize` loads quantized as it is (`quantize` may repeat its
    format, not change it)."""
    from nemodiff_jax.convert.hf import load_model
    from nemodiff_jax.convert.orbax_io import is_orbax_dir, load_orbax, orbax_config

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None and quantize not in QUANT_FORMATS:
        raise ValueError(f"quantize must be one of {QUANT_FORMATS} or None, got {quantize!r}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected an HF model directory or an orbax checkpoint)")
    def shardings_for(cfg):
        if mesh is None:
            return None
        from nemodiff_jax.sharding import param_shardings

        return param_shardings(abstract_model(cfg, DTYPES[dtype]), mesh)

    if is_orbax_dir(path):
        model = load_orbax(path, DTYPES[dtype], shardings=shardings_for(orbax_config(path)))
    else:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json")
        cfg = Config.from_file(path / "config.json")
        model = load_model(path, cfg, DTYPES[dtype], shardings=shardings_for(cfg), progress=progress)
    stored = model.config.quantization
    if quantize is not None and stored is not None and stored.format != quantize:
        raise ValueError(f"{path}: the checkpoint is quantized to {stored.format}; it cannot be loaded as {quantize} "
                         "(convert the 16-bit checkpoint instead)")
    if quantize is not None and stored is None:
        model = quantize_weights(model, quantize)  # on the weights' devices; Generator re-shards under a mesh
    elif stored is not None:
        model = tile_quantized(model)  # the kernel's weight layout where it runs (a no-op elsewhere)
    gen = Generator(model, Tokenizer.from_dir(path), path, mesh=mesh, attention=attention)
    if drafter is None and (path / DRAFTER_DIR / ADAPTER_CONFIG).is_file():
        drafter = path / DRAFTER_DIR
    if drafter is not None and drafter is not False:
        gen.attach_drafter(drafter)
    return gen
