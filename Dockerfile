# The Berth image: the registry server and the operator in one Python environment.
#
#   docker build -t ghcr.io/berth-dev/berth:0.1.0 .        (make image: hack/image.sh)
#
# The operator tags the registry servers it deploys with its own version, so one
# image, one tag: the chart's operator pod runs `python -m registry_operator`, the
# Registry pods it renders run `python -m registry_server --config ...`, both with
# uid 65532. Without a command the image serves a registry on :5000, like registry:2.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment with berth and its pinned dependencies -----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/berth
# Dependencies first (from pyproject.toml, pinned by constraints.txt), so that a
# source change rebuilds only the last layer.
COPY pyproject.toml constraints.txt ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && /opt/berth/bin/pip install -c constraints.txt -r requirements.txt
COPY README.md ./
COPY registry_server ./registry_server
COPY operator ./operator
# A regular (not editable) install; then the installers leave, nothing needs them,
# and so does the kubernetes client's asyncio twin (a third of the environment; the
# operator uses the synchronous client and Kopf its own). Bytecode is compiled here:
# the pods' root filesystems are read-only.
RUN /opt/berth/bin/pip install --no-deps -c constraints.txt . \
    && /opt/berth/bin/pip check \
    && /opt/berth/bin/python -m pip uninstall -y -q pip setuptools \
    && rm -rf /opt/berth/lib/python3*/site-packages/kubernetes/aio \
    && /opt/berth/bin/python -m compileall -q /opt/berth/lib \
    && /opt/berth/bin/python -c 'import registry_operator.__main__, registry_server.app'

# --- runtime: the same base, the environment, a non-root user ---------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="berth" \
      org.opencontainers.image.description="Berth: OCI registry server and Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"
# 65532 is the uid/gid the operator renders into every Registry pod (runAsUser).
RUN groupadd --system --gid 65532 berth \
    && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /var/lib/berth --shell /usr/sbin/nologin berth \
    && install -d -o 65532 -g 65532 -m 0750 /var/lib/berth
COPY --from=build /opt/berth /opt/berth
ENV PATH=/opt/berth/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BERTH_HTTP_ADDR=0.0.0.0:5000 \
    BERTH_STORAGE_ROOT=/var/lib/berth
USER 65532:65532
WORKDIR /var/lib/berth
EXPOSE 5000
CMD ["python", "-m", "registry_server"]
