"""Train the embedded default model (a ~10M-parameter NLD on Shakespeare + Milton) and export it in NLD HF format.

    python scripts/train_tiny.py --out out/tiny                  # 900 steps: ~4.5 min on one H200, 21 MB bf16
    python scripts/train_tiny.py --minutes 8 --out out/tiny      # fill a time budget (horizon fitted to it)
    python scripts/train_tiny.py --out out/tiny --steps 1200 --resume   # continue from <out>.work/ckpt
    python scripts/train_tiny.py --preset micro --steps 5 --out /tmp/tt   # CPU smoke run

`nemodiff train` with this repository's paths as defaults (--train data/train.txt, --val data/val.txt,
--out out/tiny; the corpus comes from scripts/train_tokenizer.py): the same flags, mapped onto
nemodiff_jax.trainer.TrainJob, and the loop is nemodiff_jax.trainer.run (see its docstring for the outputs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nemodiff_jax import trainer
from nemodiff_jax.cli import add_train_arguments, train_job_from_args

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(ap, train=REPO / "data" / "train.txt", val=REPO / "data" / "val.txt",
                        out=REPO / "out" / "tiny")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    return trainer.run(train_job_from_args(parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
