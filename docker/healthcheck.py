"""Docker HEALTHCHECK for the deploylab image: healthy when TorchServe answers /ping with Healthy
AND every registered model has at least its minimum number of READY workers.

/ping alone is not enough: TorchServe 0.12 says Healthy while a model's workers fail to load and
are restarted over and over. TorchServe checks tokens on /ping and on the management API, so the
keys are read from the key_file.json it writes into its working folder at start. The management
API answers only on the container's loopback (docker/config.properties). Standard library only.

Keys that outlive their hour: TorchServe's inference and management keys expire after
``token_expiration_min`` (60 minutes by default); only the API key does not. A check that used the
keys of the start would turn the container unhealthy at the 60th minute and, in Kubernetes, get
the pod restarted every hour. So this check renews an expired key (or one about to expire) with
the API key through TorchServe's token API (``GET /token?type=inference``), which writes the new
key into key_file.json: clients on the same host re-read that file when a key is refused.
Behind the reverse proxy (``disable_token_authorization=true`` in the config named by
``TS_CONFIG_FILE``, TorchServe reachable only from the proxy) there are no keys to renew.

    python healthcheck.py [--key-file PATH] [--inference URL] [--management URL] [--config PATH] [--renew-before-s S]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

KEY_FILE = Path("/home/serve/run/key_file.json")
INFERENCE = "http://127.0.0.1:8080"
MANAGEMENT = "http://127.0.0.1:8081"
CONFIG = os.environ.get("TS_CONFIG_FILE", "/app/config.properties")
RENEW_BEFORE = timedelta(seconds=20)  # renew this long before expiry: longer than a check's interval plus timeout


def get(url: str, key: str | None):
    """GET ``url`` with a bearer token (none when ``key`` is None); the decoded JSON answer."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as r:  # noqa: S310 (loopback URLs)
        return json.loads(r.read().strip() or b"{}")  # the token API answers a bare newline


def token_auth_on(config: str) -> bool:
    """False only when the config file says ``disable_token_authorization=true`` (behind the proxy)."""
    try:
        lines = Path(config).read_text().splitlines()
    except OSError:
        return True
    props = dict(line.split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith("#"))
    return props.get("disable_token_authorization", "false").strip().lower() != "true"


def expires_soon(entry: dict, now: datetime, before: timedelta = RENEW_BEFORE) -> bool:
    """The key of a key-file entry expires within ``before`` (TorchServe writes ``2026-12-06T07:31:12.5Z``)."""
    stamp = entry.get("expiration time")
    if not stamp:
        return False
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) - now <= before


def read_keys(key_file: Path, attempts: int = 20) -> dict:
    """key_file.json, decoded. TorchServe rewrites it in place (truncate, then write) when a key is
    renewed, so a read can catch it empty or half written: read again shortly."""
    for attempt in range(attempts):
        try:
            return json.loads(key_file.read_text())
        except ValueError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def current_keys(key_file: Path, management: str, *, force: bool = False,
                 before: timedelta = RENEW_BEFORE) -> tuple[str, str]:
    """The inference and management keys, renewed first (with the API key) if expiring or ``force``."""
    keys = read_keys(key_file)
    now = datetime.now(timezone.utc)
    due = [k for k in ("inference", "management") if force or expires_soon(keys[k], now, before)]
    for kind in due:
        get(f"{management}/token?type={kind}", keys["API"]["key"])  # TorchServe rewrites key_file.json
    if due:
        keys = read_keys(key_file)
    return keys["inference"]["key"], keys["management"]["key"]


def check(inference_key: str | None, management_key: str | None, inference: str, management: str) -> str | None:
    """What is not healthy yet, or None (raises urllib's errors when TorchServe refuses or does not answer)."""
    status = get(f"{inference}/ping", inference_key).get("status")
    if status != "Healthy":
        return f"/ping: {status}"
    models = [m["modelName"] for m in get(f"{management}/models", management_key).get("models", [])]
    if not models:
        return "no model registered"
    for name in models:
        for version in get(f"{management}/models/{urllib.parse.quote(name)}", management_key):
            ready = sum(w.get("status") == "READY" for w in version.get("workers", []))
            if ready < int(version.get("minWorkers", 1)):
                return f"model {name}: {ready} of {version.get('minWorkers')} workers READY"
    return None


def problem(key_file: Path = KEY_FILE, inference: str = INFERENCE, management: str = MANAGEMENT,
            config: str = CONFIG, before: timedelta = RENEW_BEFORE) -> str | None:
    """What is not healthy yet, or None; renews expiring keys on the way."""
    if not token_auth_on(config):
        keys: tuple[str | None, str | None] = (None, None)
    else:
        try:
            keys = current_keys(key_file, management, before=before)
        except (OSError, ValueError, KeyError) as e:
            return f"no keys yet ({e})"
    try:
        try:
            return check(*keys, inference, management)
        except urllib.error.HTTPError as e:
            if e.code not in (400, 401) or keys == (None, None):
                raise
            # refused although not due by our clock (clock skew, a key renewed by someone else): renew, retry once
            return check(*current_keys(key_file, management, force=True), inference, management)
    except (OSError, ValueError, KeyError) as e:
        return f"TorchServe does not answer ({e})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="health of the TorchServe in this container")
    parser.add_argument("--key-file", type=Path, default=KEY_FILE)
    parser.add_argument("--inference", default=INFERENCE)
    parser.add_argument("--management", default=MANAGEMENT)
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--renew-before-s", type=float, default=RENEW_BEFORE.total_seconds(),
                        help="renew a key this many seconds before it expires")
    a = parser.parse_args()
    why = problem(a.key_file, a.inference, a.management, a.config, timedelta(seconds=a.renew_before_s))
    print(why or "healthy")
    sys.exit(1 if why else 0)
