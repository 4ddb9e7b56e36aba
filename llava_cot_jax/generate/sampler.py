"""Jitted prefill + while-loop decode with a KV cache, and the HF-shaped `generate`.

Layout. Prompts are left-padded into a shape bucket so a handful of compiled programs serve every length.
All rows write the same cache slot at each step (`DecodeState.cursor`); a row that has finished keeps
stepping but marks its slots invalid, so a cache may have holes and stays correct (attention masks by
`key_valid`, RoPE uses per-row `positions`). That is what lets stage search continue any row of a batch
from wherever the previous stage left it without re-running its prefix.

Decoding is one `lax.while_loop` per call: sample → check EOS / stop strings (on the byte suffix, see
`stop.py`) / budget → run the new token through the model. No host round trip per token, the cache is
donated, and the loop exits as soon as every row is done. Image keys/values (`cross_kv`) are computed
once by `encode` and passed in; runs of consecutive rows may share one image's K/V (see `layers.attention`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_cot_jax import sharding as sharding_lib
from llava_cot_jax.generate import stop as stop_lib
from llava_cot_jax.models.mllama import model as model_lib
from llava_cot_jax.models.mllama import quant
from llava_cot_jax.models.mllama.layout import with_scan_layers

# finish reasons per row
RUNNING, FINISH_EOS, FINISH_STOP, FINISH_BUDGET = 0, 1, 2, 3
FINISH_NAMES = {RUNNING: "running", FINISH_EOS: "eos", FINISH_STOP: "stop", FINISH_BUDGET: "budget"}


def bucket_length(n: int, minimum: int = 32, step: int | None = None) -> int:
    """Shape bucket for a length: powers of two up to 1024, then multiples of 512; with `step`, multiples of
    `step` (at least `minimum`): more compiled shapes, less padding to compute."""
    if step:
        return max(minimum, -(-n // step) * step)
    if n <= 1024:
        return max(minimum, 1 << max(0, n - 1).bit_length())
    return -(-n // 512) * 512


# --- state ---------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything needed to continue decoding a batch of rows.

    cache: {'k','v'}: per layer [B, KVH, L, Dh] (model.init_cache); key_valid: [B, L] slots holding real tokens;
    cursor: int32 slot
    the next token is written to (shared by all rows); positions: [B] RoPE position of each row's next token;
    logits: [B, V] float32 logits for each row's next token; xmask: [B, 1, I, T] the tiles a new token sees
    (the last prompt row, as transformers repeats it) or a [B, 1, 1, 1] dummy without images.
    """

    cache: dict
    key_valid: jax.Array
    cursor: jax.Array
    positions: jax.Array
    logits: jax.Array
    xmask: jax.Array

    @property
    def cache_len(self) -> int:
        return self.key_valid.shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutput:
    tokens: jax.Array  # [B, T] int32, pad after a row finished
    num_tokens: jax.Array  # [B] tokens each row produced (EOS included)
    finish: jax.Array  # [B] RUNNING / FINISH_*
    stop_index: jax.Array  # [B] which stop string ended the row (-1 if none)
    logprob_sum: jax.Array  # [B] sum of log p(token) at temperature 1 over the row's tokens (EOS excluded)
    steps: jax.Array  # scalar: loop iterations run (= slots consumed)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Defaults are transformers' (`top_k=50` applies whenever sampling)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    def static(self) -> tuple[bool, int, bool]:
        """What changes the program: sampling at all, the top-k size (0: off) and whether top-p applies.

        k is compiled in so the filter is a `lax.top_k` (linear in the vocabulary) rather than a full sort,
        which costs ~30 ms per step for a 32k vocabulary on XLA:CPU."""
        return (self.do_sample, self.top_k if self.do_sample else 0, self.do_sample and self.top_p < 1.0)

    def values(self) -> np.ndarray:
        return np.asarray([self.temperature, self.top_p], np.float32)


