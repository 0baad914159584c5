"""Analytic FLOP counts for VISOR vs. dense LLaVA-OneVision (paper Sec. 4.2-4.3, Table 1 savings).

What. Exact integer FLOPs of the LLM for one request (prefill + decode) under a given set of
active SA layers, the same request on the dense LLaVA-OV baseline, and their ratio (``savings``).
The vision encoder is reported separately (the paper leaves it out: it is common to all methods).

Conventions (chosen so a torch ``FlopCounterMode`` count of `visor_vllm.model.reference` matches exactly):

* A matmul ``[m,k] x [k,n]`` costs ``2*m*n*k``. Bias adds, norms, activations, RoPE, softmax,
  residual adds, the embedding lookup and ``lm_head`` are not counted (``lm_head`` per token is
  reported on the side as ``lm_head_flops_per_token = 2*d*vocab``).
* Attention is the full rectangle a dense *masked* kernel (SDPA with a mask) computes: ``Nq``
  queries x ``Nk`` keys cost ``QK^T + AV = 4*Nq*Nk*H*dh``. Causal masking is NOT halved -- causal
  flash kernels skip about half of the prefill rectangle, so real kernels do less than this.
* Depthwise Conv1d, ``C`` channels, kernel ``k``, ``N`` positions: ``2*C*k*N``.

Symbols: text config ``d, H, Hkv, f``; ``dh = head_dim or d // H``; ``Nv`` image tokens, ``Nt``
prompt text tokens (everything not an image token, routing token included), ``S`` active SA layers.

    layer(N, Nk) = 2*N*(d*H*dh + 2*d*Hkv*dh + H*dh*d + 3*d*f) + 4*N*Nk*H*dh
    cross(Nv, Nt) = 2*d*k*Nv + 2*Nt*d*H*dh + 2*Nv*2*d*Hkv*dh + 4*Nt*Nv*H*dh + 2*Nt*H*dh*d
    router(R) = 2*R*(d*r + r*C)          r = router_hidden_size, C = len(sa_configs)

Prefill: ``text`` and inactive ``self`` layers cost ``layer(Nt, Nt)``; active ``self`` layers
``layer(Nv+Nt, Nv+Nt)``; ``cross`` layers ``layer(Nt, Nt) + cross(Nv, Nt)``; plus ``router(R)`` when
the router chose (``routed``, several configurations, ``Nv > 0``). With ``Nv == 0`` every layer
is text-only (no cross module, no router), as in the reference model.
Decode step (context ``c`` text tokens incl. the new one): every layer ``layer(1, c)``, active SA
layers ``layer(1, Nv + c)``; each cross layer adds ``2*2*d*H*dh + 4*Nv*H*dh`` (q/o projections
and attention; vision K/V and the conv are cached at prefill). A request with ``n_out`` output
tokens is prefill + steps ``c = Nt + j``, ``j = 1..n_out-1`` (prefill yields the first token;
``n_out == 0`` means prefill only). The step cost is affine in ``c``, so the sum is closed-form.
Dense LLaVA-OV: every layer ``layer(Nv+Nt, Nv+Nt)`` at prefill, ``layer(1, Nv+Nt+j)`` per step.
VISOR-TR (paper Sec. 4.4, App. I): VISOR runs on the *packed* ``Nv`` while dense LLaVA-OV would
see the image's full count ``Nv_dense`` (``n_image_dense``, from
`visor_vllm.model.packing.visual_token_count` with ``packed=False``); savings compare the two,
which is how the paper's 18x/35x rows are counted.
Vision encoder per crop (SigLIP, ``P = (image_size//patch)^2``):
``2*P*3*p*p*dv + layers*(2*P*(4*dv*dv + 2*dv*fv) + 4*P*P*dv) + 2*P*(dv*d + d*d)`` [projector].

Footguns. Layer indices in the API are 0-based; the CLI's ``--sa`` and the reported ``sa_layers``
use the paper's 1-based numbers. The vision estimate ignores anyres newline tokens (the CLI's
crop count ``ceil(image_tokens / tokens per crop)`` is an estimate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visor_vllm.model.config import VisorConfig


class FlopsInputError(ValueError):
    """Negative token counts, or SA layers that the config cannot run."""


def _dims(cfg: VisorConfig) -> tuple[int, int, int, int, int]:
    """``(d, H, Hkv, dh, f)``, read once per public call: a transformers config's attribute
    reads are slow (``PreTrainedConfig.__getattribute__``), and the engine counts every
    joining row's FLOPs on the step's critical path (`visor_vllm.engine.bridge`)."""
    tc = cfg.text_config
    d, h = tc.hidden_size, tc.num_attention_heads
    return d, h, tc.num_key_value_heads, getattr(tc, "head_dim", None) or d // h, tc.intermediate_size


def _linear(dims: tuple, n: int) -> int:
    """Projections + MLP of one transformer layer on ``n`` tokens (``dims``: `_dims`)."""
    d, h, hkv, dh, f = dims
    return 2 * n * (d * h * dh + 2 * d * hkv * dh + h * dh * d + 3 * d * f)


def _attn(dims: tuple, nq: int, nk: int) -> int:
    _, h, _, dh, _ = dims
    return 4 * nq * nk * h * dh


def _layer(dims: tuple, n: int, nk: int) -> int:
    return _linear(dims, n) + _attn(dims, n, nk)


def _cross_qo(dims: tuple, nt: int) -> int:
    """The cross module's q and o projections on ``nt`` text tokens."""
    d, h, _, dh, _ = dims
    return 2 * nt * d * h * dh + 2 * nt * h * dh * d


