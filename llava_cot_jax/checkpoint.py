"""Model weights on disk: Orbax checkpoints of the Mllama parameters, and conversion to/from HF safetensors.

A converted checkpoint directory holds:
  llava_cot_config.json   the MllamaConfig
  params/                 an Orbax (OCDBT) checkpoint of the parameters, nested by module path
  tokenizer / processor files copied from the HF directory, so MllamaProcessor.from_pretrained(dir) works

Every writer builds its output in a sibling temporary directory and renames it into place at the end, so an
interrupted or failed run never leaves a half-written output directory behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np

from llava_cot_jax.models.mllama.config import MllamaConfig
from llava_cot_jax.models.mllama import params as hf_params

CONFIG_FILE = "llava_cot_config.json"
PARAMS_DIR = "params"
# Files a checkpoint directory may carry besides the weights: tokenizer, image processor, chat template.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja",
              "generation_config.json")

Params = dict[tuple[str, ...], np.ndarray]


@contextlib.contextmanager
def atomic_directory(out_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory next to `out_dir` that becomes `out_dir` only if the block succeeds."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
  try:
    yield tmp
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _nested(params: Params) -> dict:
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


def save_checkpoint(out_dir: str, config: MllamaConfig, params: Params, side_files_from: str | None = None,
                    overwrite: bool = False) -> str:
  """Writes config + parameters (numpy or jax arrays) as an Orbax checkpoint directory, atomically."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with atomic_directory(out_dir, overwrite) as tmp:
    with ocp.PyTreeCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), _nested(params))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      f.write(config.to_json())
    if side_files_from:
      copy_side_files(side_files_from, tmp)
  return out_dir


def load_config(ckpt_dir: str) -> MllamaConfig:
  path = os.path.join(ckpt_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{ckpt_dir} is not a llava_cot_jax checkpoint: {CONFIG_FILE} is missing")
  with open(path) as f:
    return MllamaConfig.from_json(f.read())


def load_params(ckpt_dir: str) -> tuple[MllamaConfig, Params]:
  """Reads a checkpoint's parameters as host numpy arrays, checked against the config's shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = load_config(ckpt_dir)
  expected = hf_params.abstract_params(config)
  path = os.path.join(ckpt_dir, PARAMS_DIR)
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  params = _flat(tree)
  missing = sorted("/".join(p) for p in set(expected) - set(params))
  unexpected = sorted("/".join(p) for p in set(params) - set(expected))
  wrong = [f"{'/'.join(p)}: expected {expected[p][0]}, found {params[p].shape}"
           for p in expected if p in params and tuple(params[p].shape) != expected[p][0]]
  if missing or unexpected or wrong:
    raise hf_params.CheckpointError(f"checkpoint {ckpt_dir} does not match its config: missing {missing}, "
                                    f"unexpected {unexpected}, shape mismatches {wrong}")
  return config, params


def load_model(ckpt_dir: str, dtype: str | None = None, compute_dtype: str | None = None):
  """Builds the model from a converted checkpoint; `dtype` overrides the stored parameter dtype."""
  config, params = load_params(ckpt_dir)
  if dtype is not None:
    config = config.replace(param_dtype=dtype, dtype=compute_dtype or dtype)
  elif compute_dtype is not None:
    config = config.replace(dtype=compute_dtype)
  return hf_params.model_from_params(config, params)


def save_model(out_dir: str, model, side_files_from: str | None = None, overwrite: bool = False) -> str:
  """Writes a model's parameters and config (e.g. after fine-tuning) as a checkpoint directory."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  params = {tuple(str(k) for k in path): np.asarray(var[...]) for path, var in flat}
  return save_checkpoint(out_dir, model.config, params, side_files_from, overwrite)


# ------------------------------------------------------------------------------------- HF <-> Orbax


def convert_hf_to_orbax(hf_dir: str, out_dir: str, dtype: str | None = None, overwrite: bool = False,
                        progress: bool = True) -> str:
  """HF checkpoint directory -> our checkpoint directory. Reads one tensor at a time (numpy, no torch)
  into preallocated arrays, so peak memory is about one copy of the weights."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  config = MllamaConfig.from_hf_config(hf_dir)
  stored_dtype = _stored_dtype(hf_dir)
  config = config.replace(param_dtype=dtype or stored_dtype, dtype=dtype or stored_dtype)
  total = sum(os.path.getsize(f) for f in hf_params.safetensors_files(hf_dir))
  with tqdm(total=total, unit="B", unit_scale=True, desc="reading HF tensors", disable=not progress) as bar:
    params = hf_params.load_hf_params(hf_dir, config, progress=bar.update)
  return save_checkpoint(out_dir, config, params, side_files_from=hf_dir, overwrite=overwrite)


def _stored_dtype(hf_dir: str) -> str:
  """The dtype the HF checkpoint stores its weights in (from its first tensor's header)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  first = hf_params.safetensors_files(hf_dir)[0]
  try:
    with safe_open(first, framework="numpy") as f:
      name = next(iter(f.keys()))
      code = f.get_slice(name).get_dtype()
  except Exception as e:
    raise hf_params.CheckpointError(f"cannot read {first}: {e} (truncated or corrupt safetensors file?)") from e
  names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
  if code not in names:
    raise hf_params.CheckpointError(f"{first}: unsupported tensor dtype {code}")
  return names[code]


def export_to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                 progress: bool = True) -> str:
  """Our checkpoint -> HF directory: sharded safetensors with the Hub key names, an index, config.json and
  the tokenizer/processor files, loadable by transformers' `from_pretrained`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  config, params = load_params(ckpt_dir)
  table = hf_params.hf_table(config)
  sizes = {}
  for name, entry in table.items():
    value = params[entry.path]
    sizes[name] = value.nbytes // (value.shape[0] if entry.index is not None else 1)
  shards, current, current_bytes = [], [], 0
  for name in table:
    if current and current_bytes + sizes[name] > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(name)
    current_bytes += sizes[name]
  shards.append(current)

  tensors = hf_params.hf_tensors(params, config)
  weight_map = {}
  with atomic_directory(out_dir, overwrite) as tmp, tqdm(total=sum(sizes.values()), unit="B", unit_scale=True,
                                                          desc="writing safetensors", disable=not progress) as bar:
    for k, names in enumerate(shards):
      file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      shard = {}
      for name in names:
        got_name, value = next(tensors)
        assert got_name == name, (got_name, name)
        shard[name] = value
        weight_map[name] = file
        bar.update(value.nbytes)
      save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
      del shard
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config.to_hf_dict(), f, indent=2)
    copy_side_files(ckpt_dir, tmp)
  return out_dir
