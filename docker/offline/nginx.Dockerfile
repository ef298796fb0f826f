# nginx from Debian's archive on the offline Python base (docker/offline-images.sh),
# with the njs module the per-API-key rate limits need (docker/nginx/api_keys.js)
# and the stream module the Swarm stack's loopback monitoring door needs
# (deploy/swarm/monitoring-door.conf; both built into the official image).
# Behaves like the official image where compose relies on it: config at
# /etc/nginx/nginx.conf, `nginx -g 'daemon off;'` in the foreground, logs on
# stdout/stderr, graceful stop on SIGQUIT.
ARG BASE_IMAGE=ml-api/python:offline
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light libnginx-mod-http-js libnginx-mod-stream \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