def sample_tokens(logits: jax.Array, key: jax.Array, flags: tuple[bool, int, bool], values: jax.Array) -> jax.Array:
    """Next token per row. transformers' warper order: temperature → top-k → top-p (keeps ≥ 1 token)."""
    do_sample, top_k, use_top_p = flags
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temperature, top_p = values[0], values[1]
    scaled = logits / temperature
    if not (top_k or use_top_p):
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    if top_k and top_k < scaled.shape[-1]:
        ranked, order = jax.lax.top_k(scaled, top_k)  # the k best, in descending order
    else:
        order = jnp.argsort(-scaled, axis=-1)
        ranked = jnp.take_along_axis(scaled, order, axis=-1)
    if use_top_p:
        rank = jnp.arange(ranked.shape[-1])[None, :]
        probs = jax.nn.softmax(ranked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        ranked = jnp.where((mass_before < top_p) | (rank == 0), ranked, -jnp.inf)
    choice = jax.random.categorical(key, ranked, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


# --- streaming (host callback, only compiled in when asked for) ----------------------------------------------

_STREAM_TARGET: list[Callable[[np.ndarray, np.ndarray], None]] = []


def _stream_dispatch(tokens, active):
    if _STREAM_TARGET:
        _STREAM_TARGET[-1](np.asarray(tokens), np.asarray(active))


@contextlib.contextmanager
def streaming(callback: Callable[[np.ndarray, np.ndarray], None]):
    """Within the block, decode loops compiled with `stream=True` call `callback(tokens [B], active [B])` per step."""
    _STREAM_TARGET.append(callback)
    try:
        yield
    finally:
        _STREAM_TARGET.pop()


# --- jitted programs -----------------------------------------------------------------------------------------
#
# Every program takes `rules`: None on one device, or the logical-axis rules (`sharding.inference_rules`) of the
# mesh set by the caller (`jax.set_mesh`). With rules, the weights arrive sharded over the tensor axis and each
# program pins the arrays it returns: KV caches and image K/V [.., B, K, T, hd] with rows over data x fsdp and
# kv heads over tensor (replicated where the tensor axis does not divide them), the rest row-sharded. A state
# returned by one program therefore enters the next one (and the next call of the same one) with the sharding
# it was compiled for: one compiled program per shape, whatever the mesh.

_KV_AXES = ("batch", "kv_heads", None, "head_dim")  # one layer's KV cache / image K/V rows: [B, K, T, hd]


def map_kv_axes(fn, tree):
    """fn(leaf, logical axes) over a KV cache or image K/V tree ([B, K, T, hd] leaves, [layers, ...] when scanned)."""
    return jax.tree.map(lambda x: fn(x, ("layers",) * (x.ndim - 4) + _KV_AXES), tree)


def map_state_axes(fn, state: DecodeState) -> DecodeState:
    """fn(leaf, logical axes) over every array of a decode state: caches as above, everything else by rows."""
    rows = lambda x: fn(x, ("batch",) + (None,) * (x.ndim - 1))
    return DecodeState(
        cache=map_kv_axes(fn, state.cache),
        key_valid=rows(state.key_valid),
        cursor=fn(state.cursor, ()),
        positions=rows(state.positions),
        logits=rows(state.logits),  # replicated over the vocabulary: sampling reads whole rows
        xmask=rows(state.xmask),
    )


def _shard_kv(tree, rules):
    """Pins cache-like leaves to the mesh (no-op on one device: rules None)."""
    if rules is None or tree is None:
        return tree
    return map_kv_axes(lambda x, names: sharding_lib.constrain(x, names, rules), tree)


def _shard_state(state: DecodeState, rules) -> DecodeState:
    if rules is None:
        return state
    return map_state_axes(lambda x, names: sharding_lib.constrain(x, names, rules), state)


def _take_state_rows(state: DecodeState, rows) -> DecodeState:
    """Row r of the result is row `rows[r]` of `state` (None: unchanged)."""
    if rows is None:
        return state
    take = lambda x: jnp.take(x, rows, axis=0)
    return DecodeState(
        cache=model_lib.take_rows(state.cache, rows),
        key_valid=take(state.key_valid),
        cursor=state.cursor,
        positions=take(state.positions),
        logits=take(state.logits),
        xmask=take(state.xmask),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "rules"))
def encode(graphdef, params, pixel_values, aspect_ratio_ids, aspect_ratio_mask, *, rules=None):
    """What decoding reads of an image batch (`model.image_context`), once per batch: Mllama's vision tower,
    projector and every cross-attention layer's K/V; LLaVA's projected image features."""
    model = nnx.merge(graphdef, params)
    return _shard_kv(model.image_context(pixel_values, aspect_ratio_ids, aspect_ratio_mask), rules)


def _extend(model, state: DecodeState, input_ids, attention_mask, cross_kv, cross_attention_mask) -> DecodeState:
    """Runs a chunk of left-padded tokens [B, S] into the cache at the cursor. Positions continue each row's
    own count (`state.positions`), as transformers' `cumsum(attention_mask) - 1` does over the whole row."""
    s = input_ids.shape[1]
    mask = attention_mask.astype(bool)
    positions = state.positions[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    key_valid = jax.lax.dynamic_update_slice(state.key_valid, mask, (0, state.cursor))
    xmask = cross_attention_mask if cross_kv is not None else None
    logits, cache = model.forward_cached(input_ids, positions, state.cache, state.cursor, key_valid, cross_kv, xmask)
    any_new = jnp.any(mask, axis=1)
    return DecodeState(
        cache=cache,
        key_valid=key_valid,
        cursor=state.cursor + s,
        positions=state.positions + jnp.sum(mask, axis=1).astype(jnp.int32),
        logits=jnp.where(any_new[:, None], logits[:, -1].astype(jnp.float32), state.logits),
        xmask=xmask[:, -1:].astype(jnp.int32) if xmask is not None else state.xmask,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "rules"))
def prefill(
    graphdef,
    params,
    input_ids,
    attention_mask,
    cross_kv,
    cross_attention_mask,
    rows=None,
    *,
    cache_len: int,
    rules=None,
) -> DecodeState:
    """Runs left-padded prompts [B, S] into a fresh cache of `cache_len` slots; returns the decode state, with
    row r holding prompt `rows[r]` when `rows` is given (e.g. N candidate rows per question).

    Positions follow transformers (`cumsum(attention_mask) - 1`), so extra left padding changes nothing.
    """
    model = nnx.merge(graphdef, params)
    b = input_ids.shape[0]
    empty = DecodeState(
        cache=_shard_kv(model.init_cache(b, cache_len), rules),
        key_valid=jnp.zeros((b, cache_len), bool),
        cursor=jnp.int32(0),
        positions=jnp.zeros((b,), jnp.int32),
        logits=jnp.zeros((b, model.config.text.vocab_size), jnp.float32),
        xmask=jnp.zeros((b, 1, 1, 1), jnp.int32),
    )
    state = _extend(model, empty, input_ids, attention_mask, cross_kv, cross_attention_mask)
    return _shard_state(_take_state_rows(state, rows), rules)


@functools.partial(jax.jit, static_argnames=("graphdef", "rules"))
def extend(
    graphdef,
    params,
    state: DecodeState,
    input_ids,
    attention_mask,
    cross_kv,
    cross_attention_mask,
    rows=None,
    *,
    rules=None,
) -> DecodeState:
    """Continues rows `rows` of `state` (all of them when None) with a chunk of left-padded tokens [R, S] (the
    cache needs S free slots): e.g. judge prompts continuing the prefilled prefix (question, image,
    instructions) of their question. `state` is kept (not donated): later calls continue it again."""
    state = _take_state_rows(state, rows)
    state = _extend(nnx.merge(graphdef, params), state, input_ids, attention_mask, cross_kv, cross_attention_mask)
    return _shard_state(state, rules)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeArgs:
    """What a decode call runs with besides the weights and the state it continues (see `decode`).

    Array fields are arguments of the compiled loop; the fields marked static (`max_new`, `flags`, `pad_id`,
    `stream`) are part of its pytree structure and so select the program, as static arguments of `jax.jit` do."""

    key: jax.Array  # PRNG key; step i samples with fold_in(key, i)
    sampling_values: jax.Array  # [2] float32: temperature, top_p (Sampling.values)
    stop_table: stop_lib.StopTable
    eos_ids: jax.Array  # [E] int32, -1 entries mean no EOS
    cross_kv: Any  # image K/V of the state's rows, or None without images
    budget: jax.Array  # int32: at most this many tokens per row (<= max_new)
    active: jax.Array  # [B] bool: rows that take part
    keep_last: jax.Array  # bool: run a budget-cut row's last token through the model (a continuation needs it)
    rows: jax.Array | None = None  # [B] int32: row r first takes the state of row rows[r]
    max_new: int = dataclasses.field(metadata={"static": True})  # the token buffer's length
    flags: tuple[bool, int, bool] = dataclasses.field(metadata={"static": True})  # Sampling.static()
    pad_id: int = dataclasses.field(metadata={"static": True})
    stream: bool = dataclasses.field(default=False, metadata={"static": True})  # call the `streaming` target


@functools.partial(jax.jit, static_argnames=("graphdef", "rules"), donate_argnames=("state",))
def decode(graphdef, params, state: DecodeState, args: DecodeArgs, *, rules=None) -> tuple[DecodeState, DecodeOutput]:
    """Decodes up to `min(args.budget, args.max_new)` tokens per row in one while loop.

    With `args.rows`, row r first takes the state of row `rows[r]` (every candidate continues its question's
    winner). A row stops at an EOS id (not written to the cache), at a stop string (the token completing it
    is written, so a later call continues right after it), or at the budget. `keep_last` also runs the
    final token of a budget-cut row through the model, which a continuation needs but plain generation
    does not. Rows with `active` false do nothing. The budget is an argument, not part of the program: one
    compiled loop serves every budget up to `max_new`.
    """
    model = nnx.merge(graphdef, params)
    state = _shard_state(_take_state_rows(state, args.rows), rules)
    b = state.positions.shape[0]
    budget = jnp.minimum(args.budget, jnp.minimum(args.max_new, state.cache_len - state.cursor))
    window, filled = stop_lib.init_window(b, args.stop_table)
    # A model that reads its images only in the prompt (LLaVA) decodes without them.
    step_images = args.cross_kv if model.cross_attends_images else None
    xmask = state.xmask if step_images is not None else None

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < budget) & ~jnp.all(done)

    def body(carry):
        i, st, out, done, window, filled = carry
        logp = jax.nn.log_softmax(st.logits, axis=-1)
        token = sample_tokens(st.logits, jax.random.fold_in(args.key, i), args.flags, args.sampling_values)
        token = jnp.where(done, args.pad_id, token)
        is_eos = jnp.any(token[:, None] == args.eos_ids[None, :], axis=-1) & ~done
        window, filled, hit = stop_lib.step(args.stop_table, window, filled, token)
        hit_any = jnp.any(hit, axis=-1) & ~done & ~is_eos
        last = (i + 1 >= budget) & ~done & ~is_eos & ~hit_any
        finish = jnp.where(
            is_eos, FINISH_EOS, jnp.where(hit_any, FINISH_STOP, jnp.where(last, FINISH_BUDGET, out.finish))
        )
        new_done = done | is_eos | hit_any | last
        write = ~done & ~is_eos  # EOS ends a row without entering its context
        out = DecodeOutput(
            tokens=out.tokens.at[:, i].set(token),
            num_tokens=out.num_tokens + (~done).astype(jnp.int32),
            finish=finish,
            stop_index=jnp.where(hit_any, jnp.argmax(hit, axis=-1), out.stop_index),
            logprob_sum=out.logprob_sum
            + jnp.where(write, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], 0.0),
            steps=i + 1,
        )
        if args.stream:
            jax.debug.callback(_stream_dispatch, token, ~done, ordered=True)

        def run_model(st):
            key_valid = st.key_valid.at[:, st.cursor].set(write)
            logits, cache = model.forward_cached(
                token[:, None], st.positions[:, None], st.cache, st.cursor, key_valid, step_images, xmask
            )
            return DecodeState(
                cache=_shard_kv(cache, rules),
                key_valid=key_valid,
                cursor=st.cursor + 1,
                positions=st.positions + write.astype(jnp.int32),
                logits=jnp.where(write[:, None], logits[:, 0], st.logits),
                xmask=st.xmask,
            )

        # The model step is needed while any row goes on, or to absorb stop tokens / cut rows for a continuation.
        needed = jnp.any(~new_done) | jnp.any(hit_any) | (args.keep_last & jnp.any(last))
        st = jax.lax.cond(needed, run_model, lambda st: st, st)
        return i + 1, st, out, new_done, window, filled

    out = DecodeOutput(
        tokens=jnp.full((b, args.max_new), args.pad_id, jnp.int32),
        num_tokens=jnp.zeros((b,), jnp.int32),
        finish=jnp.zeros((b,), jnp.int32),
        stop_index=jnp.full((b,), -1, jnp.int32),
        logprob_sum=jnp.zeros((b,), jnp.float32),
        steps=jnp.int32(0),
    )
    done = (budget <= 0) | ~args.active  # inactive rows (e.g. finished questions) take no part
    carry = (jnp.int32(0), state, out, done, window, filled)
    _, state, out, _, _, _ = jax.lax.while_loop(cond, body, carry)
    return state, out


