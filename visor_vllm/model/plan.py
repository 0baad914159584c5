"""Pure functions that fix how a VISOR request is laid out and which SA layers it runs.

Shared by the reference model and the vLLM model (never an `nn.Module`), so both follow one
document. The decisions, in one place:

Sequence order ("vision_first"). A prompt's image-token placeholders are taken out of the token
stream. ``V`` is the concatenation of every image's packed LLaVA-OV features, in prompt order
(image 1's base crop, its anyres tiles and newline tokens, then image 2, ...). ``T`` is every
other prompt token (system prompt, role tags, question, routing token), in prompt order. SA
layers run the ordinary causal layer on ``[V;T]`` -- visual tokens first -- so for a prompt whose
image comes first the all-SA model *is* LLaVA-OneVision.

RoPE positions. ``V`` takes positions ``0..Nv-1`` and text token ``j`` (prompt or generated)
takes ``Nv + j``, whatever the image's place in the prompt. Text-only and CA layers only see
text-text relative offsets, so the offset ``Nv`` matters only in SA layers. Cross-attention uses
no RoPE: the visual tokens get their position from the 1D depthwise conv (per image, zero
padding at image borders, so one image never leaks into its neighbour).

Routing. The routing token is appended after each question by the chat template. The router
reads the hidden state of *every* routing token in the prompt at the output of
``config.router_layer``; each token votes for its argmax configuration and the costliest vote
wins (paper Sec. 4.3: "conservatively selects the configuration with the highest computational
cost"). Cost = number of SA layers; ties go to the later entry of ``sa_configs`` (the list is
ordered cheapest first). Layers up to the router layer run the always-on SA layers only, which
every configuration contains, so the choice is causal and identical after a recompute.

Footgun: user-facing layer numbers are 1-based (the paper's), indices here are 0-based.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from visor_vllm.model.config import VisorConfig


class InvalidConfigurationError(ValueError):
    """An explicit SA configuration that this checkpoint cannot run."""


class RoutingTokenMissingError(ValueError):
    """The router must choose a configuration but the prompt holds no routing token."""


class ImageTokenMismatchError(ValueError):
    """The prompt's image placeholders do not match the number of visual features."""


def layers_from_numbers(numbers: Iterable[int]) -> list[int]:
    """Paper / CLI layer numbers (1-based) -> 0-based indices."""
    return [int(n) - 1 for n in numbers]


def numbers_from_layers(layers: Iterable[int]) -> list[int]:
    """0-based indices -> paper / CLI layer numbers (1-based)."""
    return [int(i) + 1 for i in layers]


def check_sa_layers(cfg: VisorConfig, sa_layers: Iterable[int]) -> tuple[int, ...]:
    """Validate an explicit set of SA layers (0-based) against the SA-capable layers."""
    layers = tuple(sorted(set(int(i) for i in sa_layers)))
    bad = [i for i in layers if i not in cfg.sa_capable_layers]
    if bad:
        raise InvalidConfigurationError(
            f"layer number(s) {numbers_from_layers(bad)} are not SA-capable; SA-capable layer "
            f"numbers are {numbers_from_layers(cfg.sa_capable_layers)}"
        )
    return layers


def needs_router(cfg: VisorConfig) -> bool:
    return len(cfg.sa_configs) > 1


def choose_configuration(cfg: VisorConfig, router_logits: torch.Tensor,
                         allowed: Sequence[bool] | None = None) -> int:
    """Index into ``cfg.sa_configs`` chosen from router logits ``[R, C]`` (R routing tokens).

    ``allowed`` (a budget, see `visor_vllm.model.budget`) restricts every vote to those configurations.
    """
    if router_logits.ndim != 2 or router_logits.shape[0] == 0:
        raise RoutingTokenMissingError("the router needs at least one routing token")
    if allowed is not None:
        keep = torch.tensor(list(allowed), dtype=torch.bool, device=router_logits.device)
        router_logits = router_logits.masked_fill(~keep, float("-inf"))
    votes = router_logits.argmax(dim=-1)  # [R]
    num_layers = torch.tensor([len(c) for c in cfg.sa_configs], device=votes.device)
    cost = num_layers[votes] * len(cfg.sa_configs) + votes  # lexicographic (len, index)
    return int(votes[cost.argmax()])


def vision_first_positions(n_vision: int, n_text: int, past_text: int = 0,
                           device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions ``(v_pos [Nv], t_pos [n_text])`` for text tokens ``past_text..past_text+n_text``."""
    v_pos = torch.arange(n_vision, device=device)
    t_pos = torch.arange(past_text, past_text + n_text, device=device) + n_vision
    return v_pos, t_pos


def segment_gaps(lengths: Sequence[int], pad: int,
                 device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """Rows of segments laid out with ``pad`` zero rows between them: ``(dst [N], total)``.

    Row ``r`` of segment ``s`` goes to ``r + pad * s``; ``total`` is the gapped length. Pure
    function of the host-side lengths, so a batch can build it before its step
    (`visor_vllm.model.batch_layout`).
    """
    import numpy as np

    lens = np.asarray(list(lengths), dtype=np.int64)
    n = int(lens.sum())
    # numpy, not torch: this runs in DataLoader workers, where torch's repeat_interleave enters
    # OpenMP directly and hangs in a process forked from one that already used OpenMP
    seg = np.repeat(np.arange(len(lens)), lens)                  # [N] segment of each row
    dst = torch.from_numpy(np.arange(n) + pad * seg)
    return dst.to(device), n + pad * max(len(lens) - 1, 0)


def segment_depthwise_conv1d(x: torch.Tensor, lengths: Sequence[int], weight: torch.Tensor,
                             bias: torch.Tensor | None,
                             gaps: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Depthwise 1D conv over each segment of ``x`` independently, zero-padded at its borders.

    x: [N, d] (segments concatenated, sum(lengths) == N); weight: [d, 1, k] (k odd); bias: [d].
    Segments are laid out with ``k//2`` zero rows between them, so one batched conv equals a
    per-segment conv with padding ``k//2`` (no Python loop over segments in the hot path).
    ``gaps``: `segment_gaps(lengths, k // 2)` on ``x``'s device, when the caller built it already.
    """
    n, d = x.shape
    k = weight.shape[-1]
    pad = k // 2
    if sum(lengths) != n:
        raise ValueError(f"segment lengths {list(lengths)} do not sum to {n}")
    dst, total = gaps if gaps is not None else segment_gaps(lengths, pad, x.device)
    gapped = x.new_zeros(total, d).index_copy_(0, dst, x)  # [total, d]
    y = torch.nn.functional.conv1d(gapped.t().unsqueeze(0), weight, bias, padding=pad, groups=d)
    return y[0].t().index_select(0, dst)  # [N, d]
