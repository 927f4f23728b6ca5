# peftserve in a container: docker build -t peftserve . && docker run -p 8000:8000 -v peftserve-cache:/data/cache peftserve
# GPUs: a CUDA base image (its Python, 3.10+, runs a venv), e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 -t peftserve:cuda .
#   docker run --gpus all ... peftserve:cuda
# torch comes from the package index like every other package; the versions are the ones in requirements.lock.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG TORCH=torch==2.13.0

# Options are PEFTSERVE_* variables (flag > env > --config file): override them with docker run -e.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PEFTSERVE_CACHE=/data/cache \
    PEFTSERVE_ADAPTER_DIR=/data/adapters \
    PEFTSERVE_HOST=0.0.0.0 \
    PEFTSERVE_PORT=8000

# system packages: a C compiler for Triton's kernels on GPUs; python3 + venv where the base image has none
RUN apt-get update && apt-get install -y --no-install-recommends gcc python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY server server
COPY kernels kernels
COPY adapters adapters
# torch first, then this package with every other dependency at the version in requirements.lock
RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir ${TORCH} \
 && pip install --no-cache-dir -c requirements.lock .
# /data/cache: the default model (fetched on first start) and converted GGUF files; /data/adapters: --adapter-dir
RUN mkdir -p /data/cache /data/adapters
RUN useradd --create-home --uid 10001 peftserve && chown -R peftserve /data
USER peftserve
VOLUME ["/data/cache", "/data/adapters"]
EXPOSE 8000
# 503 while starting, draining (SIGTERM) or with the engine stopped; the first start fetches the model
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PEFTSERVE_PORT', '8000'), timeout=4)"
STOPSIGNAL SIGTERM
# With no --model it serves SmolLM2-135M-Instruct + demo adapters; docker run peftserve --model /data/models/x ...
ENTRYPOINT ["peftserve", "serve"]
