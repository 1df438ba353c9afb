"""The NLD backbone (Ministral-3 dense decoder + untied `diffusion_head`) in flax.nnx.

`Transformer(tokens[B,T], positions[B,T], cache, causal=...) -> (logits[B,T,V] float32, cache)`: the only
thing that differs between prefill, AR step, denoise, draft, verify and commit is `causal` and what the
caller does with the cache afterwards (see cache.py). Layers are a Python list, unrolled under jit: scanning
over stacked layer weights was measured 2.6x slower in the decode path.

Parameter layouts (Flax [in, out], heads split): qkv [D,K,G+2,H] (per kv head: its G query heads, then k,
then v: one GEMV instead of three, and it shards cleanly over kv heads), o [N,H,D], gate_up [D,2,F],
down [F,D], embed [V,D], head [D,V]. Each Param carries `logical_axes` for sharding.py.

A VLM config (cfg.vision) adds `vision_tower` and `multi_modal_projector` (vision.py; in the checkpoint they sit
inside `encoder` too). Images enter only through the prefill's input embeddings: `embed(tokens, features)`
splices `encode_images(...)` into the placeholder rows, and `hidden`/`__call__` take those `embeds` instead of
token ids; every decode pass after it is the text model's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nemodiff_jax import quant, rope, sharding, vision
from nemodiff_jax.attention import chunk_attention, sdpa
from nemodiff_jax.cache import KVCache, write_chunk
from nemodiff_jax.config import Config, Quantization


# The matmul weights a quantized model stores as quant.QWeight, with the leading axes each one contracts.
# Selected by name: the vision tower's weights are named otherwise (vision.py) and stay 16-bit.
QUANTIZABLE = {"qkv_proj": 1, "o_proj": 2, "gate_up_proj": 1, "down_proj": 1, "diffusion_head": 1}
HEAD_FORMAT = "int8"  # for both formats: an int4 head costs 1.6 more perplexity (docs/QUANTIZATION.md)


def _dense(subscripts: str, x: jax.Array, p: nnx.Param, impl: str, out_dtype=None) -> jax.Array:
    """x times a matmul weight: the einsum for a 16-bit weight, quant.matmul (its kernel or the reference,
    as quant's table picks for `impl`) for a quantized one."""
    w = p.get_value()
    if isinstance(w, quant.QWeight):
        if isinstance(impl, sharding.ShardedMatmul):
            return sharding.sharded_qmatmul(x, w, p.get_metadata()["logical_axes"], impl, out_dtype)
        return quant.matmul(x, w, out_dtype=out_dtype, impl=impl)
    return jnp.einsum(subscripts, x, w, preferred_element_type=out_dtype)


@functools.lru_cache(maxsize=None)
def _quantizer(fmt: str, in_dims: int):
    return jax.jit(functools.partial(quant.quantize, fmt=fmt, in_dims=in_dims))


def tile_quantized(model: Transformer) -> Transformer:
    """Lays every quantized weight out in quant.tile's 128 x 128 blocks, in place, where the Pallas kernel will
    read it (quant.why_not: the first device is a Hopper GPU and the weight is one the kernel takes); elsewhere
    (CPU, other GPUs: the XLA reference) the weights stay in rows. Returns the model."""
    from nemodiff_jax.attention import DeviceInfo

    device = DeviceInfo.of()
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        w = var.get_value()
        if (isinstance(w, quant.QWeight) and not w.tiled and quant.tileable(w)
                and quant.why_not("pallas", device, jnp.bfloat16, 1, w) is None):
            var.set_value(_tiler(w))
    return model


_tiler = jax.jit(quant.tile)


def quantize_weights(model: Transformer, fmt: str) -> Transformer:
    """Replaces the matmul weights (QUANTIZABLE) by quant.QWeight in `fmt` ("int8" | "int4"), in place and on
    their device (one compile per shape); the embedding table and the norms stay as they are. Returns the
    model."""
    if fmt not in quant.FORMATS:
        raise ValueError(f"quantize must be one of {quant.FORMATS}, got {fmt!r}")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path[-1]
        f = HEAD_FORMAT if name == "diffusion_head" else fmt
        if name in QUANTIZABLE and isinstance(var.get_value(), quant.QWeight):
            if var.get_value().fmt != f:
                raise ValueError(f"{'/'.join(map(str, path))} is already quantized to {var.get_value().fmt}; "
                                 f"it cannot become {f} (quantize the 16-bit weights)")
        elif name in QUANTIZABLE:
            w = var.get_value()
            quant.check_quantizable(w.shape, f, QUANTIZABLE[name], name="/".join(map(str, path)))
            var.set_value(_quantizer(f, QUANTIZABLE[name])(w))
    model.config = model.config.replace(quantization=Quantization(fmt, HEAD_FORMAT, quant.DEFAULT_GROUP))
    return tile_quantized(model)


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None) -> nnx.Param:
    if scale is None:  # fan-in init for matrices (all inputs lead, except o_proj's [N, H, D])
        fan_in = shape[0] * shape[1] if axes[:2] == ("q_heads", "head_dim") else shape[0]
        scale = fan_in ** -0.5
    value = jax.random.normal(rngs.params(), shape, jnp.float32) * scale
    return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in fp32, normalised value cast back before the weight multiply (as HF Mistral does).
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.group = cfg.group_size
        self.qkv_proj = _param(rngs, (d, k, self.group + 2, h), ("embed", "kv_heads", None, "head_dim"), dtype)
        self.o_proj = _param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype)

    def __call__(self, x, cos, sin, qscale, cache: KVCache | None, layer: int, *, causal: bool, mask=None,
                 within=None, lora=None, attn_impl: str = "auto", matmul_impl: str = "auto"):
        qkv = _dense("btd,dkch->btkch", x, self.qkv_proj, matmul_impl)
        g = self.group
        b, t, kh = qkv.shape[:3]
        q = qkv[:, :, :, :g].reshape(b, t, kh * g, -1)  # query head n = kv head * G + g (HF repeat_kv order)
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
        q = rope.apply_rope(q, cos, sin)
        k = rope.apply_rope(k, cos, sin)
        if qscale is not None:  # Llama-4 query temperature, after RoPE, q only
            q = q * qscale[:, :, None, None].astype(q.dtype)
        if cache is None:
            # Cache-free pass (training, tests): attention within the chunk under `mask` or causal/bidir.
            if mask is None:
                mask = jnp.tril(jnp.ones((t, t), bool)) if causal else jnp.ones((t, t), bool)
                mask = jnp.broadcast_to(mask, (b, t, t))
            out = sdpa(q, k, v, mask)
        else:
            k_buf = write_chunk(cache.k[layer], k, cache.lengths)
            v_buf = write_chunk(cache.v[layer], v, cache.lengths)
            cache = cache.with_layer(layer, k_buf, v_buf)
            out = chunk_attention(q, k_buf, v_buf, cache.lengths, causal=causal, impl=attn_impl, within=within)
        y = _dense("btnh,nhd->btd", out, self.o_proj, matmul_impl)
        if lora is not None:  # drafter LoRA on o_proj: y += scale * (out A) B
            a, b = lora.a[layer], lora.b[layer]
            delta = jnp.einsum("btnh,nhr,rd->btd", out, a.astype(out.dtype), b.astype(out.dtype)) * lora.scale
            if lora.gate is not None:
                delta = delta * lora.gate[:, :, None].astype(delta.dtype)
            y = y + delta.astype(y.dtype)
        return y, cache


