"""The embedded default model: where it lies in the package, and the prompts the demo runs."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

DEMO_PROMPTS = [
    "ROMEO:\nBut soft, what light through yonder window breaks?",
    "KING HENRY:\nOnce more unto the breach, dear friends,",
    "HAMLET:\nTo be, or not to be,",
    "Of Man's first disobedience, and the fruit",
]


def default_model() -> Path:
    """The embedded default model (trained here; see docs/EMBEDDED_MODEL.md)."""
    if not (ASSETS / "config.json").exists():
        raise SystemExit(f"no embedded model in {ASSETS}: pass --model PATH")
    return ASSETS
