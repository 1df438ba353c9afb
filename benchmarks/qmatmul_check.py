import jax, jax.numpy as jnp
from nemodiff_jax import quant
from nemodiff_jax.pallas_kernels import qmatmul as qm
for fmt in quant.FORMATS:
    for (k, n) in [(4096, 6144), (14336, 4096)]:
        w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.05
        qw = quant.quantize(w, fmt)
        for m in (1, 32, 200):
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(jnp.bfloat16)
            got = qm.qmatmul_pallas(x, qw.q, qw.scale, out_dtype=jnp.float32)
            want = qm.qmatmul_reference(x, qw.q, qw.scale, out_dtype=jnp.float32)
            print("check", fmt, k, n, m, float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))), flush=True)
