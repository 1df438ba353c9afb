"""CPU test suite: a fake 8-device host platform so sharding tests run anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def tiny_model_with_tokenizer(directory, seed: int):
    """A random tiny NLD model (float32, vocab 8192) saved in HF format with the shipped tokenizer files."""
    import shutil

    import jax.numpy as jnp
    from flax import nnx

    from nemodiff_jax.convert.hf import save_hf
    from nemodiff_jax.embedded import ASSETS
    from nemodiff_jax.config import PRESETS
    from nemodiff_jax.model import Transformer

    cfg = PRESETS["tiny"].replace(vocab_size=8192)
    save_hf(Transformer(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32), directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ASSETS / name, directory / name)
    return directory


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests run only where jax has a GPU backend (`pytest -m gpu` on the GPU machine)."""
    import jax
    import pytest

    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU (jax backend is %s)" % jax.default_backend())
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
