"""LLaVA-CoT JSONL + images → a TFDS dataset in ArrayRecord shards (random access, no TensorFlow needed).

Images are stored as their original encoded bytes (`tfds.features.Tensor(shape=(), dtype=np.object_)`; the pipeline
decodes them with PIL), the turns as JSON text. `tfds.features.Image` would need TensorFlow, so it is not used.

The dataset is built in a temporary directory next to the destination and renamed into place only when complete,
so an interrupted build leaves either the previous dataset or nothing at the destination, never a partial one; a
rerun starts afresh (stale temporary directories of earlier interrupted runs are removed).

Records are stored in the order of the validated samples (no TFDS shuffle: the pipeline shuffles), and
`has_image.npy` next to them holds one bool per record, whether it has an image, in that order: batches grouped by
modality (`PipelineConfig.group_by_modality`) read it instead of every record.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from llava_cot_jax import files
from llava_cot_jax.data import sources

DATASET_NAME = "llava_cot"
VERSION = "1.0.0"
REPORT_FILE = "validation_report.txt"
HAS_IMAGE_FILE = "has_image.npy"
_TMP_PREFIX = f".{DATASET_NAME}.tmp-"


class LlavaCot(tfds.core.GeneratorBasedBuilder):
    """Builder over an already-validated list of samples (see `prepare_tfds`)."""

    name = DATASET_NAME
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Single-image, single-turn LLaVA-CoT samples; images as encoded bytes."}
    # No download checksums to look up. TFDS would locate them via the builder's source file, which with etils>=1.10
    # and no `importlib_resources` installed fails with ModuleNotFoundError for builders defined in a package.
    code_path = None

    def __init__(self, samples: list[sources.Sample] | None = None, split: str = "train", **kwargs):
        # samples is None when TFDS re-instantiates the builder to read an existing dataset.
        self._samples = samples
        self._split = split
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaVA-CoT supervised samples: question with one image, four-stage answer.",
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded JPEG/PNG, b"" if none
                    "conversations": tfds.features.Text(),  # JSON list of {"from", "value"}
                }
            ),
            disable_shuffling=True,  # records in sample order, which HAS_IMAGE_FILE follows
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: samples come from local files
        return {self._split: self._generate_examples()}

    def _generate_examples(self):
        if self._samples is None:
            raise RuntimeError("LlavaCot was constructed without samples; use prepare_tfds to build it")
        for index, sample in enumerate(self._samples):
            yield index, sources.read_record(sample)


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    builder_dir: Path  # what `load_tfds_source` / `tfds.builder_from_directory` takes
    num_examples: int
    report: sources.ValidationReport


def prepare_tfds(
    jsonl_path: str | os.PathLike,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    num_shards: int | None = None,
    on_error: sources.OnError = "skip",
    record_filter: sources.RecordFilter = "llava_cot",
    token_counter: sources.TokenCounter | None = None,
    max_tokens: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    num_threads: int = 4,
) -> PreparedDataset:
    """Validates `jsonl_path` (see `sources.validate_jsonl`) and writes the kept samples as ArrayRecord shards.

    The result lives at `out_dir/llava_cot/1.0.0/` with the validation summary in `validation_report.txt` and
    which records have an image in `has_image.npy`.
    Raises `sources.DataValidationError` (on_error="fail") before anything is written, and `FileExistsError` if the
    destination exists and `overwrite` is False.
    """
    out_dir = Path(out_dir)
    final_dir = out_dir / DATASET_NAME / VERSION
    if final_dir.exists() and not overwrite:
        raise FileExistsError(f"{final_dir} already exists; pass overwrite=True (--overwrite) to rebuild it")

    samples, report = sources.validate_jsonl(
        jsonl_path,
        image_root,
        on_error=on_error,
        record_filter=record_filter,
        token_counter=token_counter,
        max_tokens=max_tokens,
        progress=progress,
        num_threads=num_threads,
    )
    if not samples and not report.counts:  # nothing left out: the file itself holds no sample
        raise ValueError(f"{jsonl_path} holds no samples ({report.lines} lines); nothing written")
    if not samples:
        raise sources.DataValidationError(f"no usable samples, nothing written:\n{report.summary()}")

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(out_dir)
    tmp_root = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX + f"{os.getpid()}-", dir=out_dir))
    try:
        builder = LlavaCot(samples=samples, split=split, data_dir=str(tmp_root), file_format="array_record")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=num_shards, try_download_gcs=False)
        )
        built_dir = Path(builder.data_dir)
        (built_dir / REPORT_FILE).write_text(report.summary() + "\n", encoding="utf-8")
        np.save(built_dir / HAS_IMAGE_FILE, np.array([sample.image is not None for sample in samples], bool))
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        files.replace_directory(built_dir, final_dir)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return PreparedDataset(final_dir, len(samples), report)


def _remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Removes temporary directories left by interrupted builds whose process is gone."""
    for path in glob.glob(str(out_dir / (_TMP_PREFIX + "*"))):
        pid = Path(path).name[len(_TMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue  # another build is running into this directory right now
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_tfds_source(builder_dir: str | os.PathLike, split: str = "train"):
    """The random-access source (`len`, `__getitem__`) over a prepared dataset, for `grain.MapDataset.source`."""
    builder_dir = Path(builder_dir)
    if not (builder_dir / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"{builder_dir} is not a prepared dataset (no dataset_info.json); point at .../{DATASET_NAME}/{VERSION}"
        )
    return tfds.builder_from_directory(str(builder_dir)).as_data_source(split=split)


def read_has_image(builder_dir: str | os.PathLike) -> np.ndarray:
    """The prepared dataset's `has_image.npy`: whether each record has an image, in record order."""
    path = Path(builder_dir) / HAS_IMAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the dataset was prepared before batches could be grouped by modality; run "
            "tools/prepare_data.py again (with --overwrite) or set data.group_by_modality=False"
        )
    return np.load(path).astype(bool)
