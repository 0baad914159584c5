"""VISOR vs vLLM's own LLaVA-OneVision: latency, throughput and KV-cache capacity, in one run.

What. Builds two hub-free checkpoints of the *same architecture sizes* -- VISOR
(``visor-vllm build-tiny DIR --preset visor-0.5b``: config, tokenizer, processor, no weights) and
LLaVA-OneVision in the llava-hf layout (``visor-vllm build-tiny-llava DIR --real-sizes``: the same
LLaVA-OV-0.5B sub-configs, no weights) -- and serves each in turn with ``vllm serve`` (both
``--load-format dummy``, identical flags and environment). VISOR is served once and measured
under every per-request budget (``min`` / ``auto`` / ``max`` by default, sent as
``extra_body={"vllm_xargs": {"visor_budget": ...}}``); LLaVA-OV is vLLM's built-in
``LlavaOnevisionForConditionalGeneration``. For every (model, budget, concurrency) it records
TTFT, inter-token latency (mean and p50), request throughput and output-token throughput, and
for every (model, budget) how many concurrent image requests fit in the KV cache. It prints one
table plus VISOR/LLaVA-OV ratios (same concurrency, same run) and writes everything to JSON
(default ``bench-results/bench_vs_llava.json``, the ratios as a chart next to it, ``.png``;
``bench-results/`` is gitignored).

Why. VISOR's claim is that keeping image tokens out of most LLM layers saves compute and
memory without dropping visual tokens. On a server that shows up as prefill time (TTFT), decode
time per token (text queries attend the image only in CA/SA layers) and KV memory per request,
i.e. concurrency. Comparing against vLLM's own LLaVA-OV on the same box, same images, same
prompts and same server flags in one process run keeps the comparison honest: nothing differs
but the model.

How to run::

    .venv/bin/python benchmarks/bench_vs_llava.py                       # real sizes (long)
    .venv/bin/python benchmarks/bench_vs_llava.py --preset tiny          # smoke test, ~4-8 min
    .venv/bin/python benchmarks/bench_vs_llava.py --concurrency 1 --num-prompts 2 --budgets max
    .venv/bin/python benchmarks/bench_vs_llava.py --help

Useful flags: ``--concurrency 1 4 16`` (levels, the default), ``--num-prompts N`` (per level; default
``max(4, 2*c)``), ``--max-tokens 64``, ``--image 384x384``, ``--budgets min auto max``,
``--kv-space-gib 4`` (``VLLM_CPU_KVCACHE_SPACE``), ``--omp-bind auto``
(``VLLM_CPU_OMP_THREADS_BIND``), ``--out FILE``, ``--workdir DIR`` (checkpoints, datasets,
server logs and every raw ``vllm bench serve`` result land there), ``--models visor llava``,
``--serve-args '...'`` (more ``vllm serve`` flags, given to both servers). Exit status 1 when
a server or a run failed (the table and JSON are still written).

How it measures.

* Requests: ``vllm bench serve`` (``--backend openai-chat``, streaming, greedy, ``--ignore-eos``
  so every request decodes exactly ``--max-tokens``), one invocation per (model, budget,
  concurrency) with ``--max-concurrency c`` and ``--extra-body`` carrying the budget. We use
  vLLM's own client so TTFT / ITL / throughput follow upstream's definitions. Its
  ``--dataset-name random-mm`` is *not* used: it samples prompt token ids from each model's own
  tokenizer vocabulary (VISOR's has 151,936 entries, LLaVA-OV's 151,648) and draws images from
  the same RNG stream, so prompts -- and after the first divergence the images -- would differ
  between the models. Instead this
  script writes a ``custom_image`` JSONL per concurrency level (``--enable-multimodal-chat``,
  ``--disable-shuffle``): fresh seeded random-noise PNGs plus a fixed list of questions, byte
  for byte the same for every model and budget. ``--extra-body`` applies to a whole invocation,
  which is exactly one budget here, so per-request extra body is not needed.
* Fresh images: every concurrency level and VISOR budget has its own images (seed
  ``[seed, c]`` for the first budget and for LLaVA-OV, ``[seed, c, slot]`` for the others), so
  neither server ever sees an image twice in the timed runs: vLLM's encoder cache (LLaVA-OV)
  and VISOR's vision-tower cache would otherwise skip SigLIP for a repeated image. Both
  servers run with ``--mm-processor-cache-gb 0 --no-enable-prefix-caching``.
* Warm-up + KV probe: before each (model, budget)'s timed runs one streaming request with its
  own image (same size, none of the timed ones) is sent with the ``openai`` client; after
  every streamed token it reads ``vllm:kv_cache_usage_perc`` and ``num_gpu_blocks`` from
  ``/metrics``.
* Multi-turn (``--conversations N``, default 3): per (model, budget), N two-turn chats about
  one fresh image each (seed ``[seed, TURNS_LEVEL, slot]``: LLaVA-OV gets the first budget's),
  one request at a time; turn 2 re-sends the image, turn 1's question and answer and a follow-up,
  as chat clients do. Reported: median TTFT of each turn. Neither server has prefix caching,
  so turn 2 re-prefills; what differs is the vision work: vLLM's encoder cache serves LLaVA-OV's
  repeated image, VISOR's own vision-tower cache serves VISOR's (``VISOR_VISION_CACHE_MB``).
* KV capacity = ``num_gpu_blocks // peak_blocks_of_one_request`` with
  ``peak_blocks = round(peak_usage * num_gpu_blocks)``, i.e. measured from what vLLM actually
  allocates for this request shape (image + prompt + ``--max-tokens``), in the same
  ``VLLM_CPU_KVCACHE_SPACE`` for both models. It cannot simply be computed from token counts:
  VISOR pages its text-only layers per *text* token, its CA layers per visual token (``Nv``,
  written once) and its SA-capable layers as one ``[vision ; text]`` sequence per request
  (``Nv + T``, the vision prefix only where the request's budget may run the layer, so
  capacity depends on the budget: ``min`` holds fewer), and vLLM's hybrid allocator groups
  these kinds into equal-size layer groups with padding layers (``Add N padding layers`` in
  the server log), which costs memory that a token count does not see
  (`visor_vllm.engine.kv_layout`). LLaVA-OV pages image + text tokens in every layer. vLLM's
  own startup line (``CPU KV cache size: N tokens, Maximum concurrency for L tokens per
  request: X``) is recorded too, but it is for a ``--max-model-len`` request (and for VISOR
  adds encoder slots for the largest encoder input vLLM allows), not for the benchmark's
  image request.

Footguns.

* CPU timings are noisy (2 cores, and anything else running on the box competes: the
  benchmark client shares those cores). Compare only rows of one run; the ratios are the
  result, the absolute numbers are this machine's. Seen here while other jobs ran: one
  ``visor/min`` c=1 run at 2x the ITL of ``visor/max``, gone in three repeats. Repeat a run
  (or ``--budgets max min max min``) before believing a surprising row.
* The vision encoder dominates TTFT on CPU (an earlier measurement in this project: SigLIP
  ~37 s of ~55 s for a 1,521-token image) and it runs once per request in *both* models
  (VISOR has no encoder cache in enc-dec mode; LLaVA-OV's never hits with fresh images), so
  VISOR's TTFT gain is bounded by the LLM share of prefill. What this script measured with
  bf16 servers on the 2-core box (384x384 image = 1,505 LLaVA-OV prompt tokens, c=1): TTFT
  ~5-8 s VISOR vs ~9-13 s LLaVA-OV. With concurrency > 1 requests queue behind each other's
  encoder work, so TTFT grows with concurrency for both.
* Dummy weights: outputs are random tokens; ``--ignore-eos`` keeps output lengths identical.
  With ``--budgets auto`` the router's choice on dummy weights is arbitrary (not the trained
  distribution); ``min`` / ``max`` bracket it.
* ``usage.prompt_tokens`` (and vLLM bench's input-token totals) count VISOR's *text* tokens
  only; LLaVA-OV's include the image tokens. Token throughput here is *output* tokens.
* Wall time. Real sizes with the defaults: 2 server starts, 4 probes, 4 x 44 timed requests
  (c = 1, 4, 16), 4 x 3 two-turn chats, plus ~15 s of ``vllm bench serve`` start-up per run:
  about 20 minutes (1,194 s) measured on the 2-core box (2026-12-02, eager, ``--omp-bind
  0-1``); with ``--compiled`` and the ``auto`` binding (docs/benchmarks.md's table) 52 minutes (3,134
  s, 2026-12-04). Each run records its own in ``meta.wall_s``.
  ``--preset tiny`` runs the whole pipeline (servers really start) in ~4-8 minutes, most of
  it server start-up; ``--concurrency 1 --num-prompts 2 --budgets max`` is the quick
  real-size check (~5 minutes).
* Thread binding. The default, ``--omp-bind auto``, is vLLM's own default: the worker's OpenMP
  threads get every core but one, which vLLM reserves for the engine-core process, because
  that process busy-waits (``sched_yield``) on the worker's replies between steps. On this
  2-core box that leaves the worker one core. ``--omp-bind 0-1`` gives the worker both cores
  and is faster for both models in absolute terms, but the engine core then spins on a core
  an OMP thread needs, and a parallel region can wait for the descheduled thread. VISOR's
  step has more, smaller regions (8 more attention calls; a slot mapping per KV cache group,
  17 groups against LLaVA-OV's 1: 4.7 against 0.6 ms of input preparation per step in a
  py-spy profile with ``0-1``) and loses more: at c=1 its ITL p50 was 1.19-1.48x
  LLaVA-OV's with ``0-1`` and 0.92-0.98x with ``auto`` (2026-12-04). Compare ratios of one
  binding only.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

PRESETS = {
    # name: (visor build-tiny args, llava build-tiny-llava args)
    "real": (["--preset", "visor-0.5b"], ["--real-sizes"]),
    "tiny": ([], []),
}
DEFAULT_BUDGETS = ("min", "auto", "max")
PROMPTS = (
    "Describe the image in detail.",
    "What is shown in this image?",
    "How many people are in the photo?",
    "What color is the car parked in front of the house?",
)
SERVED_NAME = "m"
PROBE_LEVEL = 10**6  # seed slot of the probe images (never a concurrency level)
TURNS_LEVEL = 10**6 + 1  # seed slot of the multi-turn images
FOLLOW_UP = "And what else can you see there?"
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="VISOR vs vLLM's LLaVA-OneVision (same sizes, dummy weights): TTFT, ITL, "
                    "throughput, KV-cache capacity; see the module docstring.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="real",
                    help="real: VISOR-0.5B vs LLaVA-OV-0.5B sizes, dummy weights; tiny: the "
                         "tiny random checkpoints (smoke test)")
    ap.add_argument("--models", nargs="+", choices=["visor", "llava"], default=["visor", "llava"])
    ap.add_argument("--budgets", nargs="+", default=list(DEFAULT_BUDGETS),
                    help="VISOR budgets, each a visor_budget value (min/auto/max or an int)")
    ap.add_argument("--concurrency", nargs="+", type=_positive_int, default=[1, 4, 16],
                    help="max concurrent requests, one timed run per level")
    ap.add_argument("--num-prompts", type=_positive_int, default=None,
                    help="timed requests per concurrency level (default: max(4, 2*c))")
    ap.add_argument("--max-tokens", type=_positive_int, default=64,
                    help="output tokens per request (ignore_eos)")
    ap.add_argument("--image", type=_image_size, default=(384, 384), metavar="WxH",
                    help="size of the random images (default 384x384)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-space-gib", type=float, default=4.0,
                    help="VLLM_CPU_KVCACHE_SPACE for both servers")
    ap.add_argument("--omp-bind", default="auto",
                    help="VLLM_CPU_OMP_THREADS_BIND for both servers (default: vLLM's own, one "
                         "core reserved for the engine core; see the footguns)")
    ap.add_argument("--max-model-len", type=_positive_int, default=10000)
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    ap.add_argument("--startup-timeout", type=float, default=1800, help="seconds per server")
    ap.add_argument("--workdir", type=Path, default=Path("bench-results/bench_vs_llava"),
                    help="checkpoints, datasets, logs and raw results")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_vs_llava.json"))
    ap.add_argument("--serve-args", type=shlex.split, default=[],
                    help="extra vllm serve arguments for *both* servers, one quoted string, "
                         "e.g. --serve-args='--max-num-seqs 8'")
    ap.add_argument("--compiled", action="store_true",
                    help="serve both models without --enforce-eager (vLLM's default: "
                         "torch.compile)")
    ap.add_argument("--conversations", type=int, default=3,
                    help="multi-turn case: conversations per (model, budget), each two turns "
                         "about one fresh image, sent one at a time (0: skip the case)")
    ap.add_argument("--no-probe", action="store_true",
                    help="skip the warm-up/KV probe request (no KV capacity then)")
    args = ap.parse_args(argv)
    for b in args.budgets:
        if not (b in DEFAULT_BUDGETS or b.isdigit()):
            ap.error(f"--budgets: {b!r} is not min/auto/max or an integer >= 0")
    args.concurrency = sorted(set(args.concurrency))
    return args


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def _image_size(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX](\d+)", s.strip())
    if not m or min(int(m[1]), int(m[2])) < 1:
        raise argparse.ArgumentTypeError(f"expected WxH like 384x384, got {s!r}")
    return int(m[1]), int(m[2])


def requests_for(concurrency: int, num_prompts: int | None) -> int:
    """Timed requests at one concurrency level."""
    return num_prompts if num_prompts else max(4, 2 * concurrency)


# ---------------------------------------------------------------------------------------------
# Checkpoints and datasets
# ---------------------------------------------------------------------------------------------

def build_checkpoints(preset: str, root: Path) -> dict[str, Path]:
    """``visor-vllm build-tiny`` / ``build-tiny-llava`` into ``root`` (reused when present)."""
    visor_args, llava_args = PRESETS[preset]
    out = {"visor": root / f"visor-{preset}", "llava": root / f"llava-onevision-{preset}"}
    cli = str(BIN / "visor-vllm")
    for name, cmd in (("visor", [cli, "build-tiny", str(out["visor"]), *visor_args]),
                      ("llava", [cli, "build-tiny-llava", str(out["llava"]), *llava_args])):
        if (out[name] / "config.json").exists() and (out[name] / "tokenizer.json").exists():
            continue
        print(f"building {name}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return out


def image_data_url(rng, width: int, height: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_content(url: str, prompt: str) -> list[dict]:
    """Image first, then the question (LLaVA-OV's usual order; VISOR puts V first anyway)."""
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]


