"""scripts/code_corpus.py on a tiny fake standard library: split by module, exclusions, cleaning, manifest,
tokenizer layout and round trip, determinism."""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from nemodiff_jax.tokenizer import Tokenizer
from nemodiff_jax.training import DOC_SEP

SCRIPTS = Path(__file__).parents[1] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cc = _load("code_corpus")
tt = sys.modules["train_tokenizer"]  # the sibling module code_corpus imports

SNIPPET = (
    "class Queue:\n"
    '    """A FIFO queue."""\n'
    "\n"
    "    def __init__(self, items=()):\n"
    "        self._items = list(items)\n"
    "\n"
    "    def pop(self):\n"
    "        if not self._items:\n"
    "            raise IndexError('pop from an empty queue')\n"
    "\treturn self._items.pop(0)  # tab-indented, café\n"
)


@pytest.fixture(scope="module")
def fake_stdlib(tmp_path_factory):
    root = tmp_path_factory.mktemp("stdlib")

    def put(rel, data):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))

    put("os.py", "import sys\n\nsep = '/'\n" + SNIPPET * 20)
    for i, name in enumerate(cc.HELD_OUT):
        put(name, f"def held_out_{i}(x):\n    return x + {i}\n")
    # BOM, CRLF, trailing blanks, five blank lines, a tab: cleaned to LF, two blank lines, tab kept.
    put("crlf.py", "\ufeffimport os   \r\n\r\n\r\n\r\n\r\n\r\ndef f():\r\n\treturn os.sep\t\r\n")
    put("latin1.py", "name = 'caf\xe9'\n".encode("latin-1"))
    put("big.py", "#" * (cc.MAX_FILE_BYTES + 1) + "\n")
    put("empty.py", "\n\n")
    put("json/__init__.py", "from .decoder import loads\n")
    put("json/decoder.py", "def loads(s):\n    return eval(s)\n")
    put("json/tests/test_decoder.py", "assert True\n")
    put("test/test_os.py", "TESTS_OS = 1\n")  # CPython's own test suite is a package of the corpus
    put("test/test_bisect.py", "TESTS_HELD_OUT = 1\n")  # but not the tests of a held-out module
    put("test/support/tests/test_x.py", "assert True\n")
    put("idlelib/editor.py", "EDITOR = 1\n")
    put("notapackage/mod.py", "X = 1\n")
    put("README.txt", "not python\n")
    return root


@pytest.fixture(scope="module")
def built(fake_stdlib, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    argv = ["--stdlib", str(fake_stdlib), "--out", str(out / "tok"), "--data-out", str(out / "data"),
            "--vocab-size", "400"]
    summary = cc.main(argv)
    return out, summary, argv


def _docs(out, split):
    return tt.split_documents((out / "data" / f"{split}.txt").read_text(encoding="utf-8"))


def test_split_by_module_and_exclusions(built):
    out, summary, _ = built
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    split_of = {f["path"]: f["split"] for f in manifest["files"]}
    assert sorted(p for p, s in split_of.items() if s == "val") == sorted(cc.HELD_OUT)
    assert sorted(p for p, s in split_of.items() if s == "train") == [
        "crlf.py", "json/__init__.py", "json/decoder.py", "os.py", "test/test_os.py"]
    assert {s["path"]: s["reason"] for s in manifest["skipped"]}.keys() == {
        "big.py", "empty.py", "latin1.py", "test/test_bisect.py"}
    val = "".join(_docs(out, "val"))
    assert all(f"held_out_{i}" in val for i in range(len(cc.HELD_OUT)))
    train = (out / "data" / "train.txt").read_text(encoding="utf-8")
    assert "held_out_" not in train
    assert "TESTS_OS" in train
    for absent in ("EDITOR", "X = 1", "assert True", "caf\xe9'", "###", "TESTS_HELD_OUT"):
        assert absent not in train + val
    assert summary["train"]["files"] == 5 and summary["val"]["files"] == len(cc.HELD_OUT)
    assert manifest["totals"]["val"]["files"] == len(cc.HELD_OUT)


def test_documents_clean_and_round_trip(built, fake_stdlib):
    out, _, _ = built
    assert DOC_SEP == tt.DOC_SEP
    docs, _, _ = cc.load_documents(fake_stdlib)
    for split in ("train", "val"):
        text = (out / "data" / f"{split}.txt").read_text(encoding="utf-8")
        expected = [t for n, t in docs if (n in cc.HELD_OUT) == (split == "val")]
        assert _docs(out, split) == expected
        assert text == DOC_SEP.join(expected) + "\n"
        for doc in expected:
            assert DOC_SEP not in doc and "\r" not in doc and not doc.startswith("\n") and not doc.endswith("\n")
            assert all(line == line.rstrip() for line in doc.split("\n"))
    assert dict(docs)["crlf.py"] == "import os\n\n\ndef f():\n\treturn os.sep"


def test_manifest_hashes_match_files(built, fake_stdlib):
    out, _, _ = built
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["stdlib"] == str(fake_stdlib.resolve())
    for f in manifest["files"]:
        raw = (fake_stdlib / f["path"]).read_bytes()
        assert f["bytes"] == len(raw) and f["sha256"] == hashlib.sha256(raw).hexdigest()
    for split in ("train", "val"):
        assert manifest["totals"][split]["txt_chars"] == len((out / "data" / f"{split}.txt").read_text("utf-8"))


def test_tokenizer_layout_and_round_trip(built):
    out, summary, _ = built
    tok = Tokenizer.from_dir(out / "tok")
    assert tok.backend.get_vocab_size() == 400
    assert (tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (1, 11, 100)
    assert [tok.id_to_token(i) for i in (1, 11, 100)] == ["<s>", "<|im_end|>", "<SPECIAL_100>"]
    assert (out / "tok" / "chat_template.jinja").read_text() == tt.CHAT_TEMPLATE
    ids = tok.encode(SNIPPET)
    assert ids[0] == 1 and all(i >= tt.NUM_RESERVED for i in ids[1:])
    assert tok.decode(ids) == SNIPPET
    assert summary["train"]["tokens"] < summary["train"]["chars"]  # the merges learnt something


def test_second_run_is_byte_identical(built, tmp_path):
    out, _, argv = built
    again = [a.replace(str(out), str(tmp_path)) for a in argv]
    cc.main(again)
    for rel in ("data/train.txt", "data/val.txt", "data/manifest.json", "tok/tokenizer.json",
                "tok/tokenizer_config.json", "tok/chat_template.jinja"):
        assert (tmp_path / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_rejects_a_dir_without_os_py(tmp_path):
    with pytest.raises(FileNotFoundError, match="no os.py"):
        cc.find_sources(tmp_path)
    (tmp_path / "os.py").write_text("")
    with pytest.raises(FileNotFoundError, match="held-out modules missing.*bisect.py"):
        cc.find_sources(tmp_path)
