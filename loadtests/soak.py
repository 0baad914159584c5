"""Soak: a VISOR server at saturation with mixed good and bad requests, bounded and loopback only.

    .venv/bin/python loadtests/soak.py --minutes 10 --out soak.json      # the measured run
    .venv/bin/python loadtests/soak.py --minutes 0.5                     # a smoke run

What. Starts ``vllm serve`` of a fresh tiny VISOR checkpoint on 127.0.0.1 (the product's own
launcher, `visor_vllm.evaluation.launch.served`, with the middleware), then keeps ``--workers``
client threads busy for ``--minutes``. Each request is drawn from a fixed mix (seeded). About
70% are good: chat with an image under every budget form, streamed or not, text-only, and
completions. About 30% are bad: a bad budget (also streamed), ``true`` as a budget, a forged
receipt id, a corrupt image, a ``file://`` or loopback image URL, ``echo``, a body nested
100,000 deep, and a client that disconnects mid-stream. It samples the server's memory (RSS of the
API server, engine and worker processes) every 5 s.

It passes (exit 0) when, over the run:

* no good request failed (non-200, no choices, or no ``visor`` receipt);
* every bad request got a 4xx (a disconnect gets nothing, by design);
* the counters add up: ``visor:requests_total`` grew by exactly the requests that reached the
  engine, and ``vllm:request_success_total`` agrees; ``visor:llm_flops_total`` for prefill grew
  by the sum of the receipts' prefill FLOPs (aborted streams are the only requests without a
  receipt, so their prefill is added from the event count, see below);
* memory grew by less than ``--max-growth`` (5%): the median RSS of the last fifth of the run
  against that of the second fifth (the first fifth is warm-up).

Footguns. Aborted streams: the engine counts what ran, so their decode FLOPs are not checked,
only that each is one request; their prefill FLOPs equal a normal request's and are added from
a reference receipt of the same image and budget. Times here are wall-clock on a shared machine:
this is a robustness run, not a benchmark.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

MODEL = "visor-soak"


def _png(seed: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGE = None  # set in main: one image, so every good image request has the same prefill


def _chat(xargs=None, stream=False, image=True, text="What is in the picture?", **kw):
    parts = ([{"type": "image_url", "image_url": {"url": IMAGE}}] if image else [])
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": parts + [{"type": "text", "text": text}]}],
            **kw}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    if stream:
        body["stream"] = True
    return body


def cases():
    """name -> (kind, path, body or raw bytes); kind: good | bad | abort."""
    good = {
        "auto": ("good", "/v1/chat/completions", _chat()),
        "min": ("good", "/v1/chat/completions", _chat({"visor_budget": "min"})),
        "max": ("good", "/v1/chat/completions", _chat({"visor_budget": "max"})),
        "cap1": ("good", "/v1/chat/completions", _chat({"visor_budget": 1})),
        "flops": ("good", "/v1/chat/completions", _chat({"visor_max_flops": 0.5})),
        "layers": ("good", "/v1/chat/completions", _chat({"visor_sa_layers": [1, 4]})),
        "stream-max": ("good", "/v1/chat/completions", _chat({"visor_budget": "max"}, stream=True)),
        "text-only": ("good", "/v1/chat/completions", _chat(image=False)),
        "completions": ("good", "/v1/completions", {"model": MODEL, "prompt": "a b c",
                                                    "max_tokens": 4, "ignore_eos": True}),
    }
    bad = {
        "bad-budget": ("bad", "/v1/chat/completions", _chat({"visor_budget": "lots"})),
        "bad-budget-stream": ("bad", "/v1/chat/completions", _chat({"visor_budget": "lots"}, stream=True)),
        "true-budget": ("bad", "/v1/chat/completions", _chat({"visor_budget": True})),
        "bad-layer": ("bad", "/v1/chat/completions", _chat({"visor_sa_layers": [2]})),
        "forged-receipt": ("bad", "/v1/responses", {"model": MODEL, "input": "hi",
                                                    "vllm_xargs": {"visor_receipt": "ab" * 16}}),
        "corrupt-image": ("bad", "/v1/chat/completions",
                          {**_chat(), "messages": [{"role": "user", "content": [
                              {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}},
                              {"type": "text", "text": "x"}]}]}),
        "file-url": ("bad", "/v1/chat/completions",
                     {**_chat(), "messages": [{"role": "user", "content": [
                         {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}),
        "loopback-url": ("bad", "/v1/chat/completions",
                         {**_chat(), "messages": [{"role": "user", "content": [
                             {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}),
        "echo": ("bad", "/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}),
        "deep-json": ("bad", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
    }
    abort = {"disconnect": ("abort", "/v1/chat/completions",
                            {**_chat({"visor_budget": "max"}, stream=True), "max_tokens": 200})}
    return good, bad, abort


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.n = {}
        self.failures: list[str] = []
        self.prefill = 0           # sum of receipts' visor_prefill_flops
        self.engine_requests = 0   # requests that reached the engine (good + aborted)
        self.successes = 0         # finished requests (vllm:request_success_total)
        self.aborts = 0

    def add(self, name, ok, why="", prefill=0, engine=0, success=0, abort=0):
        with self.lock:
            self.n[name] = self.n.get(name, 0) + 1
            self.prefill += prefill
            self.engine_requests += engine
            self.successes += success
            self.aborts += abort
            if not ok and len(self.failures) < 50:
                self.failures.append(f"{name}: {why}")
            elif not ok:
                self.failures.append("...")


def _receipt_of_stream(text: str) -> dict | None:
    for line in text.splitlines():
        if line.startswith("data:") and '"visor"' in line:
            return json.loads(line[5:]).get("visor")
    return None


def one(client, base, name, kind, path, body, tally: Tally, abort_prefill: float):
    import httpx

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    try:
        if kind == "abort":
            with client.stream("POST", base + path, content=raw, headers=headers, timeout=60) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if i >= 3:
                        break  # close mid-stream: vLLM aborts the request
            tally.add(name, r.status_code == 200, f"HTTP {r.status_code}",
                      prefill=abort_prefill, engine=1, abort=1)
            return
        r = client.post(base + path, content=raw, headers=headers, timeout=120)
        if kind == "bad":
            tally.add(name, 400 <= r.status_code < 500, f"HTTP {r.status_code}: {r.text[:120]}")
            return
        if r.status_code != 200:
            return tally.add(name, False, f"HTTP {r.status_code}: {r.text[:200]}")
        visor = (_receipt_of_stream(r.text) if isinstance(body, dict) and body.get("stream")
                 else r.json().get("visor"))
        if visor is None:
            return tally.add(name, False, "no visor receipt")
        tally.add(name, True, prefill=visor["visor_prefill_flops"], engine=1, success=1)
    except httpx.HTTPError as e:
        tally.add(name, kind == "bad", f"{type(e).__name__}: {e}")


PREFILL = 'visor:llm_flops_total{phase="prefill"}'


def _metrics(base) -> dict[str, float]:
    """Each series summed over its labels, plus the prefill FLOPs series by its full name."""
    import httpx

    out = {}
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        m = re.match(r"^((?:visor|vllm):[^\s{]+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            if m.group(1) + (m.group(2) or "") == PREFILL:
                out[PREFILL] = float(m.group(3))
    return out


def _tree_rss(pid: int) -> int:
    import psutil

    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)] if q.is_running())


def _server_pid(base: str) -> int:
    import psutil

    port = base.rsplit(":", 1)[1]
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "serve" in cmd and "--port" in cmd and cmd[cmd.index("--port") + 1] == port:
            return p.pid
    raise RuntimeError("server process not found")


def run(minutes: float, workers: int, seed: int, max_growth: float, log_dir: Path) -> dict:
    import httpx

    from visor_vllm.evaluation.launch import served
    from visor_vllm.testing import write_random_tiny_checkpoint

    global IMAGE
    IMAGE = _png(seed)
    good, bad, abort = cases()
    ckpt = write_random_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="visor-soak-")))
    with served(ckpt, MODEL, ["--max-num-seqs", "8"], log=log_dir / "server.log") as (base, log):
        client = httpx.Client()
        ref = client.post(base + "/v1/chat/completions", json=_chat({"visor_budget": "max"}),
                          timeout=120).json()["visor"]  # the aborted streams' prefill
        m0 = _metrics(base)
        pid = _server_pid(base)
        tally, stop = Tally(), time.time() + 60 * minutes
        menu = ([(n, *c) for n, c in good.items()] * 7 + [(n, *c) for n, c in bad.items()] * 2
                + [(n, *c) for n, c in abort.items()] * 2)

        def worker(k):
            rng = random.Random(seed * 1000 + k)
            with httpx.Client() as c:
                while time.time() < stop:
                    one(c, base, *rng.choice(menu), tally, ref["visor_prefill_flops"])

        rss: list[tuple[float, int]] = []
        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(workers)]
        t0 = time.time()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            rss.append((time.time() - t0, _tree_rss(pid)))
            time.sleep(5)
        for t in threads:
            t.join()
        time.sleep(2)  # the last step's stats drain
        m1 = _metrics(base)
        healthy = client.get(base + "/health", timeout=10).status_code == 200
        hurt = re.findall(r"EngineDeadError|EngineCore encountered|Traceback", log.read_text())

    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in m1}
    fifth = max(1, len(rss) // 5)
    early = statistics.median(r for _, r in rss[fifth:2 * fifth]) if len(rss) >= 5 else rss[0][1]
    late = statistics.median(r for _, r in rss[-fifth:])
    growth = late / early - 1
    checks = {
        "no_failed_requests": not tally.failures,
        "visor_requests_add_up": d.get("visor:requests_total", 0) == tally.engine_requests,
        "vllm_success_agrees": d.get("vllm:request_success_total", 0) == tally.successes,
        "prefill_flops_add_up": _close(d.get(PREFILL, 0.0), tally.prefill),
        "memory_growth_under_limit": growth < max_growth,
        "healthy_at_end": healthy,
        "clean_log": not hurt,
    }
    return {"minutes": minutes, "workers": workers, "requests": sum(tally.n.values()),
            "by_case": tally.n, "failures": tally.failures, "aborted_streams": tally.aborts,
            "engine_requests": tally.engine_requests,
            "visor_requests_delta": d.get("visor:requests_total"),
            "vllm_success_delta": d.get("vllm:request_success_total"),
            "prefill_flops_delta": d.get(PREFILL), "prefill_flops_from_receipts": tally.prefill,
            "rss_mib_early": round(early / 2**20, 1), "rss_mib_late": round(late / 2**20, 1),
            "memory_growth": round(growth, 4), "rss_samples": len(rss),
            "log_problems": hurt[:5], "checks": checks, "passed": all(checks.values())}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=12, help="client threads (saturation: > max-num-seqs 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-growth", type=float, default=0.05)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--log-dir", type=Path, default=None)
    args = p.parse_args(argv)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="visor-soak-log-"))
    report = run(args.minutes, args.workers, args.seed, args.max_growth, log_dir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
