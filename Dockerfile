# The project image: sharder, trainer and evaluator (the shard server is stock nginx).
# GPUs: run with the NVIDIA container toolkit; PyPI's torch wheel is a CUDA build.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY shards shards
COPY atlas_shards atlas_shards
COPY trainer trainer
COPY evaluate evaluate
COPY docker docker
RUN pip install -e .

# Data, shards, runs and reports live on mounted volumes (see docker-compose.yml).
VOLUME ["/data", "/srv/shards", "/runs", "/reports"]
CMD ["atlas-shards", "--help"]
