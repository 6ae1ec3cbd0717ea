# syntax=docker/dockerfile:1
# Multi-stage build for mmoe-ranker.
#   docker build --target service -t mmoe-ranker:service .   # onnxruntime, no torch, non-root
#   docker build --target trainer -t mmoe-ranker:trainer .   # + torch (CPU) for ranker data/train/export
# docker-compose.yml builds both; see docs/operations.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- base: interpreter, a virtualenv, and the non-root user shared by both targets -----------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Numeric uid/gid in USER below: runtimes (and Kubernetes runAsNonRoot) can verify it is not 0.
RUN python -m venv /opt/venv \
 && groupadd --system --gid 10001 ranker \
 && useradd --system --uid 10001 --gid ranker --home-dir /app --shell /usr/sbin/nologin ranker
WORKDIR /app

# ---- deps: the service's dependencies only (base install = no extras: no torch, no redis-server) --
# Copy only what pip needs to build the package (README.md is not: the image needs no long
# description, and the build only warns without it). The versions are the lock's
# (requirements/service.txt, `make lock`); the project itself is installed without resolving.
FROM base AS deps
COPY pyproject.toml ./
COPY requirements ./requirements
COPY ranker ./ranker
COPY launch ./launch
COPY service ./service
COPY training ./training
COPY bench ./bench
RUN pip install -r requirements/service.txt \
 && pip install --no-deps .

# ---- service: what runs in production --------------------------------------------------------
FROM base AS service
COPY --from=deps /opt/venv /opt/venv
# Everything written at run time goes to /tmp (a tmpfs in docker-compose) or to mounted volumes,
# so the container runs with a read-only root filesystem.
ENV RANKER_MODEL_REPO=/models \
    RANKER_MODEL_NAME=mmoe \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus \
    HOME=/tmp
USER 10001:10001
# 8000: the API; 9100: /metrics and /admin when RANKER_METRICS_PORT=9100 (docker-compose.yml)
EXPOSE 8000 9100
# stdlib only: the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
# The multiprocess metrics dir lives on the /tmp tmpfs, which starts empty: create it first.
CMD ["sh", "-c", "mkdir -p \"$PROMETHEUS_MULTIPROC_DIR\" && exec ranker serve --host 0.0.0.0 --port 8000 --workers 2"]

# ---- trainer: torch (CPU wheels) for the one-shot data/train/export/features-load job ----------
# Built on `deps`, so only the train extra is added on top of the service's dependencies.
FROM deps AS trainer
# The CPU wheel index keeps the image free of CUDA libraries: requirements/train.txt pins the
# train extra at the lock's versions, torch==2.13.0+cpu among them, which only that index has.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install -r requirements/train.txt \
 && mkdir -p /models /data \
 && chown ranker:ranker /models /data
ENV RANKER_MODEL_REPO=/models \
    RANKER_MODEL_NAME=mmoe \
    HOME=/tmp
USER 10001:10001
CMD ["ranker", "run", "--no-serve", "--data-dir", "/data"]
