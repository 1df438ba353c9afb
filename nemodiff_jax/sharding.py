"""Logical axes -> mesh axes. One small rules table; a ("data", "model") mesh over any number of devices.

Tensor parallelism shards heads / MLP / vocab over "model"; batch rows go over "data". A dimension that the
mesh axis does not divide stays replicated (e.g. 8 kv heads over 16 devices), so every mesh shape is valid.
Attention is local per device because whole heads are sharded.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nemodiff_jax import quant
from nemodiff_jax.pallas_kernels.qlayout import INT4_BLOCK

RULES: dict[str, str | None] = {
    "vocab": "model",
    "vocab_table": None,  # the (untied) embedding table: replicated, lookups stay local (model.py)
    "embed": None,
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    "batch": "data",
}


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A ("data", "model") mesh; `model` defaults to all devices not used by `data`."""
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        model = len(devices) // data
    if data * model > len(devices) or data < 1 or model < 1:
        raise ValueError(f"mesh ({data}, {model}) needs {data * model} devices, have {len(devices)}")
    grid = np.array(devices[: data * model]).reshape(data, model)
    return Mesh(grid, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def spec_for(shape: tuple[int, ...], axes: tuple[str | None, ...], mesh: Mesh) -> P:
    out = []
    for dim, name in zip(shape, axes):
        mesh_axis = RULES.get(name) if name else None
        if mesh_axis is not None and dim % mesh.shape[mesh_axis]:
            mesh_axis = None  # not divisible: replicate this dimension
        out.append(mesh_axis)
    return P(*out)


def param_shardings(model, mesh: Mesh) -> dict[tuple, NamedSharding]:
    """nnx path -> NamedSharding for every parameter, from its `logical_axes` metadata; for a quantized
    weight, a quant.QWeight of NamedShardings (qweight_shardings)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        value = var.get_value()
        if isinstance(value, quant.QWeight):
            out[path] = qweight_shardings(value, axes, mesh)
        else:
            out[path] = NamedSharding(mesh, spec_for(tuple(var.shape), axes, mesh))
    return out


def qweight_shardings(qw: quant.QWeight, axes: tuple, mesh: Mesh) -> quant.QWeight:
    """A quantized weight shards like its 16-bit twin [*in, *out]: q [*out, K] takes the out axes and, for its
    flattened K, the first input axis (a contiguous split of K = a split of that axis); the scales lie beside
    their channels: [*out] (int8), [K/group, *out] (int4: groups split with the inputs)."""
    out_axes, k_axis = tuple(axes[qw.in_dims:]), axes[0]
    # tiled ([*out[:-1], out[-1]/128, K/128, 128, 128]): the block indices take the last out axis and K's
    q_spec = spec_for(tuple(qw.q.shape), out_axes + (k_axis,) + ((None, None) if qw.tiled else ()), mesh)
    s_axes = out_axes if qw.fmt == "int8" else (k_axis,) + out_axes
    s_spec = spec_for(tuple(qw.scale.shape), s_axes, mesh)
    return quant.QWeight(NamedSharding(mesh, q_spec), NamedSharding(mesh, s_spec), qw.fmt, qw.shape, qw.in_dims,
                         qw.group, qw.tiled)


def cache_sharding(cfg, batch: int, mesh: Mesh | None) -> NamedSharding | None:
    """KV buffers [B, S, K, H]: rows over data, kv heads over model (where they divide); None without a mesh."""
    if mesh is None:
        return None
    return NamedSharding(mesh, spec_for((batch, 0, cfg.num_kv_heads, cfg.head_dim),
                                        ("batch", None, "kv_heads", None), mesh))


def rows_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Per-row arrays (leading batch dim): rows over "data" where they divide, other dims replicated."""
    return NamedSharding(mesh, spec_for(shape, ("batch",) + (None,) * (len(shape) - 1), mesh))


def shard_model(model, mesh: Mesh):
    """Places an existing model's parameters onto the mesh (loading uses param_shardings directly)."""
    shardings = param_shardings(model, mesh)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(jax.device_put(var.get_value(), shardings[path]))
    nnx.update(model, state)
    return model


@dataclasses.dataclass(frozen=True)
class ShardedMatmul:
    """Quantized matmuls under a mesh as one device's program each (the Pallas kernel where quant's table picks
    it), inside shard_map: the weight's own split decides; a split contraction (o, down) ends in a psum over
    "model". `reference`: the XLA reference per device (CPU tests of the partitioning)."""

    mesh: Mesh
    reference: bool = False


def matmul_impl(mesh: Mesh):
    """The model's matmul_impl under `mesh`: per device where some device has the kernel's kind (CUDA), else
    the XLA reference, which the SPMD partitioner splits by itself."""
    return ShardedMatmul(mesh) if any(d.platform == "gpu" for d in mesh.devices.flat) else "xla"


def sharded_qmatmul(x: jax.Array, qw: quant.QWeight, axes: tuple, impl: ShardedMatmul, out_dtype=None):
    """x [..., *in] @ qw -> [..., *out] under impl.mesh (see ShardedMatmul); the GSPMD reference where the
    scales would not split with their inputs."""
    mesh = impl.mesh
    out_dtype = x.dtype if out_dtype is None else out_dtype
    specs = qweight_shardings(qw, axes, mesh)
    q_spec, s_spec = tuple(specs.q.spec), tuple(specs.scale.spec)
    q_spec += (None,) * (qw.q.ndim - len(q_spec))
    s_spec += (None,) * (qw.scale.ndim - len(s_spec))
    k_axis = q_spec[-3] if qw.tiled else q_spec[-1]
    k = qw.kn[0]
    splits = math.prod(mesh.shape[a] for a in (k_axis if isinstance(k_axis, tuple) else (k_axis,)) if a)
    permuted = [kk % INT4_BLOCK == 0 for kk in (k, k // splits)]
    if qw.fmt == "int4" and (s_spec[0] != k_axis or permuted[0] != permuted[1]):
        # groups not split like the inputs, or a shard's K would read int4's memory order differently from the
        # whole K (quant.permute_int4): let the partitioner do it
        return quant.matmul_reference(x, qw, out_dtype)
    lead = x.shape[:x.ndim - qw.in_dims]
    xf = x.reshape(*lead, k)
    rows = "data" if lead and lead[0] % mesh.shape["data"] == 0 else None
    x_spec = P(rows, *([None] * (len(lead) - 1)), k_axis)
    y_spec = P(rows, *([None] * (len(lead) - 1)), *(q_spec[:-3] if qw.tiled else q_spec[:-1]))

    def local(xl, ql, sl):
        out_l, kl = ((*ql.shape[:-4], ql.shape[-4] * quant.TILE), ql.shape[-3] * quant.TILE) if qw.tiled else \
            (ql.shape[:-1], ql.shape[-1])
        qwl = quant.QWeight(ql, sl, qw.fmt, (kl, *out_l), 1, qw.group, qw.tiled)
        partial = k_axis is not None
        y = quant.matmul(xl, qwl, out_dtype=jnp.float32 if partial else out_dtype,
                         impl="xla" if impl.reference else "auto")
        return jax.lax.psum(y, k_axis).astype(out_dtype) if partial else y

    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, P(*q_spec), P(*s_spec)), out_specs=y_spec,
                         check_vma=False)(xf, qw.q, qw.scale)
