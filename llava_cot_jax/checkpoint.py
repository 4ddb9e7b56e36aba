"""Model weights on disk: Orbax checkpoints of a model family's parameters, and conversion to/from HF safetensors.

A converted checkpoint directory holds:
  llava_cot_config.json   the architecture config (its "family" key names the family; none: Mllama)
  params/                 an Orbax (OCDBT) checkpoint of the parameters, nested by module path
  tokenizer / processor files copied from the HF directory, so MllamaProcessor.from_pretrained(dir) works

A training checkpoint `DIR/checkpoints/STEP` (written by the trainer's Orbax CheckpointManager) holds the same
`params/` item (every parameter, trained and frozen) next to the optimizer-state and data-iterator items; its
config is `model_config/llava_cot_config.json` and its tokenizer/processor files are in `DIR/processor/`. Every
reader here (load_model, export_to_hf, inference) takes either kind of directory.

Every writer builds its output in a sibling temporary directory and renames it into place at the end, so an
interrupted or failed run never leaves a half-written output directory behind.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from llava_cot_jax import families
from llava_cot_jax.files import atomic_directory
from llava_cot_jax.models import reward
from llava_cot_jax.models.mllama import layout, quant
from llava_cot_jax.models.mllama import params as safetensors_io  # the family-independent safetensors reading

CONFIG_FILE = "llava_cot_config.json"
PARAMS_DIR = "params"
# Files a checkpoint directory may carry besides the weights: tokenizer, image processor, chat template.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)

# Inside a training step directory: the item holding the config, and where the run keeps its processor files.
TRAIN_CONFIG_ITEM = "model_config"
TRAIN_PROCESSOR_DIR = "processor"

Params = dict[tuple[str, ...], np.ndarray]
# Arrays are written in chunks of at most this size, so the writer's buffers stay small next to the model.
_CHUNK_BYTES = 8 * 2**20


def nested(params: Params) -> dict:
    """{("a", "b"): x} -> {"a": {"b": x}}: the nested parameter dict of a model (nnx.to_pure_dict layout)."""
    tree: dict = {}
    for path, value in params.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _flat(tree: dict, prefix=()) -> Params:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if os.path.exists(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def save_checkpoint(
    out_dir: str, config, params: Params, side_files_from: str | None = None, overwrite: bool = False
) -> str:
    """Writes config + parameters (numpy or jax arrays) as an Orbax checkpoint directory, atomically."""
    import jax  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    # The save is synchronous and nothing mutates the arrays meanwhile, so Orbax's defensive copy of every
    # host array (a second copy of the whole model) is not needed; a bounded write window keeps
    # TensorStore's own buffers small.
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False))
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, save_concurrent_gb=0.05, use_ocdbt=False)
    params = {path: np.asarray(value) for path, value in params.items()}
    with atomic_directory(out_dir, overwrite) as tmp:
        tree = nested(params)
        save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), tree)
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(os.path.join(tmp, PARAMS_DIR), args=ocp.args.PyTreeSave(tree, save_args=save_args))
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config.to_json())
        if side_files_from:
            copy_side_files(side_files_from, tmp)
    return out_dir


def _config_path(ckpt_dir: str) -> str | None:
    for path in (os.path.join(ckpt_dir, CONFIG_FILE), os.path.join(ckpt_dir, TRAIN_CONFIG_ITEM, CONFIG_FILE)):
        if os.path.exists(path):
            return path
    return None


def is_checkpoint(ckpt_dir: str) -> bool:
    """A llava_cot_jax weights checkpoint or a training checkpoint step directory (not an HF directory)."""
    return _config_path(ckpt_dir) is not None


def side_files_dir(ckpt_dir: str) -> str:
    """Where a checkpoint's tokenizer/processor files are: the directory itself, or for a training step
    DIR/checkpoints/STEP, DIR/processor."""
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir)))
    train_side = os.path.join(run_dir, TRAIN_PROCESSOR_DIR)
    if _config_path(ckpt_dir) and not os.path.exists(os.path.join(ckpt_dir, CONFIG_FILE)) and os.path.isdir(train_side):
        return train_side
    return ckpt_dir


def load_config(ckpt_dir: str):
    path = _config_path(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir} is not a llava_cot_jax checkpoint: {CONFIG_FILE} is missing")
    with open(path) as f:
        return families.config_from_json(f.read())


def _check_chunks(ckpt_dir: str, params_dir: str) -> None:
    """Every chunk file of every array (the per-array zarr layout `convert_hf_to_orbax` writes) is present: zarr
    would read a missing one as zeros, silently."""
    import json
    import math

    for name in sorted(os.listdir(params_dir)):
        zarray = os.path.join(params_dir, name, ".zarray")
        if not os.path.isfile(zarray):
            continue  # another layout (OCDBT, a training checkpoint): Orbax checks its own
        with open(zarray) as f:
            spec = json.load(f)
        expected = math.prod(math.ceil(n / c) for n, c in zip(spec["shape"], spec["chunks"])) if spec["shape"] else 1
        found = [f for f in os.listdir(os.path.dirname(zarray)) if not f.startswith(".")]
        if len(found) < expected:
            raise layout.CheckpointError(
                f"checkpoint {ckpt_dir}: {name} has {len(found)} of its {expected} chunk files (deleted or not "
                "copied); convert or copy the checkpoint again"
            )


def _param_reader(ckpt_dir: str):
    """(config, read(paths) -> {path: numpy array}) for a checkpoint, after checking its parameter set and
    shapes against the config. Reading a subset restores only those arrays (Orbax partial restore)."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    config = load_config(ckpt_dir)
    expected = families.of(config).weights.abstract_params(config)
    path = os.path.join(ckpt_dir, PARAMS_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {ckpt_dir} has no {PARAMS_DIR}/ directory: it is incomplete")
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        metadata = checkpointer.metadata(path).item_metadata
    if metadata is None:  # Orbax logs why (an unreadable metadata file) and returns nothing
        raise layout.CheckpointError(
            f"checkpoint {ckpt_dir}: the metadata of {PARAMS_DIR}/ is missing or corrupt; convert or copy it again"
        )
    stored = {p: tuple(m.shape) for p, m in _flat(metadata.tree).items()}
    _check_chunks(ckpt_dir, path)
    missing = sorted("/".join(p) for p in set(expected) - set(stored))
    # a reward model's head (models/reward.py) is extra to the base model, which loads without it
    unexpected = sorted("/".join(p) for p in set(stored) - set(expected) if p[0] != reward.HEAD_KEY)
    wrong = [
        f"{'/'.join(p)}: expected {expected[p][0]}, found {stored[p]}"
        for p in expected
        if p in stored and stored[p] != expected[p][0]
    ]
    if missing or unexpected or wrong:
        raise layout.CheckpointError(
            f"checkpoint {ckpt_dir} does not match its config: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {wrong}"
        )

    def read(paths, restore_args=None) -> Params:
        """Host numpy arrays by default; `restore_args` {path: ocp.ArrayRestoreArgs(sharding=...)} reads each array
        straight into its shards (every device's slice read from disk by itself)."""
        item = nested({p: 0 for p in paths})
        restore_args = nested(restore_args or {p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            tree = checkpointer.restore(
                path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
            )
        return _flat(tree)

    return config, read, list(expected)


def load_reward_head(ckpt_dir: str) -> dict:
    """The reward head's parameters (nested, host arrays) of a reward model's checkpoint (train.objective=pairwise);
    CheckpointError when it has none."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    path = os.path.join(ckpt_dir, PARAMS_DIR)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        stored = _flat(checkpointer.metadata(path).item_metadata.tree)
        paths = [p for p in stored if p[0] == reward.HEAD_KEY]
        if not paths:
            raise layout.CheckpointError(f"{ckpt_dir} has no {reward.HEAD_KEY}: not a reward model's checkpoint")
        restore_args = nested({p: ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})
        tree = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=nested({p: 0 for p in paths}), restore_args=restore_args, partial_restore=True
            ),
        )
    return tree[reward.HEAD_KEY]


def load_params(ckpt_dir: str) -> tuple[object, Params]:
    """Reads a checkpoint's parameters as host numpy arrays, checked against the config's shapes."""
    config, read, paths = _param_reader(ckpt_dir)
    return config, read(paths)


def load_model(
    ckpt_dir: str,
    dtype: str | None = None,
    compute_dtype: str | None = None,
    scan_layers: bool = True,
    mesh=None,
    rules=None,
    quantize: str | None = None,
):
    """Builds the model from a converted checkpoint; `dtype` overrides the stored parameter dtype;
    `scan_layers=False` loads the text layers unscanned, as decoding wants them (the config's `scan_layers`).

    With a `mesh`, every parameter is read straight into its shards as `rules` (default: the training table;
    decoding passes `sharding.inference_rules(...)`) place it: each device's slice is read from disk by itself,
    one parameter at a time, so no host or device ever holds the whole model (90B loads onto chips that only
    hold it together). `quantize="int8"` stores the text decoder's matrices as int8 as each is read
    (`models/mllama/quant.py`), so 11B's 21 GB of bf16 weights load onto one 16 GB chip."""
    config = load_config(ckpt_dir).replace(scan_layers=scan_layers)
    if dtype is not None:
        config = config.replace(param_dtype=dtype, dtype=compute_dtype or dtype)
    elif compute_dtype is not None:
        config = config.replace(dtype=compute_dtype)
    if mesh is None and quantize:  # one device: still read parameter by parameter, the host never holds the model
        import jax  # pylint: disable=g-import-not-at-top

        from llava_cot_jax import sharding  # pylint: disable=g-import-not-at-top

        mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    if mesh is not None:
        return _load_onto_mesh(ckpt_dir, config, mesh, rules, quantize)
    _, params = load_params(ckpt_dir)
    return layout.model_from_params(config, params, quantize, families.of(config).model_class)


def _load_onto_mesh(ckpt_dir: str, config, mesh, rules, quantize: str | None):
    """`load_model` on a mesh. The checkpoint stores layers stacked; an unscanned model's layer i is sliced from the
    stacked parameter on the devices (one stacked parameter in flight at a time)."""
    import jax  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

    from llava_cot_jax import sharding  # pylint: disable=g-import-not-at-top

    _, read, _ = _param_reader(ckpt_dir)  # checks names and shapes against the config first
    stored = families.of(config).weights.abstract_params(config)
    model_class = families.of(config).model_class
    abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    targets = dict(nnx.to_flat_state(sharding.param_shardings(state, mesh, rules or sharding.LOGICAL_AXIS_RULES)))
    variables = dict(nnx.to_flat_state(state))
    by_key: dict = {}  # stored parameter -> [(our path, layer index or None)]
    for path in variables:
        key, index = layout.stacked_location(path)
        by_key.setdefault(key, []).append((path, index))
    slicers = {}  # one jitted slice per target sharding (and shape): layer i is an argument, not a new program

    def take_layer(stacked, index, target):
        if target not in slicers:
            slicers[target] = jax.jit(
                lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), out_shardings=target
            )
        return slicers[target](stacked, np.int32(index))

    values = {}
    for key, entries in by_key.items():
        target = targets[entries[0][0]].get_value()
        stacked = entries[0][1] is not None
        spec = PartitionSpec(None, *target.spec) if stacked else target.spec
        args = ocp.ArrayRestoreArgs(
            sharding=NamedSharding(mesh, spec), dtype=config.jnp_param_dtype, global_shape=stored[key][0]
        )
        value = read([key], {key: args})[key]
        for path, index in entries:
            layer = value if index is None else take_layer(value, index, target)
            values[path] = quant.maybe_quantize(path, variables[path], layer, quantize)
        del value
    for path, var in variables.items():
        var.set_value(values.pop(path))
    return nnx.merge(graphdef, nnx.from_flat_state(list(variables.items())))


def save_model(out_dir: str, model, side_files_from: str | None = None, overwrite: bool = False) -> str:
    """Writes a model's parameters and config (e.g. after fine-tuning) as a checkpoint directory."""
    params = {path: np.asarray(value) for path, value in layout.model_params(model).items()}
    return save_checkpoint(out_dir, model.config.replace(scan_layers=True), params, side_files_from, overwrite)


# ------------------------------------------------------------------------------------- HF <-> Orbax


def convert_hf_to_orbax(
    hf_dir: str, out_dir: str, dtype: str | None = None, overwrite: bool = False, progress: bool = True
) -> str:
    """HF checkpoint directory -> our checkpoint directory. Reads one tensor at a time (numpy, no torch)
    into preallocated arrays, so peak memory is about one copy of the weights."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    family = families.of_hf_dir(hf_dir)
    config = family.config_class.from_hf_config(hf_dir)
    stored_dtype = safetensors_io.stored_dtype(hf_dir)
    config = config.replace(param_dtype=dtype or stored_dtype, dtype=dtype or stored_dtype)
    total = sum(os.path.getsize(f) for f in safetensors_io.safetensors_files(hf_dir))
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading HF tensors", disable=not progress) as bar:
        params = family.weights.load_hf_params(hf_dir, config, progress=bar.update)
    return save_checkpoint(out_dir, config, params, side_files_from=hf_dir, overwrite=overwrite)


def export_to_hf(
    ckpt_dir: str, out_dir: str, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, progress: bool = True
) -> str:
    """Our checkpoint -> HF directory: sharded safetensors with the Hub key names, an index, config.json and
    the tokenizer/processor files, loadable by transformers' `from_pretrained`.

    Streams one parameter at a time (tensors are emitted parameter by parameter, so a stacked parameter is
    read once and dropped once all its layers are out): memory holds one shard plus one parameter."""
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    config, read, _ = _param_reader(ckpt_dir)
    weights = families.of(config).weights
    by_param: dict[tuple[str, ...], list[str]] = {}
    for name, entry in weights.hf_table(config).items():
        by_param.setdefault(entry.path, []).append(name)
    shapes = weights.abstract_params(config)
    itemsize = np.dtype(config.param_dtype).itemsize
    total = sum(int(np.prod(shape)) * itemsize for shape, _ in shapes.values())

    weight_map, shard_files = {}, []
    with (
        atomic_directory(out_dir, overwrite) as tmp,
        tqdm(total=total, unit="B", unit_scale=True, desc="writing safetensors", disable=not progress) as bar,
    ):
        shard, shard_bytes = {}, 0

        def flush():
            nonlocal shard, shard_bytes
            file = f"shard-{len(shard_files):05d}.safetensors"
            try:
                save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
            except Exception as err:  # safetensors reports a failed write (a full disk) as its own SafetensorError
                if "I/O error" not in str(err):
                    raise
                raise OSError(f"cannot write {out_dir}/{file}: {err}") from err
            shard_files.append(file)
            weight_map.update({n: file for n in shard})
            shard, shard_bytes = {}, 0

        for path, names in by_param.items():
            value = read([path])[path]
            for name, tensor in weights.hf_tensors({path: value}, config, names):
                if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
                    flush()
                shard[name] = tensor
                shard_bytes += tensor.nbytes
                bar.update(tensor.nbytes)
            del value
        flush()
        # transformers' naming: model-00001-of-0000N.safetensors
        renames = {f: f"model-{k + 1:05d}-of-{len(shard_files):05d}.safetensors" for k, f in enumerate(shard_files)}
        for old, new in renames.items():
            os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(
                {"metadata": {"total_size": total}, "weight_map": {n: renames[f] for n, f in weight_map.items()}},
                f,
                indent=2,
            )
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config.to_hf_dict(), f, indent=2)
        copy_side_files(side_files_dir(ckpt_dir), tmp)
    return out_dir
