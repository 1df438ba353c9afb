"""Chat templates and conversations rendered by both transformers and nemodiff_jax.tokenizer (the fixtures in
tests/fixtures/chat_templates.json come from transformers; see scripts/chat_template_fixtures.py). Standard
library only: the fixture script runs it in a venv that has transformers and not this project."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "nemodiff_jax" / "assets"
NLD = (ASSETS / "chat_template.jinja").read_text(encoding="utf-8")
CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
          "unk_token": "<unk>", "add_bos_token": True, "clean_up_tokenization_spaces": False}

GENERATION = (  # a training-style template: assistant text inside {% generation %} blocks
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

RAISES = (
    "{%- for m in messages %}\n"
    "  {%- if m['role'] not in ['user', 'assistant'] %}\n"
    "    {{- raise_exception('Conversation roles must be user/assistant, got ' ~ m['role']) }}\n"
    "  {%- endif %}\n"
    "  {{- '[' ~ m['role'] ~ '] ' ~ m['content'] ~ '\\n' }}\n"
    "{%- endfor %}")

VARIABLES = (  # what the renderer passes, and its whitespace rules (trim_blocks, lstrip_blocks)
    "tools={{ tools is none }} documents={{ documents is none }}\n"
    "    {% if pad_token is defined %}pad={{ pad_token }}{% else %}pad undefined{% endif %}\n"
    "bos={{ bos_token }} eos={{ eos_token }} unk={{ unk_token }}\n"
    "{% if enable_thinking is defined %}thinking={{ enable_thinking }}{% else %}thinking undefined{% endif %}\n"
    "year-digits={{ strftime_now('%Y') | length }}\n"
    "{% for m in messages %}\n"
    "    {% if loop.index > 2 %}{% break %}{% endif %}\n"
    "    {% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
    "    {{ m | tojson }}\n"
    "{% endfor %}\n"
    "{% if tools %}{% for t in tools %}tool: {{ t['function']['name'] }} {{ t | tojson(indent=1) }}{% endfor %}{% endif %}\n"
    "{% if documents %}{% for d in documents %}doc: {{ d['title'] }}={{ d['text'] }}\n{% endfor %}{% endif %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

NAMED = [{"name": "default", "template": "{% for m in messages %}{{ m['content'] }}|{% endfor %}"},
         {"name": "tool_use", "template": "TOOLS {{ tools | length }}: {% for m in messages %}{{ m['content'] }}"
                                          "{% endfor %}"}]

TEMPLATES = {
    "nld": {"chat_template": NLD, "config": CONFIG},
    "generation": {"chat_template": GENERATION, "config": CONFIG},
    "raises": {"chat_template": RAISES, "config": CONFIG},
    "variables": {"chat_template": VARIABLES, "config": CONFIG},
    "named": {"chat_template": NAMED, "config": CONFIG},
}

USER = [{"role": "user", "content": "Who is Hamlet?"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Hamlet?"}]
HISTORY = [{"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "<think>\nA greeting.\n</think>\nHello, friend."},
           {"role": "user", "content": "Naïve café? 東京 🙂"}]
TOOL = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter für einen Ort",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
DOCS = [{"title": "Quarto", "text": "To be, or not to be"}]

CASES = {
    "nld": [
        {"messages": USER},
        {"messages": USER, "kwargs": {"add_generation_prompt": True}},
        {"messages": USER, "kwargs": {"add_generation_prompt": True, "enable_thinking": True}},
        {"messages": USER, "kwargs": {"add_generation_prompt": True, "enable_thinking": False}},
        {"messages": SYSTEM, "kwargs": {"add_generation_prompt": True}},
        {"messages": HISTORY, "kwargs": {"add_generation_prompt": True}},
        {"messages": HISTORY, "kwargs": {"add_generation_prompt": True, "truncate_history_thinking": False}},
        {"messages": HISTORY, "kwargs": {"add_generation_prompt": True, "enable_thinking": True,
                                         "truncate_history_thinking": True}},
        {"messages": USER + [{"role": "assistant", "content": "A prince"}],
         "kwargs": {"continue_final_message": True}},
        {"messages": [{"role": "robot", "content": "beep"}]},
        {"messages": USER + [{"role": "system", "content": "late"}]},
    ],
    "generation": [
        {"messages": HISTORY},
        {"messages": HISTORY, "kwargs": {"add_generation_prompt": True}},
    ],
    "raises": [
        {"messages": USER},
        {"messages": SYSTEM},
    ],
    "variables": [
        {"messages": SYSTEM + HISTORY},
        {"messages": HISTORY, "kwargs": {"add_generation_prompt": True, "enable_thinking": True}},
        {"messages": USER, "kwargs": {"tools": TOOL, "documents": DOCS}},
        {"messages": USER, "kwargs": {"bos_token": "OVERRIDDEN", "custom": 3}},
    ],
    "named": [
        {"messages": HISTORY},
        {"messages": HISTORY, "kwargs": {"tools": TOOL}},
        {"messages": HISTORY, "kwargs": {"chat_template": "tool_use", "tools": []}},
    ],
}


def write_tokenizer_dir(spec: dict, folder: Path) -> Path:
    """The embedded model's tokenizer.json with the case's tokenizer_config.json (template inside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(ASSETS / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({**spec["config"], "chat_template": spec["chat_template"]},
                                                             ensure_ascii=False), encoding="utf-8")
    return folder


def hf_tokenizer(spec: dict, folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(write_tokenizer_dir(spec, folder)))
