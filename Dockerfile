# syntax=docker/dockerfile:1
# GPU training image for RunPod (or any CUDA host): the project installed on the official PyTorch CUDA image.
#   docker build -t ghcr.io/<you>/cbvae:latest . && docker push ghcr.io/<you>/cbvae:latest
# The entrypoint runs the whole job (dataset -> train -> baseline -> evaluate), see scripts/runpod_train.sh --help.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PYTHON=python

# sshd: the launcher reads status.json and downloads outputs over the pod's public port 22; rsync makes that resumable
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-server rsync ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cbvae
# dependencies first (cached layer); the base image's CUDA torch already satisfies the project's torch range
COPY pyproject.toml README.md ./
COPY cbvae_ext ./cbvae_ext
RUN pip install . && python -c "import cbvae_ext, monai, nimare, torch; print('torch', torch.__version__)"

COPY bundle ./bundle
COPY scripts ./scripts

EXPOSE 22
ENTRYPOINT ["/opt/cbvae/scripts/runpod_train.sh"]
