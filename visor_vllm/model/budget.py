"""Per-request compute budgets: what a client may ask for and how it narrows the router.

A request carries its budget in ``SamplingParams.extra_args`` (the OpenAI API's
``extra_body={"vllm_xargs": {...}}``). Keys, all optional:

* ``visor_budget``: ``"auto"`` (default: the router chooses among every viable configuration),
  ``"min"`` (the cheapest configuration), ``"max"`` (the costliest), or an integer ``k >= 0``
  (the router chooses among configurations with at most ``k`` optional SA layers).
* ``visor_sa_layers``: an explicit list of 1-based SA layer numbers (the paper's numbering);
  any subset of the SA-capable layers, bypassing the router. Excludes the other keys.
* ``visor_max_flops``: a number ``0 < r <= 1``, a FLOP cap relative to dense LLaVA-OV: the
  router chooses among configurations whose *prefill* LLM FLOPs for this request (its own
  image and text token counts) are at most ``r`` times dense LLaVA-OV's. Combines with
  ``"auto"`` or an integer ``visor_budget``. When no configuration fits (a tiny ``r`` with a
  long text prompt), the cheapest allowed one runs and the request's receipt says
  ``flops_cap_met: false`` -- reported, never silent.

A server-wide default applies to requests that carry none of these keys: the environment
variable ``VISOR_DEFAULT_BUDGET`` (``visor-vllm serve --default-budget``) holds either a
``visor_budget`` value (``min``, ``3``, ...) or a JSON object of the keys above
(``{"visor_max_flops": 0.2}``). `Budget.source` says where a budget came from: ``router``
(nothing restricts the router), ``default`` (the server default) or ``override`` (the request).

`parse_budget` validates syntax and ranges and raises `BudgetError` (a ``ValueError``, which
vLLM turns into HTTP 400) with a message that lists what is allowed. `allowed_configs` turns a
budget into the boolean mask over ``config.sa_configs`` the router is restricted to; the model
applies it with the same costliest-vote rule as an unrestricted router (`visor_vllm.model.plan`).

Footguns: layer numbers here are 1-based; `plan.layers_from_numbers` converts. The FLOP cap
needs the request's token counts, which exist only once the prompt is processed: it is
applied in the worker at the request's first step (`allowed_configs` with counts), not at
admission.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

from visor_vllm import envs
from visor_vllm.model.config import VisorConfig
from visor_vllm.model.plan import layers_from_numbers, numbers_from_layers

KEYS = ("visor_budget", "visor_sa_layers", "visor_max_flops")
# set by the server middleware (`visor_vllm.engine.receipts`), never a budget; accepted, ignored here
INTERNAL_KEYS = ("visor_receipt",)
WORDS = ("auto", "min", "max")
DEFAULT_ENV = "VISOR_DEFAULT_BUDGET"


class BudgetError(ValueError):
    """An invalid per-request budget (becomes HTTP 400 through vLLM's validation path)."""


@dataclass(frozen=True)
class Budget:
    mode: str = "auto"                         # auto | min | max | cap | layers
    cap: int | None = None                     # mode == "cap": max optional SA layers
    sa_layers: tuple[int, ...] | None = None   # mode == "layers": 0-based explicit layers
    max_flops: float | None = None             # prefill FLOP cap relative to dense (0, 1]
    source: str = "router"                     # router | default | override

    @property
    def uses_router(self) -> bool:
        return self.mode in ("auto", "cap")


def parse_budget(extra_args: Mapping | None, cfg: VisorConfig | None = None,
                 default: Budget | None = None) -> Budget:
    """Parse ``extra_args``; with ``cfg`` also check layers and caps against the checkpoint.

    A request without budget keys gets ``default`` (`default_budget()` when None).
    """
    # every key that starts with "visor" in any letter case is VISOR's to judge: a misspelt or
    # mis-cased one ("VISOR_BUDGET") is an error, never silently the default budget
    args = {k: v for k, v in (extra_args or {}).items()
            if str(k).lower().startswith("visor") and k not in INTERNAL_KEYS}
    if not args:
        return default_budget(cfg) if default is None else default
    return replace(_parse_args(args, cfg), source="override")


def default_budget(cfg: VisorConfig | None = None) -> Budget:
    """The server-wide default from ``$VISOR_DEFAULT_BUDGET`` (unset: the router, unrestricted)."""
    raw = envs.VISOR_DEFAULT_BUDGET
    if not raw:
        return Budget()
    if raw.startswith("{"):
        try:
            args = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BudgetError(f"{DEFAULT_ENV} is not valid JSON: {e}") from None
        if not isinstance(args, dict) or not args:
            raise BudgetError(f"{DEFAULT_ENV} must be a budget word/number or a non-empty JSON "
                              f"object of {list(KEYS)}, got {raw!r}")
    else:
        args = {"visor_budget": raw}
    try:
        budget = _parse_args(args, cfg)
    except BudgetError as e:
        raise BudgetError(f"{DEFAULT_ENV}={raw!r}: {e}") from None
    return replace(budget, source="router" if budget == Budget() else "default")


def _parse_args(args: Mapping, cfg: VisorConfig | None) -> Budget:
    unknown = sorted(set(args) - set(KEYS))
    if unknown:
        raise BudgetError(f"unknown VISOR argument(s) {unknown}; allowed: {list(KEYS)}")
    if "visor_sa_layers" in args:
        if len(args) > 1:
            raise BudgetError("visor_sa_layers fixes the configuration: give it alone, without "
                              "visor_budget or visor_max_flops")
        return Budget("layers", sa_layers=_parse_layers(args["visor_sa_layers"], cfg))
    budget = _parse_words(args.get("visor_budget", "auto"), cfg)
    if "visor_max_flops" in args:
        if budget.mode in ("min", "max"):
            raise BudgetError(f"visor_max_flops combines with visor_budget 'auto' or an integer, "
                              f"not {budget.mode!r} (which already fixes the configuration)")
        budget = replace(budget, max_flops=_parse_ratio(args["visor_max_flops"]))
    return budget


def _parse_ratio(value) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise BudgetError("visor_max_flops must be a number in (0, 1]: the prefill FLOP cap "
                          f"relative to dense LLaVA-OneVision, got {_show(value)}")
    return float(value)


def _parse_words(value, cfg: VisorConfig | None) -> Budget:
    if isinstance(value, str) and value.strip().lower() in WORDS:
        return Budget(value.strip().lower())
    if isinstance(value, str) and value.strip().removeprefix("+").isdecimal():
        try:
            value = int(value)
        except ValueError:  # a digit int() does not take
            pass
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BudgetError(f"visor_budget must be one of {list(WORDS)} or an integer >= 0 "
                          f"(a cap on optional SA layers), got {_show(value)}")
    if cfg is not None and not any(_n_optional(cfg, c) <= value for c in cfg.sa_configs):
        raise BudgetError(f"visor_budget {value}: no configuration has that few optional SA "
                          f"layers; the smallest has {min(_n_optional(cfg, c) for c in cfg.sa_configs)}")
    return Budget("cap", cap=value)


def _show(value, limit: int = 120) -> str:
    """A value for an error message, cut short: a 100,000-element list is not echoed back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _parse_layers(value, cfg: VisorConfig | None) -> tuple[int, ...]:
    if isinstance(value, str):  # "1,4,7" from a query string or a CLI
        value = [v for v in value.replace(" ", "").split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise BudgetError(f"visor_sa_layers must be a list of layer numbers, got {_show(value)}")
    numbers = [_layer_number(v) for v in value]
    if None in numbers:  # 1.5 must not silently become layer 1
        raise BudgetError(f"visor_sa_layers must hold integer layer numbers, got {_show(value)}")
    if len(numbers) != len(value) or len(set(numbers)) != len(numbers):
        raise BudgetError(f"visor_sa_layers must hold distinct integer layer numbers, got {_show(value)}")
    if not numbers:
        raise BudgetError("visor_sa_layers is empty: name the SA layers to run, the always-on "
                          "one(s) included"
                          + (f" ({numbers_from_layers(cfg.always_on_sa_layers)})" if cfg else ""))
    if cfg is not None and len(numbers) > cfg.num_layers:
        raise BudgetError(f"visor_sa_layers: {len(numbers)} numbers for a {cfg.num_layers}-layer "
                          f"model; choose from {numbers_from_layers(cfg.sa_capable_layers)}")
    layers = tuple(sorted(layers_from_numbers(numbers)))
    if cfg is not None:
        bad = [i for i in layers if i not in cfg.sa_capable_layers]
        if bad:
            raise BudgetError(f"visor_sa_layers: layer number(s) {numbers_from_layers(bad)[:20]} are not "
                              f"SA-capable; choose from {numbers_from_layers(cfg.sa_capable_layers)}")
        missing = [i for i in cfg.always_on_sa_layers if i not in layers]
        if missing:
            raise BudgetError(f"visor_sa_layers must include the always-on SA layer(s) "
                              f"{numbers_from_layers(cfg.always_on_sa_layers)}: they always run")
    return layers


def _layer_number(v) -> int | None:
    """An integer layer number from an int, a whole float (JSON 4.0) or a digit string; else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().removeprefix("+").removeprefix("-").isdecimal():
        try:
            return int(v)
        except ValueError:
            return None
    return None


def _n_optional(cfg: VisorConfig, config: list[int]) -> int:
    return len(set(config) - set(cfg.always_on_sa_layers))


def cheapest_config(cfg) -> int:
    """Index of the cheapest configuration (fewest SA layers, then the first): budget ``min``,
    and the fallback when no configuration meets a FLOP cap."""
    return min((len(c), i) for i, c in enumerate(cfg.sa_configs))[1]


def costliest_config(cfg) -> int:
    return max((len(c), i) for i, c in enumerate(cfg.sa_configs))[1]


def possible_sa_layers(cfg, budget: Budget) -> frozenset[int]:
    """Every SA layer (0-based) a request under ``budget`` may run: what its vision K/V must hold.

    The scheduler allocates vision K/V from this before the request's first step, the worker
    then runs a configuration inside it, so it must cover each path the worker can take: the
    explicit layers; else every configuration the cap-free mask allows (a FLOP cap only
    narrows that mask and falls back inside it; the router picks inside it), and the cheapest
    configuration for good measure. ``cfg`` needs only ``sa_configs`` and
    ``always_on_sa_layers``: the engine's scheduler process calls this with those two.
    """
    if budget.mode == "layers":
        return frozenset(budget.sa_layers)
    mask = allowed_configs(cfg, budget)
    layers = {i for c, ok in zip(cfg.sa_configs, mask) if ok for i in c}
    return frozenset(layers | set(cfg.sa_configs[cheapest_config(cfg)]))


def allowed_configs(cfg: VisorConfig, budget: Budget, n_image: int | None = None,
                    n_text: int | None = None, n_image_dense: int | None = None) -> list[bool]:
    """Mask over ``cfg.sa_configs`` the router may choose from (all False for ``layers``).

    The FLOP cap (``budget.max_flops``) is applied only when the request's token counts are
    given (see `flops_fit`; ``n_image_dense`` under VISOR-TR); otherwise the mask is the
    cap-free one.
    """
    n = len(cfg.sa_configs)
    if budget.mode == "auto":
        mask = [True] * n
    elif budget.mode == "cap":
        mask = [_n_optional(cfg, c) <= budget.cap for c in cfg.sa_configs]
    elif budget.mode in ("min", "max"):
        pick = cheapest_config(cfg) if budget.mode == "min" else costliest_config(cfg)
        return [i == pick for i in range(n)]
    else:
        return [False] * n
    if budget.max_flops is not None and n_image is not None and n_text is not None:
        mask, _ = flops_fit(cfg, mask, budget.max_flops, n_image, n_text, n_image_dense)
    return mask


def flops_fit(cfg: VisorConfig, mask: list[bool], max_flops: float, n_image: int,
              n_text: int, n_image_dense: int | None = None) -> tuple[list[bool], bool]:
    """Restrict ``mask`` to configurations within the prefill FLOP cap; ``(mask, cap_met)``.

    Prefill FLOPs of every configuration for this request are compared with dense LLaVA-OV's
    (`visor_vllm.model.flops`), on the image's full token count ``n_image_dense`` under VISOR-TR
    (a cap is always a fraction of what dense LLaVA-OV would spend on the same image). When
    none of the masked configurations fits, the cheapest masked one is kept and ``cap_met`` is
    False. A text-only request (``n_image == 0``) always fits.
    """
    from visor_vllm.model.flops import dense_prefill_flops, prefill_flops

    if n_image == 0:
        return list(mask), True
    dense = dense_prefill_flops(cfg, n_image if n_image_dense is None else n_image_dense, n_text)
    cost = [prefill_flops(cfg, n_image, n_text, c) for c in cfg.sa_configs]
    fit = [m and cost[i] <= max_flops * dense for i, m in enumerate(mask)]
    if any(fit):
        return fit, True
    cheapest = min((cost[i], len(c), i) for i, c in enumerate(cfg.sa_configs) if mask[i])[2]
    return [i == cheapest for i in range(len(mask))], False
