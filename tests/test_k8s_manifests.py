"""Lesson 08's Kubernetes manifests, validated offline (no cluster can run here):

- kubernetes-validate against the schemas of a pinned Kubernetes version, strict (no unknown fields);
- checkov's scan of the manifests and the Ray image's Dockerfile: no failed check (skips are inline, with a reason);
- the KubeRay RayService, for which kubernetes-validate has no schema: the fields KubeRay's CRD requires,
  and its serveConfigV2 through Ray Serve's own schema, importing the application builder it names;
- the security settings the lesson promises, read from the Deployment itself.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploylab import config
from deploylab.serving import docker_build

K8S = config.ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37"
MANIFESTS = sorted(K8S.glob("*.yaml"))
CHECKOV = config.ROOT / ".venv-tools" / "bin" / "checkov"


def _documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _kind(kind: str) -> dict:
    found = [d for path in MANIFESTS for d in _documents(path.name) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_manifests_pass_kubernetes_validate_strict():
    assert MANIFESTS, f"no manifests under {K8S}"
    exe = Path(sys.executable).with_name("kubernetes-validate")
    done = subprocess.run([str(exe), "-k", KUBERNETES_VERSION, "--strict", *map(str, MANIFESTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    passed = done.stdout.count(" passed for resource ")
    core = sum(d["kind"] != "RayService" for path in MANIFESTS for d in _documents(path.name))
    assert passed == core, f"{passed} resources validated, {core} expected:\n{done.stdout}"


def test_checkov_finds_no_failed_check():
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run `make setup` (scripts/setup.sh installs checkov into .venv-tools)")
    done = subprocess.run([str(CHECKOV), "-d", str(K8S), "--framework", "kubernetes", "dockerfile", "--output", "json",
                           "--skip-download"], capture_output=True, text=True, timeout=600)
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(c["check_id"], c["file_path"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, f"checkov failed checks: {failed}"
    passed = sum(r["summary"]["passed"] for r in reports)
    assert passed > 50, f"checkov passed only {passed} checks: did it scan the manifests?"
    skipped = [(c["check_id"], c["check_result"].get("suppress_comment", "").strip()) for r in reports
               for c in r["results"]["skipped_checks"]]
    assert all(len(reason) > 20 for _, reason in skipped), f"every skipped check carries its reason: {skipped}"


def test_ray_image_dockerfile_passes_hadolint():
    findings = [f for f in docker_build.hadolint(K8S / "ray.Dockerfile") if f["level"] in ("error", "warning")]
    assert not findings, findings


def _named(kind: str, name: str) -> dict:
    found = [d for path in MANIFESTS for d in _documents(path.name) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def test_deployments_are_locked_down():
    for name, writable in (("deploylab-serve", {"/tmp", "/home/serve/run"}), ("deploylab-proxy", {"/tmp"})):
        dep = _named("Deployment", name)
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] >= 10001
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert set(c["resources"]["requests"]) == {"cpu", "memory"} and set(c["resources"]["limits"]) == {"cpu", "memory"}
        assert {"readinessProbe", "livenessProbe"} <= set(c), name
        mounts = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
        assert mounts == writable, f"{name}: the writable places, as the tmpfs mounts of lesson 06"
        svc = _named("Service", name)
        assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    serve = _named("Deployment", "deploylab-serve")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert serve[probe]["exec"]["command"][-1] == "/app/healthcheck.py", f"{probe} does not run the image's health check"
    hpa = _kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "deploylab-serve"


def test_torchserve_scales_behind_the_proxy_with_one_key():
    """Several TorchServe pods (the HPA) work for one client key only because the key is checked at
    the proxy (from the Secret), TorchServe runs with token authorization off, and only the proxy
    reaches it."""
    serve = _named("Deployment", "deploylab-serve")["spec"]["template"]["spec"]["containers"][0]
    assert serve["command"][-1] == "/app/config-behind-proxy.properties"
    assert {"name": "TS_CONFIG_FILE", "value": "/app/config-behind-proxy.properties"} in serve["env"]
    behind = (config.ROOT / "docker" / "config-behind-proxy.properties").read_text()
    assert "disable_token_authorization=true" in behind.splitlines()
    assert _kind("HorizontalPodAutoscaler")["spec"]["maxReplicas"] > 1
    policy = _named("NetworkPolicy", "deploylab-serve")
    inference = [rule for rule in policy["spec"]["ingress"] if {"port": 8080, "protocol": "TCP"} in rule["ports"]]
    assert [rule["from"] for rule in inference] == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "deploylab-proxy"}}}]]
    proxy = _named("Deployment", "deploylab-proxy")["spec"]["template"]["spec"]
    sources = [src["secret"]["name"] for v in proxy["volumes"] if "projected" in v for src in v["projected"]["sources"]]
    assert sorted(sources) == ["deploylab-inference-key", "deploylab-proxy-tls"], "the key and certificate come from Secrets"


def test_rayservice_has_what_kuberay_requires_and_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    rs = _kind("RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    cluster = rs["spec"]["rayClusterConfig"]  # KubeRay's CRD: spec.required = [rayClusterConfig]
    assert "template" in cluster["headGroupSpec"]
    for group in cluster["workerGroupSpecs"]:
        assert {"groupName", "minReplicas", "maxReplicas", "template"} <= set(group)
    assert cluster["rayVersion"] == importlib.import_module("ray").__version__, "the RayService's Ray is the lock's"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    module, _, name = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), name)), f"{app.import_path} is not importable"
    (dep,) = app.deployments
    assert dep.autoscaling_config["min_replicas"] >= 1 and dep.autoscaling_config["max_replicas"] > 1
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (c,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert "secretKeyRef" in env["DEPLOYLAB_INFERENCE_KEY"]["valueFrom"], "the bearer key comes from a Secret"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_no_secret_value_is_committed():
    kinds = [d["kind"] for path in MANIFESTS for d in _documents(path.name)]
    assert "Secret" not in kinds, "the Secret is created by the reader (namespace.yaml says how), never committed"


def _serve_deployment(rs: dict):
    from ray.serve.schema import ServeDeploySchema

    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    return serve_config, serve_config.applications[0].deployments[0]


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_rayservice_adds_worker_pods_for_the_replicas_serve_asks_for():
    """Serve's autoscaler asks for up to max_replicas replicas; only Ray's autoscaler (KubeRay's in-tree one)
    adds the pods to place those past what the first worker pod holds."""
    rs = _kind("RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert set(options["resources"]) == {"requests", "limits"}, "the autoscaler sidecar's resources are bounded"
    assert options["securityContext"]["allowPrivilegeEscalation"] is False and options["securityContext"]["capabilities"]["drop"] == ["ALL"]
    _, dep = _serve_deployment(rs)
    per_replica = dep.ray_actor_options.num_cpus
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head places no replica"
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    per_pod = int(_cpus(worker["resources"]["requests"]["cpu"]) // per_replica)
    assert per_pod * group["replicas"] < dep.autoscaling_config["max_replicas"], "one pod would hold them all: nothing to test"
    assert per_pod * group["maxReplicas"] >= dep.autoscaling_config["max_replicas"], \
        f"{group['maxReplicas']} pods of {per_pod} replicas cannot hold Serve's {dep.autoscaling_config['max_replicas']}"
    # the sidecar talks to the Kubernetes API with the head pod's ServiceAccount token; workers need none
    assert cluster["headGroupSpec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert group["template"]["spec"]["automountServiceAccountToken"] is False


def test_rayservice_sheds_load_as_lesson_08_does():
    from deploylab.serving import ray_serve

    serve_config, dep = _serve_deployment(_kind("RayService"))
    assert dep.max_ongoing_requests == ray_serve.MAX_ONGOING and dep.max_queued_requests == ray_serve.MAX_QUEUED
    assert dep.backpressure_config.status_code == 503 and dep.backpressure_config.retry_after_s == ray_serve.RETRY_AFTER_S
    assert dict(dep.request_router_config) == ray_serve.ROUTER_BACKOFF
    assert serve_config.http_options.keep_alive_timeout_s == ray_serve.KEEP_ALIVE_S


def test_ray_pods_admit_serve_from_clients_and_rays_own_ports_only_from_ray_pods():
    cluster = _kind("RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    policy = _named("NetworkPolicy", "deploylab-ray")["spec"]
    selector = policy["podSelector"]["matchLabels"]
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items(), "the policy must select every Ray pod"
    assert policy["policyTypes"] == ["Ingress"]
    ray_pods = {"podSelector": {"matchLabels": selector}}
    for rule in policy["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if not ports:  # every port: only from the Ray pods themselves
            assert rule["from"] == [ray_pods], rule
        elif ports == {8000}:  # Serve's HTTP proxy: the namespace's pods and the ingress controller
            assert {"podSelector": {}} in rule["from"], rule
        else:  # the dashboard and its agents: only the KubeRay operator's pods
            assert ports <= {8265, 52365}, rule
            assert all(src.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "kuberay-operator"}
                       for src in rule["from"]), rule
    assert any(not r.get("ports") for r in policy["ingress"]) and any({p["port"] for p in r.get("ports", [])} == {8000}
                                                                       for r in policy["ingress"])
