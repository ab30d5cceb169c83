# visionloop-serve: the serving side (the core install): `visionloop serve` (8000) and `visionloop monitor` (8001).
# ONNX Runtime + FastAPI + the MLflow client; no torch, scikit-learn, kfp or onnx. (`visionloop loop` runs in the
# training image: it retrains with torch, or submits the Kubeflow pipeline with kfp.)
#
# Build it with `visionloop images build --kind serve` (see deploy/docker/README.md): the build context is a folder
# that command assembles: this file, wheels/ (the dependencies) and project/ (the visionloop wheel), which make the
# wheelhouse of `visionloop images wheelhouse`.
# Python packages come only from wheels/ (`pip install --no-index`): no pip over the network, and the build passes
# with `docker build --network none`. Works with the legacy builder and with BuildKit.
#
# Run it with a read-only root file system: docker run --read-only --tmpfs /tmp -v vl-home:/var/lib/visionloop ...

# The base: any image with python3.11 and its venv module. The default is the public Python image; a machine that
# reaches no registry builds on `visionloop images base` (Debian bookworm minbase from debootstrap).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# the dependencies first, in a layer of their own: a change to visionloop alone reinstalls one wheel, not all.
# wheels/ is exactly the set pip resolved with constraints.txt (`visionloop images wheelhouse`), so each wheel is
# installed as it is (--no-deps), and `pip check` proves the set complete. Byte-code is compiled at install time
# (pip's default): a read-only container never needs to write any.
COPY wheels /wheels
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --no-deps /wheels/*.whl
COPY project /project
ARG VERSION=0.1.0
RUN /opt/venv/bin/pip install --no-index --no-deps "/project/visionloop-${VERSION}-py3-none-any.whl" \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/pip uninstall --yes pip \
 && /opt/venv/bin/python -c "import visionloop.serving.app, onnxruntime, fastapi, mlflow"

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/visionloop/visionloop
LABEL org.opencontainers.image.title="visionloop-serve" \
      org.opencontainers.image.description="visionloop serving side: KServe V2 and REST model server (ONNX Runtime), drift monitor, closed loop" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# a numeric, non-root user (Kubernetes' runAsNonRoot can check a number, not a name)
RUN (getent group 10001 >/dev/null || groupadd --system --gid 10001 visionloop) \
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
    VISIONLOOP_MONITOR__HOST=0.0.0.0 \
    VISIONLOOP_LOOP__HOST=0.0.0.0
# the only place the container writes, with /tmp (the prediction store's SQLite file lives here unless
# VISIONLOOP_MONITOR__STORE_URL names a PostgreSQL database)
VOLUME ["/var/lib/visionloop"]
WORKDIR /var/lib/visionloop
USER 10001:10001
EXPOSE 8000 8001 8002

# Alive (not ready: GET /readyz says that) on the port of the service this container runs: serve, monitor or loop,
# from --port, else VISIONLOOP_<SERVICE>__PORT, else 8000/8001/8002. Python's urllib: the image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-c", "import os, urllib.request\nargs = open('/proc/1/cmdline', 'rb').read().decode().split('\\0')\nservice = 'monitor' if 'monitor' in args else 'loop' if 'loop' in args else 'serve'\nport = os.environ.get(f'VISIONLOOP_{service.upper()}__PORT') or {'serve': '8000', 'monitor': '8001', 'loop': '8002'}[service]\nport = args[args.index('--port') + 1] if '--port' in args[:-1] else port\nurllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

ENTRYPOINT ["visionloop"]
CMD ["serve"]
