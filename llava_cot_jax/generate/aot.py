"""The inference programs of a stage search, described for ahead-of-time compilation (`tools/aot_compile.py`).

`programs(config, mesh)` builds the model abstractly (`nnx.eval_shape`: nothing is allocated, so 90B is as quick
as the tiny model), places it with the decoding rules, and describes the programs one question runs, at the shapes
the search itself computes (`stage_search.search_shapes`): the vision encoder, the question prefill (N candidate
rows), the candidate decode loop, and the judge's prefix prefill, extend and decode loop. Each program notes the
GiB per device of what the analysis can name: weights, KV cache and image K/V.

Config keys (configs/infer.py): the `model` group (`model.preset` for an architecture without weights: 11b,
90b, bench, tiny; else the architecture of `model.weights`; dtype, scan_layers, quantize), `batch_size`
(questions searched together), the `search` group (N and the budgets) and the `mesh` group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llava_cot_jax import aot, loading
from llava_cot_jax import sharding as sharding_lib
from llava_cot_jax.aot import gib_per_device
from llava_cot_jax.generate import config as generate_config
from llava_cot_jax.generate import judge as judge_lib
from llava_cot_jax.generate import sampler as sampler_lib
from llava_cot_jax.generate import stage_search
from llava_cot_jax.generate import stop as stop_lib
from llava_cot_jax.models.mllama import quant

QUESTION_TOKENS = 64  # the question length the judge shapes are computed for (one judge bucket step)


def _processor(config, model_cfg):
    """The checkpoint's processor for the judge template lengths, else one with the tiny byte-level tokenizer: it
    spends more tokens on the same text than Llama 3's, so the shapes it gives are upper bounds."""
    if config.model.weights or config.model.processor:
        return loading.load_processor(config.model), "checkpoint tokenizer"
    # pylint: disable=g-import-not-at-top
    from llava_cot_jax.data.image import MllamaImageProcessor
    from llava_cot_jax.data.processor import MllamaProcessor
    from llava_cot_jax.data.tokenizer import build_tiny_tokenizer

    image = MllamaImageProcessor(size=model_cfg.vision.image_size, max_image_tiles=model_cfg.vision.max_num_tiles)
    return MllamaProcessor(image, build_tiny_tokenizer()), "tiny tokenizer (an upper bound on Llama-3 lengths)"


