"""`nemodiff serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over the serving engine.

    GET  /v1/models             the one served model
    POST /v1/completions        prompt: a string or token ids; on a VLM checkpoint the extra field `images` (a list
                                of data: URLs or allowed local paths, the same sources as chat's image parts)
                                goes with a string prompt: each image at its `<image>` marker, or all before
                                the text when it has none (multimodal.split_markers)
    POST /v1/chat/completions   messages, rendered with the model's chat template; on a VLM checkpoint content
                                may hold image parts (OpenAI's image_url: a base64 data: URL, or a local path
                                inside a directory the operator allows with --allowed-media-dir; never a remote
                                URL), placed where they are (multimodal.py)
    GET  /health                200 {"status": "ok"} (never needs the API key)
    GET  /metrics               Prometheus text format

Besides OpenAI's fields (max_tokens, temperature, top_p, seed, stop, stream, stream_options, n = 1) a request
takes, as extra body fields the way vLLM takes extra parameters: `mode` (ar | diffusion | linear_spec |
quadratic_spec, default ar) and that mode's options (`block_size`, `threshold`, `policy`, `steps`, `deterministic`:
generate.MODE_OPTIONS), `top_k`,
`stop_token_ids` (added to the model's EOS) and `ignore_eos`. Every response, and the last chunk of a stream,
carries a top-level `stats` object (the engine Result's stats: forward passes, tokens per forward, accepted per
round, denoise steps per block, ...).

Everything is validated here before a request reaches the engine; a client mistake is a 400 with OpenAI's
error JSON naming the field, a full engine queue a 429. Only the engine's interface is used (Engine.submit,
Handle.stream / cancel / first_token_s, stats, queue_depth, slots, slots_in_use, and the limits max_prompt_tokens
/ max_new_tokens where it has them): Handle.stream() is a blocking iterator, so each request's stream runs on its
own small thread that hands items to the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from nemodiff_jax.decoding.diffusion import POLICIES
from nemodiff_jax.engine import Cancelled, Engine, QueueFull, Request
from nemodiff_jax.generate import DRAFTING_MODES, MODE_OPTIONS, MODES, Result
from nemodiff_jax.multimodal import IMAGE_MARKER, IMAGE_PART_TYPES, MediaPolicy, Prompt, prepare_image
from nemodiff_jax.tokenizer import RESERVED_TEMPLATE_KEYS, MissingChatTemplateError

log = logging.getLogger("uvicorn.error")  # shown wherever uvicorn's own messages are
OPTION_NAMES = sorted({k for opts in MODE_OPTIONS.values() for k in opts})
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                 "user", "mode", "top_k", "stop_token_ids", "ignore_eos", "max_thinking_tokens", *OPTION_NAMES}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "images", "logprobs", "echo", "best_of", "logit_bias", "suffix",
                                     "presence_penalty", "frequency_penalty"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "logit_bias",
                               "presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
                               "parallel_tool_calls", "metadata", "store", "service_tier", "chat_template_kwargs"}
# OpenAI fields this server does not implement: accepted only at their "off" values.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "logit_bias": (None, {}), "suffix": (None, ""), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "tools": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"})}
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


class APIError(Exception):
    """An error answered with OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.message, self.param, self.status, self.type, self.code, self.headers)


