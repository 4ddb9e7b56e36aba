"""The Grain training input pipeline: records → decoded, tiled, tokenised, padded batches.

    source (TFDS ArrayRecord or JSONL, random access)
      → global order: seeded shuffle of all records, reshuffled every epoch, repeated (or, with
        `group_by_modality`, whole global batches of image records or of text-only ones: `ModalityGroupedOrder`)
      → this process's share: its batch_size-long slice of every global batch
      → encode: decode image, tile (MllamaImageProcessor), chat template + assistant-only labels
      → batch, padding the sequence to the smallest bucket that fits (a few shapes → a few compiles)
      → read threads, optionally worker processes (grain mp_prefetch)

Iterating `build_dataset(...)` gives a `grain.DatasetIterator`; its `get_state()` / `set_state()` make a resumed
run see exactly the batches an uninterrupted one would (for a fixed source, config and process layout).
`make_global_batch` turns each process's batch into global `jax.Array`s.

Batch fields (per-process batch B, sequence bucket L, images I = max_images, tiles T = max_image_tiles):
    input_ids, attention_mask, labels        [B, L] int32 (labels -100 off the assistant answer and on padding)
    pixel_values                             [B, I, T, 3, H, W] float32, or uint8 with pixel_dtype="uint8"
                                             (then normalise on the device with image.normalize_on_device);
                                             the llava family's [B, I, 3, H, W], I = 0 when no row has an image
    aspect_ratio_ids                         [B, I] int32
    aspect_ratio_mask                        [B, I, T] int32
    cross_attention_mask                     [B, L, I, T] int32
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import grain
import numpy as np
from PIL import Image

from llava_cot_jax.data import chat, sources, tfds_builder, vicuna
from llava_cot_jax.data.image import MllamaImageProcessor, choose_canvas, fit_size, to_rgb
from llava_cot_jax.data.llava_image import LlavaImageProcessor

logger = logging.getLogger(__name__)

# The keys of a batch (PadBatch): Mllama's, and the llava family's (its image enters through the prompt).
BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "labels",
    "pixel_values",
    "aspect_ratio_ids",
    "aspect_ratio_mask",
    "cross_attention_mask",
)
LLAVA_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int  # per process; the global batch is batch_size * process_count
    seq_buckets: tuple[int, ...] = (256, 512, 1024, 2048)
    max_images: int = 1
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever (the trainer stops at its step count)
    drop_remainder: bool = True  # keeps every batch the same size (no extra compile for a ragged last batch)
    pixel_dtype: Literal["float32", "uint8"] = "float32"
    overlong: Literal["truncate", "error"] = "truncate"
    jpeg_draft: bool = False  # decode big JPEGs at reduced scale (faster; pixels differ slightly from full decode)
    bos: str = chat.DEFAULT_BOS  # "transformers": two BOS, as LLaVA-CoT trained (chat module docstring)
    # The llava family's conversation format ("vicuna_v1", or "plain" for LLaVA-1.5's stage 1) and the system
    # sentence in front of a Vicuna conversation (data/vicuna.py); Mllama has one template and ignores both.
    template: str = "vicuna_v1"
    system: str = ""
    read_threads: int = 2  # threads per process (or per worker) running the encode step
    prefetch_buffer_size: int = 8
    worker_count: int = 0  # worker processes (grain mp_prefetch); 0 encodes in this process's threads
    worker_buffer_size: int = 2
    # LLaVA-1.5's `group_by_modality_length`: every global batch holds only records with an image or only text-only
    # ones (except the few at an epoch's end, `ModalityGroupedOrder`), so a text-only llava batch skips CLIP.
    group_by_modality: bool = False

    def __post_init__(self):
        if self.group_by_modality and not self.shuffle:
            raise ValueError("group_by_modality draws its batches at random: it needs shuffle=True")
        if self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.seq_buckets or list(self.seq_buckets) != sorted(set(self.seq_buckets)):
            raise ValueError(f"seq_buckets must be non-empty and strictly increasing, got {self.seq_buckets}")
        if self.pixel_dtype not in ("float32", "uint8"):
            raise ValueError(f"pixel_dtype must be 'float32' or 'uint8', got {self.pixel_dtype!r}")
        if self.overlong not in ("truncate", "error"):
            raise ValueError(f"overlong must be 'truncate' or 'error', got {self.overlong!r}")
        if self.bos not in chat.BOS_MODES:
            raise ValueError(f"bos must be one of {chat.BOS_MODES}, got {self.bos!r}")
        if self.template not in vicuna.TEMPLATES:
            raise ValueError(f"template must be one of {vicuna.TEMPLATES}, got {self.template!r}")


def _text(value: Any) -> str:
    """TFDS returns text fields as bytes, the JSONL source as str."""
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_image(data: bytes, processor, draft: bool = False) -> Image.Image:
    """Encoded bytes → RGB PIL image. With `draft`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    still at least as large as the size the processor will resize it to, which skips most of the decode work."""
    try:
        image = Image.open(io.BytesIO(data))
        if draft and image.format == "JPEG":
            width, height = image.size
            if isinstance(processor, LlavaImageProcessor):  # one square: decode at about the size it is cut to
                scale = processor.size / min(width, height)
                image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
                image.load()
                return to_rgb(image)
            tile = processor.tile_size
            rows, cols = choose_canvas(height, width, processor.max_image_tiles, tile)
            target_h, target_w = fit_size(height, width, rows * tile, cols * tile, tile)
            image.draft("RGB", (target_w, target_h))
        image.load()
    except Exception as err:  # PIL raises many types for bad data; name the problem, not just the type
        raise ValueError(f"cannot decode image ({len(data)} bytes): {type(err).__name__}: {err}") from err
    return to_rgb(image)


class ExampleEncoder:
    """One record ({id, image bytes, conversations JSON}) → unpadded numpy arrays for one sample.

    Picklable (it is shipped to grain worker processes) and stateless between calls.
    """

    def __init__(self, tokenizer, image_processor: MllamaImageProcessor, config: PipelineConfig):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        sample_id = _text(record["id"])
        try:
            return self._encode(record, sample_id)
        except Exception as err:
            raise ValueError(f"sample {sample_id!r}: {err}") from err

    def _encode(self, record, sample_id: str) -> dict[str, np.ndarray]:
        config, processor = self.config, self.image_processor
        conversations = json.loads(_text(record["conversations"]))
        image_bytes = record["image"]
        if isinstance(image_bytes, np.ndarray):
            image_bytes = image_bytes.item()
        num_tiles = None
        if image_bytes:
            image = decode_image(image_bytes, processor, draft=config.jpeg_draft)
            processed = processor([image], return_uint8=config.pixel_dtype == "uint8")
            num_tiles = processed["num_tiles"][0]
            # One sample of one image: take the processor's arrays as they are (a tile set is ~15 MB in float32,
            # so copies cost), then pad the image axis to max_images.
            pad_images = config.max_images - 1
            pixel_values = _pad_axis0(processed["pixel_values"][0], pad_images)
            aspect_ratio_ids = _pad_axis0(processed["aspect_ratio_ids"][0].astype(np.int32), pad_images)
            aspect_ratio_mask = _pad_axis0(processed["aspect_ratio_mask"][0].astype(np.int32), pad_images)
        else:
            tiles = (config.max_images, processor.max_image_tiles)
            pixel_dtype = np.uint8 if config.pixel_dtype == "uint8" else np.float32
            pixel_values = np.zeros(tiles + (3, processor.tile_size, processor.tile_size), pixel_dtype)
            aspect_ratio_ids = np.zeros(config.max_images, np.int32)
            aspect_ratio_mask = np.zeros(tiles, np.int32)
        # Mllama marks the first tile of every image slot, padding slots included.
        aspect_ratio_mask[:, 0] = 1
        encoded = chat.encode_training_example(
            self.tokenizer,
            conversations,
            has_image=bool(image_bytes),
            num_tiles=num_tiles,
            max_images=config.max_images,
            max_tiles=processor.max_image_tiles,
            bos=config.bos,
        )
        input_ids, labels, cross_mask = encoded["input_ids"], encoded["labels"], encoded["cross_attention_mask"]
        limit = config.seq_buckets[-1]
        if len(input_ids) > limit:
            message = f"{len(input_ids)} tokens exceed the largest sequence bucket ({limit})"
            if config.overlong == "error":
                raise ValueError(message)
            logger.warning("sample %r: %s; truncated", sample_id, message)
            input_ids, labels, cross_mask = input_ids[:limit], labels[:limit], cross_mask[:limit]
        return {
            "input_ids": input_ids.astype(np.int32),
            "labels": labels.astype(np.int32),
            "cross_attention_mask": cross_mask.astype(np.int32),
            "pixel_values": pixel_values,
            "aspect_ratio_ids": aspect_ratio_ids,
            "aspect_ratio_mask": aspect_ratio_mask,
        }


class LlavaExampleEncoder(ExampleEncoder):
    """`ExampleEncoder` for the llava family: the Vicuna v1 template (LLaVA-1.5's), `<image>` widened to one token
    per image feature, pixel values [max_images, 3, H, W] (padding slots zero; the model reads as many features as
    a row has image tokens) or [0, 3, H, W] for a text-only record (`PadBatch` gives a batch as many slots as its
    most imaged row, so an all-text batch has none and CLIP does not run), uint8 or float32 as `pixel_dtype` says;
    no cross-attention mask or aspect ratios."""

    def _encode(self, record, sample_id: str) -> dict[str, np.ndarray]:
        config, processor = self.config, self.image_processor
        conversations = json.loads(_text(record["conversations"]))
        image_bytes = record["image"]
        if isinstance(image_bytes, np.ndarray):
            image_bytes = image_bytes.item()
        uint8 = config.pixel_dtype == "uint8"
        pixel_values = np.zeros(
            (config.max_images if image_bytes else 0, 3, processor.size, processor.size),
            np.uint8 if uint8 else np.float32,
        )
        if image_bytes:
            square = processor.square(decode_image(image_bytes, processor, draft=config.jpeg_draft))
            pixel_values[0] = np.moveaxis(square, -1, 0) if uint8 else processor.normalize(square)
        encoded = vicuna.encode_training_example(
            self.tokenizer,
            conversations,
            has_image=bool(image_bytes),
            image_tokens=processor.image_tokens,
            template=config.template,
            system=config.system,
        )
        input_ids, labels = encoded["input_ids"], encoded["labels"]
        limit = config.seq_buckets[-1]
        if len(input_ids) > limit:
            message = f"{len(input_ids)} tokens exceed the largest sequence bucket ({limit})"
            if config.overlong == "error":
                raise ValueError(message)
            if (input_ids[limit:] == self.tokenizer.convert_tokens_to_ids(vicuna.IMAGE)).any():
                raise ValueError(f"{message}, and cutting them would cut into the image's tokens")
            logger.warning("sample %r: %s; truncated", sample_id, message)
            input_ids, labels = input_ids[:limit], labels[:limit]
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


# The example encoder of each family's image processor.
ENCODERS = {MllamaImageProcessor: ExampleEncoder, LlavaImageProcessor: LlavaExampleEncoder}


class PairEncoder:
    """A pair record ({id, image bytes, question, chosen, rejected}, `data/pairs.py`) -> [chosen sample, rejected
    sample], each encoded as `ExampleEncoder` encodes a conversation (question, then that answer)."""

    def __init__(self, tokenizer, image_processor, config: PipelineConfig):
        self.encoder = ENCODERS[type(image_processor)](tokenizer, image_processor, config)

    def __call__(self, record: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
        from llava_cot_jax.data.pairs import pair_conversations

        question, image = _text(record["question"]), record["image"]
        has_image = bool(image.item() if isinstance(image, np.ndarray) else image)
        return [
            self.encoder(
                {**record, "conversations": json.dumps(pair_conversations(question, _text(record[side]), has_image))}
            )
            for side in ("chosen", "rejected")
        ]


def _pad_axis0(array: np.ndarray, extra: int) -> np.ndarray:
    if extra == 0:
        return array
    return np.concatenate([array, np.zeros((extra,) + array.shape[1:], array.dtype)])


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


class PadBatch:
    """Stacks encoded samples, padding the sequence axis to the smallest bucket that fits the longest one."""

    def __init__(self, buckets: Sequence[int], pad_id: int):
        self.buckets = tuple(buckets)
        self.pad_id = int(pad_id)

    def __call__(self, samples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        length = bucket_length(max(len(s["input_ids"]) for s in samples), self.buckets)
        batch = len(samples)
        input_ids = np.full((batch, length), self.pad_id, np.int32)
        labels = np.full((batch, length), chat.IGNORE_INDEX, np.int32)
        attention_mask = np.zeros((batch, length), np.int32)
        cross_mask = None
        if "cross_attention_mask" in samples[0]:  # Mllama's; a llava sample has none
            cross_mask = np.zeros((batch, length) + samples[0]["cross_attention_mask"].shape[1:], np.int32)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = sample["input_ids"]
            labels[row, :n] = sample["labels"]
            attention_mask[row, :n] = 1
            if cross_mask is not None:
                cross_mask[row, :n] = sample["cross_attention_mask"]
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        # Per-sample arrays without a sequence axis are stacked, the image axis padded with zero slots to the
        # longest (a text-only llava sample has no image slot; Mllama's samples all have max_images).
        for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            if key in samples[0]:
                images = max(len(s[key]) for s in samples)
                out[key] = np.stack([_pad_axis0(s[key], images - len(s[key])) for s in samples])
        if cross_mask is not None:
            out["cross_attention_mask"] = cross_mask
        return out


class PadPairs(PadBatch):
    """B encoded pairs -> a batch of 2B rows, each pair's chosen and rejected rows next to each other
    (`train/pairwise.py` reads rows 2i and 2i + 1), so micro-batches of an even size keep pairs whole."""

    def __call__(self, pairs: Sequence[Sequence[dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
        return super().__call__([sample for pair in pairs for sample in pair])


class ProcessSlice:
    """Local index -> record of a globally ordered dataset: of every `global_batch = batch_size * process_count`
    consecutive records, this process takes the `process_index`-th run of `batch_size`. Picklable (it goes to
    grain worker processes with the records it indexes)."""

    def __init__(self, records: grain.MapDataset, batch_size: int, process_index: int, process_count: int):
        self.records, self.batch_size = records, batch_size
        self.process_index, self.process_count = process_index, process_count

    def global_index(self, local_index: int) -> int:
        block, offset = divmod(int(local_index), self.batch_size)
        return (block * self.process_count + self.process_index) * self.batch_size + offset

    def __call__(self, local_index: int):
        return self.records[self.global_index(local_index)]


def record_has_image(source) -> np.ndarray:
    """Which records of `source` have an image: one bool per record, in record order, read without touching an image
    (the validated samples of a JSON/JSONL source; the `has_image.npy` that `prepare_tfds` wrote next to a TFDS
    dataset)."""
    if isinstance(source, sources.JsonlSource):
        flags = np.array([sample.image is not None for sample in source.samples], bool)
    elif hasattr(source, "dataset_info"):  # a prepared TFDS dataset (tfds_builder.load_tfds_source)
        flags = tfds_builder.read_has_image(source.dataset_info.data_dir)
    else:
        raise TypeError(
            f"cannot tell which records of {source!r} have an image (a JSON/JSONL or prepared TFDS source can)"
        )
    if len(flags) != len(source):
        raise ValueError(f"{len(flags)} has-image flags for the {len(source)} records of {source!r}")
    return flags


class ModalityGroupedOrder:
    """Position in the repeated global order -> record index, every global batch of one modality (records with an
    image, or text-only ones) as LLaVA-1.5's `group_by_modality_length` sampler draws them.

    Each epoch, from (seed, epoch) alone: each modality's records are shuffled and cut into runs of `global_batch`,
    the runs are shuffled, and the two modalities' leftovers (fewer than a global batch each, shuffled together)
    go at the epoch's end. An epoch that does not start on a global-batch boundary (its length is not a multiple
    of the global batch) first completes the batch the previous epoch left open, from its leftovers (one run is
    broken up when there are too few). So every record comes once per epoch, global batches stay aligned with the
    runs, and the only mixed global batches are at most two around the end of each epoch. Picklable (it goes to
    grain workers); the current epochs' orders are cached."""

    def __init__(self, has_image: np.ndarray, global_batch: int, seed: int):
        self.has_image = np.asarray(has_image, bool)
        self.global_batch, self.seed = int(global_batch), int(seed)
        self._orders: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_orders": {}}

    def epoch_order(self, epoch: int) -> np.ndarray:
        size, batch = len(self.has_image), self.global_batch
        rng = np.random.default_rng([self.seed, epoch])
        runs, leftovers = [], []
        for indices in (np.flatnonzero(self.has_image), np.flatnonzero(~self.has_image)):
            indices = rng.permutation(indices)
            whole = len(indices) // batch * batch
            runs += np.split(indices[:whole], whole // batch) if whole else []
            leftovers.append(indices[whole:])
        runs = [runs[i] for i in rng.permutation(len(runs))]
        pool = rng.permutation(np.concatenate(leftovers))
        open_slots = -epoch * size % batch  # of the global batch the previous epoch left unfinished
        while len(pool) < open_slots and runs:
            pool = np.concatenate([pool, runs.pop()])
        return np.concatenate([pool[:open_slots], *runs, pool[open_slots:]])

    def __call__(self, position: int, _=None) -> int:
        epoch, offset = divmod(int(position), len(self.has_image))
        order = self._orders.get(epoch)
        if order is None:
            order = self.epoch_order(epoch)
            self._orders = {e: o for e, o in self._orders.items() if abs(e - epoch) <= 1} | {epoch: order}
        return int(order[offset])


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only needed to ask for the process layout

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def record_dataset(
    source, config: PipelineConfig, *, process_index: int | None = None, process_count: int | None = None
) -> grain.MapDataset:
    """The records this process reads, in order.

    The order is global: every process computes the same seeded per-epoch shuffle of all records (indices only),
    repeated `num_epochs` times, and global batch k is records [k * G, (k + 1) * G) of it (G = batch_size *
    process_count), of which each process reads only its own `batch_size`. So a global batch holds the same
    samples however many processes share it (a 2-host run sees the batches of a 1-host run), and an epoch is
    every record exactly once. A finite dataset with `drop_remainder` stops at the last whole global batch, so
    every process yields the same number of batches. With `group_by_modality` the order is `ModalityGroupedOrder`'s
    (it needs to know which records have an image: `record_has_image`)."""
    process_index, process_count = _process_layout(process_index, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    if len(source) == 0:
        raise ValueError(f"empty source {source!r}")
    per_process, global_batch = config.batch_size, config.batch_size * process_count
    if config.group_by_modality:
        order = ModalityGroupedOrder(record_has_image(source), global_batch, config.seed)
        # the range's positions past the first epoch come through repeat() as they are; the order maps each one
        records = grain.MapDataset.range(len(source)).repeat(config.num_epochs).map_with_index(order)
        records = records.map(source.__getitem__)
    else:
        records = grain.MapDataset.source(source)
        if config.shuffle:
            # repeat() passes indices past the first epoch through, and shuffle derives each epoch's seed from them.
            records = records.shuffle(seed=config.seed)
        records = records.repeat(config.num_epochs)
    whole, rest = divmod(len(records), global_batch)
    local_len = whole * per_process
    if not config.drop_remainder:
        local_len += min(max(rest - process_index * per_process, 0), per_process)
    return grain.MapDataset.range(local_len).map(ProcessSlice(records, per_process, process_index, process_count))


def build_dataset(
    source,
    tokenizer,
    image_processor,
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    pairs: bool = False,
) -> grain.IterDataset:
    """The per-process pipeline over a random-access `source` (see `open_source`). Iterate it for batches.

    `process_index` / `process_count` default to jax's (a test can pass them to simulate several hosts). With
    `pairs`, the records are preference pairs (`data/pairs.PairSource`) and a batch of B pairs has 2B rows
    (`PadPairs`).
    """
    dataset = record_dataset(source, config, process_index=process_index, process_count=process_count)
    encoder, pad = (PairEncoder, PadPairs) if pairs else (ENCODERS[type(image_processor)], PadBatch)
    dataset = dataset.map(encoder(tokenizer, image_processor, config))
    dataset = dataset.batch(
        config.batch_size,
        drop_remainder=config.drop_remainder,
        batch_fn=pad(config.seq_buckets, tokenizer.pad_token_id),
    )
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    )
    if config.worker_count > 0:
        _ensure_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    return iter_dataset


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags; a program that never ran absl.app (a test, a notebook) has not
    parsed them, and grain then fails. Mark them parsed, with their defaults, only in that case."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def open_source(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    split: str = "train",
    record_filter: sources.RecordFilter = "llava_cot",
):
    """A prepared TFDS dataset directory (…/llava_cot/1.0.0), or a JSONL file with its `image_root` (validated with
    `record_filter`, bad samples skipped and reported). A TFDS dataset was filtered when it was prepared
    (`tools/prepare_data.py --record_filter`)."""
    path = Path(path)
    if path.is_dir():
        return tfds_builder.load_tfds_source(path, split=split)
    if image_root is None:
        raise ValueError(f"{path} is not a TFDS dataset directory; a JSONL source also needs image_root")
    # logs its validation summary when it skipped anything or kept irregular records
    return sources.JsonlSource(path, image_root, record_filter=record_filter)


