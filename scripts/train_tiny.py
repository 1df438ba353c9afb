"""Train the embedded default model (a 12.6M-parameter NLD on CPython's standard library) and export it in NLD
HF format.

    python scripts/train_tiny.py --minutes 4 --out out/code      # the embedded model: 4 min on one H100, 25 MB bf16
    python scripts/train_tiny.py --out out/code --steps 1200 --resume   # continue from <out>.work/ckpt
    python scripts/train_tiny.py --preset micro --steps 5 --out /tmp/tt   # CPU smoke run

`nemodiff train` with this repository's paths as defaults (--train data/code/train.txt, --val data/code/val.txt,
--out out/code; the corpus comes from scripts/code_corpus.py): the same flags, mapped onto
nemodiff_jax.trainer.TrainJob, and the loop is nemodiff_jax.trainer.run (see its docstring for the outputs).
scripts/build_code_model.sh runs it, then the drafter and the evaluation.
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
    add_train_arguments(ap, train=REPO / "data" / "code" / "train.txt", val=REPO / "data" / "code" / "val.txt",
                        out=REPO / "out" / "code")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    return trainer.run(train_job_from_args(parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
