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

# Twelve prompts in the embedded model's style, the demo's four first: the GPU tests' bf16 comparisons and the
# server load generator use them.
PROMPTS = DEMO_PROMPTS + [
    "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?",
    "MACBETH:\nIs this a dagger which I see before me,",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "Now is the winter of our discontent",
    "PORTIA:\nThe quality of mercy is not strain'd;",
    "Say first, for Heav'n hides nothing from thy view,",
    "LEAR:\nBlow, winds, and crack your cheeks!",
    "PROSPERO:\nOur revels now are ended.",
]


def default_model() -> Path:
    """The embedded default model (trained here; see docs/EMBEDDED_MODEL.md)."""
    if not (ASSETS / "config.json").exists():
        raise SystemExit(f"no embedded model in {ASSETS}: pass --model PATH")
    return ASSETS