def pad_sequence_axis(batch: Mapping[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Pads a batch's sequence axis (axis 1 of the text fields) further, to `length`."""
    fill = {"input_ids": pad_id, "labels": chat.IGNORE_INDEX, "attention_mask": 0, "cross_attention_mask": 0}
    padded = dict(batch)
    for key, value in fill.items():
        extra = length - batch[key].shape[1]
        if extra < 0:
            raise ValueError(f"{key} is longer ({batch[key].shape[1]}) than the requested length {length}")
        widths = [(0, 0), (0, extra)] + [(0, 0)] * (batch[key].ndim - 2)
        padded[key] = np.pad(batch[key], widths, constant_values=value)
    return padded


def pad_image_axis(batch: Mapping[str, np.ndarray], images: int) -> dict[str, np.ndarray]:
    """Pads a llava batch's image axis (axis 1 of pixel_values) with zero slots to `images`; no row's tokens read
    them."""
    padded = dict(batch)
    if "pixel_values" in batch and batch["pixel_values"].shape[1] < images:
        pixels = batch["pixel_values"]
        padded["pixel_values"] = np.pad(pixels, [(0, 0), (0, images - pixels.shape[1])] + [(0, 0)] * (pixels.ndim - 2))
    return padded


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], sharding, pad_id: int | None = None, micro_batches: int | None = None
) -> dict[str, Any]:
    """Assembles each process's batch into global `jax.Array`s with the batch axis split by `sharding`.

    `sharding` is one `jax.sharding.Sharding` for every field (e.g. `NamedSharding(mesh, P(("data", "fsdp")))`,
    which shards axis 0 and replicates the rest) or a mapping field → sharding. Processes pick their sequence
    bucket independently, so with several processes the lengths are agreed first (one tiny all-gather) and shorter
    batches padded with `pad_id` (required then), and so is a llava batch's image axis (one process's rows may all
    be text-only); every process must use the same per-process batch size.
    With `micro_batches`, every field is first reshaped to [micro_batches, batch / micro_batches, ...] on the host
    (consecutive samples per micro-batch; the sharding then splits axis 1).
    """
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if pad_id is None:
            raise ValueError("pad_id is required with several processes (sequence lengths may differ per process)")
        pixels = local_batch.get("pixel_values")
        sizes = [local_batch["input_ids"].shape[1], 0 if pixels is None else pixels.shape[1]]
        length, images = np.max(multihost_utils.process_allgather(np.int32(sizes)), axis=0)
        local_batch = pad_image_axis(pad_sequence_axis(local_batch, int(length), pad_id), int(images))
    if micro_batches is not None:
        local_batch = split_micro_batches(local_batch, micro_batches)

    def sharding_of(key):
        return sharding[key] if isinstance(sharding, Mapping) else sharding

    return {key: jax.make_array_from_process_local_data(sharding_of(key), value) for key, value in local_batch.items()}


def split_micro_batches(batch: Mapping[str, np.ndarray], micro_batches: int) -> dict[str, np.ndarray]:
    """[B, ...] fields -> [micro_batches, B / micro_batches, ...] (consecutive samples per micro-batch)."""
    out = {}
    for key, value in batch.items():
        if micro_batches < 1 or value.shape[0] % micro_batches:
            raise ValueError(
                f"batch field {key} has {value.shape[0]} rows, not divisible into {micro_batches} micro-batches"
            )
        out[key] = value.reshape(micro_batches, value.shape[0] // micro_batches, *value.shape[1:])
    return out
