"""CPU test suite: a fake 8-device host platform so sharding tests run anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


import tempfile

import jax
import pytest

# XLA's persistent compilation cache, shared by the xdist workers: many modules compile the same programs (the
# embedded model's modes at the same shapes), and a hit skips XLA's compiler (keyed by the program, the
# flags and the jax version, so a stale entry is never used). Cold on a fresh machine, it still cut a
# decoding + lora + cli run from 143 to 128 s. NEMODIFF_TEST_XLA_CACHE=off turns it off, or names the folder.
_cache = os.environ.get("NEMODIFF_TEST_XLA_CACHE", os.path.join(tempfile.gettempdir(), "nemodiff-jax-test-xla-cache"))
if _cache != "off":
    jax.config.update("jax_compilation_cache_dir", _cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _memory_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """After each test module, free what it compiled. XLA:CPU keeps every compiled executable's JIT code in
    memory mappings of its own (~5k per module of this suite); kept for the whole session they reach the
    kernel's vm.max_map_count (65530), and then allocations inside XLA's compiler fail: the suite died in
    libgcc's unwinder (segfaults, aborts) at ~65.4k mappings (a core dump of 2026-12-07). A module that still
    leaves more than a quarter of the limit behind fails here, by name, instead of crashing a later one."""
    yield
    import gc

    import jax

    from nemodiff_jax import slots

    slots.clear_programs()
    jax.clear_caches()
    gc.collect()
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        left = _memory_mappings()
    except OSError:  # no Linux /proc here: nothing to check
        return
    else:
        assert left < limit // 4, (f"{left} memory mappings remain after this module's compiled programs were "
                                   f"freed (vm.max_map_count {limit}): something keeps executables alive")


def tiny_model_with_tokenizer(directory, seed: int):
    """A random tiny NLD model (float32, the shipped tokenizer's vocab) saved in HF format with the shipped
    tokenizer files."""
    import shutil

    import jax.numpy as jnp
    from flax import nnx

    from nemodiff_jax.convert.hf import save_hf
    from nemodiff_jax.embedded import ASSETS
    from nemodiff_jax.config import PRESETS
    from nemodiff_jax.model import Transformer
    from nemodiff_jax.tokenizer import Tokenizer

    cfg = PRESETS["tiny"].replace(vocab_size=Tokenizer.default().vocab_size)
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
