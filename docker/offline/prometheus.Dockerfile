# Prometheus from Debian's archive on the offline Python base
# (docker/offline-images.sh). Same entrypoint, user, config and data paths as
# the official prom/prometheus image, so compose treats both alike.
ARG BASE_IMAGE=ml-api/python:offline
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus \
 && chown nobody:nogroup /prometheus \
 && ln -sf /usr/bin/prometheus /bin/prometheus 2>/dev/null || true
USER nobody
WORKDIR /prometheus
EXPOSE 9090
VOLUME ["/prometheus"]
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.console.libraries=/usr/share/prometheus/console_libraries", \
     "--web.console.templates=/usr/share/prometheus/consoles"]
