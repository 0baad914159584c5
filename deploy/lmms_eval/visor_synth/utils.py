"""lmms-eval hooks for the synthetic task: the same question, image and scoring as `visor-vllm eval`."""

import os
from pathlib import Path

from PIL import Image


def _root() -> Path:
    return Path(os.environ["VISOR_SYNTH_DATA"])


def doc_to_visual(doc):
    return [Image.open(_root() / doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["conversations"][0]["value"].replace("<image>", "").strip()


def doc_to_target(doc):
    return doc["conversations"][1]["value"]


def process_results(doc, results):
    pred = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(pred == doc_to_target(doc).strip().lower())}
