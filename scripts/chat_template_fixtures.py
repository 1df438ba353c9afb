"""Writes tests/fixtures/chat_templates.json: chat templates rendered and encoded by transformers' own
`apply_chat_template`, the reference the project's renderer must equal byte for byte.

Run with transformers installed (a Python 3.11 venv with `pip install transformers==5.17.* jinja2` does; no torch
needed): `python scripts/chat_template_fixtures.py`. tests/test_chat_template.py replays every case through
nemodiff_jax.tokenizer, and tests/test_chat_template_live.py renders them again with transformers where it is
importable (the GPU machine).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from chat_template_cases import CASES, TEMPLATES, hf_tokenizer  # noqa: E402


def render(tok, case: dict) -> dict:
    kw = dict(case.get("kwargs", {}))
    try:
        text = tok.apply_chat_template(case["messages"], tokenize=False, **kw)
        ids = tok.apply_chat_template(case["messages"], tokenize=True, return_dict=False, **kw)
        return {"text": text, "ids": list(ids)}
    except Exception as e:  # noqa: BLE001 - the reference's own error is the expected outcome
        return {"error": type(e).__name__, "message": str(e)}


def main() -> int:
    import transformers

    out = {"transformers": transformers.__version__, "templates": {}}
    for name, spec in TEMPLATES.items():
        tok = hf_tokenizer(spec, Path("/tmp/nemodiff_chat_fixtures") / name)
        out["templates"][name] = {"spec": spec, "cases": [{**c, "expect": render(tok, c)} for c in CASES[name]]}
    path = ROOT / "tests" / "fixtures" / "chat_templates.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    n = sum(len(t["cases"]) for t in out["templates"].values())
    print(f"wrote {n} cases over {len(TEMPLATES)} templates to {path} (transformers {transformers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