def error_response(message: str, param: str | None = None, status: int = 400, type: str = "invalid_request_error",
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ClientGone(Exception):
    """The HTTP client disconnected while its request was generating."""


# ---------------------------------------------------------------------------------------------- validation


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(body: dict, name: str, default: Any = None, lo: int | None = None, hi: int | None = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise APIError(f"'{name}' must be an integer, got {json.dumps(v)}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(f"'{name}' must be {span}, got {v}", name)
    return v


def _number(body: dict, name: str, default: Any = None, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise APIError(f"'{name}' must be a number, got {json.dumps(v)}", name)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise APIError(f"'{name}' must be in {left}{lo}, {'inf' if hi is None else hi}], got {v}", name)
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"'{name}' must be a boolean, got {json.dumps(v)}", name)
    return v


def _is_off(v: Any, off: Any) -> bool:
    """Whether `v` is the "off" value `off` of an unsupported field (0 and 0.0 alike; False is not 0)."""
    if off is None or isinstance(off, bool):
        return v is off
    if isinstance(off, (int, float)):
        return _is_number(v) and v == off
    return v == off


def _offs(name: str) -> str:
    return " or ".join(json.dumps(o) for o in UNSUPPORTED[name] if o is not None) or "null"


def _token_ids(v: Any, param: str, vocab: int) -> list[int]:
    if not all(_is_int(t) for t in v):
        raise APIError(f"'{param}' token ids must be integers", param)
    bad = [t for t in v if not 0 <= t < vocab]
    if bad:
        raise APIError(f"'{param}' token id(s) {bad[:5]} outside the vocabulary [0, {vocab})", param)
    return list(v)


@dataclasses.dataclass
class Job:
    """One validated request: what goes to the engine, and how the answer is shaped."""

    ids: list[int]
    mode: str
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int
    stop: list[str]
    stop_ids: tuple[int, ...]  # the ids that end generation (never shown as text)
    options: dict
    stream: bool
    include_usage: bool
    max_thinking_tokens: int | None = None
    images: tuple = ()  # preprocessed images, in the order of their blocks in `ids`

    def request(self, rid: str) -> Request:
        prompt = Prompt(self.ids, self.images) if self.images else self.ids
        return Request(prompt=prompt, mode=self.mode, max_new_tokens=self.max_tokens, temperature=self.temperature,
                       top_k=self.top_k, top_p=self.top_p, seed=self.seed, stop_token_ids=self.stop_ids,
                       options=dict(self.options), max_thinking_tokens=self.max_thinking_tokens, id=rid)


def sampling_defaults(model_dir) -> dict:
    """Sampling defaults for fields a request leaves out, from the model's generation_config.json as vLLM
    reads it: greedy unless it says do_sample (then its temperature / top_p / top_k, temperature 1.0 if unset)."""
    gc: dict = {}
    if model_dir is not None:
        from pathlib import Path

        try:
            gc = json.loads((Path(model_dir) / "generation_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            gc = {}
    if not isinstance(gc, dict) or not gc.get("do_sample", False):
        return {"temperature": 0.0, "top_p": None, "top_k": None}
    t, p, k = gc.get("temperature", 1.0), gc.get("top_p"), gc.get("top_k")
    return {"temperature": float(t) if _is_number(t) and t >= 0 else 1.0,
            "top_p": float(p) if _is_number(p) and 0 < p < 1 else None,
            "top_k": k if _is_int(k) and k >= 1 else None}


# ---------------------------------------------------------------------------------------------- the engine bridge


class _Pump:
    """Runs a Handle's blocking stream() on a daemon thread; the event loop awaits its items with `get`, which
    also notices a client that went away (polling Starlette's is_disconnected)."""

    def __init__(self, handle, loop: asyncio.AbstractEventLoop, request: HTTPRequest, poll_s: float):
        self.handle, self.loop, self.request, self.poll_s = handle, loop, request, poll_s
        self.items: collections.deque = collections.deque()
        self.ready = asyncio.Event()
        self.checked = time.monotonic()
        threading.Thread(target=self._run, name=f"nemodiff-serve-{handle.id}", daemon=True).start()

    def _run(self) -> None:
        try:
            for item in self.handle.stream():
                self._put(("item", item))
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the event loop, which maps it to a response
            self._put(("error", e))

    def _put(self, x) -> None:
        self.items.append(x)
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    async def _check(self) -> None:
        self.checked = time.monotonic()
        if await self.request.is_disconnected():
            raise ClientGone()

    async def get(self):
        if time.monotonic() - self.checked > self.poll_s:
            await self._check()
        while not self.items:
            self.ready.clear()
            if self.items:
                break
            try:
                await asyncio.wait_for(self.ready.wait(), self.poll_s)
            except TimeoutError:
                await self._check()
        return self.items.popleft()


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in `text`."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could be the start of a stop string (held back)."""
    for k in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


# ---------------------------------------------------------------------------------------------- the server


class Server:
    """The state behind the app: generator (config, tokenizer), engine, served name, API key and counters."""

    def __init__(self, generator, engine: Engine, model_name: str, api_key: str | None = None,
                 poll_s: float = 0.25, media: MediaPolicy | None = None):
        if generator.tokenizer is None:
            raise ValueError("nemodiff serve needs a tokenizer (tokenizer.json) in the model directory")
        self.gen, self.engine, self.model_name, self.api_key = generator, engine, model_name, api_key
        self.media = media or MediaPolicy()  # image sources: data: URLs, local files only in allowed dirs
        self.tokenizer = generator.tokenizer
        self.config = generator.config
        self.poll_s = poll_s
        self.defaults = sampling_defaults(getattr(generator, "path", None))
        self.created = int(time.time())
        self.started = time.monotonic()
        self.http: collections.Counter = collections.Counter()  # (endpoint, status) -> responses
        self.events: collections.Counter = collections.Counter()  # disconnects, stop-string ends, ...
        self.per_mode: dict[str, collections.Counter] = {m: collections.Counter() for m in MODES}

    # ---- validation ------------------------------------------------------------------------
    def authorize(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError("missing or incorrect API key: send 'Authorization: Bearer <key>'", None, 401,
                           code="invalid_api_key")

    @staticmethod
    async def json_body(request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    def _check_fields(self, body: dict, allowed: set[str]) -> None:
        for k, v in body.items():
            if k not in allowed:
                raise APIError(f"unknown field '{k}'", k)
            if k in UNSUPPORTED and not any(_is_off(v, off) for off in UNSUPPORTED[k]):
                raise APIError(f"'{k}' is not supported by this server (only {_offs(k)})", k)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError("'model' must be a string", "model")
        if model is not None and model != self.model_name:
            raise APIError(f"the model '{model}' does not exist; this server serves '{self.model_name}'", "model",
                           404, code="model_not_found")

    def completion_prompt(self, body: dict) -> list[int] | Prompt:
        """The prompt's token ids, or with `images` a multimodal.Prompt (each image's block at its marker)."""
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if body.get("images") not in (None, []):  # an empty list: no images
            return self.completion_images(p, body["images"])
        if isinstance(p, str):
            if not p:
                raise APIError("'prompt' must not be empty", "prompt")
            return self.tokenizer.encode(p)
        if isinstance(p, list):
            if not p:
                raise APIError("'prompt' must not be empty", "prompt")
            if all(isinstance(x, (str, list)) for x in p):
                raise APIError("one prompt per request: send a string or one list of token ids", "prompt")
            return _token_ids(p, "prompt", self.config.vocab_size)
        if p is None:
            raise APIError("'prompt' is required", "prompt")
        raise APIError("'prompt' must be a string or a list of token ids", "prompt")

    def completion_images(self, text: Any, images: Any) -> Prompt:
        """A completion prompt with images: the same sources and rules as chat's image parts (MediaPolicy),
        errors naming `images[j]`."""
        vcfg = self.config.vision
        if vcfg is None:
            raise APIError("'images': this model is text-only (its checkpoint has no vision tower): images are not "
                           "supported", "images")
        if not isinstance(images, list):
            raise APIError("'images' must be a list of images (base64 data: URLs, or local paths where the server "
                           "allows them)", "images")
        if not isinstance(text, str):
            raise APIError(f"'images' needs a string 'prompt': each image goes at its {IMAGE_MARKER!r} marker, or "
                           "before the text when it has none", "prompt")
        try:
            processed = [prepare_image(self.media.resolve(src, f"images[{j}]"), vcfg, f"images[{j}]")
                         for j, src in enumerate(images)]
        except ValueError as e:  # a refused source, an image that does not decode
            raise APIError(str(e), "images") from None
        try:
            return self.gen.prepare([{"text": text, "images": processed}], names=["prompt"])[0]
        except ValueError as e:  # markers that do not match the images, image tokens typed in the text, too long
            raise APIError(str(e), "prompt") from None

    @staticmethod
    def has_images(body: dict) -> bool:
        """Whether a body has images: a completion's `images`, a chat's image content parts (their decoding runs
        off the event loop)."""
        if body.get("images"):
            return True
        messages = body.get("messages")
        return isinstance(messages, list) and any(
            isinstance(m, dict) and isinstance(m.get("content"), list)
            and any(isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES for part in m["content"])
            for m in messages)

    def chat_prompt(self, body: dict) -> list[int] | Prompt:
        """The chat's token ids, or with image parts a multimodal.Prompt (ids with each image's block where
        its part is, and the preprocessed images)."""
        messages = body.get("messages")
        if messages is None:
            raise APIError("'messages' is required", "messages")
        if not isinstance(messages, list):
            raise APIError("'messages' must be a list of messages", "messages")
        if not messages:
            raise APIError("'messages' must not be empty", "messages")
        rendered, images = [], False
        for i, m in enumerate(messages):
            has_image = False
            if not isinstance(m, dict):
                raise APIError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
            role = m.get("role")
            if not isinstance(role, str) or role not in CHAT_ROLES:
                raise APIError(f"messages[{i}].role: unknown role {json.dumps(role)}; one of {list(CHAT_ROLES)}",
                               f"messages[{i}].role")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text, and images for a VLM
                texts = []
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind in IMAGE_PART_TYPES:
                        if self.config.vision is None:
                            raise APIError(f"messages[{i}].content[{j}]: this model is text-only (its checkpoint "
                                           "has no vision tower): image parts are not supported",
                                           f"messages[{i}].content")
                        images = has_image = True
                        continue
                    if not (kind == "text" and isinstance(part.get("text"), str)):
                        raise APIError(f"messages[{i}].content[{j}]: a content part must be a text part"
                                       f"{' or an image part (image_url)' if self.config.vision else ''}",
                                       f"messages[{i}].content")
                    texts.append(part["text"])
                if not has_image:
                    content = "".join(texts)
            elif content is None and role == "assistant":
                content = ""
            elif not isinstance(content, str):
                raise APIError(f"messages[{i}].content must be a string or a list of text parts",
                               f"messages[{i}].content")
            rendered.append({**{k: v for k, v in m.items() if k not in ("role", "content")}, "role": role,
                             "content": content})
        kwargs = body.get("chat_template_kwargs")
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, dict):
            raise APIError("'chat_template_kwargs' must be an object", "chat_template_kwargs")
        if set(kwargs) & RESERVED_TEMPLATE_KEYS:
            raise APIError(f"'chat_template_kwargs' may not set {sorted(set(kwargs) & RESERVED_TEMPLATE_KEYS)}",
                           "chat_template_kwargs")
        from jinja2.exceptions import TemplateError

        try:
            # as `nemodiff generate --chat` and vLLM: the generation prompt added, the template's own
            # options (enable_thinking, truncate_history_thinking, ...) from chat_template_kwargs; encoded
            # without adding specials, as transformers does
            if images:  # each image where its part is (Generator.encode_chat), read under the media policy
                return self.gen.encode_chat(rendered, add_generation_prompt=True, resolve=self.media.resolve,
                                            **kwargs)
            return self.tokenizer.apply_chat_template(rendered, tokenize=True, add_generation_prompt=True, **kwargs)
        except MissingChatTemplateError as e:
            raise APIError(f"{e}; use /v1/completions", "messages") from None
        except TemplateError as e:
            raise APIError(f"the chat template rejected the messages: {e}", "messages") from None
        except TypeError as e:  # a template that cannot use a chat_template_kwargs value
            raise APIError(f"chat_template_kwargs: {e}", "chat_template_kwargs") from None
        except ValueError as e:  # an image: undecodable, refused by the media policy, markers that do not match
            raise APIError(str(e), "messages") from None

    def job(self, body: dict, prompt: list[int] | Prompt, chat: bool) -> Job:
        cfg = self.config
        ids, images = (prompt.ids, prompt.images) if isinstance(prompt, Prompt) else (prompt, ())
        of_images = prompt.describe_images() if isinstance(prompt, Prompt) else ""
        mode = body.get("mode", "ar")
        if mode is None:
            mode = "ar"
        if not isinstance(mode, str) or mode not in MODES:
            raise APIError(f"unknown mode {json.dumps(mode)}; one of {sorted(MODES)}", "mode")
        n = _int(body, "n", 1)
        if n != 1:
            raise APIError("only n = 1 is supported", "n")
        stream = _bool(body, "stream", False)
        include_usage = False
        so = body.get("stream_options")
        if so is not None:
            if not stream:
                raise APIError("'stream_options' is only allowed with stream = true", "stream_options")
            if not isinstance(so, dict) or set(so) - {"include_usage", "continuous_usage_stats"}:
                raise APIError("'stream_options' must be an object with 'include_usage'", "stream_options")
            include_usage = _bool(so, "include_usage", False)
        temperature = _number(body, "temperature", self.defaults["temperature"], lo=0.0)
        top_p = _number(body, "top_p", self.defaults["top_p"], lo=0.0, hi=1.0, lo_open=True)
        top_k = _int(body, "top_k", self.defaults["top_k"])
        if top_k is not None and top_k < 1:
            if top_k not in (0, -1):
                raise APIError(f"'top_k' must be >= 1 (or -1 / 0: off), got {top_k}", "top_k")
            top_k = None
        if top_k is not None and top_k > cfg.vocab_size:
            raise APIError(f"'top_k' must be at most the vocabulary size {cfg.vocab_size}, got {top_k}", "top_k")
        seed = _int(body, "seed", None, lo=0, hi=2 ** 32 - 1)
        seed = secrets.randbits(31) if seed is None else seed
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise APIError("'stop' must be a string or a list of strings", "stop")
        if any(s == "" for s in stop):
            raise APIError("'stop' strings must not be empty", "stop")
        ignore_eos = _bool(body, "ignore_eos", False)
        extra = body.get("stop_token_ids")
        if extra is not None and not isinstance(extra, list):
            raise APIError("'stop_token_ids' must be a list of token ids", "stop_token_ids")
        extra = _token_ids(extra or [], "stop_token_ids", cfg.vocab_size)
        stop_ids = tuple(dict.fromkeys(([] if ignore_eos else list(cfg.eos_token_ids)) + extra))
        options = {}
        for name in OPTION_NAMES:
            if body.get(name) is None:
                continue
            if name not in MODE_OPTIONS[mode]:
                raise APIError(f"unknown option '{name}' for mode '{mode}'; its options: "
                               f"{sorted(MODE_OPTIONS[mode]) or 'none'}", name)
            options[name] = body[name]
        block = cfg.block_size
        if "block_size" in options:
            block = options["block_size"] = _int(options, "block_size", lo=2, hi=256)
        if "threshold" in options:
            options["threshold"] = _number(options, "threshold", lo=0.0, hi=1.0)
        if "policy" in options and options["policy"] not in POLICIES:
            raise APIError(f"unknown policy {json.dumps(options['policy'])}; one of {list(POLICIES)}", "policy")
        if "steps" in options:
            options["steps"] = _int(options, "steps", lo=1, hi=block)
        # the context: prompt + new tokens (+ one block of slack for the block modes) must fit the positions,
        # and both must fit the engine's limits (its slots are sized for them)
        limit = cfg.max_position_embeddings
        slack = 0 if mode == "ar" else block
        prompt_field = "messages" if chat else "prompt"
        max_prompt, max_new = self.engine.max_prompt_tokens, self.engine.max_new_tokens
        if len(ids) + slack >= limit:
            raise APIError(f"the prompt has {len(ids)} tokens{of_images} (+{slack} block slack): the model's "
                           f"context is {limit} positions", prompt_field)
        if max_prompt is not None and len(ids) > max_prompt:
            raise APIError(f"the prompt has {len(ids)} tokens{of_images}; this server takes at most {max_prompt} "
                           "(nemodiff serve --max-prompt-tokens)", prompt_field)
        max_tokens = _int(body, "max_completion_tokens", None, lo=1) if chat else None
        max_tokens = _int(body, "max_tokens", max_tokens, lo=1)
        if max_tokens is None:
            max_tokens = limit - len(ids) - slack if chat else DEFAULT_COMPLETION_MAX_TOKENS
            max_tokens = min(max_tokens, max_new) if max_new is not None else max_tokens
        if len(ids) + max_tokens + slack > limit:
            raise APIError(f"prompt of {len(ids)} tokens + max_tokens {max_tokens} (+{slack} block slack for mode "
                           f"'{mode}') exceeds the model's context of {limit} positions", "max_tokens")
        if max_new is not None and max_tokens > max_new:
            raise APIError(f"max_tokens {max_tokens} exceeds this server's limit of {max_new} "
                           "(nemodiff serve --max-new-tokens)", "max_tokens")
        think = _int(body, "max_thinking_tokens", None, lo=0, hi=2 ** 31 - 1)
        if think is not None and self.tokenizer is None:
            raise APIError("'max_thinking_tokens' needs the model's tokenizer ('</think>')", "max_thinking_tokens")
        return Job(ids=ids, mode=mode, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   seed=seed, stop=stop, stop_ids=stop_ids, options=options, stream=stream,
                   include_usage=include_usage, max_thinking_tokens=think, images=tuple(images))

    # ---- generation ------------------------------------------------------------------------
    def submit(self, job: Job, rid: str):
        try:
            return self.engine.submit(job.request(rid))
        except QueueFull as e:
            raise APIError(f"the server is busy ({e}); try again later", None, 429, type="server_busy",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise APIError(str(e)) from None

    async def generation(self, request: HTTPRequest, job: Job, handle) -> AsyncIterator[tuple]:
        """("text", piece) events, then ("done", finish_reason, completion_tokens, stats). Stop strings are
        matched on the decoded text across chunk boundaries (a possible start of one is held back) and never
        emitted; a match cancels the engine request so its slot frees."""
        pump = _Pump(handle, asyncio.get_running_loop(), request, self.poll_s)
        dec = self.tokenizer.stream_decoder()
        stops, stop_ids = job.stop, set(job.stop_ids)
        pending, n, finished, t0 = "", 0, False, time.perf_counter()
        try:
            while True:
                kind, item = await pump.get()
                if kind == "error":
                    raise item
                if kind == "end":
                    raise RuntimeError("the engine's stream ended without a result")
                if isinstance(item, Result):
                    result = item
                    break
                for t in item:
                    n += 1
                    if t in stop_ids:
                        continue
                    pending += dec.step(t)
                    cut = _find_stop(pending, stops) if stops else None
                    if cut is not None:
                        finished = True
                        handle.cancel()
                        self.events["stop_string"] += 1
                        if pending[:cut]:
                            yield ("text", pending[:cut])
                        stats = {"mode": job.mode, "generated_tokens": n, "finished_by": "stop_string",
                                 "wall_time_s": time.perf_counter() - t0}
                        yield ("done", "stop", n, self._with_ttft(stats, handle))
                        return
                hold = _held(pending, stops) if stops else 0
                emit, pending = pending[:len(pending) - hold], pending[len(pending) - hold:]
                if emit:
                    yield ("text", emit)
            pending += dec.flush()
            cut = _find_stop(pending, stops) if stops else None
            finished = True
            reason = "stop" if result.tokens and result.tokens[-1] in stop_ids else "length"
            if cut is not None:
                pending, reason = pending[:cut], "stop"
                self.events["stop_string"] += 1
            if pending:
                yield ("text", pending)
            self._record(job.mode, result)
            yield ("done", reason, len(result.tokens), self._with_ttft(dict(result.stats), handle))
        finally:
            if not finished:
                handle.cancel()

    @staticmethod
    def _with_ttft(stats: dict, handle) -> dict:
        ttft = getattr(handle, "first_token_s", None)
        if ttft is not None:
            stats["time_to_first_token_s"] = ttft
        return _finite(stats)

    def _record(self, mode: str, r: Result) -> None:
        c = self.per_mode.setdefault(mode, collections.Counter())
        s = r.stats
        c["finished"] += 1
        c["tokens"] += s.get("generated_tokens", len(r.tokens))
        c["forward_passes"] += s.get("forward_passes", 0)
        if "rounds" in s:
            c["rounds"] += s["rounds"]
            c["accepted"] += s["mean_accepted_per_round"] * s["rounds"]
        if "blocks" in s:
            c["blocks"] += s["blocks"]
            c["denoise_steps"] += s["denoise_steps_per_block"] * s["blocks"]

    async def start(self, request: HTTPRequest, job: Job, rid: str):
        """Submits and waits for the first event, so that an error the engine raises for the request is
        still an HTTP status (400) rather than a broken stream. Returns (first event, the rest, handle)."""
        handle = self.submit(job, rid)
        events = self.generation(request, job, handle)
        try:
            first = await events.__anext__()
        except ClientGone:
            self.events["client_disconnect"] += 1
            raise
        except Cancelled as e:
            raise APIError(f"the request was cancelled: {e}", None, 503, type="server_error") from None
        except ValueError as e:
            raise APIError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - not the client's mistake: a 500 that says what broke
            log.exception("request %s failed in the engine", rid)
            raise APIError(f"internal error in the engine: {type(e).__name__}: {e}", None, 500,
                           type="server_error") from None
        return first, events, handle

    # ---- metrics ---------------------------------------------------------------------------
    def metrics(self) -> str:
        e = self.engine
        st = dict(getattr(e, "stats", {}) or {})
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
                v = float(value)
                out.append(f"{name}{{{lab}}} {v!r}" if lab else f"{name} {v!r}")

        metric("nemodiff_requests_total", "counter",
               "Engine requests by outcome (submitted = accepted into the queue).",
               [({"outcome": "submitted"}, st.get("requests", 0))] +
               [({"outcome": k}, st.get(k, 0)) for k in ("finished", "cancelled", "failed")])
        metric("nemodiff_http_responses_total", "counter", "HTTP responses by endpoint and status code.",
               [({"endpoint": ep, "code": str(code)}, v) for (ep, code), v in sorted(self.http.items())])
        metric("nemodiff_client_disconnects_total", "counter",
               "Requests whose client went away (engine request cancelled).",
               [({}, self.events["client_disconnect"])])
        metric("nemodiff_stop_string_total", "counter", "Requests ended by a stop string.",
               [({}, self.events["stop_string"])])
        metric("nemodiff_generated_tokens_total", "counter", "Tokens generated by finished engine requests.",
               [({}, st.get("tokens", 0))])
        busy = st.get("busy_seconds", 0.0)
        metric("nemodiff_engine_busy_seconds_total", "counter", "Seconds the engine spent serving requests.",
               [({}, busy)])
        metric("nemodiff_tokens_per_second", "gauge", "Generated tokens per second of engine busy time.",
               [({}, st.get("tokens", 0) / busy if busy > 0 else 0.0)])
        metric("nemodiff_queue_depth", "gauge", "Requests waiting in the engine's queue.", [({}, e.queue_depth)])
        metric("nemodiff_slots", "gauge", "Decode slots of the engine.", [({}, e.slots)])
        metric("nemodiff_slots_in_use", "gauge", "Decode slots holding a request now.", [({}, e.slots_in_use)])
        modes = sorted(self.per_mode)
        # per mode, from the Results of the requests served here (engine-side warm-ups not included)
        metric("nemodiff_mode_requests_total", "counter", "Finished requests per decoding mode.",
               [({"mode": m}, self.per_mode[m]["finished"]) for m in modes])
        metric("nemodiff_mode_generated_tokens_total", "counter", "Tokens generated per decoding mode.",
               [({"mode": m}, self.per_mode[m]["tokens"]) for m in modes])
        metric("nemodiff_tokens_per_forward", "gauge",
               "Generated tokens per forward pass (prefill included), per mode.",
               [({"mode": m}, c["tokens"] / c["forward_passes"]) for m in modes
                if (c := self.per_mode[m])["forward_passes"]])
        spec = [(m, self.per_mode.get(m, collections.Counter())) for m in DRAFTING_MODES]
        metric("nemodiff_accepted_per_round", "gauge",
               "Speculative modes: tokens accepted per round (over finished requests).",
               [({"mode": m}, c["accepted"] / c["rounds"] if c["rounds"] else 0.0) for m, c in spec])
        d = self.per_mode.get("diffusion", collections.Counter())
        metric("nemodiff_denoise_steps_per_block", "gauge", "diffusion: denoise passes per block (over finished "
               "requests).", [({"mode": "diffusion"}, d["denoise_steps"] / d["blocks"] if d["blocks"] else 0.0)])
        metric("nemodiff_uptime_seconds", "gauge", "Seconds since the server started.",
               [({}, time.monotonic() - self.started)])
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- the app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over a Server (its engine started by the caller; stopped when the app shuts down)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.engine.stop(timeout=5.0)

    app = FastAPI(title="nemodiff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: HTTPRequest, exc: APIError):
        server.http[(request.url.path, exc.status)] += 1
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, exc: StarletteHTTPException):
        return error_response(str(exc.detail), None, exc.status_code,
                              "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: HTTPRequest, exc: Exception):
        server.http[(request.url.path, 500)] += 1
        return error_response(f"internal server error: {type(exc).__name__}: {exc}", None, 500, "server_error")

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            return error_response("the engine's worker has stopped", status=503, type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        server.authorize(request)
        return {"object": "list", "data": [{
            "id": server.model_name, "object": "model", "created": server.created, "owned_by": "nemodiff",
            "max_model_len": server.config.max_position_embeddings, "modes": sorted(MODES)}]}

    async def serve(request: HTTPRequest, chat: bool) -> Response:
        server.authorize(request)
        body = await server.json_body(request)
        server._check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
        if server.has_images(body):  # decoding and resizing images: off the event loop
            prompt = await asyncio.to_thread(server.chat_prompt if chat else server.completion_prompt, body)
        else:
            prompt = server.chat_prompt(body) if chat else server.completion_prompt(body)
        job = server.job(body, prompt, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        endpoint = request.url.path
        try:
            first, events, handle = await server.start(request, job, rid)
        except ClientGone:
            return Response(status_code=499)  # nobody is listening
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": server.model_name}

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}

        if not job.stream:
            pieces, ev = [], first
            try:
                while ev[0] == "text":
                    pieces.append(ev[1])
                    ev = await events.__anext__()
            except ClientGone:
                server.events["client_disconnect"] += 1
                return Response(status_code=499)
            _, reason, n, stats = ev
            text = "".join(pieces)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                          "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            server.http[(endpoint, 200)] += 1
            return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                                 "choices": [choice], "usage": usage(n), "stats": stats})

        state = {"done": False}

        def chunk(text: str | None = None, reason: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else
                         {} if text is None else {"content": text})
                c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return {**head, "choices": [c]}

        async def sse():
            ev = first
            try:
                if chat:
                    yield _sse(chunk(role=True))
                while ev[0] == "text":
                    yield _sse(chunk(ev[1]))
                    ev = await events.__anext__()
                _, reason, n, stats = ev
                yield _sse({**chunk(None, reason), "usage": usage(n), "stats": stats})
                if job.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(n), "stats": stats})
                yield "data: [DONE]\n\n"
                state["done"] = True
            except ClientGone:
                pass
            except Exception as e:  # noqa: BLE001 - the status line is gone: report in the stream
                state["done"] = True
                if not isinstance(e, ValueError):
                    log.exception("request %s failed in the engine mid-stream", rid)
                code = 400 if isinstance(e, ValueError) else 500
                typ = "invalid_request_error" if code == 400 else "server_error"
                server.http[(endpoint, code)] += 1
                yield _sse({"error": {"message": f"{type(e).__name__}: {e}", "type": typ, "param": None,
                                      "code": None}})
                yield "data: [DONE]\n\n"
            finally:
                await events.aclose()

        def cleanup():
            # runs when the response ends, also when Starlette cancelled it for a client that went away
            if not state["done"]:
                server.events["client_disconnect"] += 1
                handle.cancel()

        server.http[(endpoint, 200)] += 1
        return StreamingResponse(sse(), media_type="text/event-stream", background=BackgroundTask(cleanup),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await serve(request, chat=True)

    return app


def run(generator, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        max_queue: int = 64, log_level: str = "info", warmup: bool = False, allowed_media_dirs=(),
        **engine_options) -> None:
    """Starts the engine over `generator` (engine_options: Engine's slots, max_prompt_tokens, max_new_tokens,
    segment_steps; unset ones keep the engine's defaults) and serves the app with uvicorn until interrupted.
    `allowed_media_dirs`: directories whose files image parts may name (a path or a file:// URL); data: URLs
    are always taken, remote URLs never."""
    import uvicorn

    media = MediaPolicy.of(allowed_media_dirs)
    if media.allowed_dirs and generator.config.vision is None:
        raise ValueError("--allowed-media-dir is for image inputs, but this model is text-only")

    engine = Engine(generator, max_queue=max_queue, **{k: v for k, v in engine_options.items() if v is not None})
    if warmup:
        t0 = time.perf_counter()
        n = engine.warm_up()
        images = (" (and one image request of the smallest image bucket per prompt width)"
                  if generator.config.vision is not None else "")
        print(f"nemodiff serve: compiled every mode at every admission shape{images} ({n} admissions) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    engine.start()
    server = Server(generator, engine, model_name, api_key=api_key, media=media)
    app = create_app(server)
    limits = (f"slots per mode {engine.slots_per_pool}, max prompt tokens {engine.max_prompt_tokens}, "
              f"max new tokens {engine.max_new_tokens}")
    print(f"nemodiff serve: '{model_name}' on http://{host}:{port}/v1 (modes: {', '.join(sorted(MODES))}; "
          f"queue {max_queue}{'; ' + limits if limits else ''}{'; API key required' if api_key else ''})",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