def _cross_prefill(dims: tuple, k: int, nv: int, nt: int) -> int:
    """The cross module's prefill (``k``: the depthwise conv's kernel)."""
    d, _, hkv, dh, _ = dims
    return (2 * d * k * nv + 2 * nv * 2 * d * hkv * dh + _attn(dims, nt, nv)
            + _cross_qo(dims, nt))


def _check(counts: dict[str, int], cfg: VisorConfig | None = None,
           sa_layers: Iterable[int] | None = None) -> frozenset[int]:
    for name, value in counts.items():
        if int(value) != value or value < 0:
            raise FlopsInputError(f"{name} must be a non-negative integer, got {value!r}")
    if sa_layers is None:
        return frozenset()
    sa = frozenset(int(i) for i in sa_layers)
    bad = sorted(sa - set(cfg.sa_capable_layers))
    if bad:
        raise FlopsInputError(
            f"layer index(es) {bad} (0-based) are not SA-capable; SA-capable indices are "
            f"{cfg.sa_capable_layers} (layer numbers {[i + 1 for i in cfg.sa_capable_layers]})")
    return sa


def prefill_flops(cfg: VisorConfig, n_image: int, n_text: int, sa_layers: Iterable[int],
                  n_routing: int = 1, routed: bool = True) -> int:
    """VISOR LLM FLOPs to prefill ``n_image`` visual + ``n_text`` text tokens."""
    sa = _check(dict(n_image=n_image, n_text=n_text, n_routing=n_routing), cfg, sa_layers)
    if n_routing > n_text:
        raise FlopsInputError(f"n_routing ({n_routing}) cannot exceed n_text ({n_text}): "
                              "routing tokens are text tokens")
    nv, nt, total, dims = n_image, n_text, 0, _dims(cfg)
    k = cfg.cross_attn_conv_kernel
    for i, kind in enumerate(cfg.layer_types):
        joint = kind == "self" and i in sa and nv > 0
        total += _layer(dims, nv + nt, nv + nt) if joint else _layer(dims, nt, nt)
        if kind == "cross" and nv > 0:
            total += _cross_prefill(dims, k, nv, nt)
    if routed and nv > 0 and len(cfg.sa_configs) > 1:
        r, c = cfg.router_hidden_size, len(cfg.sa_configs)
        total += 2 * n_routing * (dims[0] * r + r * c)
    return total


def _decode_step(cfg: VisorConfig, nv: int, c: int, sa: frozenset[int], dims: tuple) -> int:
    total = 0
    for i, kind in enumerate(cfg.layer_types):
        total += _layer(dims, 1, c + (nv if kind == "self" and i in sa else 0))
        if kind == "cross" and nv > 0:
            total += _cross_qo(dims, 1) + _attn(dims, 1, nv)
    return total


