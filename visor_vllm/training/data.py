"""Training data: LLaVA conversation files or Hugging Face datasets -> the tokens the server sees.

What.
* `load_records` reads local data only (never a hub): a LLaVA-style ``.json`` (a list) or
  ``.jsonl`` file, a directory written by ``datasets.Dataset.save_to_disk``, or ``.parquet``
  files. A record has ``conversations`` (``[{"from": "human"|"gpt"|"system", "value": ...}]``,
  ``<image>`` placeholders in the text) and optionally ``image``: a path (relative to
  ``image_folder``, default the data file's directory), a list of paths, PIL images, or
  ``{"bytes": ...}`` as `datasets` stores images.
* `SampleEncoder` turns a record into ``input_ids`` (image placeholders expanded exactly as the
  checkpoint's LLaVA-OV processor expands them), ``labels`` (the assistant answers and their
  ``<|im_end|>``, everything else ``-100``), ``pixel_values`` and ``image_sizes``. It renders the
  *checkpoint's own* chat template: for a VISOR checkpoint that appends the routing token after
  every question, for LLaVA-OV it does not -- the same text `vllm serve` builds for a request.
* `EncodedDataset` encodes on access and *skips* bad samples (missing or corrupt image, no
  answer, too long, placeholders that do not match the images), counting each reason in
  `SkipCounter`; `collate` pads a list of encoded samples into a batch.
* `pre_encode` encodes the samples a training stage will draw up front, with several
  processes (`PreEncoded`): the trainer's DataLoader then only pads them. It keeps the
  processed images in a `PixelStore`, so a later stage with the same image processor (VISOR's
  stages after the dense phase) only tokenizes.

Why. One path from a conversation to tokens for every model the recipe trains (dense LLaVA-OV
and VISOR) and for evaluation, so nothing the model learns depends on a side format.

Footguns.
* Labels: the conversation is rendered and tokenized once; each answer starts right after the
  template's generation prompt (``<|im_start|>assistant\n`` for ChatML, found by rendering an
  empty conversation with ``add_generation_prompt``) and runs to its end token. When the
  headers found do not match the assistant turns one to one the sample is bad
  (``answer_not_located``), never silently mislabelled.
* Label positions follow transformers' convention: ``labels[i]`` is predicted from position
  ``i - 1`` (`visor_vllm.training.model.answer_loss` shifts).
* `EncodedDataset` returns `Skipped` for a bad sample; `collate` drops them, so a batch can be
  smaller than asked (the loss is normalised by answer tokens, so that is harmless).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from visor_vllm.model.batch_layout import IGNORE, AnswerIndex, BatchLayout

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
IMAGE_PLACEHOLDER = "<image>"


class DataError(ValueError):
    """Training data that cannot be read at all (missing file, unknown format)."""


class BadSample(ValueError):
    """One sample that cannot be used; ``reason`` is a short key counted by `SkipCounter`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------