def programs(config, mesh) -> list[aot.Program]:
    model_cfg = loading.arch_config(config.model).replace(scan_layers=config.model.scan_layers)
    search = generate_config.search_config(config.search, config.seed)
    n, questions = search.num_candidates, int(config.get("batch_size", 1))
    processor, tokenizer_note = _processor(config, model_cfg)
    prompts = judge_lib.JudgePrompts.load(search.prompts_file)
    shapes = stage_search.search_shapes(
        search, prompts, processor, stage_search.MIN_PROMPT_BUCKET, QUESTION_TOKENS, n, max_images=1
    )
    print(
        f"model {config.model.weights or config.model.preset} {model_cfg.param_dtype} {config.model.quantize}, "
        f"scan_layers={model_cfg.scan_layers}; {questions} question(s) x {n} candidates; {shapes}; judge lengths "
        f"from the {tokenizer_note}"
    )

    rules = sharding_lib.inference_rules(model_cfg.text.num_key_value_heads, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    graphdef, state = nnx.split(loading.abstract_model(model_cfg))
    if config.model.quantize:
        state = jax.eval_shape(quant.quantize_state, state)
    shardings = quant.param_shardings(state, mesh, rules)
    params = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, shardings)
    weights = gib_per_device(params)

    def placed(tree, axes_map):
        """Abstract arrays of `tree` (from jax.eval_shape) with the shardings the programs pin them to."""
        spec = lambda x, names: NamedSharding(mesh, sharding_lib.dividing_spec(x.shape, names, mesh, rules))
        return axes_map(lambda x, names: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec(x, names)), tree)

    def array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    v = model_cfg.vision
    pixels = (
        array((questions, 1, v.max_num_tiles, v.num_channels, v.image_size, v.image_size), jnp.float32),
        array((questions, 1), jnp.int32),
        array((questions, 1, v.max_num_tiles), jnp.int32),
    )
    # The stop table's shapes (its values do not matter here); built before the abstract mesh is set, under which
    # no concrete array can be made.
    vocab = [b""] * model_cfg.text.vocab_size
    table = stop_lib.build_stop_table(
        vocab, ("</SUMMARY>",), window=sampler_lib.Sampler.STOP_WINDOW, num_slots=sampler_lib.Sampler.STOP_SLOTS
    )
    table = jax.tree.map(lambda x: array(x.shape, x.dtype), table)
    result = []
    with jax.set_mesh(mesh):
        cross_kv = placed(
            jax.eval_shape(lambda p, *x: sampler_lib.encode(graphdef, p, *x), params, *pixels), sampler_lib.map_kv_axes
        )
        image_kv = gib_per_device(cross_kv)
        result.append(
            aot.Program(
                f"encode image x{questions}",
                sampler_lib.encode,
                (graphdef, params, *pixels),
                {"rules": rules},
                {"weights": weights, "image_kv": image_kv},
            )
        )

        def prefill_program(name, rows_in, length, cache_len, rows_out, with_image=True):
            ids, mask = array((rows_in, length), jnp.int32), array((rows_in, length), jnp.int32)
            xmask = array((rows_in, length, 1, v.max_num_tiles), jnp.int32) if with_image else None
            rows = array((rows_out,), jnp.int32)
            kv = cross_kv if with_image else None
            args = (params, ids, mask, kv, xmask, rows)
            out = jax.eval_shape(lambda *a: sampler_lib.prefill(graphdef, *a, cache_len=cache_len, rules=rules), *args)
            decode_state = placed(out, sampler_lib.map_state_axes)
            notes = {"weights": weights, "kv_cache": gib_per_device(decode_state.cache), "image_kv": image_kv}
            program = aot.Program(
                name, sampler_lib.prefill, (graphdef, *args), {"cache_len": cache_len, "rules": rules}, notes
            )
            return program, decode_state

        def decode_program(name, decode_state, rows, max_new):
            key = jax.eval_shape(lambda: jax.random.key(0))
            sampling = sampler_lib.Sampling(
                do_sample=True, temperature=search.temperature, top_p=search.top_p, top_k=search.top_k
            )
            args = sampler_lib.DecodeArgs(
                key=array(key.shape, key.dtype),
                sampling_values=array((2,), jnp.float32),
                stop_table=table,
                eos_ids=array((4,), jnp.int32),
                cross_kv=cross_kv,
                budget=array((), jnp.int32),
                active=array((rows,), jnp.bool_),
                keep_last=array((), jnp.bool_),
                rows=array((rows,), jnp.int32),
                max_new=max_new,
                flags=sampling.static(),
                pad_id=0,
            )
            notes = {"weights": weights, "kv_cache": gib_per_device(decode_state.cache), "image_kv": image_kv}
            return aot.Program(
                name, sampler_lib.decode, (graphdef, params, decode_state, args), {"rules": rules}, notes
            )

        rows = questions * n
        program, candidates = prefill_program(
            f"prefill question {rows}x{shapes.cache_len}", questions, shapes.prompt, shapes.cache_len, rows
        )
        result.append(program)
        result.append(
            decode_program(
                f"decode candidates {rows}x{shapes.cache_len}", candidates, rows, search.stage_max_new_tokens
            )
        )
        if n > 1 and "compare" in shapes.judge.prefix:
            judge_rows = questions * shapes.judge.rows["compare"]
            length, cache_len = shapes.judge.prefix["compare"], shapes.judge.cache_len
            program, prefix = prefill_program(
                f"prefill judge prefix {questions}x{cache_len}", questions, length, cache_len, questions
            )
            result.append(program)
            rest = shapes.judge.rest["compare"]
            ids, mask = array((judge_rows, rest), jnp.int32), array((judge_rows, rest), jnp.int32)
            xmask = array((judge_rows, rest, 1, v.max_num_tiles), jnp.int32)
            args = (params, prefix, ids, mask, cross_kv, xmask, array((judge_rows,), jnp.int32))
            out = jax.eval_shape(lambda *a: sampler_lib.extend(graphdef, *a, rules=rules), *args)
            judges = placed(out, sampler_lib.map_state_axes)
            notes = {"weights": weights, "kv_cache": gib_per_device(prefix.cache) + gib_per_device(judges.cache)}
            result.append(
                aot.Program(
                    f"extend judges {judge_rows}x{rest}", sampler_lib.extend, (graphdef, *args), {"rules": rules}, notes
                )
            )
            result.append(
                decode_program(
                    f"decode judges {judge_rows}x{cache_len}", judges, judge_rows, search.judge_max_new_tokens
                )
            )
    return result
