# syntax=docker/dockerfile:1
# VISOR on vLLM for AMD GPUs (ROCm). vLLM, torch and ROCm come from the base image; this image only
# adds the visor-vllm plugin (vllm.general_plugins entry point `visor`, loaded by every vLLM process).
#
# BASE_IMAGE (required, no default on purpose): a *dated* rocm/vllm tag whose vLLM is exactly our
# pin, visor_vllm/_compat.py VLLM_VERSION (0.32.0). Pick it from https://hub.docker.com/r/rocm/vllm/tags
# (nightlies: rocm/vllm-dev). The tags our research names are too old (e.g.
# rocm/vllm:rocm7.14.0_cdna_ubuntu24.04_py3.14_pytorch_2.11.0_vllm_0.23.0); never use a floating
# tag (:latest; docs once pointed at a non-existent :instinct_main). The build checks the version.
#
#   docker build --build-arg BASE_IMAGE=rocm/vllm:<tag-with-vllm_0.32.0> -t visor-vllm:rocm .
#   docker compose up            # see docker-compose.yml (VISOR_ROCM_BASE_IMAGE=...)
ARG BASE_IMAGE
FROM ${BASE_IMAGE}

WORKDIR /opt/visor-vllm
COPY pyproject.toml README.md ./
COPY visor_vllm ./visor_vllm
# --no-deps: keep the base image's vLLM/torch/ROCm stack untouched.
RUN python3 -m pip install --no-cache-dir --no-deps -e .

# Fail the build, not the first request, when the base image does not match our pins.
RUN python3 - <<'PY'
import importlib.metadata as md, re, sys
from visor_vllm._compat import VLLM_VERSION
pyproject = open("pyproject.toml").read()
want_tf = re.search(r'"transformers==([^"]+)"', pyproject).group(1)
have_vllm, have_tf = md.version("vllm").split("+")[0], md.version("transformers")
print(f"vllm {md.version('vllm')} (want {VLLM_VERSION}), transformers {have_tf} (want {want_tf})")
if have_vllm != VLLM_VERSION:
    sys.exit(f"BASE_IMAGE ships vllm {have_vllm}, visor-vllm needs {VLLM_VERSION}: pick another tag")
if have_tf != want_tf:
    sys.exit(f"BASE_IMAGE ships transformers {have_tf}, visor-vllm needs {want_tf}: "
             f"add `pip install --no-deps transformers=={want_tf}` here or pick another tag")
from importlib.metadata import entry_points
assert "visor" in entry_points(group="vllm.general_plugins").names, "plugin entry point missing"
PY

# AMD suggests VLLM_ROCM_USE_AITER=1 on MI300; left off until the cross-attention path is
# verified with AITER kernels.
ENV HF_HUB_OFFLINE=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=5 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://localhost:8000/health', timeout=5)"
# The one serving command (docker-compose.yml does not override it). VISOR_MODEL: a VISOR
# checkpoint directory inside the container (how to make one: deploy/README.md). --middleware adds
# per-response receipts (the visor:* metrics need no flag); --max-num-batched-tokens must cover the
# largest image (8,748 tokens) plus the prompt, because VISOR prefills a prompt in one step.
ENV VLLM_USE_V2_MODEL_RUNNER=0 VISOR_MODEL=/models/visor-0.5b VISOR_SERVED_NAME=visor-0.5b
CMD ["sh", "-c", "exec vllm serve \"$VISOR_MODEL\" --host 0.0.0.0 --port 8000 --served-model-name \"$VISOR_SERVED_NAME\" --middleware visor_vllm.serving.middleware.VisorMiddleware --max-model-len 16384 --max-num-batched-tokens 16384 --limit-mm-per-prompt '{\"image\": 4}'"]