def dataset_lines(seed: int, level: int, n: int, size: tuple[int, int], slot: int = 0) -> list[str]:
    """``custom_image`` JSONL lines: n fresh images for one level and budget slot; same args ->
    same bytes. Slot 0 (the first VISOR budget, and LLaVA-OV) keeps the historical stream."""
    import numpy as np

    rng = np.random.default_rng([seed, level] if slot == 0 else [seed, level, slot])
    return [json.dumps({"content": chat_content(image_data_url(rng, *size),
                                                PROMPTS[i % len(PROMPTS)])})
            for i in range(n)]


def write_datasets(args: argparse.Namespace, root: Path) -> dict[tuple[int, int], Path]:
    """One dataset per (concurrency level, budget slot): a VISOR server never sees an image
    twice across its budgets, or its vision-tower cache would hide SigLIP from every budget
    after the first. Images of one size cost the same whatever their pixels."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for c in args.concurrency:
        for slot in range(len(args.budgets)):
            p = root / f"images-{args.image[0]}x{args.image[1]}-seed{args.seed}-c{c}-b{slot}.jsonl"
            p.write_text("\n".join(dataset_lines(args.seed, c, requests_for(c, args.num_prompts),
                                                 args.image, slot)) + "\n")
            paths[c, slot] = p
    return paths


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------

def server_command(model: Path, port: int, max_model_len: int = 10000,
                   extra: list[str] | None = None, compiled: bool = False) -> list[str]:
    """The `vllm serve` command; identical for both models but the directory.

    ``--enforce-eager`` unless ``compiled`` (vLLM's default path: torch.compile for both models;
    CPU start-up then includes the compilation). VISOR's requirements, as in
    `visor_vllm.serving.serve.vllm_command`: ``--max-num-batched-tokens`` >= the largest image's tokens plus prompt (no chunked prefill in
    enc-dec mode), ``--limit-mm-per-prompt``. Benchmark choices: bfloat16; one image and no video
    per prompt (LLaVA-OV's video processor needs torchvision); no prefix caching and no
    multimodal processor cache, so no request is served from a cache; ``--load-format dummy``
    when the directory has no ``*.safetensors`` (real sizes: both models). Deliberately *not*
    `vllm_command` itself: that one also adds VISOR-only serving features (e.g. the receipts
    middleware) which would make the two servers differ; pass them with ``--serve-args`` if
    wanted (they then go to both servers).
    """
    dummy = [] if any(Path(model).glob("*.safetensors")) else ["--load-format", "dummy"]
    return [str(BIN / "vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED_NAME, "--dtype", "bfloat16",
            *([] if compiled else ["--enforce-eager"]), "--max-model-len", str(max_model_len),
            "--max-num-batched-tokens", str(max_model_len),
            "--limit-mm-per-prompt", '{"image": 1, "video": 0}', "--no-enable-prefix-caching",
            "--mm-processor-cache-gb", "0", "--seed", "0", *dummy, *(extra or [])]


def server_env(kv_space_gib: float, omp_bind: str) -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{kv_space_gib:g}",
            "VLLM_CPU_OMP_THREADS_BIND": omp_bind, "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


class Server:
    """A `vllm serve` subprocess in its own process group; a context manager."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, port: int):
        self.cmd, self.env, self.log, self.port = cmd, env, log, port
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        return self

    def wait_ready(self, timeout: float) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; last log "
                                   f"lines:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return time.time() - t0
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"vllm serve not ready after {timeout:.0f}s; log: {self.log}")

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        # the API server first (it stops its engine core and workers cleanly), then whatever is
        # left of the process group we created for it
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of our own group only
        except (ProcessLookupError, PermissionError):
            pass


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Log and /metrics parsing, KV capacity
# ---------------------------------------------------------------------------------------------

_KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens "
                      r"per request: ([\d.]+)x")
_GROUPS = re.compile(r"kv cache group sizes \(([\d, ]*)\)")
_PADDING = re.compile(r"Add (\d+) padding layers")


def parse_kv_log(text: str) -> dict:
    """vLLM's startup KV lines -> dict (None for what is missing).

    ``kv_cache_tokens`` / ``max_concurrency_at_max_len``: the "KV cache size: N tokens, Maximum
    concurrency for L tokens per request: Xx" line (for ``--max-model-len`` requests);
    ``group_block_sizes``: one block size per KV cache group; ``padding_layers``: layers vLLM's
    hybrid allocator added to equalise groups (memory that holds nothing).
    """
    out = {"kv_cache_tokens": None, "max_model_len": None, "max_concurrency_at_max_len": None,
           "group_block_sizes": None, "padding_layers": 0}
    if m := _KV_LINE.search(text):
        out["kv_cache_tokens"] = int(m[1].replace(",", ""))
        out["max_model_len"] = int(m[2].replace(",", ""))
        out["max_concurrency_at_max_len"] = float(m[3])
    if m := _GROUPS.search(text):
        out["group_block_sizes"] = [int(x) for x in m[1].replace(" ", "").split(",") if x]
    out["padding_layers"] = sum(int(x) for x in _PADDING.findall(text))
    return out


