"""The one ledger of patches to third-party internals. Nothing else in visor-vllm monkeypatches.

Every patch is listed here and registered in `PATCHES` (a test enumerates them and checks each has
its why/how/removal text). `apply_transformers_patches()` applies the ones that are needed in this
environment, idempotently.

Ledger
------

1. ``transformers-video-processor-stub`` (transformers 5.19; only when torchvision is missing)

   Why.  ``ProcessorMixin.from_pretrained`` always loads every sub-processor its class declares,
   and `LlavaOnevisionProcessor` declares a ``video_processor``. In transformers 5.19
   `AutoVideoProcessor` / `LlavaOnevisionVideoProcessor` are torchvision-only dummy classes, so
   ``LlavaOnevisionProcessor.from_pretrained(dir)`` fails on a machine without torchvision even
   for image-only use -- and VISOR is image-only. Also ``VideoProcessorMixin`` (which
   ``ProcessorMixin`` resolves *by name* on the ``transformers`` module to type-check the
   sub-processor) is not exported there without torchvision.
   How.  Point ``transformers.processing_utils._LazyAutoProcessorMapping._MAPPING_NAMES
   ["video_processor"]`` at `NoVideoAutoProcessor` (this module), whose ``from_pretrained``
   returns a `NoVideoProcessor` (a `VideoProcessorMixin` whose ``__call__`` raises
   `NotImplementedError`), and set ``transformers.VideoProcessorMixin``.
   When it can go.  When torchvision is installed (the patch is then skipped), or when
   transformers loads only the sub-processors a checkpoint ships / exports VideoProcessorMixin
   unconditionally.

2. ``vllm-pixtral-image-processing-shim`` (vLLM 0.32 import path; only when torchvision is missing)

   Why.  vLLM's ``model_executor/models/llava.py`` (imported for LLaVA-OneVision and so for
   VISOR) imports ``.pixtral``, which does ``from transformers.models.pixtral.
   image_processing_pixtral import _num_image_tokens``; that transformers module imports
   torchvision at top level, so importing vLLM's LLaVA family fails without torchvision.
   How.  Put a shim module of that name into ``sys.modules`` exposing only ``_num_image_tokens``,
   re-exported from the torchvision-free ``image_processing_pil_pixtral`` (same function).
   When it can go.  When torchvision is installed (skipped then), or when vLLM stops importing
   the torchvision-backed module (or transformers stops importing torchvision at its top level).

3. ``vllm-encoder-outputs-in-row-order`` (vLLM 0.32 V1 model runner; VISOR worker processes)

   Why.  In encoder-decoder mode ``encoder_outputs`` reach ``forward`` in scheduling order,
   while attention metadata and the logits-processor state are in persistent-batch row order;
   a new request may take any free row, so matching images to rows by position could swap two
   requests' images silently.
   How.  Wrap ``GPUModelRunner._batch_mm_inputs_from_scheduler`` to stable-sort its items by
   (modality, row of the item's request). Applied by the VISOR model's ``__init__`` only
   (`apply_vllm_patches`), so only processes serving VISOR are touched.
   When it can go.  With Model Runner V2 everywhere (it orders by ``input_batch.req_ids``), or
   when vLLM documents a row-order contract for encoder outputs.

4. ``pil-bomb-check-deferred-to-vllm`` (PIL's process-global ``Image.MAX_IMAGE_PIXELS``; the
   process that builds the VISOR multimodal processor, i.e. the API server)

   Why.  vLLM 0.32 opens request images with PIL and then answers HTTP 400 when
   ``w*h > VLLM_MAX_IMAGE_PIXELS``. Its default (178,956,970) equals PIL's own bomb threshold
   (``2 * MAX_IMAGE_PIXELS``), so PIL raises ``DecompressionBombError`` inside ``Image.open``
   first; that is neither ``OSError`` nor ``ValueError``, and vLLM answers HTTP 500 with a
   traceback (measured: a 109 KB PNG whose header says 30000x30000).
   How.  ``Image.MAX_IMAGE_PIXELS = None`` while vLLM's limit is on (> 0), so vLLM's header
   check answers 400 before any decode; `visor_vllm.engine.inputs` keeps the rest of the input checks.
   With ``VLLM_MAX_IMAGE_PIXELS=0`` PIL's guard stays.
   When it can go.  When vLLM catches ``DecompressionBombError`` (the test
   ``tests/engine/test_inputs.py`` pins the 500 and will say so).

5. ``vllm-models-config-map-visor-hook`` (vLLM 0.32 ``MODELS_CONFIG_MAP``; every process that
   builds a ``VllmConfig``)

   Why.  One vLLM default would break VISOR far from its cause: full decode-only CUDA
   graphs for encoder-decoder models on GPU (VISOR's compiled step is free of host syncs, but
   a replay would reuse per-step host bounds and skip the Python side channels). The model
   runner is left to vLLM (VISOR runs on V1 and on Model Runner V2); the hook logs which one
   the config resolves to. vLLM's supported seam for per-architecture config
   changes is ``verify_and_update_config`` in ``MODELS_CONFIG_MAP``, but that dict has no
   registration API for out-of-tree models.
   How.  ``MODELS_CONFIG_MAP["VisorForConditionalGeneration"] = VisorConfigHook``
   (`visor_vllm.engine.config_hook`), installed by ``register()``; the hook sets
   ``cudagraph_mode = NONE`` with a log line, and logs the runner.
   When it can go.  When vLLM offers a registration API for config hooks (then use it), and
   the setting itself when a captured VISOR step is proven on a GPU.

6. ``vllm-kv-manager-tells-visor-the-request`` (vLLM 0.32 ``KVCacheManager.allocate_slots``;
   the scheduler's process, only once a VISOR SA-layer manager exists)

   Why.  VISOR's SA-capable layers keep one ``[vision ; text]`` sequence per request
   (`visor_vllm.engine.kv_layout`): a request needs ``Nv + T`` slots there when its budget may
   run the group's layers, ``T`` when it cannot. vLLM's single-type managers are told request
   ids and text token counts only; the image size and the budget (``sampling_params.
   extra_args``) are on the request.
   How.  Wrap ``allocate_slots(request, ...)``: first hand the request to every
   `VisorSAManager` of the coordinator (``visor_note(request)``), then run vLLM's code, in which
   that manager adds the noted vision prefix to the token counts. Applied by the manager's
   ``__init__``.
   When it can go.  When vLLM passes the request (or its sampling params) to single-type
   managers, or has a per-request allocation hook.

Not a patch, recorded here because it works around vLLM internals: `VisorMultiModalProcessor`
reports every image placeholder at encoder offset 0. vLLM 0.32's scheduler compares decoder
token counts with encoder placeholder offsets when it decides which encoder inputs to run, so a
second image whose offset exceeds the decoder prompt length would never be scheduled; in
enc-dec mode nothing else reads the offsets. It can go when the scheduler stops doing that.

Footguns. Patches mutate process-global state: apply them before the first processor load / vLLM
model import in each process (the vLLM plugin's ``register()`` does). Do not add a patch anywhere
else: add it here, to the docstring and to `PATCHES`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

from transformers.video_processing_utils import VideoProcessorMixin

_PIXTRAL_MODULE = "transformers.models.pixtral.image_processing_pixtral"


@dataclass(frozen=True)
class Patch:
    """One ledger entry: ``needed()`` says whether this environment needs it, ``apply()`` does it."""

    name: str
    target: str          # the third-party object that is patched
    why: str
    how: str
    removal: str         # when the patch can go
    needed: Callable[[], bool]
    applied: Callable[[], bool]
    apply: Callable[[], None]


# ---------------------------------------------------------------------------------------------
# Patch 1: a video processor stub so LlavaOnevisionProcessor loads without torchvision
# ---------------------------------------------------------------------------------------------

class NoVideoProcessor(VideoProcessorMixin):
    """Placeholder sub-processor: satisfies ProcessorMixin's type check; videos are unsupported."""

    def __init__(self, **kwargs):
        super().__init__()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "NoVideoProcessor":
        return cls()

    def __call__(self, videos=None, **kwargs):
        raise NotImplementedError(
            "video input is not supported: VISOR is image-only, and transformers' video "
            "processors need torchvision, which is not installed")