def compile_count() -> int:
    """How many programs the jitted entry points above hold (for tests that count compilations)."""
    return sum(f._cache_size() for f in (encode, prefill, extend, decode))


# --- host-side helpers ---------------------------------------------------------------------------------------


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray, bucket: int, pad_id: int, *extra):
    """Left-pads each row of [B, S] arrays into [B, bucket], moving right padding (if any) to the left.

    `extra` arrays share the first two axes with input_ids and are padded with zeros.
    """
    b, s = input_ids.shape
    if bucket < s:
        raise ValueError(f"bucket {bucket} < prompt length {s}")
    lengths = attention_mask.sum(axis=1)
    ids = np.full((b, bucket), pad_id, input_ids.dtype)
    mask = np.zeros((b, bucket), np.int32)
    extras = [np.zeros((b, bucket) + e.shape[2:], e.dtype) for e in extra]
    for r in range(b):
        keep = np.flatnonzero(attention_mask[r])
        n = len(keep)
        if n == 0:
            raise ValueError(f"row {r} has no tokens")
        ids[r, bucket - n :] = input_ids[r, keep]
        mask[r, bucket - n :] = 1
        for src, dst in zip(extra, extras):
            dst[r, bucket - n :] = src[r, keep]
    return ids, mask, lengths, extras


