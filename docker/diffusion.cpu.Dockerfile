# syntax=docker/dockerfile:1
# dreamsight diffusion on CPUs: diffusers and Lightning on CPU torch.
# gRPC 50053, Prometheus 9103.
#   docker build -f docker/diffusion.cpu.Dockerfile -t dreamsight/diffusion:0.1.0-cpu .

FROM python:3.11.11-slim-bookworm AS build
# PyPI's torch is the CUDA build; the CPU wheels (+cpu) are on PyTorch's
# index and win over PyPI's as the higher local version.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}
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
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/dreamsight
USER 10001:10001
EXPOSE 50053 9103
ENTRYPOINT ["python", "-m", "diffusion_service"]
