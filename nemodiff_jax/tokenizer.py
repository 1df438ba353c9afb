"""HF-compatible tokenizer wrapper (spec §4, §11): `tokenizers` for the BPE, jinja2 for chat templates.

We avoid `transformers` on purpose (heavy, torch-oriented) but render and encode exactly as it does:
- `encode` goes through the tokenizer.json post-processor like a fast HF tokenizer (`tokenizer(text)`);
- chat templates are read as transformers 5 reads them (`chat_template.jinja` and
  `additional_chat_templates/*.jinja`, else `tokenizer_config.json`'s `chat_template`, a string or a named
  list) and rendered in the same jinja environment (sandboxed, trim_blocks, lstrip_blocks, loopcontrols,
  `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII, the `{% generation %}` tag) with the
  same variables (`messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens that are set,
  and every extra keyword such as `enable_thinking`);
- a rendered chat is encoded with `add_special_tokens=False`, as transformers' `apply_chat_template(...,
  tokenize=True)` does and as NVIDIA encodes the NLD Instruct template (which carries no BOS; spec §11).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TOKENIZER_DIR = Path(__file__).parent / "assets"
NLD_MASK_TOKEN_ID = 100  # NLD has no named mask token; slot 100 is the mask by convention (spec §4)

# HF classes whose __init__ rebuilds the post-processor from add_bos_token/add_eos_token (transformers 4.x).
_REBUILDS_POST_PROCESSOR = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer",
                            "CodeLlamaTokenizerFast", "GemmaTokenizer", "GemmaTokenizerFast"}


class MissingChatTemplateError(ValueError):
    """The tokenizer directory ships no chat template (base models usually don't)."""


def _token_str(value: Any) -> str | None:
    """Config special tokens are either plain strings or serialized AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _find_chat_templates(d: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """As transformers 5 loads them: `chat_template.jinja` (the default) and `additional_chat_templates/*.jinja`
    (named) take priority over the config's `chat_template`, a string or a list of {"name", "template"}. One
    default template is a string; several are a dict by name."""
    files = {}
    if (d / "chat_template.jinja").is_file():
        files["default"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
    for f in sorted((d / "additional_chat_templates").glob("*.jinja")):
        files[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    if files:
        return files["default"] if list(files) == ["default"] else files
    tpl = config.get("chat_template")
    if isinstance(tpl, list):
        try:
            return {t["name"]: t["template"] for t in tpl}
        except (TypeError, KeyError):
            raise ValueError("tokenizer_config.json: 'chat_template' as a list must hold {'name', 'template'} "
                             "objects") from None
    if tpl is not None and not isinstance(tpl, str):
        raise ValueError(f"tokenizer_config.json: 'chat_template' must be a string or a named list, got "
                         f"{type(tpl).__name__}")
    return tpl


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` block (it marks assistant text for training
    masks): the body renders as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # HF overrides jinja's tojson so it does not HTML-escape (templates emit raw JSON for tools).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _clean_up_tokenization(text: str) -> str:
    """transformers' legacy `clean_up_tokenization_spaces` rewrite (only if the config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the tokenizer_config.json facts HF's AutoTokenizer would use."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict[str, Any] | None = None,
                 chat_template: str | None = None, source: str | None = None) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template  # a string, or named templates (dict), or None
        self.source = source
        self.bos_token = _token_str(self.config.get("bos_token")) or self._if_known("<s>")
        self.eos_token = _token_str(self.config.get("eos_token")) or self._if_known("</s>")
        self.add_bos_token = bool(self.config.get("add_bos_token", True))
        self._clean_up = bool(self.config.get("clean_up_tokenization_spaces", False))
        self._compiled: dict[str, jinja2.Template] = {}
        if self.config.get("tokenizer_class") in _REBUILDS_POST_PROCESSOR:
            self._rebuild_post_processor()

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """Load an HF tokenizer directory; None when it has no tokenizer.json (e.g. weights-only dir)."""
        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON/schema
            raise ValueError(f"corrupt tokenizer file {tj}: {e}") from e
        cfg_path = d / "tokenizer_config.json"
        config = _read_json(cfg_path) if cfg_path.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object")
        stm = d / "special_tokens_map.json"  # transformers reads it too; the config's own entries win
        if stm.is_file() and isinstance(extra := _read_json(stm), dict):
            config = {**{k: v for k, v in extra.items() if k in SPECIAL_TOKEN_NAMES}, **config}
        return cls(backend, config, _find_chat_templates(d, config), source=str(d))

    @classmethod
    def default(cls) -> Tokenizer:
        """The tiny 8192-token BPE shipped for the embedded default model (NLD special-id layout)."""
        tok = cls.from_dir(DEFAULT_TOKENIZER_DIR)
        if tok is None:
            raise FileNotFoundError(f"packaged tokenizer missing: {DEFAULT_TOKENIZER_DIR / 'tokenizer.json'}")
        return tok

    def _if_known(self, token: str) -> str | None:
        return token if self.backend.token_to_id(token) is not None else None

    def _rebuild_post_processor(self) -> None:
        """Mirror LlamaTokenizerFast.update_post_processor: BOS/EOS come from the config flags."""
        add_eos = bool(self.config.get("add_eos_token", False))
        bos, eos = self.bos_token, self.eos_token
        if (self.add_bos_token and bos is None) or (add_eos and eos is None):
            raise ValueError(f"{self.source}: add_bos_token/add_eos_token set but the token is undefined")
        b0, b1 = (f"{bos}:0 ", f" {bos}:1") if self.add_bos_token else ("", "")
        e0, e1 = (f" {eos}:0", f" {eos}:1") if add_eos else ("", "")
        specials = [(t, self.backend.token_to_id(t)) for t, on in ((bos, self.add_bos_token), (eos, add_eos)) if on]
        self.backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{b0}$A:0{e0}", pair=f"{b0}$A:0{e0}{b1} $B:1{e1}", special_tokens=specials)

    # ---- ids -------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def mask_token_id(self) -> int:
        """Config `mask_token_id`/`mask_token` if given, else NLD's reserved slot 100."""
        if isinstance(self.config.get("mask_token_id"), int):
            return self.config["mask_token_id"]
        mask = _token_str(self.config.get("mask_token"))
        mid = None if mask is None else self.backend.token_to_id(mask)
        return NLD_MASK_TOKEN_ID if mid is None else mid

    @property
    def vocab_size(self) -> int:
        """Including added tokens, i.e. len(hf_tokenizer) (the model's embedding may be padded larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Same ids as HF `tokenizer(text)["input_ids"]`: specials in text are matched, the
        post-processor decides BOS (so a template that already starts with BOS gets a second one,
        exactly as in the reference scripts)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
        """Yield non-empty text pieces as tokens arrive; their concatenation equals decode(ids)."""
        dec = StreamDecoder(self, skip_special_tokens)
        for i in ids:
            if piece := dec.step(i):
                yield piece
        if tail := dec.flush():
            yield tail

    # ---- chat ------------------------------------------------------------------------------
    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set (transformers' `special_tokens_map`): template variables."""
        out = {k: _token_str(self.config.get(k)) for k in SPECIAL_TOKEN_NAMES}
        return {k: v for k, v in out.items() if v is not None}

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render, chosen as transformers chooses: a name among named templates (else
        "tool_use" when tools are given, else "default"), a template string, or the tokenizer's own."""
        if isinstance(self.chat_template, dict):
            named = self.chat_template
            if chat_template is not None and chat_template in named:
                return named[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in named:
                    return named["tool_use"]
                if "default" in named:
                    return named["default"]
                raise ValueError(f"this tokenizer has several chat templates and no default: pass one of "
                                 f"{sorted(named)} as chat_template")
            return chat_template
        if chat_template is not None:
            return chat_template
        if self.chat_template is None:
            raise MissingChatTemplateError(
                f"tokenizer at {self.source or '<memory>'} has no chat template (no chat_template.jinja or "
                "tokenizer_config.json 'chat_template'); use plain-text prompts for base models")
        return self.chat_template

    def apply_chat_template(self, conversation: list[dict[str, Any]], tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, continue_final_message: bool | str = False,
                            tokenize: bool = True, **kwargs: Any) -> str | list[int]:
        """Renders (and by default encodes) a conversation exactly as transformers' `apply_chat_template`
        with the same arguments and defaults. Extra keywords (`enable_thinking`, `truncate_history_thinking`,
        ...) reach the template as variables, over the special tokens. `tokenize=True` returns the token ids
        (encoded with add_special_tokens=False, as transformers does; its default return is a BatchEncoding
        holding these ids), `tokenize=False` the text."""
        template = self.get_chat_template(chat_template, tools)
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("cannot apply the chat template to an empty conversation: give at least one message")
        if tools is not None and not all(isinstance(t, dict) for t in tools):
            raise ValueError("tools must be JSON schemas (dicts)")
        if documents is not None and not all(isinstance(x, dict) for x in documents):
            raise TypeError("documents must be a list of dicts with 'title' and 'text' keys")
        if template not in self._compiled:
            self._compiled[template] = _environment().from_string(template)
        messages, key, tag = list(conversation), None, "CONTINUE_FINAL_MESSAGE_TAG "
        if continue_final_message:
            key = continue_final_message if isinstance(continue_final_message, str) else "content"
            final = messages[-1].get(key) if isinstance(messages[-1], dict) else None
            if not isinstance(final, str):
                raise ValueError(f"continue_final_message is set but the final message has no {key!r} text")
            if key not in template:
                raise ValueError(f"continue_final_message is set to {key!r}, which the chat template does not use")
            messages[-1] = {**messages[-1], key: final + tag}
        text = self._compiled[template].render(messages=messages, tools=tools, documents=documents,
                                               add_generation_prompt=add_generation_prompt,
                                               **{**self.special_tokens_map, **kwargs})
        if key is not None:
            if final.strip() not in text or tag.strip() not in text:
                raise ValueError("continue_final_message is set but the chat template dropped the final message")
            at = text.rindex(tag.strip())
            text = text[:at] if text[at:at + len(tag)] == tag else text[:at].rstrip()
        return self.encode(text, add_special_tokens=False) if tokenize else text


# Template variable names the renderer sets itself (apply_chat_template's own arguments and `messages`): extra
# template keywords (chat_template_kwargs in the server and batch lines) may not take them.
RESERVED_TEMPLATE_KEYS = frozenset({"messages"} | {
    name for name, p in inspect.signature(Tokenizer.apply_chat_template).parameters.items()
    if p.kind is not inspect.Parameter.VAR_KEYWORD})


class StreamDecoder:
    """Incremental detokenizer for generation output: `tokenizers`' own DecodeStream (it holds back a UTF-8
    character split over several byte-level tokens and renders each token in the context of the ones before
    it), plus `flush` for what is still held back when the stream ends. The pieces concatenate to
    `decode(ids)` (without the config's legacy clean_up_tokenization_spaces rewrite, if it asks for one)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stream = tokenizers.decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: list[int] = []
        self._emitted = ""

    def step(self, token_id: int) -> str:
        """Feed one token; returns the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        piece = self._stream.step(self._tok.backend, int(token_id)) or ""
        self._emitted += piece
        return piece

    def flush(self) -> str:
        """What is pending at the end of the stream (an invalid tail decodes to U+FFFD, as in decode)."""
        full = self._tok.backend.decode(self._ids, skip_special_tokens=self._skip)
        tail = full[len(self._emitted):] if full.startswith(self._emitted) else ""
        self._stream = tokenizers.decoders.DecodeStream(skip_special_tokens=self._skip)
        self._ids, self._emitted = [], ""
        return tail