class Sampler:
    """A model prepared for decoding: its split parameters, stop tables and EOS/pad ids.

    The parameters are split once; every jitted program is keyed on the (hashable) graph definition, so
    several Samplers over models of the same shape share compiled code. Decoding runs the text layers as a
    Python loop over per-layer weights (`scan_layers=False`): a scanned layer's weight slice is copied before
    every matmul, which triples the bytes a batch-1 decode step reads on CPU. A scanned model is converted
    (a copy of its weights); load with `scan_layers=False` to avoid the copy. `scan_layers=True` keeps (or
    makes) the layers scanned: compile time then does not grow with depth (see docs/results/meshes.md for the TPU case).

    With a `mesh` (`sharding.make_mesh(data=..., tensor=...)`) the weights are placed by the logical-axis rules
    (`sharding.inference_rules`: tensor parallelism over heads, kv heads, MLP and vocabulary; FSDP over the
    embedding if the mesh has an fsdp axis) and every program runs on the mesh with the rows of a batch split
    over data x fsdp; results equal the single-device ones. `quantize="int8"` decodes with int8 text-decoder
    weights (`models/mllama/quant.py`; a model loaded with `quantize="int8"` already has them).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        eos_token_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        scan_layers: bool = False,
        quantize: str | None = None,
    ):
        model = with_scan_layers(model, scan_layers)
        self.model = model
        self.graphdef, self.params = nnx.split(model)
        text = model.config.text
        self.mesh = mesh
        self.rules = None
        if mesh is not None:
            self.rules = sharding_lib.inference_rules(text.num_key_value_heads, mesh)
            self.params = jax.device_put(self.params, quant.param_shardings(self.params, mesh, self.rules))
        if quantize:  # after placement: each matrix is quantized where its shards live
            self.params = quant.quantize_state(self.params)
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(text.eos_token_id if eos_token_ids is None else eos_token_ids)
        self.pad_token_id = text.pad_token_id if pad_token_id is None else pad_token_id
        self.vocab_size = text.vocab_size
        self._vocab_bytes = None
        self._tables: dict[tuple[str, ...], stop_lib.StopTable] = {}

    def on_mesh(self):
        """The context every program runs in: the sampler's mesh set (`jax.set_mesh`), or nothing on one device."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # stop tables are built once per set of strings and padded to a common shape (one compiled loop)
    STOP_WINDOW, STOP_SLOTS = 32, 4

    def stop_table(self, stop_strings: Sequence[str] = ()) -> stop_lib.StopTable:
        key = tuple(stop_strings)
        if key not in self._tables:
            if self._vocab_bytes is None:
                if self.tokenizer is None:
                    vocab = [b""] * self.vocab_size
                    if key:
                        raise ValueError("stop strings need a tokenizer")
                else:
                    vocab = stop_lib.token_bytes(self.tokenizer)[: self.vocab_size]
                    vocab += [b""] * (self.vocab_size - len(vocab))
                self._vocab_bytes = vocab
            window = max(self.STOP_WINDOW, max([len(s.encode()) for s in key], default=1))
            slots = max(self.STOP_SLOTS, len(key))
            self._tables[key] = stop_lib.build_stop_table(self._vocab_bytes, key, window=window, num_slots=slots)
        return self._tables[key]

    def eos_array(self, eos_ids: Sequence[int] | None) -> np.ndarray:
        ids = list(eos_ids or [])
        return np.asarray((ids + [-1] * 4)[: max(4, len(ids))], np.int32)

    def encode_images(self, pixel_values, aspect_ratio_ids=None, aspect_ratio_mask=None):
        """The image context of a batch of prompts' images (Mllama's take aspect-ratio ids and mask)."""
        if self.model.cross_attends_images:
            if aspect_ratio_mask is None:
                aspect_ratio_mask = np.ones(np.shape(pixel_values)[:3], np.int32)
            aspect_ratio_ids, aspect_ratio_mask = np.asarray(aspect_ratio_ids), np.asarray(aspect_ratio_mask)
        with self.on_mesh():
            return encode(
                self.graphdef,
                self.params,
                np.asarray(pixel_values),
                aspect_ratio_ids,
                aspect_ratio_mask,
                rules=self.rules,
            )

    def _image_mask(self, cross_kv, cross_attention_mask):
        """The cross-attention mask a call runs with: required with images by a model that cross-attends."""
        if cross_kv is None or not self.model.cross_attends_images:
            return None
        if cross_attention_mask is None:
            raise ValueError("cross_attention_mask is required with images")
        return np.asarray(cross_attention_mask)

    def prefill(
        self, input_ids, attention_mask, cross_kv=None, cross_attention_mask=None, *, cache_len: int, rows=None
    ):
        """A fresh decode state of `cache_len` slots holding the prompts [B, S]; with `rows` [R], row r holds
        prompt `rows[r]` (computed once per prompt)."""
        xmask = self._image_mask(cross_kv, cross_attention_mask)
        with self.on_mesh():
            return prefill(
                self.graphdef,
                self.params,
                np.asarray(input_ids),
                np.asarray(attention_mask),
                cross_kv,
                xmask,
                _rows(rows),
                cache_len=cache_len,
                rules=self.rules,
            )

    def extend(self, state, input_ids, attention_mask, cross_kv=None, cross_attention_mask=None, rows=None):
        """A new state: rows `rows` of `state` (all when None) continued by the chunk [R, S]; `state` is kept."""
        xmask = self._image_mask(cross_kv, cross_attention_mask)
        with self.on_mesh():
            return extend(
                self.graphdef,
                self.params,
                state,
                np.asarray(input_ids),
                np.asarray(attention_mask),
                cross_kv,
                xmask,
                _rows(rows),
                rules=self.rules,
            )

    def decode(
        self,
        state,
        *,
        max_new: int,
        sampling: Sampling,
        seed: int | jax.Array = 0,
        stop_strings=(),
        eos_ids: Sequence[int] | None = (),
        cross_kv=None,
        budget: int | None = None,
        keep_last=False,
        stream=False,
        active=None,
        rows=None,
    ):
        """Decodes from `state` (donated): at most `budget` tokens per row (default `max_new`, which sizes the
        program's token buffer; calls with the same `max_new` share one program whatever their budget). With
        `rows`, row r first takes the state of row `rows[r]`."""
        key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
        active = np.ones(state.positions.shape, bool) if active is None else np.asarray(active, bool)
        args = DecodeArgs(
            key=key,
            sampling_values=sampling.values(),
            stop_table=self.stop_table(stop_strings),
            eos_ids=self.eos_array(eos_ids),
            cross_kv=cross_kv,
            budget=np.int32(max_new if budget is None else budget),
            active=active,
            keep_last=np.bool_(keep_last),
            rows=_rows(rows),
            max_new=max_new,
            flags=sampling.static(),
            pad_id=int(self.pad_token_id),
            stream=stream,
        )
        with self.on_mesh():
            return decode(self.graphdef, self.params, state, args, rules=self.rules)


