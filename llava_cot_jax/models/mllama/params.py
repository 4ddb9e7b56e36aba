"""The one table between HF Mllama tensor names and this model's parameters, used in both directions.

`hf_table(config)` lists every tensor an HF checkpoint of that architecture holds: its Hub name, where it
lives here (a parameter path and, for stacked layers, the index on the "layers" axis) and how its layout
changes (HF Linear weights are [out, in]; ours are [in, out] with attention heads split out).
Loading reads safetensors tensor by tensor with numpy (no torch) into preallocated arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from flax import nnx

from llava_cot_jax.models.mllama import layout
from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama.model import MllamaForConditionalGeneration


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one tensor's layout differs between HF and here. `to_ours`/`to_hf` are exact (transposes and
    reshapes only), so HF -> here -> HF is bit-exact."""

    name: str
    to_ours: Callable[[np.ndarray, tuple], np.ndarray]  # (hf array, our shape) -> our array
    to_hf: Callable[[np.ndarray], np.ndarray]  # our array -> hf array

    def hf_shape(self, our_shape: tuple) -> tuple:
        return self.to_hf(np.empty(our_shape, np.int8)).shape


SAME = Layout("same", lambda a, shape: a, lambda a: a)
# nn.Linear [out, in] <-> [in, out]
LINEAR = Layout("linear", lambda a, shape: a.T, lambda a: a.T)
# q/k/v projections [heads * head_dim, embed] <-> [embed, heads, head_dim]
HEADS_OUT = Layout("heads_out", lambda a, shape: a.T.reshape(shape), lambda a: a.reshape(a.shape[0], -1).T)
# o projection [embed, heads * head_dim] <-> [heads, head_dim, embed]
HEADS_IN = Layout("heads_in", lambda a, shape: a.T.reshape(shape), lambda a: a.reshape(-1, a.shape[-1]).T)
# patch conv [embed, channels, p, p] <-> [channels * p * p, embed]
CONV = Layout("conv", lambda a, shape: a.reshape(a.shape[0], -1).T, None)  # to_hf set per config below


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]  # parameter path in the model's nnx state
    index: int | None  # position on the stacked "layers" axis, None for unstacked parameters
    layout: Layout


@functools.lru_cache(maxsize=8)  # read-only; built once per config, not once per streamed parameter
def hf_table(config: MllamaConfig) -> dict[str, Entry]:
    """Every tensor of an HF Mllama checkpoint (Hub key names) -> where it lives in this model."""
    v, t = config.vision, config.text
    conv = dataclasses.replace(
        CONV, to_hf=lambda a: a.T.reshape(v.hidden_size, v.num_channels, v.patch_size, v.patch_size)
    )
    table: dict[str, Entry] = {}

    def add(hf_name, path, layout=SAME, index=None):
        table[hf_name] = Entry(tuple(path), index, layout)

    vm = "vision_model"
    add(f"{vm}.patch_embedding.weight", (vm, "patch_embedding"), conv)
    add(f"{vm}.class_embedding", (vm, "class_embedding"))
    add(f"{vm}.gated_positional_embedding.embedding", (vm, "gated_positional_embedding", "embedding"))
    add(f"{vm}.gated_positional_embedding.gate", (vm, "gated_positional_embedding", "gate"))
    add(f"{vm}.gated_positional_embedding.tile_embedding.weight", (vm, "gated_positional_embedding", "tile_embedding"))
    for name in ("pre_tile_positional_embedding", "post_tile_positional_embedding"):
        add(f"{vm}.{name}.embedding.weight", (vm, name, "embedding"))
        add(f"{vm}.{name}.gate", (vm, name, "gate"))
    for name in ("layernorm_pre", "layernorm_post"):
        add(f"{vm}.{name}.weight", (vm, name, "scale"))
        add(f"{vm}.{name}.bias", (vm, name, "bias"))
    for stack, count, gated in (
        ("transformer", v.num_hidden_layers, False),
        ("global_transformer", v.num_global_layers, True),
    ):
        for i in range(count):
            hf, ours = f"{vm}.{stack}.layers.{i}", (vm, stack)
            for proj in ("q_proj", "k_proj", "v_proj"):
                add(f"{hf}.self_attn.{proj}.weight", (*ours, proj), HEADS_OUT, i)
            add(f"{hf}.self_attn.o_proj.weight", (*ours, "o_proj"), HEADS_IN, i)
            for fc in ("fc1", "fc2"):
                add(f"{hf}.mlp.{fc}.weight", (*ours, fc), LINEAR, i)
                add(f"{hf}.mlp.{fc}.bias", (*ours, f"{fc}_bias"), SAME, i)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                add(f"{hf}.{norm}.weight", (*ours, norm, "scale"), SAME, i)
                add(f"{hf}.{norm}.bias", (*ours, norm, "bias"), SAME, i)
            if gated:
                add(f"{hf}.gate_attn", (*ours, "gate_attn"), SAME, i)
                add(f"{hf}.gate_ffn", (*ours, "gate_ffn"), SAME, i)

    add("multi_modal_projector.weight", ("multi_modal_projector",), LINEAR)
    add("multi_modal_projector.bias", ("multi_modal_projector_bias",))

    lm = "language_model"
    add(f"{lm}.model.embed_tokens.weight", (lm, "embed_tokens"))
    add(f"{lm}.model.norm.weight", (lm, "norm", "scale"))
    add(f"{lm}.lm_head.weight", (lm, "lm_head"), LINEAR)
    for layer in range(t.num_hidden_layers):
        hf = f"{lm}.model.layers.{layer}"
        if layer in t.cross_attention_layers:
            i, ours, attn = t.cross_attention_layers.index(layer), (lm, "cross_layers"), "cross_attn"
            add(f"{hf}.cross_attn.q_norm.weight", (*ours, "q_norm"), SAME, i)
            add(f"{hf}.cross_attn.k_norm.weight", (*ours, "k_norm"), SAME, i)
            add(f"{hf}.cross_attn_attn_gate", (*ours, "cross_attn_attn_gate"), SAME, i)
            add(f"{hf}.cross_attn_mlp_gate", (*ours, "cross_attn_mlp_gate"), SAME, i)
        else:
            i, ours, attn = t.self_attention_layers.index(layer), (lm, "self_layers"), "self_attn"
        add_decoder_layer(add, hf, ours, i, attn)
    return table


