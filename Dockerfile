# One image for every service: `docker run IMAGE encoder|llm|gateway|serve [flags]`.
# No weights inside: mount a LLaVA-OneVision checkpoint at /models (read-only is fine).
#
#   docker build -t videollm .
#   docker run --gpus all -p 8000:8000 -v "$PWD/models:/models:ro" videollm   # the whole stack in one container
#
# docker-compose.yml runs the services as separate, scalable containers instead.

# torch's PyPI wheels bring their own CUDA libraries; the base image gives the CUDA user-space
# setup (and the driver check through NVIDIA_REQUIRE_CUDA) that the NVIDIA Container Toolkit expects.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's python3 is 3.12. redis-server is only for `videollm serve` without REDIS_URL.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# The services run as this user; /models is where the checkpoint is mounted, /video-store the
# gateway's uploads (a named volume takes this directory's owner, so the gateway can write there).
RUN groupadd --gid 10001 videollm \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin videollm \
    && mkdir /models /video-store \
    && chown videollm:videollm /models /video-store

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so that editing the source reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself (only the packages: the build context also holds .venv, tests, ...).
COPY pyproject.toml README* ./
COPY videollm ./videollm
COPY protos ./protos
COPY encoder_service ./encoder_service
COPY llm_service ./llm_service
COPY gateway ./gateway
COPY bench ./bench
RUN pip install .

USER 10001:10001

EXPOSE 8000 50051 50052
ENTRYPOINT ["videollm"]
CMD ["serve", "--host", "0.0.0.0", "--model", "/models", "--device", "cuda"]
