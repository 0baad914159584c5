"""VISOR inside vLLM V1: vision K/V paged once per request, first-pass router, mixed batches.

Layout (see ../shared/research/vllm-v1-feasibility.md section 3 and `visor_vllm.model.plan`):

* The visual tokens are the **encoder sequence** (``is_encoder_decoder``); the decoder sequence
  is the prompt without its image placeholders. Text K/V of the text-only layers is ordinary
  paged KV over text tokens only.
* ``cross`` layers run `VisorCrossAttention` on vLLM's `CrossAttention`: the visual keys/values
  (RMSNorm, per-image depthwise conv, k/v projections) are computed and written **once**, in
  the request's first step, then only read by the CPU/GPU kernel.
* ``self`` (SA-capable) layers keep one paged sequence per request, ``[V ; T]``
  (`visor_vllm.engine.kv_layout`). In the first step the visual stream of every row that runs
  the layer is advanced through it (causal among its own visual tokens; ``V`` precedes ``T``)
  and its keys/values are written once at the head of that sequence; a row that skips the layer
  has no vision there. Text queries then attend the sequence causally with vLLM's own kernel
  (`visor_vllm.engine.sa_attention`), so rows with different configurations share one batch,
  one kernel call per layer, and no mask.
* The router runs in the first step at ``config.router_layer`` on the prompt's routing tokens
  (restricted by the request's budget) and fixes the row's configuration in `bridge.RowState`.

Footguns.
* Encoder outputs are matched to rows by order; `visor_vllm.patches` makes vLLM emit them in
  persistent-batch row order (it otherwise follows scheduling order).
* Enc-dec mode in vLLM 0.32 disables chunked prefill, prefix caching and the encoder cache:
  every request's prompt is prefilled in one step (which is what lets the router run first).
* No per-row Python loops on the hot path; shapes are noted next to tensors. ``R`` rows,
  ``N`` scheduled tokens, ``Nv`` visual tokens of a row, ``L`` layers, ``C`` configurations.
"""

from __future__ import annotations

import atexit
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.library import Library

from visor_vllm.patches import apply_transformers_patches

apply_transformers_patches()  # vLLM's llava.py imports a torchvision-only module (ledger entry 2)

from transformers import BatchFeature  # noqa: E402
from vllm.compilation.decorators import support_torch_compile  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.distributed.parallel_state import get_tensor_model_parallel_rank  # noqa: E402
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.model_executor.layers.attention.cross_attention import CrossAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                               ReplicatedLinear, RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                 VocabParallelEmbedding)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llava import init_vision_tower_for_llava
from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionMultiModalProjector,
                                                        LlavaOnevisionProcessingInfo)
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing.processor import EncDecMultiModalProcessor
from vllm.v1.attention.backend import AttentionType

from visor_vllm import patches
from visor_vllm.engine import bridge, kv_layout, sa_attention, stats
from visor_vllm.engine.vision_cache import (VisionCache, budget_bytes, image_key,
                                            processed_images, processor_cache)
from visor_vllm.engine.inputs import check_images
from visor_vllm.model import layers, plan
from visor_vllm.model.config import VisorConfig
from visor_vllm.model.packing import (anyres_grid_view, crop_side, pack_features,
                                      projector_config, visual_token_count)

logger = init_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Multimodal processing: encoder prompt = image placeholders, decoder prompt = the text
# ---------------------------------------------------------------------------------------------

class VisorProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_hf_config(self) -> VisorConfig:
        cfg = self.ctx.get_hf_config(VisorConfig)
        bridge.FRONTEND_CONFIG = cfg  # lets budget validation check layer numbers at admission
        return cfg

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}  # enc-dec models serve one modality; videos are not VISOR's

    def get_num_image_tokens(self, *, image_width: int, image_height: int, num_images: int = 1) -> int:
        """LLaVA-OV's rule: one image gets anyres tiles; several images get base crop + newline.

        On the packed grid for VISOR-TR (`visor_vllm.model.packing.visual_token_count`, the
        count transformers' processor gives a TR checkpoint, and the reference's feature count).
        """
        return visual_token_count(self.get_hf_config(), image_height, image_width, num_images)


class VisorDummyInputsBuilder(LlavaOnevisionDummyInputsBuilder):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        cfg = self.info.get_hf_config()
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0) + cfg.routing_token

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        return {"image": super().get_dummy_mm_data(seq_len, {**mm_counts, "video": 0},
                                                   mm_options)["image"]}