def decode_step_flops(cfg: VisorConfig, n_image: int, context_text: int,
                      sa_layers: Iterable[int]) -> int:
    """VISOR LLM FLOPs of one decode step whose text context (new token included) is ``context_text``."""
    sa = _check(dict(n_image=n_image, context_text=context_text), cfg, sa_layers)
    if context_text < 1:
        raise FlopsInputError("context_text counts the new token, so it must be >= 1")
    return _decode_step(cfg, n_image, context_text, sa, _dims(cfg))


def _decode_sum(step_at_base: int, cfg: VisorConfig, steps: int, dims: tuple) -> int:
    """sum_{j=1..steps} step(base + j) for ``step(c) = A + B*c`` with ``B = L*4*H*dh``."""
    _, h, _, dh, _ = dims
    return steps * step_at_base + cfg.num_layers * 4 * h * dh * steps * (steps + 1) // 2


def dense_prefill_flops(cfg: VisorConfig, n_image: int, n_text: int) -> int:
    """Dense LLaVA-OV LLM FLOPs: every layer on all ``n_image + n_text`` tokens."""
    _check(dict(n_image=n_image, n_text=n_text))
    n = n_image + n_text
    return cfg.num_layers * _layer(_dims(cfg), n, n)


def dense_decode_step_flops(cfg: VisorConfig, n_image: int, context: int) -> int:
    """Dense LLaVA-OV decode step; ``context`` counts text tokens incl. the new one (not images)."""
    _check(dict(n_image=n_image, context=context))
    if context < 1:
        raise FlopsInputError("context counts the new token, so it must be >= 1")
    return cfg.num_layers * _layer(_dims(cfg), 1, n_image + context)


def decode_step_affine(cfg: VisorConfig, n_image: int, sa_layers: Iterable[int],
                       n_image_dense: int | None = None) -> tuple[int, int, int]:
    """``(a_visor, a_dense, b)``: a decode step at text context ``c`` costs ``a + b*c``.

    The step cost is affine in ``c`` with the same slope for VISOR and dense (every layer attends
    to the text context), so an engine can account executed decode steps with two integers per
    request and one multiply-add per step (`visor_vllm.engine.stats`).
    """
    nd = n_image if n_image_dense is None else n_image_dense
    sa = _check(dict(n_image=n_image, n_image_dense=nd), cfg, sa_layers)
    dims = _dims(cfg)
    _, h, _, dh, _ = dims
    n_layers = cfg.num_layers
    return (_decode_step(cfg, n_image, 0, sa, dims), n_layers * _layer(dims, 1, nd),
            n_layers * 4 * h * dh)


def request_flops(cfg: VisorConfig, n_image: int, n_text: int, n_output: int,
                  sa_layers: Iterable[int], n_routing: int = 1, routed: bool = True,
                  n_image_dense: int | None = None) -> dict:
    """VISOR vs. dense FLOPs for one request generating ``n_output`` tokens, with a breakdown.

    ``n_image_dense``: the image's token count for dense LLaVA-OV when VISOR runs on packed
    tokens (VISOR-TR); ``None`` means the same ``n_image``.
    """
    nd = n_image if n_image_dense is None else n_image_dense
    sa = _check(dict(n_output=n_output, n_image_dense=nd), cfg, sa_layers)
    steps = max(n_output - 1, 0)
    vp = prefill_flops(cfg, n_image, n_text, sa, n_routing, routed)
    dp = dense_prefill_flops(cfg, nd, n_text)
    dims = _dims(cfg)
    vd = _decode_sum(_decode_step(cfg, n_image, n_text, sa, dims), cfg, steps, dims)
    dd = _decode_sum(cfg.num_layers * _layer(dims, 1, nd + n_text), cfg, steps, dims)
    vis, den = vp + vd, dp + dd
    tc = cfg.text_config
    return dict(
        visor_flops=vis, dense_flops=den, savings=den / vis if vis else 1.0,
        prefill_savings=dp / vp if vp else 1.0,
        visor_prefill_flops=vp, visor_decode_flops=vd, dense_prefill_flops=dp, dense_decode_flops=dd,
        decode_steps=steps, sa_layers=[i + 1 for i in sorted(sa)], num_sa_layers=len(sa),
        image_tokens=n_image, dense_image_tokens=nd,
        lm_head_flops_per_token=2 * tc.hidden_size * tc.vocab_size,
    )