def load_records(path: str | os.PathLike) -> list[Mapping]:
    """Every record of a local LLaVA JSON/JSONL file, a saved `datasets` dir, or parquet."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"training data {p} does not exist")
    if p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json",
                                                     "dataset_dict.json")):
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
        if hasattr(ds, "keys"):  # a DatasetDict: take its 'train' split
            if "train" not in ds:
                raise DataError(f"{p} is a DatasetDict without a 'train' split: {list(ds)}")
            ds = ds["train"]
        return ds
    if p.suffix == ".parquet" or p.is_dir() and any(p.glob("*.parquet")):
        from datasets import load_dataset

        files = [str(p)] if p.is_file() else sorted(str(f) for f in p.glob("*.parquet"))
        return load_dataset("parquet", data_files=files, split="train")
    if p.suffix == ".jsonl":
        out = []
        with open(p) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        out.append({"_bad": f"line {n}: {e}"})
        return out
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        if not isinstance(data, list):
            raise DataError(f"{p}: a LLaVA .json file holds a list of records")
        return data
    raise DataError(f"{p}: unknown data format (want .json, .jsonl, .parquet or a saved "
                    "datasets directory)")


def default_image_folder(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def _open_image(item, folder: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(item, Image.Image):
            img = item
        elif isinstance(item, Mapping) and item.get("bytes") is not None:
            img = Image.open(io.BytesIO(item["bytes"]))
        elif isinstance(item, Mapping) and item.get("path"):
            img = Image.open(folder / item["path"])
        elif isinstance(item, (str, os.PathLike)):
            img = Image.open(folder / item)
        else:
            raise BadSample("bad_image_field", repr(item)[:80])
        img.load()
    except FileNotFoundError as e:
        raise BadSample("missing_image", str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadSample("corrupt_image", str(e)) from None
    if min(img.size) < 1:
        raise BadSample("corrupt_image", f"{img.size[0]}x{img.size[1]} pixels")
    return img.convert("RGB")


def _image_items(record: Mapping) -> list:
    """A record's image entries (``image`` or ``images``: one, or a list), as given."""
    item = record.get("image", record.get("images"))
    if item is None:
        return []
    return list(item) if isinstance(item, (list, tuple)) else [item]


def record_images(record: Mapping, folder: Path) -> list:
    return [_open_image(x, folder) for x in _image_items(record)]


def record_messages(record: Mapping) -> list[dict]:
    """LLaVA ``conversations`` -> chat messages; ``<image>`` placeholders become image parts."""
    if "_bad" in record:
        raise BadSample("unreadable_record", record["_bad"])
    conv = record.get("conversations")
    if not isinstance(conv, Sequence) or not conv:
        raise BadSample("no_conversations")
    messages = []
    for turn in conv:
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))))
        value = turn.get("value", turn.get("content"))
        if role is None or not isinstance(value, str):
            raise BadSample("bad_turn", repr(turn)[:80])
        if role == "user" and IMAGE_PLACEHOLDER in value:
            parts = [{"type": "image"}] * value.count(IMAGE_PLACEHOLDER)
            text = value.replace(IMAGE_PLACEHOLDER, "").strip()
            messages.append({"role": role, "content": parts + [{"type": "text", "text": text}]})
        else:
            messages.append({"role": role, "content": [{"type": "text", "text": value}]})
    if not any(m["role"] == "assistant" and m["content"][0]["text"].strip() for m in messages):
        raise BadSample("no_answer")
    return messages


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

@dataclass
class Encoded:
    input_ids: torch.Tensor          # [L] long, image placeholders expanded
    labels: torch.Tensor             # [L] long, IGNORE outside the answers
    pixel_values: torch.Tensor | None  # [n_images, crops, 3, S, S]
    image_sizes: torch.Tensor | None   # [n_images, 2]
    meta: dict = field(default_factory=dict)

    @property
    def tensors(self) -> tuple:
        """``(input_ids, labels, pixel_values, image_sizes)``: ``Encoded(*tensors, meta)``
        rebuilds the sample."""
        return self.input_ids, self.labels, self.pixel_values, self.image_sizes


def image_processor_key(image_processor) -> tuple[str, str]:
    """What makes two image processors process an image alike: the class (a PIL and a
    torchvision processor differ in bits) and its settings."""
    ip = image_processor
    return (f"{type(ip).__module__}.{type(ip).__qualname__}",
            json.dumps(ip.to_dict(), sort_keys=True, default=str))