class NoVideoAutoProcessor:
    """Stands in for `AutoVideoProcessor` in the processor-loading lookup table."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> NoVideoProcessor:
        return NoVideoProcessor()


def _torchvision_missing() -> bool:
    from transformers.utils import is_torchvision_available

    return not is_torchvision_available()


def _video_stub_applied() -> bool:
    from transformers import processing_utils

    names = processing_utils._LazyAutoProcessorMapping._MAPPING_NAMES
    return names["video_processor"] == (__name__, NoVideoAutoProcessor.__name__)


def _apply_video_stub() -> None:
    from transformers import processing_utils

    processing_utils._LazyAutoProcessorMapping._MAPPING_NAMES["video_processor"] = (
        __name__, NoVideoAutoProcessor.__name__)
    module = processing_utils.transformers_module
    if not hasattr(module, "VideoProcessorMixin"):
        setattr(module, "VideoProcessorMixin", VideoProcessorMixin)


# ---------------------------------------------------------------------------------------------
# Patch 2: the pixtral image-processing shim module vLLM's llava.py imports
# ---------------------------------------------------------------------------------------------

def _pixtral_shim_applied() -> bool:
    return getattr(sys.modules.get(_PIXTRAL_MODULE), "__visor_shim__", False)


def _apply_pixtral_shim() -> None:
    from transformers.models.pixtral.image_processing_pil_pixtral import _num_image_tokens

    shim = types.ModuleType(_PIXTRAL_MODULE, "visor_vllm.patches shim: _num_image_tokens only")
    shim._num_image_tokens = _num_image_tokens
    shim.__visor_shim__ = True
    sys.modules[_PIXTRAL_MODULE] = shim


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

PATCHES: list[Patch] = [
    Patch(
        name="transformers-video-processor-stub",
        target="transformers.processing_utils._LazyAutoProcessorMapping._MAPPING_NAMES"
               "['video_processor'] and transformers.VideoProcessorMixin",
        why="LlavaOnevisionProcessor.from_pretrained always loads a video processor, which is "
            "torchvision-only in transformers 5.19; VISOR is image-only.",
        how="the lookup points at NoVideoAutoProcessor (a stub whose __call__ raises "
            "NotImplementedError); VideoProcessorMixin is exported for the by-name type check.",
        removal="drop when torchvision is installed everywhere or transformers stops requiring "
                "a video processor for image-only use.",
        needed=_torchvision_missing, applied=_video_stub_applied, apply=_apply_video_stub,
    ),
    Patch(
        name="vllm-pixtral-image-processing-shim",
        target=f"sys.modules[{_PIXTRAL_MODULE!r}]",
        why="vLLM's llava.py imports pixtral.py, which imports _num_image_tokens from a "
            "transformers module that imports torchvision at top level.",
        how="a shim module of that name exposing only _num_image_tokens, re-exported from the "
            "torchvision-free image_processing_pil_pixtral.",
        removal="drop when torchvision is installed everywhere or vLLM stops importing the "
                "torchvision-backed pixtral image processor module.",
        needed=_torchvision_missing, applied=_pixtral_shim_applied, apply=_apply_pixtral_shim,
    ),
]


def apply_transformers_patches() -> list[str]:
    """Apply every ledger patch this environment needs; idempotent.

    Returns the names of the patches in effect after the call (the same list on every call).
    """
    return _apply(PATCHES)


def _apply(entries: list[Patch]) -> list[str]:
    """Apply the needed, not yet applied ``entries``; the names of those in effect."""
    in_effect = []
    for patch in entries:
        if not patch.needed():
            continue
        if not patch.applied():
            patch.apply()
        in_effect.append(patch.name)
    return in_effect


# ---------------------------------------------------------------------------------------------
# Patch 3 (vLLM, VISOR workers only): encoder outputs in persistent-batch row order
# ---------------------------------------------------------------------------------------------
#
# Why.  In encoder-decoder mode the V1 model runner passes ``encoder_outputs`` (one tensor per
#   image) to ``forward`` in *scheduling* order (``scheduled_encoder_inputs`` dict order,
#   ``gpu_model_runner.py`` ``_batch_mm_inputs_from_scheduler``), while every per-row tensor
#   the model sees (attention metadata, logits-processor state) is in *persistent-batch row*
#   order. The two usually agree, but a new request may fill any free row, so a VISOR model
#   that matched images to rows by position could silently swap two requests' images.
# How.  Wrap ``GPUModelRunner._batch_mm_inputs_from_scheduler`` (CPUModelRunner inherits it)
#   to stable-sort its items by (modality, row of the item's request); the runner's own
#   comment notes that the order is otherwise free. Applied from the VISOR model's
#   ``__init__``, i.e. only in worker processes serving VISOR.
# When it can go.  With Model Runner V2 (which orders encoder inputs by ``input_batch.req_ids``)
#   on every platform VISOR targets, or when vLLM documents the row-order contract.

_RUNNER = "vllm.v1.worker.gpu_model_runner.GPUModelRunner._batch_mm_inputs_from_scheduler"


def _rows_order_applied() -> bool:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return hasattr(GPUModelRunner._batch_mm_inputs_from_scheduler, "__visor_original__")


def _apply_rows_order() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._batch_mm_inputs_from_scheduler

    def in_row_order(self, scheduler_output):
        hashes, kwargs, refs = original(self, scheduler_output)
        rows = self.input_batch.req_id_to_index
        order = sorted(range(len(kwargs)), key=lambda i: (kwargs[i][0], rows[refs[i][0]]))
        return [hashes[i] for i in order], [kwargs[i] for i in order], [refs[i] for i in order]

    in_row_order.__visor_original__ = original
    GPUModelRunner._batch_mm_inputs_from_scheduler = in_row_order


VLLM_PATCHES: list[Patch] = [
    Patch(
        name="vllm-encoder-outputs-in-row-order",
        target=_RUNNER,
        why="encoder outputs follow scheduling order, rows follow the persistent batch; VISOR "
            "matches images to rows by order.",
        how="stable-sort the runner's encoder items by (modality, row of their request).",
        removal="drop with Model Runner V2 everywhere (it orders by input_batch.req_ids).",
        needed=lambda: True, applied=_rows_order_applied, apply=_apply_rows_order,
    ),
]


def apply_vllm_patches() -> list[str]:
    """Apply the vLLM patches (called by the VISOR model in each worker process); idempotent."""
    for patch in VLLM_PATCHES:
        if not patch.applied():
            patch.apply()
    return [p.name for p in VLLM_PATCHES]


# ---------------------------------------------------------------------------------------------
# Patch 4 (the VISOR processor's process): PIL's bomb check deferred to vLLM's pixel limit
# ---------------------------------------------------------------------------------------------

def _vllm_pixel_limit_on() -> bool:
    from visor_vllm import envs

    return int(envs.VLLM_MAX_IMAGE_PIXELS) > 0


def _pil_check_off() -> bool:
    from PIL import Image

    return Image.MAX_IMAGE_PIXELS is None


def _turn_pil_check_off() -> None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None


FRONTEND_PATCHES: list[Patch] = [
    Patch(
        name="pil-bomb-check-deferred-to-vllm",
        target="PIL.Image.MAX_IMAGE_PIXELS",
        why="PIL's DecompressionBombError fires before vLLM's VLLM_MAX_IMAGE_PIXELS check and "
            "becomes HTTP 500; vLLM's check answers 400 from the header alone.",
        how="Image.MAX_IMAGE_PIXELS = None while VLLM_MAX_IMAGE_PIXELS > 0.",
        removal="drop when vLLM maps DecompressionBombError to a 400 itself.",
        needed=_vllm_pixel_limit_on, applied=_pil_check_off, apply=_turn_pil_check_off,
    ),
]


def apply_frontend_patches() -> list[str]:
    """Apply the patches the VISOR multimodal processor's process needs; idempotent."""
    return _apply(FRONTEND_PATCHES)


