"""Docker HEALTHCHECK for the deploylab image: healthy when TorchServe answers /ping with Healthy
AND every registered model has at least its minimum number of READY workers.

/ping alone is not enough: TorchServe 0.12 says Healthy while a model's workers fail to load and
are restarted over and over. TorchServe checks tokens on /ping and on the management API, so the
keys are read from the key_file.json it writes into its working folder at start. The management
API answers only on the container's loopback (docker/config.properties). Standard library only.
"""

import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

KEY_FILE = Path("/home/serve/run/key_file.json")
INFERENCE = "http://127.0.0.1:8080"
MANAGEMENT = "http://127.0.0.1:8081"


def get(url: str, key: str):
    """GET ``url`` with a bearer token; the decoded JSON answer."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=3) as r:  # noqa: S310 (fixed loopback URLs)
        return json.loads(r.read())


def problem() -> str | None:
    """What is not healthy yet, or None."""
    try:
        keys = json.loads(KEY_FILE.read_text())
        inference, management = keys["inference"]["key"], keys["management"]["key"]
    except (OSError, ValueError, KeyError) as e:
        return f"no keys yet ({e})"
    try:
        status = get(f"{INFERENCE}/ping", inference).get("status")
        if status != "Healthy":
            return f"/ping: {status}"
        models = [m["modelName"] for m in get(f"{MANAGEMENT}/models", management).get("models", [])]
        if not models:
            return "no model registered"
        for name in models:
            for version in get(f"{MANAGEMENT}/models/{urllib.parse.quote(name)}", management):
                ready = sum(w.get("status") == "READY" for w in version.get("workers", []))
                if ready < int(version.get("minWorkers", 1)):
                    return f"model {name}: {ready} of {version.get('minWorkers')} workers READY"
    except (OSError, ValueError, KeyError) as e:
        return f"TorchServe does not answer ({e})"
    return None


if __name__ == "__main__":
    why = problem()
    print(why or "healthy")
    sys.exit(1 if why else 0)
