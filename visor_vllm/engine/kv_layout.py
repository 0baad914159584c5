"""Vision K/V that follows the budget: the layers outside the cheapest configuration get their own
KV-cache group, and a request whose budget cannot run them holds no blocks there.

What. Every VISOR layer that attends the image holds the request's vision K/V (``Nv`` slots): the
cross-attention (CA) layers and the SA-capable layers' ``vision_kv`` holders. A request always
needs the CA layers and the SA layers of the cheapest configuration (budget ``min`` runs exactly
those; every other budget may). The other SA-capable layers ("optional vision layers") are
needed only when the request's budget allows a configuration that runs one of them
(`visor_vllm.model.budget.possible_sa_layers`). Their holders declare `VisorVisionSpec`, a
`CrossAttentionSpec` that vLLM cannot merge with the plain one, so they form their own KV-cache
group; that group's manager, `VisorVisionManager`, allocates zero blocks for a request that
cannot run them. Registered through vLLM's `KVCacheSpecRegistry` (its extension point for
custom specs); the manager learns each request's budget through ledger entry 6
(`visor_vllm.patches`: vLLM's managers see request ids, not requests).

Why. With one vision group every request held vision K/V for all SA-capable layers (15 for
visor-0.5b) whatever its budget; ``min`` needs 10. vLLM's group size is the smallest layer
count of a spec type, so the split also changes the padding of the text layers: for
visor-0.5b, 24 text / 10 vision / 5 optional gives group size 5 (one padding layer) instead of
24 text / 15 vision at group size 15 (six). `split_optional_layers` applies the split only when
no budget gets more pages per block than without it (for visor-1.5b it would not: 28 / 11 / 5
pads the vision group by 4), using `pages_per_block`, vLLM's grouping rule as a pure function
(checked against vLLM's own in the tests).

Footguns.
* The decision must match the worker's: the worker only ever runs configurations inside
  ``possible_sa_layers`` of the same budget (the router picks among the allowed ones; a FLOP cap
  narrows and falls back inside them), and writes/reads a holder only for rows that run its
  layer. A row without blocks in the optional group never touches them.
* The default budget (``VISOR_DEFAULT_BUDGET``) is read in the scheduler's process too; the
  worker validated it at start (a bad one stops the engine there).
* Auto-routed requests may run any configuration, so they hold every layer; what the router then
  picks is known only after the first step (freeing the unused blocks would need the choice
  sent back to the scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import SimpleNamespace

from vllm.model_executor.layers.attention.cross_attention import CrossAttention
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import CrossAttentionManager
from vllm.v1.kv_cache_interface import CrossAttentionSpec
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


def optional_layers(cfg) -> tuple[int, ...]:
    """SA-capable layers (0-based) outside the cheapest configuration."""
    cheap = set(cfg.sa_configs[cheapest_config(cfg)])
    return tuple(i for i in cfg.sa_capable_layers if i not in cheap)


def split_optional_layers(cfg) -> tuple[int, ...]:
    """The layers whose holders get `VisorVisionSpec`: `optional_layers` when splitting them off
    costs no budget more pages per block (text or vision), else ``()`` (one vision group)."""
    rest = optional_layers(cfg)
    n_text, n_vision = cfg.num_layers, len(cfg.cross_layers) + len(cfg.sa_capable_layers)
    if not rest or len(rest) == n_vision:
        return ()
    text_1, vision_1 = pages_per_block([n_text, n_vision])
    text_2, base_2, rest_2 = pages_per_block([n_text, n_vision - len(rest), len(rest)])
    return rest if text_2 <= text_1 and base_2 + rest_2 <= vision_1 else ()


@dataclass(frozen=True)
class VisorVisionSpec(CrossAttentionSpec):
    """Vision K/V of the optional SA layers ``layers``. Carries what the scheduler needs to
    decide per request (it has no VISOR config): the configurations and always-on layers."""

    layers: tuple[int, ...] = ()
    sa_configs: tuple[tuple[int, ...], ...] = ()
    always_on_sa_layers: tuple[int, ...] = ()


class VisorVisionManager(CrossAttentionManager):
    """A cross-attention manager that gives a request no blocks when its budget cannot run the
    group's layers. ``note(request)`` (ledger entry 6) is called before each allocation, i.e.
    every step for every running request: it decides once per request, until ``free``."""

    def __init__(self, kv_cache_spec: VisorVisionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        spec = kv_cache_spec
        self._cfg = SimpleNamespace(sa_configs=[list(c) for c in spec.sa_configs],
                                    always_on_sa_layers=list(spec.always_on_sa_layers))
        self._layers = set(spec.layers)
        try:  # read once, as the worker's bridge does
            self._default = default_budget(None)
        except BudgetError:  # the worker stops the engine on it; here never guess low
            self._default = None
        self.holds: dict[str, bool] = {}   # request id -> holds blocks here (decided once)
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

    def note(self, request) -> None:
        if request.request_id not in self.holds:
            params = getattr(request, "sampling_params", None)
            self.holds[request.request_id] = self.needed(getattr(params, "extra_args", None))

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, *args, **kwargs) -> int:
        if not self.holds.get(request_id, True):
            num_tokens = num_tokens_main_model = 0
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens, new_computed_blocks, total_computed_tokens,
            num_local_computed_tokens, num_tokens_main_model, *args, **kwargs)

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        if not self.holds.get(request_id, True):
            num_tokens = num_tokens_main_model = 0
        return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model)

    def free(self, request_id: str) -> None:
        super().free(request_id)
        self.holds.pop(request_id, None)  # a preempted request is decided again on resume


class VisorVisionHolder(CrossAttention):
    """The ``vision_kv`` holder of an optional SA layer: allocation only (never called)."""

    def __init__(self, *args, visor_cfg, optional: tuple[int, ...], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._visor_fields = dict(
            layers=tuple(optional),  # split_optional_layers(visor_cfg), computed by the caller
            sa_configs=tuple(tuple(c) for c in visor_cfg.sa_configs),
            always_on_sa_layers=tuple(visor_cfg.always_on_sa_layers))

    def get_kv_cache_spec(self, vllm_config):
        base = super().get_kv_cache_spec(vllm_config)
        same = {f.name: getattr(base, f.name) for f in fields(base) if f.init}
        return VisorVisionSpec(**same, **self._visor_fields)


def register() -> None:
    """Register the spec with its manager; the built-in specs first (vLLM registers them lazily,
    only while its registry is empty). Idempotent."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(VisorVisionSpec, VisorVisionManager,
                                 uniform_type_base_spec=VisorVisionSpec)


register()  # wherever a VisorVisionSpec is unpickled (the scheduler) or built (the worker)
