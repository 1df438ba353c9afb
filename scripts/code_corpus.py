"""Build the Python-code corpus (CPython's standard library) and train its byte-level BPE tokenizer.

The corpus of the small code model of issue 15 is the pure-Python part of the standard library of the running
interpreter (``sysconfig.get_paths()["stdlib"]``, or ``--stdlib DIR``), which is on every machine: its top-level
``*.py`` modules plus the ``*.py`` files of the packages in PACKAGES (CPython's own test suite, ``test``, among
them: it is most of the code), without the directories of EXCLUDED_DIRS below a package, files over
MAX_FILE_BYTES and files that are not valid UTF-8. Each file is one document. The modules of HELD_OUT (fixed
before any training) go to val only, their own test files (``test/test_<module>.py``) to neither, everything
else to train.

    python scripts/code_corpus.py --out out/code_tokenizer --data-out data/code

writes ``<data-out>/train.txt`` and ``<data-out>/val.txt`` (documents joined by ``DOC_SEP``, as
``scripts/train_tokenizer.py`` does; ``split_documents`` recovers them exactly), ``<data-out>/manifest.json``
(interpreter version, stdlib path, every file with its split, raw size and sha256, the skipped files, and per
split the file count, raw bytes and the chars of its .txt),
and the tokenizer assets (trained on train.txt only, NLD's special-id layout: BOS 1, EOS 11, mask 100) in
``--out``. The output depends only on the stdlib files and the arguments: two runs are byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts/train_tokenizer.py
import train_tokenizer as tt  # noqa: E402

VOCAB_SIZE = 4096

# Packages whose *.py files (recursively) join the top-level modules; those missing from a stdlib are skipped.
# Left out on purpose: encodings (codec tables), pydoc_data (one big text literal), and the directories below.
PACKAGES = (
    "asyncio", "collections", "concurrent", "ctypes", "curses", "dbm", "email", "html", "http", "importlib",
    "json", "logging", "multiprocessing", "re", "sqlite3", "tkinter", "tomllib", "unittest", "urllib", "venv",
    "wsgiref", "xml", "xmlrpc", "zipfile", "zoneinfo", "test",
)
# Directory names never entered below a package's own directory.
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "ensurepip", "__phello__", "__pycache__",
})
MAX_FILE_BYTES = 200 * 1024
# Top-level modules written only to val.txt, chosen before any training; all exist in CPython 3.12.
HELD_OUT = (
    "bisect.py", "calendar.py", "colorsys.py", "fnmatch.py", "fractions.py",
    "glob.py", "graphlib.py", "heapq.py", "shlex.py", "textwrap.py",
)
# The test files of the held-out modules: they spell out those modules' behaviour, so they are left out.
HELD_OUT_TESTS = tuple(f"test/test_{name}" for name in HELD_OUT)


def default_stdlib() -> Path:
    """The standard-library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_sources(stdlib: str | Path) -> list[str]:
    """Relative POSIX paths of the candidate files under `stdlib`, sorted: top-level *.py plus PACKAGES' *.py."""
    root = Path(stdlib)
    if not (root / "os.py").is_file():
        raise FileNotFoundError(f"{root} is not a Python standard-library directory: it has no os.py")
    found = [p.name for p in root.iterdir() if p.suffix == ".py" and p.is_file()]
    for package in PACKAGES:
        if not (root / package).is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root / package):
            dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
            rel = Path(dirpath).relative_to(root)
            found += [(rel / f).as_posix() for f in filenames if f.endswith(".py") and (Path(dirpath) / f).is_file()]
    missing = sorted(set(HELD_OUT) - set(found))
    if missing:
        raise FileNotFoundError(f"held-out modules missing from {root}: {', '.join(missing)}")
    return sorted(found)


def clean_code(text: str) -> str:
    """Normalise one source file: no BOM, LF line ends, no trailing blanks, at most two blank lines in a row,
    no leading/trailing blank lines. Tabs inside lines are kept; so DOC_SEP (three blank lines) never occurs."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip(" \t\f\v") for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n")


def load_documents(stdlib: str | Path) -> tuple[list[tuple[str, str]], list[dict], list[dict]]:
    """(documents, files, skipped): documents are (relative path, cleaned text) in sorted order; files is a
    manifest entry per document (path, split, bytes and sha256 of the raw file); skipped names every candidate
    left out with its reason (over MAX_FILE_BYTES, not UTF-8, empty once cleaned)."""
    root = Path(stdlib)
    docs, files, skipped = [], [], []
    for rel in find_sources(root):
        raw = (root / rel).read_bytes()
        if rel in HELD_OUT_TESTS:
            skipped.append({"path": rel, "reason": "tests a held-out module"})
            continue
        if len(raw) > MAX_FILE_BYTES:
            skipped.append({"path": rel, "reason": f"{len(raw)} bytes > {MAX_FILE_BYTES}"})
            continue
        try:
            text = clean_code(raw.decode("utf-8"))
        except UnicodeDecodeError:
            skipped.append({"path": rel, "reason": "not valid UTF-8"})
            continue
        if not text:
            skipped.append({"path": rel, "reason": "empty"})
            continue
        docs.append((rel, text))
        files.append({"path": rel, "split": "val" if rel in HELD_OUT else "train", "bytes": len(raw),
                      "sha256": hashlib.sha256(raw).hexdigest()})
    return docs, files, skipped


def write_corpus(stdlib: str | Path, data_out: str | Path) -> list[tuple[str, str]]:
    """Write train.txt, val.txt and manifest.json into data_out; returns the documents."""
    docs, files, skipped = load_documents(stdlib)
    n_train, n_val = tt.write_splits(docs, data_out, val_names=HELD_OUT)
    totals = {split: {"files": sum(f["split"] == split for f in files),
                      "bytes": sum(f["bytes"] for f in files if f["split"] == split),
                      "txt_chars": n}
              for split, n in (("train", n_train), ("val", n_val))}
    manifest = {
        "python_version": platform.python_version(),
        "stdlib": str(Path(stdlib).resolve()),
        "packages": list(PACKAGES),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "max_file_bytes": MAX_FILE_BYTES,
        "held_out": list(HELD_OUT),
        "held_out_tests": list(HELD_OUT_TESTS),
        "totals": totals,
        "files": files,
        "skipped": skipped,
    }
    (Path(data_out) / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return docs


def main(argv: list[str] | None = None) -> dict:
    """Build the corpus, train and save the tokenizer, print and return the per-split summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stdlib", default=None, help="standard-library directory (default: the running interpreter's)")
    ap.add_argument("--out", required=True, help="directory for tokenizer.json, tokenizer_config.json, chat template")
    ap.add_argument("--data-out", default="data/code", help="directory for train.txt, val.txt, manifest.json")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    docs = write_corpus(args.stdlib or default_stdlib(), args.data_out)
    splits = {"train": [t for n, t in docs if n not in HELD_OUT], "val": [t for n, t in docs if n in HELD_OUT]}
    tok = tt.train_tokenizer(splits["train"], args.vocab_size)
    tt.save_assets(tok, args.out)
    summary = {}
    for split, texts in splits.items():
        chars = sum(map(len, texts))
        tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        summary[split] = {"files": len(texts), "chars": chars, "tokens": tokens, "chars_per_token": chars / tokens}
        print(f"{split:5s} {len(texts):5d} files {chars:10d} chars {tokens:9d} tokens {chars / tokens:.2f} chars/token")
    print(f"vocab {tok.get_vocab_size()} saved to {args.out}; corpus in {args.data_out} "
          f"({time.perf_counter() - start:.1f} s)")
    return summary


if __name__ == "__main__":
    main()