# ---------------------------------------------------------------------------------------------
# Patch 5 (every process that builds a VllmConfig): VISOR's config hook in MODELS_CONFIG_MAP
# ---------------------------------------------------------------------------------------------

def _vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


ARCH = "VisorForConditionalGeneration"
_HOOK: list = []  # the hook class `apply_config_patches` was given


def _config_hook_applied() -> bool:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    return bool(_HOOK) and MODELS_CONFIG_MAP.get(ARCH) is _HOOK[0]


def _apply_config_hook() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP[ARCH] = _HOOK[0]


CONFIG_PATCHES: list[Patch] = [
    Patch(
        name="vllm-models-config-map-visor-hook",
        target="vllm.model_executor.models.config.MODELS_CONFIG_MAP"
               "['VisorForConditionalGeneration']",
        why="full decode-only CUDA graphs are a vLLM default VISOR is not proven under (a "
            "replayed step would reuse per-step host bounds and skip the side channels); "
            "MODELS_CONFIG_MAP is the per-architecture seam but has no registration API.",
        how="insert VisorConfigHook (visor_vllm.engine.config_hook): cudagraph_mode NONE, "
            "logged; the model runner (V1 or V2) is vLLM's choice and is logged.",
        removal="use vLLM's registration API once there is one; drop the setting once a "
                "captured VISOR step is proven end to end on a GPU.",
        needed=_vllm_importable, applied=_config_hook_applied, apply=_apply_config_hook,
    ),
]