class PixelStore:
    """Processed images kept for a later stage: a record's ``(pixel_values, image_sizes)`` by
    its image files (path, size, mtime) and the image processor (class and settings).

    Why. The recipe's dense phase and VISOR's two stages train on the same image files with
    the same image processor (the converter copies it), and loading an image and running
    LLaVA-OV's image processor is about two thirds of encoding a sample: re-processing 58k of
    the dense phase's images cost VISOR's stages 30-45 s a seed on a 2-vCPU EPYC. `pre_encode`
    puts what it encoded here; `SampleEncoder.encode` reads it, so a later stage only renders
    and tokenizes its own template. A hit hands out the very tensors the first stage made, so
    no bit of training changes.

    Footguns.
    * Memory: what is kept stays until the store is dropped or cleared (`trainer.run` keeps
      one for its stages; the recipe one for its dense and VISOR phases, cleared after them).
      ``limit_bytes`` bounds it: a put past it is refused.
    * Only images given as files (a path, or ``{"path": ...}``) are kept; bytes and PIL images
      are processed every time.
    * Processes: a DataLoader worker started by fork reads the parent's store as it was at the
      fork, and its own puts are lost (only `pre_encode`'s parent puts). Pickled (a spawned
      worker) it arrives empty: a cache, never a 4 GB pickle.
    * The tensors are shared, so nothing may write into an encoded sample's tensors (nothing
      does; `PreEncoded` already hands the same sample out at every epoch).
    """

    def __init__(self, limit_bytes: float = float("inf")):
        self.limit_bytes = limit_bytes
        self.nbytes = 0
        self._kept: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._kept)

    def __getstate__(self):
        return {"limit_bytes": self.limit_bytes, "nbytes": 0, "_kept": {}}

    def key(self, image_key: tuple, record: Mapping, folder: Path) -> tuple | None:
        """The record's images as files, with ``image_key`` (`SampleEncoder.image_key`); None
        where an image is not a file that exists."""
        items = _image_items(record) if isinstance(record, Mapping) else []
        if not items:
            return None
        files = []
        for x in items:
            if isinstance(x, Mapping) and isinstance(x.get("path"), str) and x.get("bytes") is None:
                x = x["path"]
            if not isinstance(x, (str, os.PathLike)):
                return None
            path = os.path.abspath(folder / x)
            try:
                st = os.stat(path)
            except OSError:
                return None
            files.append((path, st.st_size, st.st_mtime_ns))
        return (image_key, tuple(files))

    def get(self, key: tuple | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if key is None else self._kept.get(key)

    def put(self, key: tuple | None, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> bool:
        """Keep one record's processed images; False where it is kept already, has no key or
        would pass ``limit_bytes``."""
        if key is None or key in self._kept:
            return False
        n = pixel_values.numel() * pixel_values.element_size() + \
            image_sizes.numel() * image_sizes.element_size()
        if self.nbytes + n > self.limit_bytes:
            return False
        self._kept[key] = (pixel_values, image_sizes)
        self.nbytes += n
        return True

    def clear(self) -> None:
        self._kept.clear()
        self.nbytes = 0


class SampleEncoder:
    """Record -> `Encoded`, with a checkpoint directory's tokenizer, template and processor;
    ``pixels``: a `PixelStore` whose processed images it reuses."""

    def __init__(self, checkpoint: str | os.PathLike, max_length: int = 4096,
                 pixels: PixelStore | None = None):
        from visor_vllm.checkpoints.files import load_processor

        self.processor = load_processor(checkpoint)
        self.tokenizer = self.processor.tokenizer
        self.pixels = pixels
        self.image_key = image_processor_key(self.processor.image_processor)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        self.max_length = max_length
        # what the template puts before every answer ("<|im_start|>assistant\n" for ChatML)
        probe = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
        bare, prompted = self._ids(probe), self._ids(probe, add_generation_prompt=True)
        self._generation_prompt = prompted[len(bare):]
        if prompted[:len(bare)] != bare or not self._generation_prompt:
            raise DataError(f"{checkpoint}: the chat template renders no generation prompt")

    def _ids(self, messages, add_generation_prompt=False) -> list[int]:
        text = self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, record: Mapping, folder: Path) -> Encoded:
        messages = record_messages(record)
        kept = (self.pixels.get(self.pixels.key(self.image_key, record, folder))
                if self.pixels is not None and len(self.pixels) else None)
        images = record_images(record, folder) if kept is None else None
        n_images = len(images) if kept is None else int(kept[1].shape[0])
        n_placeholders = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
        if n_placeholders != n_images:
            raise BadSample("image_count_mismatch",
                            f"{n_placeholders} <image> placeholders, {n_images} images")
        ids = self._ids(messages)
        labels = [IGNORE] * len(ids)
        starts = _find_all(ids, self._generation_prompt)
        n_answers = sum(m["role"] == "assistant" for m in messages)
        if len(starts) != n_answers:
            raise BadSample("answer_not_located",
                            f"{len(starts)} assistant headers for {n_answers} answers")
        for s in starts:
            # the answer and its end token; the template's trailing newline is not predicted
            stop = s
            while stop < len(ids) and ids[stop] != self.tokenizer.eos_token_id:
                stop += 1
            labels[s:stop + 1] = ids[s:stop + 1]
        pixel_values = image_sizes = None
        if n_images:
            if kept is None:
                out = self.processor.image_processor(images, return_tensors="pt")
                pixel_values, image_sizes = out["pixel_values"], out["image_sizes"]
            else:
                pixel_values, image_sizes = kept
            counts = self._image_token_counts(image_sizes, n_images)
            ids, labels = _expand(ids, labels, self.image_token_id, counts)
        if len(ids) > self.max_length:
            raise BadSample("too_long", f"{len(ids)} tokens > max_length {self.max_length}")
        if all(x == IGNORE for x in labels):
            raise BadSample("no_answer", "every answer was cut")
        return Encoded(torch.tensor(ids), torch.tensor(labels), pixel_values, image_sizes,
                       {k: record[k] for k in ("id", "family", "families") if k in record})

    def _image_token_counts(self, image_sizes: torch.Tensor, n_images: int) -> list[int]:
        """Tokens per image, as LLaVA-OV's processor counts them (anyres for a single image)."""
        crop = self.processor.image_processor.size
        h, w = crop["height"], crop["width"]
        if n_images > 1:  # several images: base crop + newline each (LLaVA-OV's rule)
            base = self.processor.num_image_tokens
            return [base + 1] * n_images
        return [self.processor._get_number_of_features(int(s[0]), int(s[1]), h, w)
                for s in image_sizes]


def _find_all(ids: list[int], pattern: list[int]) -> list[int]:
    """Indices just after each occurrence of ``pattern`` in ``ids``."""
    k, first, out = len(pattern), pattern[0], []
    for i, t in enumerate(ids):
        if t == first and ids[i:i + k] == pattern:
            out.append(i + k)
    return out


def _expand(ids, labels, image_id: int, counts: list[int]):
    out_ids, out_labels, k = [], [], 0
    for t, y in zip(ids, labels):
        if t == image_id:
            if k >= len(counts):
                raise BadSample("image_count_mismatch", "more <image> tokens than images")
            out_ids += [image_id] * counts[k]
            out_labels += [IGNORE] * counts[k]
            k += 1
        else:
            out_ids.append(t)
            out_labels.append(y)
    if k != len(counts):
        raise BadSample("image_count_mismatch", f"{k} <image> tokens, {len(counts)} images")
    return out_ids, out_labels


class SkipCounter(Counter):
    """Bad samples by reason (`BadSample.reason`), plus up to 5 examples per reason."""

    def __init__(self):
        super().__init__()
        self.examples: dict[str, list[str]] = {}

    def add(self, err: BadSample, where: str) -> None:
        self[err.reason] += 1
        self.note(err.reason, f"{where}: {err}")

    def note(self, reason: str, text: str) -> None:
        """Keep ``text`` as an example of ``reason``: up to 5 a reason, each once."""
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5 and text not in ex:
            ex.append(text)

    def summary(self) -> dict:
        return {"skipped": sum(self.values()), "by_reason": dict(self),
                "examples": self.examples}


@dataclass(frozen=True)
class Skipped:
    """What `EncodedDataset` returns for a bad sample; `collate` drops it."""

    reason: str


class EncodedDataset(torch.utils.data.Dataset):
    """Map-style dataset of encoded records; a bad record gives `Skipped` and is counted."""

    def __init__(self, records, encoder: SampleEncoder, image_folder: str | os.PathLike):
        self.records, self.encoder = records, encoder
        self.folder = Path(image_folder)
        self.skipped = SkipCounter()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Encoded | Skipped:
        record = self.records[i]
        try:
            return self.encoder.encode(record, self.folder)
        except BadSample as e:
            name = record.get("id", "?") if isinstance(record, Mapping) else "?"
            self.skipped.add(e, f"sample {i} ({name})")
            return Skipped(e.reason)


class PreEncoded(torch.utils.data.Dataset):
    """`EncodedDataset` whose samples were encoded up front (`pre_encode`); a sample outside
    that set is encoded on access, as before. Same samples, same bytes."""

    def __init__(self, ds: EncodedDataset, cache: dict[int, Encoded | Skipped], nbytes: int,
                 complete: bool = False, reused: int = 0):
        self.ds, self.cache, self.nbytes = ds, cache, nbytes
        self.skipped = ds.skipped
        self.complete = complete  # every sample asked for is in the cache
        self.reused = reused      # samples whose images an earlier stage processed (PixelStore)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Encoded | Skipped:
        hit = self.cache.get(i)
        return self.ds[i] if hit is None else hit


def encoded_bytes(x: Encoded | Skipped) -> int:
    """Host bytes of one encoded sample's tensors (0 for a skipped one)."""
    if isinstance(x, Skipped):
        return 0
    return sum(t.numel() * t.element_size() for t in x.tensors if t is not None)


class _Chunks(torch.utils.data.Dataset):
    """Chunk ``k`` of ``indices`` encoded, as numpy arrays (pickled through the worker's pipe,
    not as thousands of shared-memory tensors), with the examples of bad samples seen so far."""

    def __init__(self, ds: EncodedDataset, chunks: list[list[int]]):
        self.ds, self.chunks = ds, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        out = []
        for i in self.chunks[k]:
            x = self.ds[i]
            if isinstance(x, Skipped):
                out.append((i, x.reason, None))
            else:
                out.append((i, [None if t is None else t.numpy() for t in x.tensors], x.meta))
        return out, {r: list(v) for r, v in self.ds.skipped.examples.items()}


def _as_is(x):
    return x


def pre_encode(ds: EncodedDataset, indices: Sequence[int], processes: int = 1,
               chunk: int = 256, limit_bytes: float = float("inf")) -> PreEncoded:
    """``ds`` with the samples of ``indices`` encoded now: by ``processes`` DataLoader workers
    (in this process when that is 1 or there is one chunk), in index order, until the cached
    tensors pass ``limit_bytes``; the rest are encoded as drawn.

    Why. On the synthetic recipe a sample costs ~1 ms to encode (image load, LLaVA-OV's image
    processor, the chat template), and the one DataLoader worker encoding beside the step's
    two compute threads slowed the dense phase by ~18 % (4.10 against 5.00 steps/s with the
    samples encoded beforehand, 2-vCPU Xeon, 2026-12-07). Encoded up front by the idle CPUs,
    each sample once (the dense phase draws 1.6 epochs), the step then runs alone.

    Footguns. Memory: what is cached stays until the stage ends; ``limit_bytes`` is checked per
    sample, so the cache passes it by one sample at most (plus the chunks in flight between
    processes). Bad samples are kept as `Skipped` (their reasons count at every draw, as
    before) and their examples merged into ``ds.skipped``. The workers draw no seed from the
    global RNG (their own generator), so pre-encoding changes no random stream.
    """
    order = sorted(set(indices))
    parts = _Chunks(ds, [order[k:k + chunk] for k in range(0, len(order), chunk)])
    if processes > 1 and len(parts) > 1:
        loader = iter(torch.utils.data.DataLoader(
            parts, batch_size=None, collate_fn=_as_is, num_workers=min(processes, len(parts)),
            generator=torch.Generator()))
    else:
        loader = (parts[k] for k in range(len(parts)))
    cache: dict[int, Encoded | Skipped] = {}
    nbytes = reused = 0
    pixels = getattr(ds.encoder, "pixels", None)
    mine: set[tuple] = set()  # kept by this call (a repeated image is not an earlier stage's)
    for part, examples in loader:
        for reason, seen in examples.items():
            for e in seen:
                ds.skipped.note(reason, e)
        for i, arrays, meta in part:
            if isinstance(arrays, str):  # a bad sample's reason
                cache[i] = Skipped(arrays)
                continue
            x = Encoded(*(None if a is None else torch.from_numpy(a) for a in arrays), meta)
            if pixels is not None and x.pixel_values is not None:
                key = pixels.key(ds.encoder.image_key, ds.records[i], ds.folder)
                kept = pixels.get(key)
                if kept is None:
                    if pixels.put(key, x.pixel_values, x.image_sizes):
                        mine.add(key)
                else:  # the same bits (a worker read them from the store): share, not copy
                    x.pixel_values, x.image_sizes = kept
                    reused += key not in mine
            cache[i] = x
            nbytes += encoded_bytes(x)
            if nbytes > limit_bytes:  # the workers shut down as the loader is collected
                return PreEncoded(ds, cache, nbytes, complete=len(cache) == len(order),
                                  reused=reused)
    return PreEncoded(ds, cache, nbytes, complete=True, reused=reused)


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, L] right-padded with pad_id
    attention_mask: torch.Tensor   # [B, L] 1 on real tokens
    labels: torch.Tensor           # [B, L] IGNORE on padding
    pixel_values: torch.Tensor | None  # [n_images_total, max_crops, 3, S, S]
    image_sizes: torch.Tensor | None   # [n_images_total, 2]
    images_per_sample: list[int]
    meta: list[dict]
    skipped: list[str] = field(default_factory=list)  # reasons of the samples collate dropped
    answers: AnswerIndex | None = None  # where `labels`' answer tokens are predicted (host-built)
    layout: BatchLayout | None = None   # VISOR's layout (`with_layout`); it owns the crops then
    teacher: Batch | None = None        # the same samples as the dense teacher reads them
                                        # (`teacher_batch`), for a distilling stage

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn, nested) -> Batch:
        """``fn`` on the token and pixel tensors, ``nested`` on answers and layout;
        ``image_sizes`` stays as it is (only read as Python sizes)."""
        f = lambda t: None if t is None else fn(t)  # noqa: E731
        return Batch(f(self.input_ids), f(self.attention_mask), f(self.labels),
                     f(self.pixel_values), self.image_sizes, self.images_per_sample,
                     self.meta, self.skipped,
                     None if self.answers is None else nested(self.answers),
                     None if self.layout is None else nested(self.layout),
                     None if self.teacher is None else nested(self.teacher))

    def to(self, device, non_blocking: bool = False) -> Batch:
        """On ``device``; ``image_sizes`` stays on the host."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking),
                         lambda x: x.to(device, non_blocking))

    def pin_memory(self) -> Batch:
        """Page-locked host copies (the DataLoader's ``pin_memory=True`` calls this)."""
        return self._map(lambda t: t.pin_memory(), lambda x: x.pin_memory())

    @property
    def answer_tokens(self) -> int:
        """Answer tokens in the batch, a host-side count (no device read)."""
        if self.answers is not None:
            return self.answers.count
        return int((self.labels[:, 1:] != IGNORE).sum())


def collate(samples: Sequence[Encoded | Skipped | None], pad_id: int) -> Batch | None:
    """Pad encoded samples into a `Batch`; skipped ones are dropped (None if nothing is left)."""
    skipped = [s.reason for s in samples if isinstance(s, Skipped)]
    samples = [s for s in samples if isinstance(s, Encoded)]
    if not samples:
        return None
    n = max(s.input_ids.numel() for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for b, s in enumerate(samples):
        k = s.input_ids.numel()
        ids[b, :k], labels[b, :k], mask[b, :k] = s.input_ids, s.labels, 1
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    pixel_values = image_sizes = None
    if pix:
        crops = max(p.shape[1] for p in pix)
        pixel_values = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, crops - p.shape[1]))
                                  for p in pix])
        image_sizes = torch.cat([s.image_sizes for s in samples if s.image_sizes is not None])
    per = [0 if s.pixel_values is None else s.pixel_values.shape[0] for s in samples]
    return Batch(ids, mask, labels, pixel_values, image_sizes, per, [s.meta for s in samples],
                 skipped, AnswerIndex.from_labels(labels))


