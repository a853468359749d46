# syntax=docker/dockerfile:1
# dreamsight gateway: gRPC 50051, Ollama/OpenAI HTTP 11434, Prometheus 9101.
# No torch, no GPU: one image serves every overlay.
#   docker build -f docker/gateway.Dockerfile -t dreamsight/gateway:0.1.0 .

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY client/pyproject.toml client/README.md client/
COPY client/src client/src
COPY pyproject.toml README.md ./
COPY dreamsight_server dreamsight_server
COPY gateway gateway
# The project and its client, pinned by pyproject.toml, not packages by name.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ./client ".[gateway]"

FROM python:3.11.11-slim-bookworm
RUN groupadd --system --gid 10001 dreamsight \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/dreamsight dreamsight
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/dreamsight
USER 10001:10001
EXPOSE 50051 11434 9101
ENTRYPOINT ["python", "-m", "gateway"]
