"""nemodiff-jax: NVIDIA Nemotron-Labs-Diffusion (AR / block diffusion / linear self-speculation) in JAX."""

from nemodiff_jax.config import PRESETS, Config, ConfigError
from nemodiff_jax.generate import Generator, load

__all__ = ["Config", "ConfigError", "Generator", "PRESETS", "load"]
