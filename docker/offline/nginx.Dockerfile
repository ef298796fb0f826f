# The proxy: nginx from Debian's archive on a Python base (the offline one from
# docker/offline-images.sh, or python:3.12-slim-bookworm: compose builds it),
# with the njs module the per-API-key rate limits need (docker/nginx/api_keys.js),
# the Lua module that counts the proxy's answers for Prometheus (nginx.conf,
# "the proxy's metrics"; the official nginx image has none) and the stream
# module the Swarm stack's loopback monitoring door needs
# (deploy/swarm/monitoring-door.conf).
# Behaves like the official image where compose relies on it: config at
# /etc/nginx/nginx.conf, `nginx -g 'daemon off;'` in the foreground, logs on
# stdout/stderr, graceful stop on SIGQUIT.
ARG BASE_IMAGE=ml-api/python:offline
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light libnginx-mod-http-js \
    libnginx-mod-http-lua libnginx-mod-stream \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80 9113
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