class VisorMultiModalProcessor(EncDecMultiModalProcessor, LlavaOnevisionMultiModalProcessor):
    skip_decoder_start_token = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        patches.apply_frontend_patches()  # oversized images: vLLM's 400, not PIL's 500
        processor_cache()  # a bad VISOR_PROCESSOR_CACHE_MB stops the start, not a request

    def create_encoder_prompt(self, prompt, mm_items) -> list[int]:
        return [self.info.get_hf_config().image_token_index] * mm_items.get_count("image", strict=False)

    def create_decoder_prompt(self, prompt, mm_items):
        cfg = self.info.get_hf_config()
        if isinstance(prompt, str):
            return prompt.replace(self.info.get_hf_processor().image_token, "")
        return [t for t in prompt if t != cfg.image_token_index]

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        """Images only; several images go to transformers as *one* prompt's images, so they get
        LLaVA-OV's multi-image preprocessing (one crop each), exactly as the reference's inputs."""
        hf_data, hf_kwargs, passthrough = self._get_hf_mm_inputs(mm_items, hf_kwargs)
        if not hf_data:
            return self._finalize_hf_mm_data(hf_data, hf_kwargs, passthrough)
        call = dict(hf_data)
        images = call.get("images") or []
        check_images(images)  # zero-sized image -> 400, not a division by zero
        if len(images) > 1:
            call["images"] = [list(images)]
        # vLLM disables its processor cache for enc-dec models: a chat's next turn (or the next
        # question about the same image) takes the processed image from ours (vision_cache.py)
        processed = processed_images(
            images, self._processor_context(call, hf_kwargs),
            lambda: self.info.ctx.call_hf_processor(
                self.info.get_hf_processor(**hf_kwargs), call, hf_kwargs), wrap=BatchFeature)
        hf_data.pop("text", None)
        return self._finalize_hf_mm_data(hf_data, hf_kwargs, passthrough, processed)

    def _processor_context(self, call: dict, hf_kwargs) -> str:
        """What decides the processed images besides their pixels: this model's image
        processor config, dtype (vLLM casts the pixels to it) and configured processor kwargs
        (merged into every call), the call's other inputs (the image-token text) and its
        arguments. The cache is the process's, shared by every model an offline process builds."""
        if not hasattr(self, "_model_context"):
            mc = self.info.ctx.model_config
            self._model_context = "|".join((
                self.info.get_hf_processor().image_processor.to_json_string(), str(mc.dtype),
                repr(getattr(mc.multimodal_config, "mm_processor_kwargs", None))))
        rest = {k: v for k, v in call.items() if k != "images"}
        return "|".join((self._model_context, repr(sorted(rest.items())),
                         repr(sorted(dict(hf_kwargs).items()))))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        from vllm.multimodal.parse import ImageProcessorItems
        from vllm.multimodal.processing import PromptReplacement

        cfg = self.info.get_hf_config()
        n_images = mm_items.get_count("image", strict=False)

        def replacement(item_idx: int):
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            n = self.info.get_num_image_tokens(image_width=size.width, image_height=size.height,
                                               num_images=n_images)
            return [cfg.image_token_index] * n

        return [PromptReplacement(modality="image", target=[cfg.image_token_index],
                                  replacement=replacement)]

    def apply(self, inputs, timing_ctx):
        out = super().apply(inputs, timing_ctx)
        # All images at encoder offset 0. vLLM 0.32's scheduler compares *decoder* token counts
        # with *encoder* placeholder offsets (scheduler.py, _try_schedule_encoder_inputs, the
        # disable_chunked_mm_input roll-back), so a second image at offset > decoder prompt
        # length is never scheduled. Offsets mean nothing else in enc-dec mode (the encoder
        # length is the sum of placeholder lengths); order is kept. Ledger: visor_vllm.patches.
        out["mm_placeholders"] = {m: [dataclasses.replace(p, offset=0) for p in ps]
                                  for m, ps in out["mm_placeholders"].items()}
        cfg = self.info.get_hf_config()
        if (inputs.mm_data_items.get_count("image", strict=False) and plan.needs_router(cfg)
                and cfg.routing_token_id not in out["prompt_token_ids"]):
            raise ValueError(
                f"a VISOR prompt with images needs the routing token {cfg.routing_token!r} after "
                "the question; the model's chat template adds it (use chat.completions)")
        return out


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    """On CPU attention math runs in fp32: bf16 SDPA is ~6x slower there without AMX (1.7 vs
    0.3 ms for one decode query over 1.5k keys, 2 cores), and fp32 is what the reference computes."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class VisorCrossAttention(nn.Module):
    """Text queries, visual keys/values (paper Sec. 4.2.1); same math as the reference's."""

    def __init__(self, cfg: VisorConfig, cache_config, quant_config, prefix: str):
        super().__init__()
        tc = cfg.text_config
        d, self.total_heads = tc.hidden_size, tc.num_attention_heads
        self.head_dim = d // self.total_heads
        self.text_norm = RMSNorm(d, eps=tc.rms_norm_eps)
        self.vision_norm = RMSNorm(d, eps=tc.rms_norm_eps)
        k = cfg.cross_attn_conv_kernel
        self.pos_conv = nn.Conv1d(d, d, k, padding=k // 2, groups=d)  # replicated under TP
        kv = tc.num_key_value_heads * self.head_dim
        self.q_proj = ColumnParallelLinear(d, self.total_heads * self.head_dim, bias=True,
                                           quant_config=quant_config, prefix=f"{prefix}.q_proj")
        self.kv_proj = MergedColumnParallelLinear(d, [kv, kv], bias=True, quant_config=quant_config,
                                                  prefix=f"{prefix}.kv_proj")
        self.o_proj = RowParallelLinear(self.total_heads * self.head_dim, d, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.kv_size = self.kv_proj.output_size_per_partition // 2
        heads = self.q_proj.output_size_per_partition // self.head_dim
        self.attn = CrossAttention(heads, self.head_dim, self.head_dim ** -0.5,
                                   num_kv_heads=self.kv_size // self.head_dim,
                                   cache_config=cache_config, prefix=f"{prefix}.attn",
                                   attn_type=AttentionType.ENCODER_DECODER)

    def vision_kv(self, vis: torch.Tensor, item_lens: Sequence[int]):
        """vis [Nv_new, d] (new rows, row order) -> k, v [Nv_new, Hkv_local * D]."""
        kv, _ = self.kv_proj(layers.cross_vision_input(self, vis, item_lens))
        return kv.split([self.kv_size, self.kv_size], dim=-1)

    def forward(self, x: torch.Tensor, vis: torch.Tensor | None, item_lens) -> torch.Tensor:
        """The residual update ``[N, d]`` from the text stream after ``text_norm`` (``x``, which
        the decoder fuses with the residual add, as vLLM's layers do); vision K/V are written
        only when ``vis`` is given."""
        q, _ = self.q_proj(x)
        k = v = None
        if vis is not None and vis.shape[0]:
            k, v = self.vision_kv(vis, item_lens)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class VisorRouter(nn.Module):
    def __init__(self, cfg: VisorConfig, prefix: str):
        super().__init__()
        tc = cfg.text_config
        self.norm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)
        self.fc1 = ReplicatedLinear(tc.hidden_size, cfg.router_hidden_size, bias=True,
                                    prefix=f"{prefix}.fc1")
        self.fc2 = ReplicatedLinear(cfg.router_hidden_size, len(cfg.sa_configs), bias=True,
                                    prefix=f"{prefix}.fc2")

    def forward(self, x):  # [M, d] -> [M, C]
        h, _ = self.fc1(self.norm(x))
        out, _ = self.fc2(F.gelu(h))
        return out


class _Step:
    """Per-step batch facts derived from attention metadata, built by the ``visor::step`` op.

    Tensor ops only, no device-to-host read, and host ints that do not change between the
    steps of one captured graph: ``R`` and ``N`` are the batch's (padded) rows and tokens,
    ``max_vision`` a static bound. So a captured graph can replay it for another batch of the
    same size (`tests/engine/test_graph_replay.py`). Padding, as vLLM pads a batch to a graph's
    size: rows with no tokens (``q == 0``, ``seq_len == 0``) and tokens after the last row's
    (``valid`` false), which write no K/V and count no FLOPs. First-step facts (``new``,
    ``vis_row``...) are added by `VisorDecoder.first_step`, which runs eagerly.
    """

    def __init__(self, model: VisorDecoder, positions: torch.Tensor, slots, state, md):
        text_md = md[model.layers[0].self_attn.attn.layer_name]  # every group: same qsl/seq_lens
        x_md = md[model.first_cross_name]
        dev = positions.device
        self.qsl = text_md.query_start_loc.long()                      # [R+1]
        self.R, self.N = self.qsl.numel() - 1, text_md.num_actual_tokens
        q_lens = self.qsl[1:] - self.qsl[:-1]                           # [R]
        self.seq_lens = text_md.seq_lens[: self.R].long()               # [R] after this step
        self.computed = self.seq_lens - q_lens                          # [R]
        self.n_vision = x_md.seq_lens[: self.R].long()                  # [R]
        self.max_vision = model.max_vision   # static host bound >= n_vision.max() (kernels)
        # each row's slot in bridge.RowState: V1 = the persistent-batch row itself; MRV2 = the
        # request's state index (input_batch.idx_mapping, passed by engine/model_state.py)
        self.slots = (torch.arange(self.R, device=dev) if slots is None
                      else slots[: self.R].to(dev).long())                       # [R]
        tok = torch.arange(self.N, device=dev)                                   # [N]
        # each token's row: the first row whose end is past it (rows with q == 0 hold none)
        self.row = torch.searchsorted(self.qsl[1:], tok, right=True).clamp_(max=self.R - 1)
        self.valid = tok < self.qsl[-1]                       # [N] false: padding tokens
        self.col = torch.where(self.valid, tok - self.qsl[self.row], 0)  # [N] (padding: 0)
        self.text_pos = self.computed[self.row] + self.col   # [N] each token's text index
        self.has_vis = torch.zeros(positions.shape[0], 1, dtype=torch.bool, device=dev)
        self.has_vis[: self.N, 0] = (self.n_vision > 0)[self.row] & self.valid  # [T, 1]
        pos = positions.clone()
        pos[: self.N] += torch.where(self.valid, self.n_vision[self.row], 0)  # text j at Nv + j
        self.positions = pos                                            # [T]
        self.sa_mask = state.sa_mask[self.slots]  # [R, L]: first steps decide theirs below
        # dense LLaVA-OV's visual tokens per row (FLOP accounting): VISOR-TR's full count for
        # first-step rows, else what VISOR runs on. Decode rows keep theirs in bridge.RowState.
        self.n_dense_vision = self.n_vision                             # [R]
        self.new = None  # [R] rows whose images arrive now (first steps only)
        self.md = md

    def add_images(self, encoder_outputs, dense_vision, dtype) -> torch.Tensor:
        """First step: the rows whose encoder outputs arrive now, in row order; returns their
        visual tokens ``[Nv_new, d]``. Eager only (host reads)."""
        dev = self.qsl.device
        self.new = (self.computed == 0) & (self.n_vision > 0)           # [R]
        self.item_lens = [int(e.shape[0]) for e in encoder_outputs]
        new_lens = self.n_vision[self.new]
        if sum(self.item_lens) != int(new_lens.sum()):
            raise RuntimeError(f"VISOR: encoder outputs {self.item_lens} do not cover the visual "
                               f"tokens {new_lens.tolist()} of the rows in their first step")
        self.vis_row = torch.repeat_interleave(self.new.nonzero().flatten(), new_lens)  # [Nv_new]
        self.vis_col = (torch.arange(self.vis_row.numel(), device=dev)
                        - torch.repeat_interleave(new_lens.cumsum(0) - new_lens, new_lens))
        if dense_vision is not None:
            lens = torch.tensor(self.item_lens, device=dev)
            item_row = self.vis_row[lens.cumsum(0) - lens]                              # [items]
            dense = self.n_vision.clone()
            dense[self.new] = 0
            self.n_dense_vision = dense.index_add_(
                0, item_row, torch.tensor(list(dense_vision), device=dev, dtype=dense.dtype))
        return torch.cat(list(encoder_outputs)).to(dtype)


# ---------------------------------------------------------------------------------------------
# Custom ops: what a compiled step sees of VISOR's per-step state
# ---------------------------------------------------------------------------------------------
# vLLM compiles `VisorDecoder.forward` once (on CPU: dynamo traced once, then inductor) and
# replays it for every step without new images. Everything that depends on the step's
# attention metadata or on per-request state therefore lives in these two opaque ops, which
# run eagerly inside the compiled graph (as vLLM's own attention op does): traced code that
# read them would bake in the trace-time batch.

_LIB = Library("visor", "FRAGMENT")  # noqa: the ops live as long as this module


def _step_op(positions: torch.Tensor, slots: torch.Tensor | None,
             decoder: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the step's `_Step` on the decoder; return positions shifted past each row's
    image ``[T]`` and which tokens belong to rows with an image ``[T, 1]``."""
    ctx = get_forward_context()
    return ctx.no_compile_layers[decoder].begin_step(positions, slots, ctx.attn_metadata)


def _step_op_fake(positions, slots, decoder):
    return torch.empty_like(positions), positions.new_empty((positions.shape[0], 1),
                                                           dtype=torch.bool)


def _sa_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     layer_name: str) -> None:
    """SA-capable layer ``layer_name``: write this step's text K/V after each row's vision
    prefix and attend ``[vision if the row runs the layer ; causal text]`` into ``out``."""
    ctx = get_forward_context()
    sa = ctx.no_compile_layers[layer_name]
    s = ctx.no_compile_layers[sa.visor_decoder]._step
    if s is None:  # profiling / dummy run: no metadata, nothing cached
        out.zero_()
        return
    n = s.N
    prefix = torch.where(s.sa_mask[:, sa.visor_layer], s.n_vision, 0)       # [R]
    md = s.md[layer_name]
    bs = sa_attention.kernel_block_size(sa.kv_cache)
    q, k, v = q[:n], k[:n], v[:n]
    slot = sa_attention.slots(md.block_table, s.row, prefix[s.row] + s.text_pos, bs)  # [N]
    sa_attention.write(sa, k, v, torch.where(s.valid, slot, -1))  # padding writes nothing
    mdp = sa_attention.with_prefix(md, sa, prefix, s.max_vision, q.dtype)
    sa_attention.attend(sa, q, k, v, mdp, out[:n])
    out[n:] = 0


direct_register_custom_op("step", _step_op, fake_impl=_step_op_fake, target_lib=_LIB)
direct_register_custom_op("sa_attention", _sa_attention_op, mutates_args=["out"],
                          fake_impl=lambda q, k, v, out, layer_name: None, target_lib=_LIB)


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "visor_slots": 0})
class VisorDecoder(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg: VisorConfig = vllm_config.model_config.hf_config
        tc, cache, quant = cfg.text_config, vllm_config.cache_config, vllm_config.quant_config
        self.cfg, self.dtype = cfg, vllm_config.model_config.dtype
        self.embed_tokens = VocabParallelEmbedding(tc.vocab_size, tc.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(tc, cache, quant, prefix=f"{prefix}.layers.{i}")
            for i in range(cfg.num_layers))
        for i in cfg.cross_layers:
            self.layers[i].cross_attn = VisorCrossAttention(cfg, cache, quant,
                                                            prefix=f"{prefix}.layers.{i}.cross_attn")
        # the ops find this decoder and its SA layers by name, as vLLM's attention op does
        self.step_name = f"{prefix}.visor_step"
        registry = vllm_config.compilation_config.static_forward_context
        if self.step_name in registry:
            raise ValueError(f"VISOR: duplicate layer name {self.step_name}")
        registry[self.step_name] = self
        self._step: _Step | None = None  # this step's facts (set by the visor::step op)
        # SA-capable layers: one [V ; T] paged sequence per request (kv_layout), in one or
        # two KV groups (the optional layers apart, allocated per budget)
        for group in kv_layout.sa_groups(cfg):
            for i in group:
                attn = kv_layout.make_sa_attention(self.layers[i].self_attn.attn, cfg, group)
                attn.visor_layer, attn.visor_decoder = i, self.step_name
                sa_attention.check_backend(attn)
        if not cfg.cross_layers:  # the step reads each row's visual token count from a CA layer
            raise NotImplementedError("VISOR in vLLM needs at least one cross-attention layer")
        self.first_cross_name = self.layers[cfg.cross_layers[0]].cross_attn.attn.layer_name
        # a request's visual tokens never exceed the encoder budget (enc-dec mode schedules a
        # request's images in one step): the static bound of the SA kernels' max_seq_len
        self.max_vision = vllm_config.scheduler_config.max_num_encoder_input_tokens
        self.norm = RMSNorm(tc.hidden_size, eps=tc.rms_norm_eps)
        self.router = VisorRouter(cfg, prefix=f"{prefix}.router") if plan.needs_router(cfg) else None
        self.writes_receipts = get_tensor_model_parallel_rank() == 0  # one writer under TP
        # executed-FLOP stats for the visor:* series (visor_vllm.engine.stats): opened at the
        # first real step, so profiling and dummy runs count nothing
        # one file per engine: vLLM 0.32 leaves data_parallel_rank at 0 in every engine of a
        # dense model's data-parallel server (only MoE models get their rank); the engine's
        # index, which the API server's stat loggers see as engine_index, is data_parallel_index
        pc = vllm_config.parallel_config
        self._stats_path = stats.stats_path(getattr(pc, "data_parallel_index", None)
                                            or pc.data_parallel_rank)
        self._stats: stats.StatsWriter | None | bool = None  # False: could not open, stay off

    # -- the step --------------------------------------------------------------------------------
    def forward(self, input_ids, positions, visor_slots=None) -> torch.Tensor:
        """Every step without new images (decode, text-only prefill). vLLM compiles this unless
        ``--enforce-eager``: no Python branch here depends on the step (see the ops above)."""
        return self._run(input_ids, positions, visor_slots)

    def first_step(self, input_ids, positions, encoder_outputs, visor_slots=None,
                   dense_vision=None) -> torch.Tensor:
        """A step in which images arrive: the visual streams advance through the SA layers the
        rows run, CA and SA layers store their vision K/V once, the router picks. Always eager
        (vLLM runs encoder steps uncompiled as well)."""
        return self._run(input_ids, positions, visor_slots, encoder_outputs, dense_vision)

    def _run(self, input_ids, positions, slots, encoder_outputs=None, dense_vision=None):
        """The text stream as vLLM's Qwen2 carries it: ``h + res`` (``res`` None: ``h`` alone),
        each norm fusing the residual add (``RMSNorm(h, res)``, in place on CPU and GPU)."""
        h, res = self.embed_tokens(input_ids), None
        pos, has_vis = torch.ops.visor.step(positions, slots, self.step_name)  # [T], [T, 1]
        s, vis = self._step, None
        if encoder_outputs is not None and s is not None:  # (no metadata: a profiling run)
            vis = s.add_images(encoder_outputs, dense_vision, self.dtype)          # [Nv_new, d]
            self._initial_sa_mask(s, bridge.STATE)
        for i, layer in enumerate(self.layers):
            kind = self.cfg.layer_types[i]
            if kind == "cross":
                ca = layer.cross_attn
                x, res = _add_norm(ca.text_norm, h, res)
                delta = ca(x, vis, s.item_lens if vis is not None else None)
                h = torch.where(has_vis, delta, 0)  # the stream is now res + delta
            if kind == "self":
                if vis is not None:
                    vis = self._advance_vision(i, layer, vis, s)
                h, res = self._sa_layer(layer, h, res, pos)
            else:
                h, res = layer(pos, h, res)
            if vis is not None and i == self.cfg.router_layer and self.router is not None:
                self._route(h + res, input_ids, s, bridge.STATE)
        return self.norm(h, res)[0]

    def begin_step(self, positions, slots, md):
        """The ``visor::step`` op's body (eager, every step)."""
        if not isinstance(md, dict) or self.first_cross_name not in md:  # profiling/dummy run
            self._step = None
            return positions.clone(), torch.zeros(positions.shape[0], 1, dtype=torch.bool,
                                                  device=positions.device)
        state = bridge.STATE
        if state is None:
            raise RuntimeError("visor_vllm.engine.bridge:VisorBudgetBridge is not loaded; install "
                               "visor-vllm (entry point vllm.logits_processors) or pass "
                               "--logits-processors visor_vllm.engine.bridge:VisorBudgetBridge")
        s = self._step = _Step(self, positions, slots, state, md)
        return s.positions, s.has_vis

    def side_channels(self) -> None:
        """Receipts and executed-FLOP stats of the step just run (after the compiled part).
        Side channels: a failure is logged, never raised. In a step where no row joined they
        read nothing from the device (`bridge.RowState`: ``joined``, ``flush``)."""
        s, state = self._step, bridge.STATE
        if s is None:
            return
        try:
            if self.writes_receipts:  # one writer under TP
                self._side_channels(s, state)
        finally:
            state.step_done()

    def _side_channels(self, s: _Step, state) -> None:
        try:
            state.emit_receipts(s.computed == 0, s.n_vision, self.router is not None, s.slots,
                                s.n_dense_vision)
        except Exception:  # noqa: BLE001
            logger.exception("VISOR: could not write a receipt (the request still runs)")
        if self._stats is None:
            try:
                self._stats = stats.StatsWriter(self._stats_path)
                atexit.register(self._stats.close)
            except Exception:  # noqa: BLE001
                logger.exception("VISOR: no visor:* accounting, could not create %s", self._stats_path)
                self._stats = False
        if self._stats:
            try:
                state.account(s, self._stats, self.router is not None)
            except Exception:  # noqa: BLE001
                logger.exception("VISOR: executed-FLOP accounting failed for one step")

    def _initial_sa_mask(self, s: _Step, state) -> None:
        """First-step rows: explicit, forced or always-on layers, into ``s.sa_mask`` and the
        rows' state (the router may change routed rows' at ``router_layer``)."""
        R, sl = s.R, s.slots
        mask = s.sa_mask                                                 # [R, L]
        new = s.new
        if bool(new.any()):
            state.apply_flops_caps(new, s.n_vision, sl, s.n_dense_vision)  # this step's counts
            allowed = state.allowed[sl]                                  # [R, C]
            single = allowed.sum(-1) == 1                                # min / max budgets
            forced = state.config_masks[allowed.float().argmax(-1)]      # [R, L]
            init = torch.where(single[:, None], forced, state.always_on.expand(R, -1))
            explicit = state.has_explicit[sl]                            # [R]
            init = torch.where(explicit[:, None], state.explicit[sl], init)
            mask = torch.where(new[:, None], init, mask)
            if self.router is None:  # one configuration: nothing to choose
                mask = torch.where(new[:, None] & ~explicit[:, None],
                                   state.config_masks[0].expand(R, -1), mask)
            state.sa_mask[sl] = mask
            idx = torch.where(single, allowed.float().argmax(-1), -1)
            state.config_index[sl] = torch.where(new, idx, state.config_index[sl])
        s.sa_mask = mask

    def _route(self, h, input_ids, s: _Step, state) -> None:
        """Router on the routing tokens of first-step rows; the costliest vote per row wins."""
        R, C, sl = s.R, len(self.cfg.sa_configs), s.slots
        allowed = state.allowed[sl]                                                   # [R, C]
        needs = s.new & ~state.has_explicit[sl] & (allowed.sum(-1) > 1)              # [R]
        if not bool(needs.any()):
            return
        tok = (input_ids[: s.N] == self.cfg.routing_token_id) & needs[s.row] & s.valid \
            & (s.text_pos < state.prompt_len[sl][s.row])                             # [N]
        rows = s.row[tok]                                                             # [M]
        logits = self.router(h[: s.N][tok]).float()                                   # [M, C]
        logits = logits.masked_fill(~allowed[rows], float("-inf"))
        votes = logits.argmax(-1)                                                     # [M]
        sizes = state.config_masks.sum(-1)                                            # [C]
        key = sizes[votes] * C + votes
        best = torch.full((R,), -1, dtype=torch.long, device=h.device)
        best = best.scatter_reduce(0, rows, key, reduce="amax")
        missing = needs & (best < 0)
        if bool(missing.any()):  # the processor rejects such prompts; never crash the engine
            logger.warning("VISOR: %d row(s) had no routing token; using their costliest "
                           "allowed configuration", int(missing.sum()))
            allowed_key = torch.where(allowed, sizes[None] * C + torch.arange(C), -1)
            best = torch.where(missing, allowed_key.max(-1).values, best)
        chosen = torch.where(needs, best % C, -1)
        s.sa_mask = torch.where(needs[:, None], state.config_masks[chosen.clamp(min=0)], s.sa_mask)
        state.sa_mask[sl] = s.sa_mask
        state.config_index[sl] = torch.where(needs, chosen, state.config_index[sl])

    # -- SA-capable layer ------------------------------------------------------------------------
    def _sa_layer(self, layer, h, res, pos):
        """The ordinary layer for text tokens, attention by the ``visor::sa_attention`` op over
        each row's ``[its vision K/V if it runs the layer ; its text K/V]`` (kv_layout).
        ``(h, res)`` in and out: the stream ``h + res``, the adds fused into the norms."""
        attn = layer.self_attn
        x, res = _add_norm(layer.input_layernorm, h, res)
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(pos, q, k)
        hd = attn.head_dim
        out = torch.empty_like(q)                                          # [T, H * D]
        torch.ops.visor.sa_attention(q.view(-1, attn.num_heads, hd), k.view(-1, attn.num_kv_heads, hd),
                                     v.view(-1, attn.num_kv_heads, hd),
                                     out.view(-1, attn.num_heads, hd), attn.attn.layer_name)
        o, _ = attn.o_proj(out)
        x, res = layer.post_attention_layernorm(o, res)
        return layer.mlp(x), res

    def _advance_vision(self, i: int, layer, vis, s: _Step):
        """First step: the new visual tokens of rows that run SA layer ``i`` go through it;
        their K/V are stored once at the head of the layer's paged sequence."""
        sel = s.sa_mask[s.vis_row, i]                                   # [Nv_new]
        if not bool(sel.any()):
            return vis
        rows, cols = s.vis_row[sel], s.vis_col[sel]
        x, k, v = self._vision_block(layer, vis[sel], rows, cols, s.R)
        vis = vis.clone()
        vis[sel] = x
        sa = layer.self_attn.attn
        bs = sa_attention.kernel_block_size(sa.kv_cache)
        sa_attention.write(sa, k, v, sa_attention.slots(s.md[sa.layer_name].block_table,
                                                        rows, cols, bs))
        return vis

    def _vision_block(self, layer, x, rows, cols, R: int):
        """The ordinary layer on visual tokens only (V precedes T, so T cannot change V).

        x [n, d]: the visual tokens of the first-step rows that run this layer, grouped by row
        in row order (``rows`` ascending). Attention runs per row, causal, with no mask: one
        flash-attention call over each row's own ``Nv`` tokens, so a row costs ``Nv**2`` of its
        own image, never the batch's largest image times the batch's rows.
        """
        attn = layer.self_attn
        hd = attn.head_dim
        y = layer.input_layernorm(x)
        qkv, _ = attn.qkv_proj(y)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(cols, q, k)  # vision positions 0..Nv-1
        n = x.shape[0]
        q3, k3, v3 = q.view(n, -1, hd), k.view(n, -1, hd), v.view(n, -1, hd)
        out = causal_segments_attention(q3, k3, v3, torch.bincount(rows, minlength=R),
                                        attn.scaling)
        o, _ = attn.o_proj(out.reshape(n, -1))
        x = x + o
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x, k3, v3


def _add_norm(norm: RMSNorm, h: torch.Tensor, res: torch.Tensor | None):
    """``(norm(h + res), h + res)`` as vLLM's layers fuse it (``res`` None: the stream is ``h``
    alone, as after the embedding); may write into ``h`` and ``res``."""
    return (norm(h), h) if res is None else norm(h, res)


def causal_segments_attention(q, k, v, lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention within consecutive segments: q [n, H, D], k/v [n, Hkv, D], lens [R]
    (``sum(lens) == n``, zeros allowed) -> [n, H, D]. One unmasked ``is_causal`` SDPA per
    non-empty segment (first step only: the segments are the images that arrive now)."""
    dtype = q.dtype
    work = _attention_dtype(q)
    out = torch.empty_like(q)
    start = 0
    for m in lens[lens > 0].tolist():
        sl = slice(start, start + m)
        qs, ks, vs = (t[sl].transpose(0, 1)[None].to(work) for t in (q, k, v))  # [1, H, m, D]
        out[sl] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                 enable_gqa=True)[0].transpose(0, 1).to(dtype)
        start += m
    return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class VisorLanguageModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        tc = vllm_config.model_config.hf_config.text_config
        self.model = VisorDecoder(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if tc.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(tc.vocab_size, tc.hidden_size,
                                          prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(tc.vocab_size)


@MULTIMODAL_REGISTRY.register_processor(VisorMultiModalProcessor, info=VisorProcessingInfo,
                                        dummy_inputs=VisorDummyInputsBuilder)
class VisorForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """LLaVA-OV's vision path (inherited: SigLIP, projector, anyres packing) + the VISOR decoder."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={"router.": "language_model.model.router."})
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"],
                              "kv_proj": ["k_proj", "v_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        from visor_vllm import patches

        patches.apply_vllm_patches()
        config: VisorConfig = vllm_config.model_config.hf_config
        self.config = config
        self.multimodal_config = vllm_config.model_config.multimodal_config
        with self._mark_tower_model(vllm_config, {"image"}):
            self.vision_tower = init_vision_tower_for_llava(
                config, quant_config=vllm_config.quant_config, require_post_norm=False,
                prefix=maybe_prefix(prefix, "vision_tower"))
            self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size))
            # VISOR-TR packs SigLIP features before the projector: C*s*s inputs
            self.multi_modal_projector = LlavaOnevisionMultiModalProjector(projector_config(config))
        with self._mark_language_model(vllm_config):
            self.language_model = VisorLanguageModel(vllm_config=vllm_config,
                                                     prefix=maybe_prefix(prefix, "language_model"))
        limit = budget_bytes()  # VISOR_VISION_CACHE_MB (engine/vision_cache.py)
        self.vision_cache = VisionCache(limit) if limit else None
        # VISOR-TR: dense LLaVA-OV's token count of each encoder output of this step, by the
        # output's id (encoder outputs reach forward as the very tensors made here); FLOP
        # savings and caps compare VISOR's packed tokens with it. Emptied by every forward.
        self._dense_tokens: dict[int, int] = {}

    # -- vision path (LLaVA-OV's, plus VISOR-TR packing) ----------------------------------------
    def _image_pixels_to_features(self, vision_tower, pixel_values):
        """SigLIP features ``[B, P, C]``; VISOR-TR packs each crop's grid to ``[B, h*w, C*s*s]``."""
        return pack_features(super()._image_pixels_to_features(vision_tower, pixel_values),
                             self.config)

    def _merge_image_patch_embeddings(self, image_size, patch_embeddings, **kwargs):
        """LLaVA-OV's anyres merge on the crop's token grid, which VISOR-TR makes smaller.

        vLLM's merge derives the grid side from the config: it is handed the packed one
        (`visor_vllm.model.packing.anyres_grid_view`, as the reference is).
        """
        cfg = self.config
        if cfg.token_packing_ratio is None:
            return super()._merge_image_patch_embeddings(image_size, patch_embeddings, **kwargs)
        view = SimpleNamespace(config=anyres_grid_view(cfg, crop_side(cfg)),
                               image_newline=self.image_newline)
        return LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
            view, image_size, patch_embeddings, **kwargs)

    def _process_image_input(self, image_input):
        out = self._vision_features(image_input)
        if self.config.token_packing_ratio is not None and image_input.get("pixel_values") is not None:
            self._note_dense_tokens(image_input, out)
        return out

    def _note_dense_tokens(self, image_input, out) -> None:
        """Record dense LLaVA-OV's count of each image: a single image has anyres tiles
        (``> 1`` crops), an image of a several-image prompt only its base crop."""
        sizes = image_input.get("image_sizes")
        if sizes is None:
            return
        for pixels, size, t in zip(image_input["pixel_values"], sizes, out):
            h, w = (int(x) for x in size)
            self._dense_tokens[id(t)] = visual_token_count(
                self.config, h, w, n_images=1 if pixels.shape[0] > 1 else 2, packed=False)

    def _vision_features(self, image_input):
        """LLaVA-OV's tower + projector + anyres unpadding, run only on images not cached."""
        cache = self.vision_cache
        if cache is None or image_input.get("pixel_values") is None:
            return super()._process_image_input(image_input)
        pixels = list(image_input["pixel_values"])                      # per image [P, 3, S, S]
        sizes = image_input.get("image_sizes")
        if sizes is None or len(sizes) != len(pixels):
            return super()._process_image_input(image_input)
        keys = [image_key(p, s) for p, s in zip(pixels, sizes)]
        out = [cache.get(k) for k in keys]
        miss = [i for i, t in enumerate(out) if t is None]
        if miss:
            fresh = super()._process_image_input({
                "type": "pixel_values", "pixel_values": [pixels[i] for i in miss],
                "image_sizes": torch.stack([torch.as_tensor(sizes[i]) for i in miss])})
            for i, t in zip(miss, fresh):
                out[i] = t
                cache.put(keys[i], t)
        dev = self.image_newline.device
        return [t if t.device == dev else t.to(dev, non_blocking=True) for t in out]

    @staticmethod
    def get_model_state_cls():
        """Model Runner V2: per-request state through `visor_vllm.engine.model_state`."""
        from visor_vllm.engine.model_state import VisorModelState

        return VisorModelState

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        return self.language_model.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                encoder_outputs=None, visor_slots=None, **kwargs):
        dense = None
        if encoder_outputs and self.config.token_packing_ratio is not None:
            dense = [self._dense_tokens.get(id(e)) for e in encoder_outputs]
            if None in dense:  # side channel (FLOP savings): warn, never fail the step
                logger.warning("VISOR-TR: no dense token count for %d encoder output(s); their "
                               "savings count packed tokens", dense.count(None))
                dense = [int(e.shape[0]) if d is None else d for d, e in zip(dense, encoder_outputs)]
        self._dense_tokens.clear()
        decoder = self.language_model.model
        if encoder_outputs:  # images arrive: eager
            h = decoder.first_step(input_ids, positions, encoder_outputs, visor_slots, dense)
        else:                # compiled unless --enforce-eager
            h = decoder(input_ids, positions, visor_slots)
        decoder.side_channels()
        return h

    def compute_logits(self, hidden_states):
        lm = self.language_model
        return lm.logits_processor(lm.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ["language_model.lm_head."] if self.config.text_config.tie_word_embeddings else []
        return AutoWeightsLoader(self, ignore_unexpected_prefixes=skip).load_weights(
            weights, mapper=self.hf_to_vllm_mapper)


def _decoder_load_weights(self: VisorDecoder, weights) -> set[str]:
    """Checkpoint names (llava-hf layout under ``language_model.model.``) -> packed vLLM params."""
    stacked = [(".self_attn.qkv_proj", ".self_attn.q_proj", "q"),
               (".self_attn.qkv_proj", ".self_attn.k_proj", "k"),
               (".self_attn.qkv_proj", ".self_attn.v_proj", "v"),
               (".mlp.gate_up_proj", ".mlp.gate_proj", 0), (".mlp.gate_up_proj", ".mlp.up_proj", 1),
               (".cross_attn.kv_proj", ".cross_attn.k_proj", 0),
               (".cross_attn.kv_proj", ".cross_attn.v_proj", 1)]
    params = dict(self.named_parameters())
    loaded = set()
    for name, w in weights:
        for packed, part, shard in stacked:
            if part in name:
                name = name.replace(part, packed)
                p = params[name]
                p.weight_loader(p, w, shard)
                break
        else:
            p = params[name]
            getattr(p, "weight_loader", default_weight_loader)(p, w)
        loaded.add(name)
    return loaded


VisorDecoder.load_weights = _decoder_load_weights
