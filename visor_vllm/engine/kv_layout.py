"""The paged K/V layout of VISOR in vLLM: which layers hold what, and how many blocks a request takes.

What. Three kinds of attention K/V per request:

* **Text-only layers** (every layer that is not SA-capable): ordinary paged K/V over the text
  tokens, vLLM's ``FullAttentionSpec``.
* **Cross-attention (CA) layers**: the visual keys/values, written once in the request's first
  step (vLLM's ``CrossAttentionSpec``, ``Nv`` slots).
* **SA-capable layers**: one paged sequence per request and layer, ``[V ; T]``: the layer's
  visual K/V at slots ``0..Nv-1`` when the request's configuration runs the layer, then the
  text K/V. A request that skips the layer keeps its text at slot 0 (no vision prefix). Text
  queries then attend that sequence with vLLM's own attention kernel, causally, exactly the
  SA layer of the paper (text sees every visual token and the text before it) -- one kernel
  call per layer, no gather, no log-sum-exp merge. These layers declare `VisorSASpec`; its
  manager, `VisorSAManager`, allocates ``Nv + T`` slots for a request that may run one of the
  group's layers and ``T`` for one that cannot.

The SA-capable layers form one KV group, or two when that pads less: the layers of the
cheapest configuration (run by every budget) and the optional ones (the rest). A request
whose budget cannot run any optional layer (``min``, a cap of 0, explicit layers) then holds
no vision slots there (`visor_vllm.model.budget.possible_sa_layers`, the set the worker's
choice always stays inside). `sa_groups` makes the split only where no budget gets more pages
per block, using `pages_per_block`, vLLM's grouping rule as a pure function (checked against
vLLM's own in the tests).

Why this layout. With vision K/V in a separate cross-attention holder, SA text attention had to
merge two attention results, which the CPU kernel cannot (it returns no log-sum-exp), so it
ran in PyTorch over gathered pages: 9 ms per layer at 16 decode rows on 2 cores against the
kernel's ~1.4 ms for the same keys. One sequence per layer needs no merge, and it is what the
GPU kernels take too (a block table and ``seq_lens``).

Footguns.
* The worker must agree with the allocation: a row runs an SA layer only when its
  configuration does, which is inside ``possible_sa_layers`` of its budget, so a row without a
  vision prefix in a group never runs that group's layers.
* vLLM builds each group's attention metadata from the *text* lengths; the worker derives the
  layer's ``seq_lens`` (``prefix + T``), slots and kernel metadata itself
  (`visor_vllm.engine.sa_attention`). The block table is vLLM's.
* The block table of an SA group is sized for ``max_model_len + max encoder tokens``
  (`VisorSASpec.max_num_blocks_per_req`), more than a text group's.
* The manager learns each request through ledger entry 6 (`visor_vllm.patches`: vLLM's
  managers see request ids, not requests) and decides once per request, until ``free``.
* The default budget (``VISOR_DEFAULT_BUDGET``) is read in the scheduler's process too; the
  worker validated it at start (a bad one stops the engine there).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from types import SimpleNamespace

from vllm.model_executor.layers.attention import Attention
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from visor_vllm.model.budget import (BudgetError, cheapest_config, default_budget,
                                     parse_budget, possible_sa_layers)


def pages_per_block(counts: list[int]) -> list[int]:
    """vLLM 0.32's hybrid grouping (``_get_kv_cache_groups_uniform_page_size``) as a pure
    function: layer counts of the spec types -> layer pages one block of each type costs
    (its layers rounded up to the group size: the padding layers included)."""
    g = min(counts)
    if max(counts) < g * 1.5:
        g = max(counts)
    return [cdiv(n, g) * g for n in counts]


def sa_groups(cfg) -> tuple[tuple[int, ...], ...]:
    """The SA-capable layers (0-based) in their KV groups: ``(base, optional)`` -- the cheapest
    configuration's layers, the rest -- when splitting them costs no budget more pages per
    block (text or vision), else one group. Never an empty group."""
    sa = tuple(cfg.sa_capable_layers)
    cheap = set(cfg.sa_configs[cheapest_config(cfg)])
    base = tuple(i for i in sa if i in cheap)
    rest = tuple(i for i in sa if i not in cheap)
    if not base or not rest:
        return (sa,) if sa else ()
    n_text, n_cross = cfg.num_layers - len(sa), len(cfg.cross_layers)
    kinds = [n for n in (n_text, n_cross) if n]

    def pages(counts):  # -> (text pages, vision pages at max) per block; kinds first
        pp = pages_per_block(kinds + counts)
        text_pp = pp[0] if n_text else 0
        cross_pp = pp[len(kinds) - 1] if n_cross else 0
        sa_pp = sum(pp[len(kinds):])
        return text_pp + sa_pp, cross_pp + sa_pp

    one = pages([len(sa)])
    two = pages([len(base), len(rest)])
    return (base, rest) if two[0] <= one[0] and two[1] <= one[1] else (sa,)


@dataclass(frozen=True, kw_only=True)
class VisorSASpec(FullAttentionSpec):
    """``[V ; T]`` K/V of the SA-capable ``layers``. Carries what the scheduler needs to decide
    per request (it has no VISOR config): the configurations and always-on layers."""

    layers: tuple[int, ...] = ()
    sa_configs: tuple[tuple[int, ...], ...] = ()
    always_on_sa_layers: tuple[int, ...] = ()
    # Never sharded over decode-context-parallel ranks (VISOR runs without DCP). It is also
    # what keeps vLLM from merging these layers into the text layers' group: its grouping
    # tries FullAttentionSpec.merge on every pair of spec kinds, which accepts any subclass
    # but asserts equal AttentionSpec fields.
    dcp_sharded: bool = False

    @classmethod
    def merge(cls, specs):
        # vLLM probes uniformity by merging every layer's spec and catching AssertionError
        visor = {f: getattr(specs[0], f) for f in ("layers", "sa_configs", "always_on_sa_layers")}
        assert all(isinstance(s, VisorSASpec) for s in specs) and all(
            getattr(s, f) == v for s in specs for f, v in visor.items()), \
            "a VISOR SA-layer KV group holds only the SA layers of one group"
        return replace(super().merge(specs), **visor)

    def _max_tokens(self, vllm_config) -> int:
        return (vllm_config.model_config.max_model_len
                + vllm_config.scheduler_config.max_num_encoder_input_tokens)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        return cdiv(self._max_tokens(vllm_config), self.block_size) * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        return cdiv(max(max_len, self._max_tokens(vllm_config)), self.block_size)


class VisorSAManager(FullAttentionManager):
    """Full attention over ``prefix + T`` tokens, ``prefix`` = the request's visual tokens when
    its budget may run one of the group's layers, else 0. ``visor_note(request)`` (ledger
    entry 6) is called before each allocation, i.e. every step for every running request: it
    decides once per request, until ``free``."""

    def __init__(self, kv_cache_spec: VisorSASpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        spec = kv_cache_spec
        self._cfg = SimpleNamespace(sa_configs=[list(c) for c in spec.sa_configs],
                                    always_on_sa_layers=list(spec.always_on_sa_layers))
        self._layers = set(spec.layers)
        try:  # read once, as the worker's bridge does
            self._default = default_budget(None)
        except BudgetError:  # the worker stops the engine on it; here never guess low
            self._default = None
        self.prefix: dict[str, int] = {}   # request id -> vision slots before its text
        from visor_vllm.patches import apply_scheduler_patches

        apply_scheduler_patches()

    def needed(self, extra_args) -> bool:
        """Whether a request with these ``vllm_xargs`` may run one of the group's layers."""
        if self._default is None:
            return True
        try:
            budget = parse_budget(extra_args, None, self._default)
        except BudgetError:  # validated by the frontend; never guess low
            return True
        return bool(possible_sa_layers(self._cfg, budget) & self._layers)

    def visor_note(self, request) -> None:
        if request.request_id not in self.prefix:
            params = getattr(request, "sampling_params", None)
            nv = sum(request.get_num_encoder_embeds(i) for i in range(len(request.mm_features)))
            self.prefix[request.request_id] = (
                nv if nv and self.needed(getattr(params, "extra_args", None)) else 0)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, *args, **kwargs) -> int:
        p = self.prefix.get(request_id, 0)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens + p, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model + p, *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        p = self.prefix.get(request_id, 0)
        return super().allocate_new_blocks(request_id, num_tokens + p, num_tokens_main_model + p)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self.prefix.pop(request_id, None)  # a preempted request is decided again on resume