def _rows(rows):
    return None if rows is None else np.asarray(rows, np.int32)


_DEFAULT = object()


def generate(
    model,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    aspect_ratio_ids=None,
    aspect_ratio_mask=None,
    cross_attention_mask=None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    eos_token_id: Any = _DEFAULT,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    tokenizer=None,
    seed: int = 0,
    streamer: Callable[[np.ndarray, np.ndarray], None] | None = None,
    sampler: Sampler | None = None,
    mesh: jax.sharding.Mesh | None = None,
    return_dict: bool = False,
    **unused,
):
    """transformers-style generation: returns token ids [batch, prompt + new] (numpy int32).

    Inputs are the processor's keys. Prompts are left-aligned (right padding is moved to the left) and
    padded into a length bucket. `eos_token_id` defaults to the model config's EOS ids; `None` runs the
    full `max_new_tokens`. Rows that finish early are filled with `pad_token_id`; the result is as long as
    the longest row, as transformers returns it. `stop_strings` (needs `tokenizer`) end a row at the token
    that completes the string. `streamer(tokens [B], active [B])` is called on the host at every step.
    With `return_dict=True` returns a dict with `sequences` and per-row `num_tokens`, `finish`.
    Without `sampler=`, each call prepares the model for decoding (for a scanned model that is a copy of its
    weights, see `Sampler`): for repeated calls build `Sampler(model)` once and pass it. `mesh` runs on a device
    mesh (see `Sampler`). The cache is sized for `max_new_tokens` rounded up to a power of two, so nearby
    budgets share compiled programs.
    """
    unknown = {k for k, v in unused.items() if v is not None and k not in ("use_cache", "num_beams")}
    if unknown or unused.get("num_beams", 1) not in (1, None):
        raise TypeError(f"unsupported generate arguments: {sorted(unknown) or 'num_beams'}")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    sampler = sampler or Sampler(model, tokenizer=tokenizer, pad_token_id=pad_token_id, mesh=mesh)
    if eos_token_id is _DEFAULT:
        eos_ids = sampler.eos_token_ids
    elif eos_token_id is None:
        eos_ids = ()
    else:
        eos_ids = (eos_token_id,) if np.isscalar(eos_token_id) else tuple(eos_token_id)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]

    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    s = input_ids.shape[1]
    bucket = bucket_length(s)
    has_images = pixel_values is not None
    cross_attends = has_images and sampler.model.cross_attends_images
    if cross_attends and cross_attention_mask is None:
        raise ValueError("cross_attention_mask is required with pixel_values")
    extra = [np.asarray(cross_attention_mask)] if cross_attends else []
    ids, mask, _, extras = left_align(input_ids, attention_mask, bucket, sampler.pad_token_id, *extra)

    cross_kv = sampler.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask) if has_images else None
    max_new = bucket_length(max_new_tokens)  # the program's size; the budget below is exact
    state = sampler.prefill(ids, mask, cross_kv, extras[0] if extras else None, cache_len=bucket + max_new)
    sampling = Sampling(do_sample=do_sample, temperature=temperature, top_p=top_p if do_sample else 1.0, top_k=top_k)
    context = streaming(streamer) if streamer else contextlib.nullcontext()
    with context:
        _, out = sampler.decode(
            state,
            max_new=max_new,
            budget=max_new_tokens,
            sampling=sampling,
            seed=seed,
            stop_strings=tuple(stop_strings or ()),
            eos_ids=eos_ids,
            cross_kv=cross_kv,
            stream=streamer is not None,
        )
    steps = int(out.steps)
    new = np.asarray(out.tokens)[:, :steps]
    prompt = ids[:, bucket - s :]
    if not np.array_equal(mask[:, bucket - s :].sum(1), mask.sum(1)):
        raise AssertionError("left alignment lost tokens")
    sequences = np.concatenate([prompt, new], axis=1)
    if return_dict:
        return {"sequences": sequences, "num_tokens": np.asarray(out.num_tokens), "finish": np.asarray(out.finish)}
    return sequences
