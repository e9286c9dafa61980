# zhiva model proxy: docker compose up (see docker-compose.yml and README).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/zhiva --shell /usr/sbin/nologin zhiva \
 && mkdir -p /srv/zhiva/log /var/lib/zhiva \
 && chown zhiva:zhiva /srv/zhiva/log /var/lib/zhiva && chmod 0700 /var/lib/zhiva

WORKDIR /opt/zhiva
# Dependencies in their own layer: rebuilt only when setup.py changes.
COPY setup.py README.md ./
RUN mkdir -p zhiva twisted/plugins && touch zhiva/__init__.py twisted/plugins/zhiva_plugin.py \
 && pip install --no-cache-dir . && pip uninstall -y zhiva-model-proxy && rm -rf zhiva twisted build

COPY zhiva ./zhiva
COPY twisted ./twisted
# The zhiva-json encoder's C extension needs a compiler only while it builds
# (gcc in and out in one layer; the import fails the build if it is missing).
# Twisted's plugin caches, written now: the service user cannot write there.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir --no-deps . \
 && python -c "import _zhiva_decimal" \
 && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
 && python -c "from twisted.plugin import IPlugin, getPlugins; import zhiva.plugins; list(getPlugins(IPlugin)); list(getPlugins(IPlugin, zhiva.plugins))" \
 && rm -rf build

# compose mounts zhiva.crt, zhiva.key, servers.json, models.json and ./log here.
WORKDIR /srv/zhiva
USER zhiva
EXPOSE 8002
VOLUME ["/var/lib/zhiva"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["zhiva", "healthcheck", "https://127.0.0.1:8002/healthz"]
# Check the config first (one line per problem), then replace the shell with
# twistd so that it is PID 1 and gets SIGHUP (reload) and SIGTERM (stop).
CMD ["sh", "-c", "zhiva check-config . && exec twistd --nodaemon --pidfile= zhiva --config-dir . --log-dir log --state-dir /var/lib/zhiva"]
