# tabserve: a TabPy-compatible Tableau Analytics Extensions server.
#   docker build -t tabserve .
#   docker run --stop-timeout 30 -p 9004:9004 -v tabserve-state:/var/lib/tabserve tabserve
# BASE is any Debian-based image with python, pip and a venv-or-system site first on PATH:
# the registry's python:3.12-slim by default; CI builds from a local Debian base made by
# .ci/podman-setup (`podman build --format docker --build-arg BASE=tabserve-base:bookworm .`).
ARG BASE=python:3.12-slim

# Stage 1: build tabserve's wheel and install it with its dependencies into a venv of its
# own (less the libraries' own test suites), with the postgresql extra: the same image runs
# alone (state directory) or as a replica of a PostgreSQL store. Binary wheels only: no
# compiler is installed in either stage, so a dependency without a wheel for this platform
# fails the build here, never at run time.
FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tabserve ./tabserve
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/tabserve \
    && /opt/tabserve/bin/pip install --no-cache-dir --only-binary=:all: \
        "$(echo /wheels/tabserve-*.whl)[postgresql]" \
    && /opt/tabserve/bin/pip uninstall --yes --quiet setuptools pip \
    && find /opt/tabserve -depth -type d \( -name tests -o -name __pycache__ \) \
        -path '*/site-packages/*' -exec rm -rf {} + \
    && python -m compileall -q -j 0 /opt/tabserve

# Stage 2: the runtime: the base plus the venv (one layer; no wheels, no build tools, no pip
# cache). The venv's python is the base's, which both stages share.
FROM ${BASE}
# The version label: the build fails if it is not the version of the tabserve installed.
ARG VERSION=0.2.0
LABEL org.opencontainers.image.title="tabserve" \
      org.opencontainers.image.description="A TabPy-compatible server for Tableau Analytics Extensions" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
# bubblewrap for TABSERVE_SANDBOX = bubblewrap (docs/operations.md gives the container flags
# it needs); the local base has it already, so only a registry base runs apt-get.
RUN command -v bwrap >/dev/null || { apt-get update \
        && apt-get install -y --no-install-recommends bubblewrap \
        && rm -rf /var/lib/apt/lists/*; } \
    && useradd --system --uid 10001 --home-dir /var/lib/tabserve --create-home tabserve
COPY --from=build /opt/tabserve /opt/tabserve
ENV PATH=/opt/tabserve/bin:$PATH
RUN python -c "import sys, tabserve as t; v = t.__version__; \
sys.exit(v != '${VERSION}' and f'the VERSION label is ${VERSION} but tabserve is {v}')"
ENV TABSERVE_BIND_ADDRESS=0.0.0.0 \
    TABPY_PORT=9004 \
    TABPY_STATE_PATH=/var/lib/tabserve \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/var/lib/tabserve"]
USER tabserve
WORKDIR /var/lib/tabserve
EXPOSE 9004
# Liveness only: a not-ready server (see docs/operations.md) must not be restarted for it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('TABPY_PORT', '9004'), timeout=4); sys.exit(0)"]
# tabserve drains for TABSERVE_SHUTDOWN_GRACE (20 s) on SIGTERM: run with --stop-timeout 30.
STOPSIGNAL SIGTERM
CMD ["tabserve", "serve"]
