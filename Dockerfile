# tabserve: a TabPy-compatible Tableau Analytics Extensions server.
#   docker build -t tabserve .
#   docker run --stop-timeout 30 -p 9004:9004 -v tabserve-state:/var/lib/tabserve tabserve
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tabserve ./tabserve
# The postgresql extra: the same image runs alone (state directory) or as a replica.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgresql]"

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/tabserve --create-home tabserve
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV TABSERVE_BIND_ADDRESS=0.0.0.0 \
    TABPY_PORT=9004 \
    TABPY_STATE_PATH=/var/lib/tabserve \
    PYTHONUNBUFFERED=1
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
