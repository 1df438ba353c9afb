"""HF-compatible tokenizer wrapper (spec §4): `tokenizers` for the BPE, jinja2 for chat templates.

We avoid `transformers` on purpose (heavy, torch-oriented) but must stay bit-compatible with the
reference scripts, which do ``apply_chat_template(..., tokenize=False)`` and then ``tokenizer(prompt)``.
So `encode` goes through the tokenizer.json post-processor exactly like a fast HF tokenizer, and the
template is rendered with HF's jinja settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
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


def _find_chat_template(d: Path, config: dict[str, Any]) -> str | None:
    """HF precedence: chat_template.jinja, then chat_template.json, then the config, then any *.jinja."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "chat_template.json").is_file():
        tpl = _read_json(d / "chat_template.json").get("chat_template")
        if isinstance(tpl, str):
            return tpl
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tpl, str):
        return tpl
    others = sorted(d.glob("*.jinja")) + sorted(d.glob("additional_chat_templates/*.jinja"))
    return others[0].read_text(encoding="utf-8") if others else None


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
        self.chat_template = chat_template
        self.source = source
        self.bos_token = _token_str(self.config.get("bos_token")) or self._if_known("<s>")
        self.eos_token = _token_str(self.config.get("eos_token")) or self._if_known("</s>")
        self.add_bos_token = bool(self.config.get("add_bos_token", True))
        self._clean_up = bool(self.config.get("clean_up_tokenization_spaces", False))
        self._compiled: jinja2.Template | None = None
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
        return cls(backend, config, _find_chat_template(d, config), source=str(d))

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
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            enable_thinking: bool = False, tokenize: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """Render like HF; with tokenize=True encode *without* adding specials, as HF does."""
        if self.chat_template is None:
            raise MissingChatTemplateError(
                f"tokenizer at {self.source or '<memory>'} has no chat template (no chat_template.jinja, "
                "*.jinja or tokenizer_config.json 'chat_template'); use plain-text prompts for base models")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.chat_template)
        specials = {k: _token_str(self.config.get(k)) for k in
                    ("unk_token", "pad_token", "sep_token", "cls_token", "mask_token")}
        specials.update(bos_token=self.bos_token, eos_token=self.eos_token)
        text = self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     enable_thinking=enable_thinking, **{**specials, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text


class StreamDecoder:
    """Incremental detokenizer for generation output.

    Byte-level BPE may split one UTF-8 character over several tokens; decoding such a prefix gives
    U+FFFD. We therefore re-decode a short window (previous chunk + pending tokens) and emit only
    when it no longer ends in U+FFFD; the previous chunk is kept as context because some decoders
    (SentencePiece-style) render a token differently at the start of a string.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0    # end of what has been emitted

    def step(self, token_id: int) -> str:
        """Feed one token; returns the newly completed text ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Emit whatever is pending at end of stream (a genuinely invalid tail becomes U+FFFD)."""
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return text[len(done):]