class MLP(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = _param(rngs, (d, 2, f), ("embed", None, "mlp"), dtype)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), dtype)

    def __call__(self, x, matmul_impl: str = "auto"):
        gate_up = _dense("btd,dcf->btcf", x, self.gate_up_proj, matmul_impl)
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        return _dense("btf,fd->btd", jax.nn.silu(gate) * up, self.down_proj, matmul_impl)


class Block(nnx.Module):
    def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, rngs, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, rngs, dtype)

    def __call__(self, x, cos, sin, qscale, cache, layer, *, causal, mask=None, within=None, lora=None,
                 attn_impl="auto", matmul_impl="auto"):
        with jax.named_scope("attn"):
            h, cache = self.self_attn(self.input_layernorm(x), cos, sin, qscale, cache, layer, causal=causal,
                                      mask=mask, within=within, lora=lora, attn_impl=attn_impl,
                                      matmul_impl=matmul_impl)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attention_layernorm(x), matmul_impl)
        return x, cache


class Transformer(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        # The path of quantized matmuls: "auto" (quant.py's table) on one device; under a mesh
        # sharding.matmul_impl's choice (a sharding.ShardedMatmul per device, or "xla" for the partitioner).
        # Static: part of the graphdef.
        self.matmul_impl = "auto"
        # The untied embedding table is replicated, not split over vocab: a lookup then reads B*T local rows.
        # Split over vocab, XLA's GPU partitioner all-gathered the whole table every forward (measured at
        # 14B TP=2 on H200: 2.4 ms of an 8 ms step). A tied table must stay split, since it is the head too.
        table_axes = ("vocab", "embed") if cfg.tie_word_embeddings else ("vocab_table", "embed")
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), table_axes, dtype, 1.0)
        self.layers = nnx.List([Block(cfg, rngs, dtype) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.tie_word_embeddings:
            self.diffusion_head = None
        else:
            self.diffusion_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
        if cfg.vision is None:
            self.vision_tower = self.multi_modal_projector = None
        else:
            self.vision_tower = vision.VisionTower(cfg.vision, rngs, dtype)
            self.multi_modal_projector = vision.MultiModalProjector(cfg, rngs, dtype)

    def encode_images(self, images: vision.ImagePatches) -> jax.Array:
        """Image features float32 [M, D] for the patches of one or more images (vision.patchify), in the order
        their placeholders appear in the prompt."""
        if self.vision_tower is None:
            raise ValueError("this model has no vision tower (its config.json is a text-only NLD config)")
        with jax.named_scope("vision_tower"):
            features = self.vision_tower(images)
        with jax.named_scope("projector"):
            return self.multi_modal_projector(features, images.merge_index)

    def embed(self, tokens: jax.Array, image_features: jax.Array | None = None) -> jax.Array:
        """Input embeddings [B,T,D] of token ids [B,T]; with image_features [M,D], the M image placeholders
        (config.vision.image_token_id) take them in order (vision.splice_image_features: the counts must match)."""
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        if image_features is None:
            return x
        if self.config.vision is None:
            raise ValueError("image features given, but this model has no vision tower (text-only config)")
        return vision.splice_image_features(x, tokens, image_features, self.config.vision.image_token_id)

    def hidden(self, tokens, positions, cache=None, *, causal=True, mask=None, within=None, lora=None,
               attn_impl="auto", embeds=None):
        """Final normalised hidden states [B,T,D] and the cache. `embeds` [B,T,D] (from `embed`, e.g. a prefill
        with images) replaces the token lookup; `tokens` is then unused and may be None. With a cache, `within`
        [T, T] (static numpy bool) replaces `causal` inside the chunk (attention.chunk_attention); without
        one, `mask` [B, T, T] is the whole mask."""
        cfg = self.config
        if cache is not None:
            cache.check_fits((tokens if embeds is None else embeds).shape[1])
        x = jnp.take(self.embed_tokens[...], tokens, axis=0) if embeds is None else embeds.astype(self.dtype)
        cos, sin = rope.cos_sin(cfg, positions)
        qscale = rope.llama4_query_scale(cfg, positions)
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer{i}"):
                x, cache = layer(x, cos, sin, qscale, cache, i, causal=causal, mask=mask, within=within, lora=lora,
                                 attn_impl=attn_impl, matmul_impl=self.matmul_impl)
        return self.norm(x), cache

    def head(self, h: jax.Array) -> jax.Array:
        """logits float32 [B,T,V]; falls back to the tied embedding only when the checkpoint has no head."""
        if self.diffusion_head is None:
            return jnp.einsum("btd,vd->btv", h, self.embed_tokens[...], preferred_element_type=jnp.float32)
        return _dense("btd,dv->btv", h, self.diffusion_head, self.matmul_impl, jnp.float32)

    def __call__(self, tokens, positions, cache=None, *, causal=True, mask=None, within=None, lora=None,
                 attn_impl="auto", embeds=None):
        h, cache = self.hidden(tokens, positions, cache, causal=causal, mask=mask, within=within, lora=lora,
                               attn_impl=attn_impl, embeds=embeds)
        with jax.named_scope("head"):
            return self.head(h), cache


def abstract_model(cfg: Config, dtype=jnp.bfloat16) -> Transformer:
    """The model's structure with ShapeDtypeStruct leaves: no memory, for loading and shape checks. With
    cfg.quantization, the matmul weights are abstract quant.QWeight (what a quantized checkpoint holds)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    q = cfg.quantization
    if q is not None:
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            name = path[-1]
            if name in QUANTIZABLE:
                shape, fmt = tuple(var.shape), q.fmt(name)
                quant.check_quantizable(shape, fmt, QUANTIZABLE[name], q.group_size, "/".join(map(str, path)))
                var.set_value(quant.abstract(shape, fmt, QUANTIZABLE[name], q.group_size))
    return model
