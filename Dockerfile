# The project image: sharder, trainer and evaluator (the shard server is stock nginx).
#   TORCH_VARIANT=cuda (default): PyPI's torch wheel, a CUDA build (GPUs through the NVIDIA container toolkit);
#   TORCH_VARIANT=cpu: PyTorch's CPU wheels (a much smaller image for CPU-only hosts).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_VARIANT=cuda
RUN case "$TORCH_VARIANT" in \
      cuda) index="" ;; \
      cpu) index="--index-url https://download.pytorch.org/whl/cpu" ;; \
      *) echo "TORCH_VARIANT must be cuda or cpu, not $TORCH_VARIANT" >&2; exit 1 ;; \
    esac \
 && pip install $index "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY shards shards
COPY atlas_shards atlas_shards
COPY trainer trainer
COPY evaluate evaluate
COPY docker docker
RUN pip install -e '.[s3]' && chmod +x docker/*.sh

# Data, shards, runs and reports live on mounted volumes (see docker-compose.yml); any user may run it (HOST_UID).
VOLUME ["/data", "/srv/shards", "/runs", "/reports"]
CMD ["atlas-shards", "--help"]
