"""The Mllama text decoder: Llama-3 self-attention layers interleaved with gated cross-attention layers.

Self-attention layers and cross-attention layers are each stacked on a leading "layers" axis. When the
cross layers recur with a fixed period (every 5th layer in the 11B and 90B models) the stack runs as a
lax.scan over identical blocks [self x k, cross, self x (period - k - 1)], so compile time does not grow
with depth; any other pattern runs as a short Python loop over scanned runs of self-attention layers.

With `scan_layers=False` the same layer modules are kept as per-layer lists and run in a Python loop
(for small-batch decoding, see MllamaConfig.scan_layers).

One code path serves the plain forward pass and cached decoding: with a KV cache, keys/values of the new
tokens are written at slot `cache_index` (the same slot for every row: prompts are left-padded; or one slot per row,
for the server's continuous batch) and attention reads the whole cache, masked by slot order and by which slots
hold real tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from llava_cot_jax.models.mllama.config import TextConfig
from llava_cot_jax.models.mllama.layers import (
    MASK_VALUE,
    RESIDUAL_AXES,
    GatedMLP,
    RMSNorm,
    apply_rope,
    attention_projections,
    heads_major,
    llama3_inv_freq,
    maybe_remat,
    param,
    project,
    query_chunked_attention,
    rms_norm,
    rope_cos_sin,
    stack_layers,
    stats_dtype,
)
from llava_cot_jax.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderInputs:
    """Per-call tensors every layer needs, computed once per forward pass."""

    cos: jax.Array  # [B, S, head_dim]
    sin: jax.Array
    self_bias: jax.Array  # [B, 1, 1, S, T] additive self-attention mask
    cache_index: jax.Array  # int32 cache slot of the first new token: a scalar (every row), or [B] (one per row)
    cross_bias: jax.Array | None  # [B, 1, 1, S, N_vision] or None (attend to every vision token)
    cross_rows: jax.Array | None  # [B, S, 1]: 0 where a token sees no image tile (gates the cross MLP)
    # Queries per block of attention (layers.query_chunked_attention); 0: all at once.
    attention_chunk: int = dataclasses.field(default=0, metadata={"static": True})


class SelfAttentionLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(rngs, d, h, k, hd, dtype)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs)
        self.mlp = GatedMLP(d, cfg.intermediate_size, dtype, rngs)

    def __call__(self, x, inputs: DecoderInputs, cache_kv):
        """cache_kv: None, or this layer's (k, v) cache [B, K, T, hd]. Returns (x, updated (k, v) or None)."""
        dt = x.dtype
        h = self.input_layernorm(x)
        q = apply_rope(heads_major(h, self.q_proj[...]), inputs.cos, inputs.sin)
        k = apply_rope(heads_major(h, self.k_proj[...]), inputs.cos, inputs.sin)
        v = heads_major(h, self.v_proj[...])
        if cache_kv is not None:
            k, v = (write_cache(c, new.astype(c.dtype), inputs.cache_index) for c, new in zip(cache_kv, (k, v)))
            cache_kv = (k, v)
        out = query_chunked_attention(q, k.astype(dt), v.astype(dt), inputs.self_bias, dt, inputs.attention_chunk)
        x = x + project("bhsk,hkd->bsd", out, self.o_proj[...])
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), RESIDUAL_AXES), cache_kv