class VisorSAAttention(Attention):
    """The text attention of an SA-capable layer, declaring `VisorSASpec`. Its K/V and its
    attention are run by `visor_vllm.engine.sa_attention`, never by ``forward``."""

    def set_visor_group(self, cfg, layers: tuple[int, ...]) -> None:
        self._visor_fields = dict(layers=tuple(layers),
                                  sa_configs=tuple(tuple(c) for c in cfg.sa_configs),
                                  always_on_sa_layers=tuple(cfg.always_on_sa_layers))

    def get_kv_cache_spec(self, vllm_config):
        base = super().get_kv_cache_spec(vllm_config)
        if type(base) is not FullAttentionSpec:
            raise NotImplementedError(f"VISOR: SA-capable layers need full attention K/V, "
                                      f"vLLM made {type(base).__name__}")
        same = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
        same.pop("dcp_sharded")  # VisorSASpec's own (see there)
        return VisorSASpec(**same, **self._visor_fields)


def make_sa_attention(attn: Attention, cfg, layers: tuple[int, ...]) -> VisorSAAttention:
    """Turn an SA-capable layer's vLLM ``Attention`` (already registered under its name) into a
    `VisorSAAttention` in place: same module, same weights and name, another KV spec."""
    attn.__class__ = VisorSAAttention
    attn.set_visor_group(cfg, layers)
    return attn


def register() -> None:
    """Register the spec with its manager; the built-in specs first (vLLM registers them lazily,
    only while its registry is empty). Idempotent."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(VisorSASpec, VisorSAManager, uniform_type_base_spec=VisorSASpec)


register()  # wherever a VisorSASpec is unpickled (the scheduler) or built (the worker)