def vision_encoder_flops(cfg: VisorConfig, n_crops: int) -> int:
    """SigLIP + projector FLOPs for ``n_crops`` crops of ``vision_config.image_size``."""
    _check(dict(n_crops=n_crops))
    vc, d = cfg.vision_config, cfg.text_config.hidden_size
    p, dv, fv = vc.patch_size, vc.hidden_size, vc.intermediate_size
    n = (vc.image_size // p) ** 2
    per_layer = 2 * n * (4 * dv * dv + 2 * dv * fv) + 4 * n * n * dv
    per_crop = 2 * n * 3 * p * p * dv + vc.num_hidden_layers * per_layer + 2 * n * (dv * d + d * d)
    return n_crops * per_crop


# ---------------------------------------------------------------------------------------------
# CLI: visor-vllm flops
# ---------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    p = subparsers.add_parser("flops", help="LLM FLOPs of VISOR vs. dense LLaVA-OneVision",
                              description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    from visor_vllm.model.config import PRESETS

    src.add_argument("--preset", help=" | ".join(PRESETS))
    src.add_argument("--config", metavar="PATH", help="checkpoint directory with config.json")
    p.add_argument("--image-tokens", type=int, required=True, help="what VISOR runs on")
    p.add_argument("--dense-image-tokens", type=int, default=None,
                   help="the image's count for dense LLaVA-OV when VISOR-TR packs it "
                        "(default: --image-tokens)")
    p.add_argument("--text-tokens", type=int, required=True, help="incl. the routing token")
    p.add_argument("--output-tokens", type=int, required=True)
    p.add_argument("--routing-tokens", type=int, default=1)
    p.add_argument("--no-router", action="store_true", help="leave out the router's FLOPs")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--sa", metavar="N,N,...", help="active SA layers, 1-based paper numbers")
    which.add_argument("--all-configs", action="store_true", help="every configuration of the config")
    p.set_defaults(func=partial(_cli, parser=p))


def _cli(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from visor_vllm.model.config import VisorConfig, get_preset

    try:
        cfg = get_preset(args.preset) if args.preset else VisorConfig.from_pretrained(args.config)
    except (OSError, ValueError) as e:
        parser.error(" ".join(str(e).split()))
    inputs = dict(preset=args.preset, config=args.config, image_tokens=args.image_tokens,
                  text_tokens=args.text_tokens, output_tokens=args.output_tokens,
                  routing_tokens=args.routing_tokens, routed=not args.no_router)
    capable = [i + 1 for i in cfg.sa_capable_layers]
    run = partial(request_flops, cfg, args.image_tokens, args.text_tokens, args.output_tokens,
                  n_routing=args.routing_tokens, routed=not args.no_router,
                  n_image_dense=args.dense_image_tokens)
    try:
        if args.all_configs:
            out = dict(inputs, configs=[dict(config_index=k, **run(c))
                                        for k, c in enumerate(cfg.sa_configs)])
        else:
            try:
                numbers = [int(x) for x in args.sa.split(",") if x.strip()]
            except ValueError:
                parser.error(f"--sa {args.sa!r}: expected comma-separated layer numbers like 1,4,7")
            bad = sorted(set(n for n in numbers if n not in capable))
            if bad:
                parser.error(f"--sa: layer number(s) {bad} are not SA-capable; SA-capable layer "
                             f"numbers are {capable}")
            out = dict(inputs, **run([n - 1 for n in numbers]))  # 1-based -> 0-based
        from visor_vllm.model.packing import crop_tokens

        per_crop = crop_tokens(cfg)  # what one crop yields to VISOR (packed under VISOR-TR)
        crops = math.ceil(args.image_tokens / per_crop) if args.image_tokens > 0 else 0
        out.update(vision_crops_estimate=crops, vision_encoder_flops=vision_encoder_flops(cfg, crops),
                   vision_note="vision_crops_estimate = ceil(image_tokens / tokens per crop): an "
                               "estimate; vision encoder FLOPs are not in visor/dense FLOPs")
    except FlopsInputError as e:
        parser.error(str(e))
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