def teacher_batch(batch: Batch, token_id: int, pad_id: int) -> Batch:
    """``batch`` as the dense teacher reads it: every ``token_id`` (VISOR's routing token, which
    the VISOR template appends after each question and LLaVA-OV's does not) dropped, the rows
    re-padded on the right. Everything else is the dense model's own prompt, so the teacher's
    answer tokens are the student's, in the same row-major order (``answers``).

    Footgun: call it before `with_layout`, which drops ``pixel_values`` (the layout owns them).
    """
    keep = (batch.input_ids != token_id) & (batch.attention_mask > 0)   # [B, L]
    n = keep.sum(1)                                                    # [B]
    L = int(n.max())
    dest = torch.cumsum(keep, 1) - 1                                   # [B, L] new position
    b, j = keep.nonzero(as_tuple=True)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    ids[b, dest[b, j]] = batch.input_ids[b, j]
    labels[b, dest[b, j]] = batch.labels[b, j]
    mask[b, dest[b, j]] = 1
    return Batch(ids, mask, labels, batch.pixel_values, batch.image_sizes,
                 batch.images_per_sample, batch.meta, answers=AnswerIndex.from_labels(labels))


def with_layout(batch: Batch | None, model_config) -> Batch | None:
    """``batch`` with VISOR's `BatchLayout` built (host, off the step); the layout then owns the
    selected crops, so the padded ``pixel_values`` are dropped rather than copied twice."""
    if batch is None:
        return None
    from visor_vllm.model.batch_layout import build_layout

    lay = build_layout(model_config, batch.input_ids, batch.attention_mask, batch.labels,
                       batch.images_per_sample, batch.image_sizes, batch.pixel_values)
    return dataclasses.replace(batch, pixel_values=None, layout=lay)


def iter_batches(ds: EncodedDataset, pad_id: int, batch_size: int):
    """``(indices of the usable samples, Batch)`` over ``ds`` in order (evaluation, features)."""
    for start in range(0, len(ds), batch_size):
        idx = list(range(start, min(start + batch_size, len(ds))))
        items = [ds[i] for i in idx]
        batch = collate(items, pad_id)
        if batch is not None:
            yield [i for i, x in zip(idx, items) if isinstance(x, Encoded)], batch


def prompt_lengths(checkpoint: str | os.PathLike, data: str | os.PathLike) -> tuple[int, int]:
    """Image and text tokens of ``data``'s first prompt: the request shape FLOP ratios use."""
    encoder = SampleEncoder(checkpoint)
    enc = encoder.encode(load_records(data)[0], default_image_folder(data))
    n_img = int((enc.input_ids == encoder.image_token_id).sum())
    return n_img, int(enc.input_ids.numel()) - n_img