_USAGE = re.compile(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", re.M)
_NUM_BLOCKS = re.compile(r'num_gpu_blocks="(\d+)"')


def parse_metrics(text: str) -> tuple[float | None, int | None]:
    """Prometheus text -> (KV usage fraction, total KV blocks)."""
    u, nb = _USAGE.search(text), _NUM_BLOCKS.search(text)
    return (float(u[1]) if u else None), (int(nb[1]) if nb else None)


def kv_capacity(num_blocks: int | None, blocks_per_request: int | None) -> int | None:
    """Concurrent requests of this shape that fit in the pool (all groups share one pool)."""
    if not num_blocks or not blocks_per_request:
        return None
    return num_blocks // blocks_per_request


def blocks_from_usage(usage: float, num_blocks: int) -> int:
    return round(usage * num_blocks)


def probe(base: str, url: str, prompt: str, max_tokens: int, budget: str | None) -> dict:
    """One streaming request (warm-up); peak KV blocks it holds, read from /metrics per token."""
    from openai import OpenAI

    def metrics():
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    client = OpenAI(base_url=base + "/v1", api_key="none", timeout=3600, max_retries=0)
    extra = {"ignore_eos": True}
    if budget is not None:
        extra["vllm_xargs"] = {"visor_budget": budget}
    t0 = time.perf_counter()
    ttft, peak, num_blocks, n, usage = None, 0, None, 0, None
    stream = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": chat_content(url, prompt)}],
        max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra)
    for chunk in stream:
        if chunk.choices:
            n += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
            u, nb = metrics()
            if u is not None and nb:
                num_blocks = nb
                peak = max(peak, blocks_from_usage(u, nb))
        if chunk.usage:
            usage = chunk.usage
    return {"ttft_s": ttft, "e2e_s": time.perf_counter() - t0, "chunks": n,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "num_gpu_blocks": num_blocks, "blocks_per_request": peak or None,
            "kv_capacity_requests": kv_capacity(num_blocks, peak)}


