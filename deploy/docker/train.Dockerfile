# visionloop-train: the core install + the `train` extra (torch, scikit-learn, the full MLflow with its server,
# onnx, kfp). `visionloop run` (the default command), the pipeline steps on Kubeflow, `torchrun` for DDP
# (`visionloop train --nproc-per-node N`), `visionloop loop` with the local executor, and `mlflow server` (5000).
#
# Build it with `visionloop images build --kind train` (see deploy/docker/README.md): the build context is a folder
# that command assembles: this file, wheels/ (the dependencies) and project/ (the visionloop wheel), which make the
# wheelhouse of `visionloop images wheelhouse --kind train`.
# Python packages come only from wheels/ (`pip install --no-index`): no pip over the network.
#
# CPU or CUDA: the torch wheel in the wheelhouse decides, not this file. The CPU wheel (torch==2.13.0+cpu) runs on
# any base; PyPI's default Linux wheel is the CUDA build, which brings the CUDA runtime libraries as nvidia-* wheels
# and needs only the host's NVIDIA driver (docker run --gpus all, or the NVIDIA device plugin on Kubernetes).
# The CUDA base image adds the rest of the CUDA user space (cuDNN, the driver's compat files, nvidia-smi's
# environment) that a GPU node expects.

# The base: a CUDA runtime image by default. When it has no python3.11, the distribution's apt installs it (Ubuntu
# 22.04: python3.11 from universe), which needs network for that one step (`visionloop images build --network
# host`). A base that has python3.11 and its venv module (`visionloop images base`: Debian bookworm from
# debootstrap) needs no network at all.
ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN if ! command -v python3.11 >/dev/null 2>&1 || ! python3.11 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3.11-venv \
     && rm -rf /var/lib/apt/lists/*; \
    fi
# the dependencies first, in a layer of their own: a change to visionloop alone reinstalls one wheel, not all.
# wheels/ is exactly the set pip resolved with constraints.txt (`visionloop images wheelhouse --kind train`), so
# each wheel is installed as it is (--no-deps), and `pip check` proves the set complete. Byte-code is compiled at
# install time (pip's default): a read-only container never needs to write any. pip stays in this image (MLflow
# records its version with every logged model).
COPY wheels /wheels
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --no-deps /wheels/*.whl
COPY project /project
ARG VERSION=0.1.0
RUN /opt/venv/bin/pip install --no-index --no-deps "/project/visionloop-${VERSION}-py3-none-any.whl" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -c "import visionloop.training.train, torch, sklearn, mlflow.server, onnx, kfp"

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/visionloop/visionloop
LABEL org.opencontainers.image.title="visionloop-train" \
      org.opencontainers.image.description="visionloop training side: the pipeline (ingest to promote), PyTorch (DDP with torchrun), ONNX export, MLflow server, Kubeflow Pipelines" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# the same interpreter the builder made /opt/venv with (the venv links to it); nothing to do on our Debian base
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 \
     && rm -rf /var/lib/apt/lists/*; \
    fi \
 && (getent group 10001 >/dev/null || groupadd --system --gid 10001 visionloop) \
 && (getent passwd 10001 >/dev/null || useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/visionloop --shell /usr/sbin/nologin visionloop) \
 && mkdir -p /var/lib/visionloop \
 && chown 10001:10001 /var/lib/visionloop
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/visionloop \
    MPLCONFIGDIR=/tmp/matplotlib \
    MLFLOW_DISABLE_TELEMETRY=true \
    GIT_PYTHON_REFRESH=quiet \
    VISIONLOOP_HOME=/var/lib/visionloop \
    VISIONLOOP_SERVE__HOST=0.0.0.0 \
    VISIONLOOP_LOOP__HOST=0.0.0.0
# data, checkpoints, the embedded MLflow store when no server is given: the only place it writes, with /tmp
VOLUME ["/var/lib/visionloop"]
WORKDIR /var/lib/visionloop
USER 10001:10001
# `mlflow server --host 0.0.0.0 --port 5000 ...` (the same image runs the tracking server)
EXPOSE 5000
# no HEALTHCHECK: `visionloop run` is a batch job (its exit code is its health)

ENTRYPOINT ["visionloop"]
CMD ["run"]
