"""Per-request compute budgets: what a client may ask for and how it narrows the router.

A request carries its budget in ``SamplingParams.extra_args`` (the OpenAI API's
``extra_body={"vllm_xargs": {...}}``). Keys, all optional:

* ``visor_budget``: ``"auto"`` (default: the router chooses among every viable configuration),
  ``"min"`` (the cheapest configuration), ``"max"`` (the costliest), or an integer ``k >= 0``
  (the router chooses among configurations with at most ``k`` optional SA layers).
* ``visor_sa_layers``: an explicit list of 1-based SA layer numbers (the paper's numbering);
  any subset of the SA-capable layers, bypassing the router. Excludes ``visor_budget``.

`parse_budget` validates syntax and ranges and raises `BudgetError` (a ``ValueError``, which
vLLM turns into HTTP 400) with a message that lists what is allowed. `allowed_configs` turns a
budget into the boolean mask over ``config.sa_configs`` the router is restricted to; the model
applies it with the same costliest-vote rule as an unrestricted router (`visor_vllm.plan`).

Footgun: layer numbers here are 1-based; `plan.layers_from_numbers` converts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from visor_vllm.config import VisorConfig
from visor_vllm.plan import layers_from_numbers, numbers_from_layers

KEYS = ("visor_budget", "visor_sa_layers")
WORDS = ("auto", "min", "max")


class BudgetError(ValueError):
    """An invalid per-request budget (becomes HTTP 400 through vLLM's validation path)."""


@dataclass(frozen=True)
class Budget:
    mode: str = "auto"                         # auto | min | max | cap | layers
    cap: int | None = None                     # mode == "cap": max optional SA layers
    sa_layers: tuple[int, ...] | None = None   # mode == "layers": 0-based explicit layers

    @property
    def uses_router(self) -> bool:
        return self.mode in ("auto", "cap")


def parse_budget(extra_args: Mapping | None, cfg: VisorConfig | None = None) -> Budget:
    """Parse ``extra_args``; with ``cfg`` also check layers and caps against the checkpoint."""
    args = {k: v for k, v in (extra_args or {}).items() if str(k).startswith("visor_")}
    unknown = sorted(set(args) - set(KEYS))
    if unknown:
        raise BudgetError(f"unknown VISOR argument(s) {unknown}; allowed: {list(KEYS)}")
    if "visor_sa_layers" in args:
        if "visor_budget" in args:
            raise BudgetError("give either visor_budget or visor_sa_layers, not both")
        return Budget("layers", sa_layers=_parse_layers(args["visor_sa_layers"], cfg))
    value = args.get("visor_budget", "auto")
    if isinstance(value, str) and value.strip().lower() in WORDS:
        return Budget(value.strip().lower())
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BudgetError(f"visor_budget must be one of {list(WORDS)} or an integer >= 0 "
                          f"(a cap on optional SA layers), got {value!r}")
    if cfg is not None and not any(_n_optional(cfg, c) <= value for c in cfg.sa_configs):
        raise BudgetError(f"visor_budget {value}: no configuration has that few optional SA "
                          f"layers; the smallest has {min(_n_optional(cfg, c) for c in cfg.sa_configs)}")
    return Budget("cap", cap=value)


def _parse_layers(value, cfg: VisorConfig | None) -> tuple[int, ...]:
    if isinstance(value, str):  # "1,4,7" from a query string or a CLI
        value = [v for v in value.replace(" ", "").split(",") if v]
    if not isinstance(value, (list, tuple)):
        raise BudgetError(f"visor_sa_layers must be a list of layer numbers, got {value!r}")
    try:
        numbers = [int(v) for v in value if not isinstance(v, bool)]
    except (TypeError, ValueError):
        raise BudgetError(f"visor_sa_layers must hold integer layer numbers, got {value!r}") from None
    if len(numbers) != len(value) or len(set(numbers)) != len(numbers):
        raise BudgetError(f"visor_sa_layers must hold distinct integer layer numbers, got {value!r}")
    layers = tuple(sorted(layers_from_numbers(numbers)))
    if cfg is not None:
        bad = [i for i in layers if i not in cfg.sa_capable_layers]
        if bad:
            raise BudgetError(f"visor_sa_layers: layer number(s) {numbers_from_layers(bad)} are not "
                              f"SA-capable; choose from {numbers_from_layers(cfg.sa_capable_layers)}")
    return layers


def _n_optional(cfg: VisorConfig, config: list[int]) -> int:
    return len(set(config) - set(cfg.always_on_sa_layers))


def allowed_configs(cfg: VisorConfig, budget: Budget) -> list[bool]:
    """Mask over ``cfg.sa_configs`` the router may choose from (all False for ``layers``)."""
    n = len(cfg.sa_configs)
    if budget.mode == "auto":
        return [True] * n
    if budget.mode == "cap":
        return [_n_optional(cfg, c) <= budget.cap for c in cfg.sa_configs]
    if budget.mode in ("min", "max"):
        cost = [(len(c), i) for i, c in enumerate(cfg.sa_configs)]
        pick = (min(cost) if budget.mode == "min" else max(cost))[1]
        return [i == pick for i in range(n)]
    return [False] * n