def apply_config_patches(hook) -> list[str]:
    """Install ``hook`` (`visor_vllm.engine.config_hook.VisorConfigHook`) as VISOR's vLLM config
    hook where vLLM is installed (``register()`` passes it: this ledger imports nothing of the
    package's, so imports run one way); idempotent."""
    _HOOK[:] = [hook]
    return _apply(CONFIG_PATCHES)


# ---------------------------------------------------------------------------------------------
# Patch 6 (the scheduler's process): VISOR's vision manager sees the request it allocates for
# ---------------------------------------------------------------------------------------------

def _allocate_slots_applied() -> bool:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    return hasattr(KVCacheManager.allocate_slots, "__visor_original__")


def _apply_allocate_slots() -> None:
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    original = KVCacheManager.allocate_slots

    def allocate_slots(self, request, *args, **kwargs):
        for manager in self.coordinator.single_type_managers:
            note = getattr(manager, "visor_note", None)  # VisorSAManager's (engine/kv_layout)
            if note is not None:
                note(request)
        return original(self, request, *args, **kwargs)

    allocate_slots.__visor_original__ = original
    KVCacheManager.allocate_slots = allocate_slots


SCHEDULER_PATCHES: list[Patch] = [
    Patch(
        name="vllm-kv-manager-tells-visor-the-request",
        target="vllm.v1.core.kv_cache_manager.KVCacheManager.allocate_slots",
        why="VISOR's SA-layer KV groups hold [vision ; text] per request, the vision prefix only "
            "for requests whose budget can run those layers (visor_vllm.engine.kv_layout); "
            "vLLM's single-type managers get request ids and text token counts, not the "
            "requests whose images and vllm_xargs decide the prefix.",
        how="wrap allocate_slots: before vLLM's code, hand the request to each "
            "VisorSAManager (visor_note(request)), which keeps each id's vision prefix.",
        removal="drop when vLLM passes the Request (or its sampling params) to single-type "
                "managers, or offers a per-request allocation hook.",
        needed=_vllm_importable, applied=_allocate_slots_applied, apply=_apply_allocate_slots,
    ),
]


def apply_scheduler_patches() -> list[str]:
    """Applied by `VisorSAManager.__init__`, i.e. only where a VISOR scheduler runs."""
    return _apply(SCHEDULER_PATCHES)
