#!/bin/sh
# Start the lesson-06 proxy: the bearer key (a secret file) and the upstream (an environment variable)
# become the two small files docker/nginx.conf includes from /tmp/nginx (a tmpfs), then nginx runs in
# the foreground as this (non-root) user. Both values are checked first: they are pasted into nginx syntax.
set -eu
key_file=${PROXY_KEY_FILE:-/run/secrets/proxy/key}
upstream=${PROXY_UPSTREAM:-serve:8080}
key=$(cat "$key_file")
case $key in
  *[!A-Za-z0-9._~+/=-]*) echo "proxy: $key_file must hold one key of letters, digits and ._~+/=- (token68)" >&2; exit 64 ;;
esac
if [ "${#key}" -lt 32 ]; then
  echo "proxy: the key in $key_file is shorter than 32 characters" >&2; exit 64
fi
case $upstream in
  ""|*[!A-Za-z0-9.:-]*) echo "proxy: PROXY_UPSTREAM must be host:port, not '$upstream'" >&2; exit 64 ;;
esac
umask 077
mkdir -p /tmp/nginx
printf '"Bearer %s" 1;\n' "$key" > /tmp/nginx/bearer.map
printf 'server %s;\n' "$upstream" > /tmp/nginx/upstream.conf
exec nginx -c /etc/nginx/deploylab.conf -g 'daemon off;'
