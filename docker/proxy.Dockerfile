# deploylab lesson 06: nginx (Debian bookworm's nginx-light 1.22) as the TLS reverse proxy in front of
# TorchServe, built from the same Debian base as the serving image:
#   docker build -f docker/proxy.Dockerfile --build-arg BASE_IMAGE=deploylab-debian:bookworm-slim -t deploylab-proxy:bookworm .
# (deploylab.serving.proxy.build_proxy_image does this). The configuration is docker/nginx.conf; the
# certificate, its key and the clients' bearer key are mounted at run time into /run/secrets/proxy/
# (tls.crt, tls.key, key): never baked into the image. Run it read-only, with a tmpfs on /tmp
# (docker/compose.yaml, deploy/k8s/torchserve.yaml).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Debian's archive keeps one version per package (see docker/Dockerfile): the base image pins it.
# nginx-light: the core modules this proxy uses (ssl, map, limit_req, limit_conn, upstream keepalive)
# without the optional ones. The default site and its logs are removed: nginx runs with our file only.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled /etc/nginx/conf.d /var/log/nginx/* \
 && useradd --system --uid 10002 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin edgeproxy

COPY docker/nginx.conf /etc/nginx/deploylab.conf
COPY docker/proxy-entrypoint.sh /usr/local/bin/proxy-entrypoint
USER 10002:10002
EXPOSE 8443
# nginx answers on its port: a TCP connect with bash's /dev/tcp (no client tools in the image)
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=3 \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8443"]
ENTRYPOINT ["/usr/local/bin/proxy-entrypoint"]
