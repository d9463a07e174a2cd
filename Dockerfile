# The otel-dl collector image; with more extras, also the image of the demo pipeline's
# services (examples/deploy/docker-compose.yaml builds both from this file).
#
#   docker build -t otel-dl-collector:0.1.0 .
#   docker run -p 4317:4317 -p 4318:4318 -p 8889:8889 otel-dl-collector:0.1.0 \
#       --config /etc/otel-dl/collector.yaml --export-endpoint tempo:4317
#
# Build arguments:
#   EXTRAS           the project's extras to install (default: collector)
#   EXTRA_PACKAGES   further pinned requirements, e.g. the demo's web server
#   TORCH_INDEX_URL  an extra package index for torch (e.g. its CPU-only wheels)
#
# The collector runs as the unprivileged user otel-dl (uid 10001) and keeps its
# journal, export queue and fault store in the volume /var/lib/otel-dl. Its default
# configuration, /etc/otel-dl/collector.yaml, is examples/deploy/otel-dl/collector.yaml.
FROM python:3.11.13-slim-bookworm

ARG EXTRAS=collector
ARG EXTRA_PACKAGES=""
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /tmp/otel-dl-src
COPY pyproject.toml README.md ./
COPY otel_dl ./otel_dl
COPY instrumentors ./instrumentors
COPY collector ./collector
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        ".[${EXTRAS}]" ${EXTRA_PACKAGES} \
    && rm -rf /tmp/otel-dl-src

COPY examples/pipeline /opt/otel-dl/pipeline
COPY examples/deploy/otel-dl/collector.yaml /etc/otel-dl/collector.yaml

RUN groupadd --system --gid 10001 otel-dl \
    && useradd --system --uid 10001 --gid otel-dl --home-dir /var/lib/otel-dl \
        --no-create-home --shell /usr/sbin/nologin otel-dl \
    && mkdir -p /var/lib/otel-dl \
    && chown otel-dl:otel-dl /var/lib/otel-dl \
    && chmod 0700 /var/lib/otel-dl

USER 10001:10001
WORKDIR /var/lib/otel-dl
VOLUME ["/var/lib/otel-dl"]

# OTLP/gRPC, OTLP/HTTP, and the fault API with /metrics.
EXPOSE 4317 4318 8889

ENTRYPOINT ["otel-dl-collector"]
CMD ["--config", "/etc/otel-dl/collector.yaml"]