def conversation_turn2(url: str, question: str, answer: str, follow_up: str = FOLLOW_UP) -> list[dict]:
    """Turn 2 of a chat as clients send it: the image, turn 1's question and answer, a new one."""
    return [{"role": "user", "content": chat_content(url, question)},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": follow_up}]


def _stream_ttft(client, messages, max_tokens: int, budget: str | None) -> tuple[float, str]:
    extra = {"ignore_eos": True}
    if budget is not None:
        extra["vllm_xargs"] = {"visor_budget": budget}
    t0, ttft, text = time.perf_counter(), None, []
    for chunk in client.chat.completions.create(model=SERVED_NAME, messages=messages,
                                                max_tokens=max_tokens, temperature=0,
                                                stream=True, extra_body=extra):
        if chunk.choices and chunk.choices[0].delta.content is not None:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
    return ttft, "".join(text)


def multi_turn(base: str, urls: list[str], max_tokens: int, budget: str | None) -> dict:
    """Two-turn conversations, one at a time: TTFT of each turn (turn 2 re-sends the image)."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="none", timeout=3600, max_retries=0)
    convs = []
    for i, url in enumerate(urls):
        q = PROMPTS[i % len(PROMPTS)]
        t1, answer = _stream_ttft(client, [{"role": "user", "content": chat_content(url, q)}],
                                  max_tokens, budget)
        t2, _ = _stream_ttft(client, conversation_turn2(url, q, answer), max_tokens, budget)
        convs.append({"ttft_turn1_s": t1, "ttft_turn2_s": t2})
    return summarize_turns(convs)


def summarize_turns(convs: list[dict]) -> dict:
    """Median TTFT of turn 1 and turn 2 over conversations, and turn 2 / turn 1."""
    import statistics

    def med(key):
        vals = [c[key] for c in convs if c.get(key) is not None]
        return round(statistics.median(vals), 3) if vals else None

    t1, t2 = med("ttft_turn1_s"), med("ttft_turn2_s")
    return {"conversations": convs, "ttft_turn1_s": t1, "ttft_turn2_s": t2,
            "turn2_over_turn1": round(t2 / t1, 3) if t1 and t2 is not None else None}


# ---------------------------------------------------------------------------------------------
# Timed runs: vllm bench serve
# ---------------------------------------------------------------------------------------------

def bench_command(port: int, tokenizer: Path, dataset: Path, n: int, concurrency: int,
                  max_tokens: int, budget: str | None, result: Path, seed: int = 0) -> list[str]:
    cmd = [str(BIN / "vllm"), "bench", "serve", "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--host", "127.0.0.1", "--port", str(port),
           "--model", SERVED_NAME, "--tokenizer", str(tokenizer),
           "--dataset-name", "custom_image", "--dataset-path", str(dataset),
           "--enable-multimodal-chat", "--disable-shuffle", "--num-prompts", str(n),
           "--max-concurrency", str(concurrency), "--request-rate", "inf",
           "--custom-output-len", str(max_tokens), "--ignore-eos", "--temperature", "0",
           "--seed", str(seed),
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
           "--save-result", "--result-dir", str(result.parent),
           "--result-filename", result.name, "--disable-tqdm"]
    if budget is not None:
        cmd += ["--extra-body", json.dumps({"vllm_xargs": {"visor_budget": budget}})]
    return cmd


METRICS = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_itl_ms", "median_itl_ms",
           "p99_itl_ms", "mean_tpot_ms", "median_tpot_ms", "mean_e2el_ms", "request_throughput",
           "output_throughput", "completed", "failed", "duration", "total_input_tokens",
           "total_output_tokens")


def summarize_bench(result: dict) -> dict:
    """The metrics this benchmark reports from a `vllm bench serve --save-result` JSON."""
    out = {k: result.get(k) for k in METRICS}
    if out["failed"] is None and out["completed"] is not None:
        out["failed"] = result.get("num_prompts", out["completed"]) - out["completed"]
    return out


# ---------------------------------------------------------------------------------------------
# Table and ratios
# ---------------------------------------------------------------------------------------------

def row_label(model: str, budget: str | None) -> str:
    return "llava-ov" if model == "llava" else f"visor/{budget}"


def _ratio(a, b) -> float | None:
    if a is None or b is None or not isinstance(a, (int, float)) or not b:
        return None
    return a / b


def compute_ratios(rows: list[dict]) -> list[dict]:
    """VISOR/LLaVA-OV per (budget, concurrency): TTFT, ITL (<1: VISOR faster), req/s, tok/s,
    KV capacity (>1: VISOR better)."""
    llava = {r["concurrency"]: r for r in rows if r["model"] == "llava"}
    out = []
    for r in rows:
        ref = llava.get(r["concurrency"])
        if r["model"] != "visor" or ref is None:
            continue
        out.append({"budget": r["budget"], "concurrency": r["concurrency"],
                    "ttft": _ratio(r.get("mean_ttft_ms"), ref.get("mean_ttft_ms")),
                    "itl": _ratio(r.get("mean_itl_ms"), ref.get("mean_itl_ms")),
                    "itl_p50": _ratio(r.get("median_itl_ms"), ref.get("median_itl_ms")),
                    "itl_p99": _ratio(r.get("p99_itl_ms"), ref.get("p99_itl_ms")),
                    "req_per_s": _ratio(r.get("request_throughput"), ref.get("request_throughput")),
                    "tok_per_s": _ratio(r.get("output_throughput"), ref.get("output_throughput")),
                    "kv_capacity": _ratio(r.get("kv_capacity_requests"),
                                          ref.get("kv_capacity_requests"))})
    return out


def decode_cost_model(cfg, n_image: int, n_image_dense: int, context: int, sa_layers,
                      concurrency: int) -> dict[str, float]:
    """The decode-step ratio VISOR / LLaVA-OV that a cost model predicts for ``concurrency``
    identical rows: by FLOPs (`visor_vllm.model.flops`, plus the LM head both run) and by bytes
    read (every linear weight once per step, bf16, plus each row's K/V). ``context``: text
    tokens the step attends (new one included). VISOR reads text K/V in every layer, visual
    K/V in its CA layers and in the SA layers it runs, and its CA layers' q/o projections;
    LLaVA-OV reads ``n_image_dense + context`` K/V in every layer.

    What it is for: reading a measured ITL ratio. Attention is the only term VISOR shrinks, so
    where weights dominate (small images, few rows) both models are ~1.0x. It is not a hard
    floor: a served ITL also holds what the model leaves out (the sampler, per-call
    overheads, other requests' prefills), which can push the measured ratio above or below it.
    At c=16 here the model forward lands a little below it: vLLM's CPU attention kernel streams
    K/V more slowly per byte than the GEMMs stream weights (docs/benchmarks.md, the decode forward op by op).
    """
    from visor_vllm.model import flops

    # the flops module's own per-layer terms: a matmul of one token costs 2 FLOPs per weight
    dims = flops._dims(cfg)
    d, _, hkv, dh, _ = dims
    L, lm_head = cfg.num_layers, 2 * d * cfg.text_config.vocab_size
    visor = flops.decode_step_flops(cfg, n_image, context, sa_layers) + lm_head
    dense = flops.dense_decode_step_flops(cfg, n_image_dense, context) + lm_head
    weights = (L * flops._linear(dims, 1) + lm_head) // 2               # parameters read
    cross = len(cfg.cross_layers) * flops._cross_qo(dims, 1) // 2      # CA q_proj + o_proj
    kv = 2 * hkv * dh                                                   # K and V, one token
    kv_visor = kv * (L * context + (len(cfg.cross_layers) + len(set(sa_layers))) * n_image)
    kv_dense = kv * L * (n_image_dense + context)
    return {"flops": visor / dense,
            "bytes": (2 * (weights + cross) + 2 * concurrency * kv_visor)
            / (2 * weights + 2 * concurrency * kv_dense)}


def decode_cost_models(cfg, image: tuple[int, int], n_text: int, max_tokens: int,
                       budgets: list[str], levels: list[int]) -> dict[tuple[str, int], dict]:
    """`decode_cost_model` per (budget, concurrency) at the run's mean decode context
    (``n_text + max_tokens / 2``); a budget that lets the router choose gets the range over
    the configurations it allows (``lo``/``hi``)."""
    from visor_vllm.model.budget import allowed_configs, parse_budget
    from visor_vllm.model.packing import visual_token_count

    w, h = image
    nv, nd = visual_token_count(cfg, h, w), visual_token_count(cfg, h, w, packed=False)
    ctx = n_text + max(max_tokens // 2, 1)
    out = {}
    for b in budgets:
        mask = allowed_configs(cfg, parse_budget({"visor_budget": b}, cfg))
        configs = [c for c, ok in zip(cfg.sa_configs, mask) if ok]
        for c in levels:
            fl = [decode_cost_model(cfg, nv, nd, ctx, sa, c) for sa in configs]
            out[b, c] = {k: {"lo": min(x[k] for x in fl), "hi": max(x[k] for x in fl)}
                         for k in ("flops", "bytes")}
    return out


def _fmt_range(r: dict | None) -> str:
    if not r:
        return "-"
    lo, hi = f"{r['lo']:.2f}", f"{r['hi']:.2f}"
    return f"{lo}x" if lo == hi else f"{lo}-{hi}x"


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(rows: list[dict]) -> str:
    head = ("model/budget", "conc", "ok", "TTFT mean s", "ITL mean ms", "ITL p50 ms",
            "ITL p99 ms", "req/s", "out tok/s", "KV cap req")
    body = []
    for r in rows:
        ms = r.get("mean_ttft_ms")
        ok = (f"{r['completed']}/{r['completed'] + (r.get('failed') or 0)}"
              if r.get("completed") is not None else "-")
        body.append((row_label(r["model"], r["budget"]), str(r["concurrency"]), ok,
                     _fmt(ms / 1000 if ms is not None else None, ".2f"),
                     _fmt(r.get("mean_itl_ms"), ".1f"), _fmt(r.get("median_itl_ms"), ".1f"),
                     _fmt(r.get("p99_itl_ms"), ".1f"), _fmt(r.get("request_throughput"), ".3f"),
                     _fmt(r.get("output_throughput"), ".2f"),
                     _fmt(r.get("kv_capacity_requests"), "d")))
    return _grid(head, body)


def format_ratios(ratios: list[dict]) -> str:
    """The ratio table; ``model bytes`` / ``model FLOPs``: `decode_cost_model`, the decode-step
    ratio a step whose time followed bytes read / FLOPs would have (a range where the router
    chooses), when the run could compute it."""
    head = ("VISOR/LLaVA-OV", "conc", "TTFT", "ITL mean", "ITL p50", "ITL p99", "req/s",
            "out tok/s", "KV cap", "model bytes", "model FLOPs")
    body = [(f"visor/{r['budget']}", str(r["concurrency"]),
             *(_fmt(r[k], ".2f") + ("x" if r[k] is not None else "")
               for k in ("ttft", "itl", "itl_p50", "itl_p99", "req_per_s", "tok_per_s",
                         "kv_capacity")),
             *(_fmt_range((r.get("decode_cost_model") or {}).get(k)) for k in ("bytes", "flops")))
            for r in ratios]
    return _grid(head, body)


def format_multi_turn(models: dict) -> str:
    """Turn-1 and turn-2 TTFT per (model, budget), and VISOR/LLaVA-OV on turn 2."""
    ref = models.get("llava", {}).get("multi_turn", {}).get("-", {})
    head = ("model/budget", "turn-1 TTFT s", "turn-2 TTFT s", "turn 2 / turn 1",
            "turn-2 vs LLaVA-OV")
    body = []
    for name, info in models.items():
        for key, t in info.get("multi_turn", {}).items():
            body.append((row_label(name, None if key == "-" else key),
                         _fmt(t.get("ttft_turn1_s"), ".2f"), _fmt(t.get("ttft_turn2_s"), ".2f"),
                         _fmt(t.get("turn2_over_turn1"), ".2f"),
                         _fmt(_ratio(t.get("ttft_turn2_s"), ref.get("ttft_turn2_s")), ".2f")))
    return _grid(head, body)


def _grid(head: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def run_model(name: str, ckpt: Path, args, datasets: dict[int, Path], work: Path) -> dict:
    port = args.port or free_port()
    cmd = server_command(ckpt, port, args.max_model_len, args.serve_args, args.compiled)
    env = server_env(args.kv_space_gib, args.omp_bind)
    budgets = list(args.budgets) if name == "visor" else [None]
    info: dict = {"checkpoint": str(ckpt), "server_cmd": cmd, "server_log": None, "probes": {},
                  "multi_turn": {}, "rows": [], "error": None}
    log = work / "logs" / args.preset / f"{name}-server.log"
    info["server_log"] = str(log)
    print(f"\n== {name}: starting {' '.join(cmd)}", flush=True)
    with Server(cmd, env, log, port) as server:
        try:
            info["startup_s"] = round(server.wait_ready(args.startup_timeout), 1)
        except RuntimeError as e:
            info["error"] = str(e)
            print(f"!! {name}: {e}", flush=True)
            return info
        info["kv_log"] = parse_kv_log(log.read_text(errors="replace"))
        print(f"   ready in {info['startup_s']} s; KV: {info['kv_log']}", flush=True)
        import numpy as np

        probe_url = image_data_url(np.random.default_rng([args.seed, PROBE_LEVEL]), *args.image)
        for slot, budget in enumerate(budgets):  # LLaVA-OV: slot 0, the first budget's images
            key = budget or "-"
            tag = f"{name}-{budget}" if budget else name
            if not args.no_probe:
                try:
                    p = probe(server.base, probe_url, PROMPTS[0], args.max_tokens, budget)
                except Exception as e:  # keep going: timings are still useful
                    p = {"error": f"{type(e).__name__}: {e}"}
                info["probes"][key] = p
                print(f"   probe {row_label(name, budget)}: {p}", flush=True)
            if args.conversations > 0:  # fresh images, the same for every model and budget
                rng = np.random.default_rng([args.seed, TURNS_LEVEL, slot])
                urls = [image_data_url(rng, *args.image) for _ in range(args.conversations)]
                try:
                    t = multi_turn(server.base, urls, args.max_tokens, budget)
                except Exception as e:  # keep going: the other cases are still useful
                    t = {"error": f"{type(e).__name__}: {e}"}
                info["multi_turn"][key] = t
                print(f"   multi-turn {row_label(name, budget)}: "
                      f"{ {k: v for k, v in t.items() if k != 'conversations'} }", flush=True)
            for c in args.concurrency:
                n = requests_for(c, args.num_prompts)
                res = work / "runs" / args.preset / f"{tag}-c{c}.json"
                res.parent.mkdir(parents=True, exist_ok=True)
                res.unlink(missing_ok=True)
                bcmd = bench_command(port, ckpt, datasets[c, slot], n, c, args.max_tokens, budget,
                                     res, args.seed)
                blog = work / "logs" / args.preset / f"{tag}-c{c}.bench.log"
                print(f"   {row_label(name, budget)} c={c}: {n} requests ...", flush=True)
                t0 = time.time()
                with open(blog, "w") as out:
                    try:  # generous: ~10 min per request would already be a hang on any box
                        rc = subprocess.run(bcmd, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                            timeout=300 + 600 * n).returncode
                    except subprocess.TimeoutExpired:
                        rc = "timeout"
                row = {"model": name, "budget": budget, "concurrency": c, "num_prompts": n,
                       "wall_s": round(time.time() - t0, 1), "result_file": str(res),
                       "bench_log": str(blog)}
                if rc == 0 and res.exists():
                    row.update(summarize_bench(json.loads(res.read_text())))
                else:
                    row["error"] = f"vllm bench serve exited {rc}: {_tail(blog, 8)}"
                probe_row = info["probes"].get(key, {})
                row["kv_capacity_requests"] = probe_row.get("kv_capacity_requests")
                row["kv_blocks_per_request"] = probe_row.get("blocks_per_request")
                info["rows"].append(row)
                print("   " + json.dumps({k: row.get(k) for k in (
                    "completed", "failed", "mean_ttft_ms", "mean_itl_ms", "request_throughput",
                    "output_throughput", "error")}), flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    work = args.workdir
    ckpts = build_checkpoints(args.preset, work / "checkpoints")
    datasets = write_datasets(args, work / "data")
    models = {}
    for name in ("visor", "llava"):
        if name in args.models:
            models[name] = run_model(name, ckpts[name], args, datasets, work)
    rows = [r for m in models.values() for r in m["rows"]]
    ratios = compute_ratios(rows)
    try:  # the cost model next to each measured ratio (never fails the run)
        from visor_vllm.model.config import VisorConfig

        probe_tokens = models.get("visor", {}).get("probes", {})
        n_text = next((p["prompt_tokens"] for p in probe_tokens.values()
                       if isinstance(p.get("prompt_tokens"), int)), 24)
        cost = decode_cost_models(VisorConfig.from_pretrained(ckpts["visor"]), args.image,
                                  n_text, args.max_tokens, list(args.budgets),
                                  list(args.concurrency))
        for r in ratios:
            r["decode_cost_model"] = cost.get((r["budget"], r["concurrency"]))
    except Exception as e:  # noqa: BLE001
        print(f"no decode cost model ({type(e).__name__}: {e})")
    import vllm

    result = {
        "meta": {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "preset": args.preset, "vllm": vllm.__version__,
                 "python": platform.python_version(),
                 "cpus": os.cpu_count(), "machine": platform.machine(),
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "env": {"VLLM_CPU_KVCACHE_SPACE": f"{args.kv_space_gib:g}",
                         "VLLM_CPU_OMP_THREADS_BIND": args.omp_bind},
                 "prompts": list(PROMPTS), "wall_s": None},
        "models": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in models.items()},
        "rows": rows, "ratios": ratios,
    }
    result["meta"]["wall_s"] = round(time.time() - t_start, 1)
    print("\n" + format_table(rows))
    if ratios:
        print("\nratios, same run (TTFT/ITL < 1 and req/s, tok/s, KV cap > 1 favour VISOR):")
        print(format_ratios(ratios))
    if any(m.get("multi_turn") for m in models.values()):
        print("\nmulti-turn (turn 2 re-sends turn 1's image; no prefix caching on either server):")
        print(format_multi_turn(models))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} (raw results and logs under {work}); "
          f"wall {result['meta']['wall_s']} s")
    if ratios:  # the same ratios as a chart (visor-vllm plot bench FILE redraws it)
        try:
            from visor_vllm.evaluation.plot import render

            print(f"wrote {render('bench', args.out.with_suffix('.png'), result)}")
        except ImportError as e:
            print(f"no chart ({e}): install the plot extra (make setup)")
    failed = any(m.get("error") for m in models.values()) or any(r.get("error") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