def write_cache(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Writes new [B, K, S, hd] into cache [B, K, T, hd] at slot `index`: a scalar (every row), or [B] per row (a
    continuous batch, whose rows are at different lengths)."""
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, (0, i, 0)))(cache, new, index)


class CrossAttentionLayer(nnx.Module):
    """Attends to the projected vision tokens; q/k RMS-normalised per head; tanh-gated branches."""

    def __init__(self, cfg: TextConfig, dtype, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attention_projections(rngs, d, h, k, hd, dtype)
        self.q_norm = param(rngs, (hd,), ("head_dim",), dtype, init="ones")
        self.k_norm = param(rngs, (hd,), ("head_dim",), dtype, init="ones")
        self.cross_attn_attn_gate = param(rngs, (1,), (None,), dtype, init="zeros")
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs)
        self.mlp = GatedMLP(d, cfg.intermediate_size, dtype, rngs)
        self.cross_attn_mlp_gate = param(rngs, (1,), (None,), dtype, init="zeros")

    def kv(self, vision_states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys/values of the vision tokens [B, N, D] -> ([B, K, N, hd], [B, K, N, hd]); computed once per image."""
        k = heads_major(vision_states, self.k_proj[...])
        v = heads_major(vision_states, self.v_proj[...])
        return rms_norm(k, self.k_norm[...], self.eps), v

    def __call__(self, x, inputs: DecoderInputs, kv):
        dt = x.dtype
        h = self.input_layernorm(x)
        q = rms_norm(heads_major(h, self.q_proj[...]), self.q_norm[...], self.eps)
        out = query_chunked_attention(
            q, kv[0].astype(dt), kv[1].astype(dt), inputs.cross_bias, dt, inputs.attention_chunk
        )
        out = project("bhsk,hkd->bsd", out, self.o_proj[...])
        x = x + jnp.tanh(self.cross_attn_attn_gate[...].astype(dt)) * out
        out = self.mlp(self.post_attention_layernorm(x))
        if inputs.cross_rows is not None:
            out = out * inputs.cross_rows.astype(dt)
        return constrain(x + jnp.tanh(self.cross_attn_mlp_gate[...].astype(dt)) * out, RESIDUAL_AXES)


def layer_schedule(cfg: TextConfig):
    """("periodic", before, period, blocks) when the stack is `blocks` repeats of [self x before, cross,
    self x (period - before - 1)]; otherwise ("irregular", runs) with runs a list of ("self", start, stop)
    ranges over the self stack and ("cross", index) entries, in layer order."""
    cross, n = cfg.cross_attention_layers, cfg.num_hidden_layers
    if cross:
        before = cross[0]
        period = cross[1] - cross[0] if len(cross) > 1 else n
        if before < period and n == len(cross) * period and all(c == before + i * period for i, c in enumerate(cross)):
            return ("periodic", before, period, len(cross))
    runs, self_index, run_start = [], 0, 0
    for layer in range(n):
        if layer in cross:
            if self_index > run_start:
                runs.append(("self", run_start, self_index))
            runs.append(("cross", cross.index(layer)))
            run_start = self_index
        else:
            self_index += 1
    if self_index > run_start:
        runs.append(("self", run_start, self_index))
    return ("irregular", runs)


class TextModel(nnx.Module):
    def __init__(
        self,
        cfg: TextConfig,
        dtype,
        rngs: nnx.Rngs,
        remat: str = "none",
        scan_layers: bool = True,
        attention_chunk: int = 0,
    ):
        self.cfg, self.remat, self.scan_layers, self.attention_chunk = cfg, remat, scan_layers, attention_chunk
        d = cfg.hidden_size
        self.embed_tokens = param(rngs, (cfg.embedding_rows, d), ("vocab", "embed"), dtype)

        def layers(make, count):
            if scan_layers:
                return stack_layers(make, count, rngs) if count else None
            return nnx.List([make(rngs) for _ in range(count)])

        self.self_layers = layers(lambda r: SelfAttentionLayer(cfg, dtype, r), len(cfg.self_attention_layers))
        self.cross_layers = layers(lambda r: CrossAttentionLayer(cfg, dtype, r), len(cfg.cross_attention_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps, dtype, rngs)
        self.lm_head = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), dtype)

    @classmethod
    def of(cls, config, rngs: nnx.Rngs) -> TextModel:
        """The decoder of a family's architecture config: its `text`, parameter dtype and training switches."""
        return cls(
            config.text,
            config.jnp_param_dtype,
            rngs,
            remat=config.remat,
            scan_layers=config.scan_layers,
            attention_chunk=config.attention_chunk,
        )

    def cross_kv(self, vision_states: jax.Array) -> dict:
        """Keys/values of every cross-attention layer: {'k', 'v'} of [layers, B, K, N, hd] when the layers are
        scanned; unscanned, a tuple of [B, K, N, hd] per layer (a slice of a stacked array would be copied at
        every step). Either way rows sit 4 axes from the end (see model.take_rows)."""
        if not self.scan_layers:
            k, v = zip(*(layer.kv(vision_states) for layer in self.cross_layers))
            return {"k": tuple(k), "v": tuple(v)}
        graphdef, params = nnx.split(self.cross_layers)
        k, v = jax.vmap(lambda p: nnx.merge(graphdef, p).kv(vision_states))(params)
        return {"k": k, "v": v}

    def __call__(
        self,
        input_ids,
        positions,
        key_valid,
        dtype,
        *,
        cache=None,
        cache_index=None,
        cross_kv=None,
        cross_attention_mask=None,
        num_vision_tokens_per_tile: int = 0,
        return_hidden: bool = False,
        embeddings=None,
    ):
        """input_ids, positions: [B, S]; key_valid: [B, T] (T = S without a cache, the cache length with one).
        `embeddings` [B, S, D], when given, replace the token embeddings of `input_ids` (LLaVA splices image
        features into them). Returns (logits [B, S, V] fp32, updated cache or None); with `return_hidden`, the
        final-norm hidden states [B, S, D] instead of the logits (the training loss applies `logits` chunk by chunk)."""
        b, s = input_ids.shape
        cache_index = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        query_slot = cache_index[..., None] + jnp.arange(s)  # [S], or [B, S] with a cursor per row
        causal = jnp.arange(key_valid.shape[1]) <= query_slot[..., None]
        allowed = causal & key_valid[:, None, :].astype(bool)
        inv_freq = llama3_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_llama3_scaling)
        cos, sin = rope_cos_sin(positions, inv_freq, dtype)
        cross_bias = cross_rows = None
        if cross_kv is not None and cross_attention_mask is not None:
            cross_bias, cross_rows = cross_attention_bias(cross_attention_mask, num_vision_tokens_per_tile)
        inputs = DecoderInputs(
            cos=cos,
            sin=sin,
            self_bias=jnp.where(allowed, 0.0, MASK_VALUE)[:, None, None],
            cache_index=cache_index,
            cross_bias=cross_bias,
            cross_rows=cross_rows,
            attention_chunk=self.attention_chunk,
        )

        x = self.embed(input_ids) if embeddings is None else embeddings
        x, cache = self._layers(x.astype(dtype), inputs, cache, cross_kv)
        x = self.norm(x)
        return (x if return_hidden else self.logits(x)), cache

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, S, D] in the parameters' dtype."""
        return self.embed_tokens[...][input_ids]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-norm hidden states [..., D] -> logits [..., V] in fp32 (the matmul in the hidden states' dtype)."""
        return project("...d,dv->...v", hidden, self.lm_head[...], preferred_element_type=stats_dtype(hidden.dtype))

    def _layers(self, x, inputs: DecoderInputs, cache, cross_kv):
        if not self.scan_layers:
            return self._layer_loop(x, inputs, cache, cross_kv)
        self_graph, self_params = nnx.split(self.self_layers)
        cross_graph, cross_params = nnx.split(self.cross_layers) if self.cross_layers is not None else (None, None)
        num_self = len(self.cfg.self_attention_layers)
        layer_ids = jnp.arange(num_self, dtype=jnp.int32)

        def self_step(stack, carry, xs):
            # The layer's weights are indexed out of `stack` here, inside the (rematerialised) step, not sliced
            # before it: under a gradient a slice is a new array that the backward pass keeps (per block of the
            # periodic scan, that was a second copy of the decoder's weights: 5.5 GiB for 11B in int8). Float
            # leaves of `stack` may be one block's layers (row `index`); integer leaves are always the whole
            # stack (row `layer_id`, see `block`).
            h, kv_cache = carry
            index, layer_id = xs
            layer = nnx.merge(self_graph, jax.tree.map(lambda a: a[layer_id if is_integer(a) else index], stack))
            if kv_cache is None:
                h, _ = layer(h, inputs, None)
                return (h, None), None
            own = (kv_cache["k"][layer_id], kv_cache["v"][layer_id])
            h, (k, v) = layer(h, inputs, own)
            kv_cache = {"k": kv_cache["k"].at[layer_id].set(k), "v": kv_cache["v"].at[layer_id].set(v)}
            return (h, kv_cache), None

        self_step = maybe_remat(self_step, self.remat)
        cross_step = maybe_remat(lambda h, p, kv: nnx.merge(cross_graph, p)(h, inputs, kv), self.remat)

        def run_self(h, kv_cache, stack, start, stop, ids):
            """Self-attention layers stack[start:stop], whose cache rows are `ids`, scanned."""
            if stop == start:
                return h, kv_cache
            step = lambda carry, xs: self_step(stack, carry, xs)
            return jax.lax.scan(step, (h, kv_cache), (jnp.arange(start, stop), ids))[0]

        schedule = layer_schedule(self.cfg)
        if schedule[0] == "periodic":
            _, before, period, blocks = schedule
            per_block = period - 1
            # Float weights enter the scan one block at a time. Integer ones (int8 values: frozen, they have no
            # gradient to accumulate) stay whole and each layer indexes its own: a block's slice would be written
            # out as a new array (0.9 GiB for 11B).
            block_self = jax.tree.map(
                lambda a: None if is_integer(a) else a.reshape(blocks, per_block, *a.shape[1:]), self_params
            )

            def block(carry, xs):
                # The block's few layers are unrolled, not scanned: an inner scan would take the block's slice of
                # the stack as one operand, written out whole.
                block_p, cross_p, ids, kv = xs
                self_p = jax.tree.map(lambda b, a: a if b is None else b, block_p, self_params, is_leaf=is_none)
                for i in range(before):
                    carry, _ = self_step(self_p, carry, (i, ids[i]))
                if cross_kv is not None:
                    carry = (cross_step(carry[0], cross_p, (kv["k"], kv["v"])), carry[1])
                for i in range(before, per_block):
                    carry, _ = self_step(self_p, carry, (i, ids[i]))
                return carry, None

            xs = (block_self, cross_params, layer_ids.reshape(blocks, per_block), cross_kv)
            return jax.lax.scan(block, (x, cache), xs)[0]

        for run in schedule[1]:
            if run[0] == "self":
                x, cache = run_self(x, cache, self_params, run[1], run[2], layer_ids[run[1] : run[2]])
            elif cross_kv is not None:
                j = run[1]
                layer_params = jax.tree.map(lambda a, j=j: a[j], cross_params)
                x = cross_step(x, layer_params, (cross_kv["k"][j], cross_kv["v"][j]))
        return x, cache

    def _layer_loop(self, x, inputs: DecoderInputs, cache, cross_kv):
        """The unscanned schedule: every layer in order, each with its own weight and cache arrays."""
        cross = self.cfg.cross_attention_layers
        new_k, new_v, self_index = [], [], 0
        for layer in range(self.cfg.num_hidden_layers):
            if layer in cross:
                if cross_kv is not None:
                    j = cross.index(layer)
                    x = self.cross_layers[j](x, inputs, (cross_kv["k"][j], cross_kv["v"][j]))
                continue
            own = None if cache is None else (cache["k"][self_index], cache["v"][self_index])
            x, kv = self.self_layers[self_index](x, inputs, own)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
            self_index += 1
        return x, (None if cache is None else {"k": tuple(new_k), "v": tuple(new_v)})


def is_integer(a) -> bool:
    return not jnp.issubdtype(a.dtype, jnp.inexact)


def is_none(a) -> bool:
    return a is None


def cross_attention_bias(cross_attention_mask: jax.Array, tokens_per_tile: int):
    """[B, S, images, tiles] 0/1 mask -> (additive bias [B, 1, 1, S, images * tiles * tokens], row gate [B, S, 1]).

    A text token that sees no tile at all gets a zero bias (it attends uniformly to every vision token) and
    its cross-attention MLP output is zeroed, which is what the reference computes.
    """
    b, s = cross_attention_mask.shape[:2]
    tiles = cross_attention_mask.reshape(b, s, -1).astype(bool)
    rows = jnp.any(tiles, axis=-1, keepdims=True)
    bias = jnp.where(tiles | ~rows, 0.0, MASK_VALUE)
    bias = jnp.broadcast_to(bias[..., None], (*bias.shape, tokens_per_tile)).reshape(b, s, -1)
    return bias[:, None, None], rows
