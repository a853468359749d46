# syntax=docker/dockerfile:1
# dreamsight diffusion on NVIDIA GPUs: diffusers and Lightning on PyPI's
# CUDA torch (CUDA runtime inside the wheels, driver from the node).
# gRPC 50053, Prometheus 9103.
#   docker build -f docker/diffusion.cuda.Dockerfile -t dreamsight/diffusion:0.1.0-cuda .

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY client/pyproject.toml client/README.md client/
COPY client/src client/src
COPY pyproject.toml README.md ./
COPY dreamsight_server dreamsight_server
COPY diffusion_service diffusion_service
# The project and its client, pinned by pyproject.toml, not packages by name.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ./client ".[diffusion]"

FROM python:3.11.11-slim-bookworm
RUN groupadd --system --gid 10001 dreamsight \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/dreamsight dreamsight
COPY --from=build /opt/venv /opt/venv
# The trained demo model (a few MB, a toy), served from here by the base manifests.
COPY models/sd-shapes /opt/dreamsight/models/sd-shapes
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/dreamsight
USER 10001:10001
EXPOSE 50053 9103
ENTRYPOINT ["python", "-m", "diffusion_service"]
