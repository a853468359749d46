# syntax=docker/dockerfile:1
# dreamsight vision on NVIDIA GPUs: the CUDA vllm build (the `vision-cuda`
# extra). The CUDA runtime comes inside the torch and vllm wheels; the driver
# comes from the node through the NVIDIA container toolkit. gRPC 50052,
# Prometheus 9102.
#   docker build -f docker/vision.cuda.Dockerfile -t dreamsight/vision:0.1.0-cuda .

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY client/pyproject.toml client/README.md client/
COPY client/src client/src
COPY pyproject.toml README.md ./
COPY dreamsight_server dreamsight_server
COPY vision_service vision_service
# The project and its client, pinned by pyproject.toml, not packages by name.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ./client ".[vision-cuda]"

FROM python:3.11.11-slim-bookworm
# Triton builds its CUDA launcher with the system C compiler on first use.
# Debian packages follow the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 dreamsight \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/dreamsight dreamsight
COPY --from=build /opt/venv /opt/venv
# The trained demo model (a few MB, a toy), served from here by the base manifests.
COPY models/llava-shapes /opt/dreamsight/models/llava-shapes
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VLLM_NO_USAGE_STATS=1
WORKDIR /home/dreamsight
USER 10001:10001
EXPOSE 50052 9102
ENTRYPOINT ["python", "-m", "vision_service"]