def add_decoder_layer(add, hf: str, ours: tuple[str, ...], index: int, attn: str = "self_attn") -> None:
    """The entries of one Llama decoder layer (attention `attn`, SwiGLU MLP, two RMSNorms) at `index` of the stack
    `ours`: Mllama's self- and cross-attention layers and LLaVA's layers alike."""
    for proj in ("q_proj", "k_proj", "v_proj"):
        add(f"{hf}.{attn}.{proj}.weight", (*ours, proj), HEADS_OUT, index)
    add(f"{hf}.{attn}.o_proj.weight", (*ours, "o_proj"), HEADS_IN, index)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        add(f"{hf}.mlp.{proj}.weight", (*ours, "mlp", proj), LINEAR, index)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        add(f"{hf}.{norm}.weight", (*ours, norm, "scale"), SAME, index)


# transformers >= 4.52 saves `model.language_model.*`, `model.vision_model.*`, `model.multi_modal_projector.*`
# and a top-level `lm_head`; the Hub checkpoints use the older names above.
_NEW_TO_HUB = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^model\.vision_model\."), "vision_model."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
)


def rename(name: str, rules) -> str:
    """`name` with the first of `rules` ((pattern, replacement), ...) that matches its start applied."""
    for pattern, replacement in rules:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


def hub_name(name: str) -> str:
    """Maps either naming scheme to the Hub's."""
    return rename(name, _NEW_TO_HUB)


def new_name(name: str) -> str:
    """A Hub name in transformers >= 4.52's scheme (the module names of a model built by today's transformers)."""
    for pattern, replacement in _NEW_TO_HUB:
        if name.startswith(replacement):
            return pattern.pattern.lstrip("^").replace("\\.", ".") + name[len(replacement) :]
    return name


