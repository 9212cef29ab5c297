# CUDA image for SimMER: write betons, pretrain, evaluate and run the paper's tables on GPUs.
#
#   docker build -t simmer .
#   docker run --rm --gpus all --shm-size=16g \
#       -v "$PWD/data:/workspace/data" -v "$PWD/runs:/workspace/runs" \
#       simmer python train/pretrain.py -C configs/cifar10_r18_k4.yaml
#
# Base: python:3.11 on Debian bookworm, not nvidia/cuda. torch 2.14.1 from PyPI is the CUDA 13
# build and brings its own CUDA runtime, cuDNN and NCCL as nvidia-* wheels, so a CUDA base image
# would only add a second, unused copy of those libraries; the host needs just an NVIDIA driver
# recent enough for CUDA 13 and the NVIDIA Container Toolkit (`--gpus all`). Debian bookworm is
# also what the README's set-up targets, so tools/setup_env.sh installs the same apt packages here.
#
# One source of truth: every apt and pip package comes from tools/setup_env.sh and the pinned
# requirements.txt, exactly as `make setup` does outside Docker. Nothing is listed twice.
FROM python:3.11-slim-bookworm

# VENV: the venv lives outside /workspace, so mounting a checkout over /workspace keeps it
# (the Makefile's `VENV ?= .venv` picks this up too). NUMBA_THREADING_LAYER=omp: numba's TBB
# layer prints "Unable to join threads" at fork once ffcv has run; omp is as fast.
# Compiler caches in /tmp: torch.compile then works under any --user, not only the image's own.
# NVIDIA_*: what nvidia/cuda images set, so the toolkit mounts the driver's compute libraries.
ENV VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NUMBA_THREADING_LAYER=omp \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The unprivileged user that runs everything (uid 1000: the usual first user on a Linux host,
# so bind-mounted data/ and runs/ folders stay writable; otherwise run with --user).
RUN useradd --create-home --uid 1000 --shell /bin/bash simmer \
    && mkdir -p /workspace/data /workspace/runs \
    && chown simmer:simmer /workspace /workspace/data /workspace/runs
WORKDIR /workspace

# 1. Dependencies, from only the files the set-up script reads, so that this multi-GB layer is
#    rebuilt when requirements.txt or the script change, not on every source edit. The script
#    runs as root here: it apt-installs its packages (build tools, libturbojpeg, OpenCV core),
#    writes the OpenCV pkg-config shim, creates $VENV, installs requirements.txt and builds ffcv.
COPY requirements.txt pyproject.toml ./
COPY tools/setup_env.sh tools/
RUN bash tools/setup_env.sh \
    && rm -rf /var/lib/apt/lists/*

# 2. The sources. A second pass of the same script finds the apt packages and the requirements
#    in place and only redoes its editable install of the project, now that the packages exist.
COPY --chown=simmer:simmer . .
RUN rm "$VENV/.complete" \
    && bash tools/setup_env.sh

# Numeric, so that the host (and Kubernetes' runAsNonRoot) can tell it is not root: simmer.
USER 1000:1000
# Betons (and raw datasets) in data/, run directories in runs/: the repository's own data/ and
# runs/ paths, so every command and config of the README works unchanged inside the container.
VOLUME ["/workspace/data", "/workspace/runs"]
CMD ["python", "train/pretrain.py", "--help"]