def abstract_params(
    config, model_class=MllamaForConditionalGeneration
) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every parameter, by path, without allocating anything."""
    stacked = config.replace(scan_layers=True)  # the on-disk layout is always the stacked one
    abstract = nnx.eval_shape(lambda: model_class(stacked, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {tuple(str(k) for k in path): (tuple(var.shape), np.dtype(var.dtype)) for path, var in flat}


# ------------------------------------------------------------------------------------------- reading HF


def safetensors_files(hf_dir: str) -> list[str]:
    """The checkpoint's shards: from `model.safetensors.index.json` if present, else every *.safetensors."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise layout.CheckpointError(f"no *.safetensors files in {hf_dir}")
    return [os.path.join(hf_dir, f) for f in files]


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """(tensor entries of a safetensors file, offset of its data section), checked against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise layout.CheckpointError(f"cannot read {path}: file too short for a safetensors header (truncated?)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise layout.CheckpointError(
                f"cannot read {path}: header of {n} bytes exceeds the file (truncated or corrupt?)"
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise layout.CheckpointError(f"cannot read {path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        end = info["data_offsets"][1]
        if end > data_size:
            raise layout.CheckpointError(
                f"cannot read {path}: tensor {name} ends at byte {end} but the data section has "
                f"{data_size} bytes (truncated or corrupt safetensors file?)"
            )
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise layout.CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    return header, 8 + n


def stored_dtype(hf_dir: str) -> str:
    """The dtype a checkpoint stores its weights in (that of its first tensor)."""
    header, _ = read_safetensors_header(safetensors_files(hf_dir)[0])
    return _SAFETENSORS_DTYPES[next(iter(header.values()))["dtype"]]


def iter_hf_tensors(hf_dir: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """Yields (file, name as stored, numpy array), one tensor at a time.

    Each tensor is read with a plain file read rather than through a memory map, so resident memory holds
    the converted weights plus one tensor, not also the pages of the shard being read."""
    import ml_dtypes  # pylint: disable=g-import-not-at-top  (registers bfloat16 with numpy)

    del ml_dtypes
    for path in safetensors_files(hf_dir):
        if not os.path.exists(path):
            raise layout.CheckpointError(f"shard {path} listed in the index is missing")
        header, data_start = read_safetensors_header(path)
        with open(path, "rb") as f:
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]
                dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
                if (end - begin) != dtype.itemsize * int(np.prod(info["shape"], dtype=np.int64)):
                    raise layout.CheckpointError(
                        f"{path}: tensor {name} has {end - begin} bytes for shape {info['shape']} "
                        f"{info['dtype']} (corrupt header?)"
                    )
                f.seek(data_start + begin)
                array = np.empty(info["shape"], dtype)
                if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != end - begin:
                    raise layout.CheckpointError(f"cannot read {path}: tensor {name} is cut short (truncated file?)")
                yield path, name, array


def load_hf_params(hf_dir: str, config: MllamaConfig, dtype=None, progress=None) -> dict[tuple[str, ...], np.ndarray]:
    """Reads an HF checkpoint into {parameter path: numpy array} in our layout (see `read_by_table`).
    `dtype` converts each tensor as it is read (default: the config's param_dtype)."""
    target_dtype = np.dtype(dtype or config.param_dtype)
    return read_by_table(
        iter_hf_tensors(hf_dir), hf_dir, hf_table(config), abstract_params(config), target_dtype, hub_name, progress
    )


def read_by_table(
    tensors: Iterable[tuple[str, str, np.ndarray]],
    where: str,
    table: dict[str, Entry],
    shapes: dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]],
    target_dtype: np.dtype,
    rename: Callable[[str], str],
    progress=None,
    ignored: Callable[[str], bool] = lambda name: False,
) -> dict[tuple[str, ...], np.ndarray]:
    """Reads `tensors` ((file, stored name, array), e.g. `iter_hf_tensors(dir)`) that `table` names (after `rename`)
    into preallocated arrays of `shapes`, converted to `target_dtype`; any family's weight reader is this with its
    own table. `where` names the checkpoint in errors.

    Every problem is collected and reported at once: tensors the architecture does not have (unless `ignored`),
    tensors it needs but the checkpoint lacks, and shape mismatches (with expected and found shapes)."""
    out = {path: np.empty(shape, target_dtype) for path, (shape, _) in shapes.items()}
    seen, unexpected, mismatched = set(), [], []
    for file, stored_name, array in tensors:
        name = rename(stored_name)
        entry = table.get(name)
        if entry is None:
            if not ignored(name):
                unexpected.append(f"{stored_name} (in {os.path.basename(file)})")
            continue
        full_shape = shapes[entry.path][0]
        our_shape = full_shape[1:] if entry.index is not None else full_shape
        want = entry.layout.hf_shape(our_shape)
        if tuple(array.shape) != want:
            mismatched.append(f"{stored_name}: expected {want}, found {tuple(array.shape)}")
            continue
        value = entry.layout.to_ours(array, our_shape).astype(target_dtype, copy=False)
        if entry.index is None:
            out[entry.path][...] = value
        else:
            out[entry.path][entry.index] = value
        seen.add(name)
        if progress is not None:
            progress(array.nbytes)
    missing = sorted(set(table) - seen)
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} missing tensor(s): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        )
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): " + ", ".join(unexpected[:20]))
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:20]))
    if problems:
        raise layout.CheckpointError(f"checkpoint {where} does not match its config:\n  " + "\n  ".join(problems))
    return out


def tensors_by_table(
    params: dict[tuple[str, ...], np.ndarray], table: dict[str, Entry], names=None
) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameters -> (HF name, HF-layout array), for `names` (default: the whole table, in order)."""
    for name in names if names is not None else table:
        entry = table[name]
        value = params[entry.path]
        if entry.index is not None:
            value = value[entry.index]
        yield name, np.ascontiguousarray(entry.layout.to_hf(np.asarray(value)))


def hf_tensors(
    params: dict[tuple[str, ...], np.ndarray], config: MllamaConfig, names=None
) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameters -> (Hub name, HF-layout array), for `names` (default: the whole table, in order)."""
    return tensors_by_table(params, hf_table(config), names)


def from_hf(
    path: str, dtype: str = "float32", compute_dtype: str | None = None, quantize: str | None = None, **config_overrides
):
    """Loads an HF Mllama checkpoint directory (config.json + safetensors shards, Hub or new key names).

    `dtype` is the parameter dtype; `compute_dtype` the activation dtype (default: the same); `quantize="int8"`:
    int8 text-decoder weights (quant.py)."""
    config = MllamaConfig.from_hf_config(path, param_dtype=dtype, dtype=compute_dtype or dtype, **config_overrides)
    return layout.model_from_params(config, load_hf_params(path, config), quantize)
