"""Lesson 10 (deploylab.ops): the registry, the router's share, the controller's decisions and a swap under load.

Real servers (the custom ASGI server on the smoke profile's deployed student), a real router
process, a real INT8 model calibrated on black images as the broken candidate, and lesson 07's load
generator; nothing is mocked.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from deploylab import config, data, deployable, export, onnx_int8, onnxrt
from deploylab.ops import canary, registry, swap
from deploylab.ops import router as routing
from deploylab.serving import asgi, loadgen, protocol

PROFILE = config.get_profile("smoke")


@pytest.fixture(scope="module")
def model():
    return deployable.student_onnx(PROFILE)


@pytest.fixture(scope="module")
def broken(model, tmp_path_factory):
    """The student quantized to INT8 with all-black calibration images, with its card (servable)."""
    out = tmp_path_factory.mktemp("broken") / "student_int8_black.onnx"
    black = data.preprocess(np.zeros((32, 28, 28), np.uint8))
    onnx_int8.quantize_int8(model, out, onnx_int8.CalibrationReader(black))
    card = export.read_card(model)
    x, y = data.tensors("test", 256)
    par = export.parity(onnxrt.run(onnxrt.session(out), x), onnxrt.run(onnxrt.session(model), x), y)
    export.write_card(out, role="student", arch=card["arch"], profile=PROFILE, precision="int8", exporter=card["exporter"],
                      parity=par, accuracy=par.accuracy, test_images=par.images, source=card["source_checkpoint"])
    return out, par


@pytest.fixture(scope="module")
def servers(model, broken):
    """Two servers of the same file (a, b) and one of the broken candidate (c)."""
    with ThreadPoolExecutor(3) as pool:
        started = dict(zip("abc", pool.map(lambda p: asgi.AsgiServer(p).start(), (model, model, broken[0]))))
    yield started
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def bodies():
    images, _ = data.raw_split("test", 64)
    return [protocol.png_bytes(im) for im in images]


def test_registry_versions_aliases_audit_and_a_changed_file(tmp_path, model, broken):
    reg = registry.Registry(tmp_path / "reg")
    v1 = reg.register("student", model, metrics={"accuracy": 0.9}, lineage={"made_by": "export"})
    v2 = reg.register("student", broken[0], metrics={"agreement": broken[1].top1_agreement}, lineage={"parent": v1.uri})
    assert (v1.version, v2.version, v2.uri) == (1, 2, "models:/student/2")
    assert (tmp_path / "reg" / "student" / "v2" / "student_int8_black.card.json").is_file()
    reg.set_alias("student", "champion", 1, reason="deployed")
    reg.set_alias("student", "champion", 2, reason="canary passed")
    assert reg.by_alias("student", "champion") == v2 and reg.aliases("student") == {"champion": 2}
    moves = [e for e in reg.events("student") if e["event"] == "alias champion"]
    assert [(e["from"], e["to"], e["reason"]) for e in moves] == [(None, 1, "deployed"), (1, 2, "canary passed")]
    assert reg.model_path(v1).read_bytes() == model.read_bytes()
    with pytest.raises(registry.RegistryError, match="no alias"):
        reg.by_alias("student", "challenger")
    with pytest.raises(registry.RegistryError, match="no version"):
        reg.set_alias("student", "champion", 7)
    copy = reg.model_path(v1)
    copy.write_bytes(copy.read_bytes()[:-1] + bytes([copy.read_bytes()[-1] ^ 0xFF]))  # one byte changed
    with pytest.raises(registry.RegistryError, match="changed after registration"):
        reg.model_path(v1)


def test_router_sends_the_stated_share_compares_answers_and_guards_its_doors(servers, bodies):
    with routing.RouterServer(servers["a"], version="a") as r:
        r.configure(candidate=routing.spec(servers["b"], "b"), weight=0.2)
        with httpx.Client(trust_env=False, timeout=30) as client:
            headers = {"Authorization": f"Bearer {r.key()}", "Content-Type": "image/png"}
            answers = [client.post(f"{r.url}/predictions/student", content=bodies[i % len(bodies)], headers=headers)
                       for i in range(50)]
            assert {a.status_code for a in answers} == {200}
            versions = [a.headers["x-model-version"] for a in answers]
            assert versions.count("b") == 10  # exactly 20% of 50, not about
            assert client.post(f"{r.url}/predictions/student", content=bodies[0],
                               headers={**headers, "Authorization": "Bearer wrong-key-wrong-key"}).status_code == 401
            assert client.get(f"{r.url}/admin/log", headers=headers).status_code == 401  # the inference key is not the admin key
        records, nxt = r.log()
        assert nxt == len(records) == 60  # 50 served + 10 reference answers of v"a" to the candidate's requests
        cand = [x for x in records if x["role"] == "candidate"]
        assert len(cand) == 10 and all(x["served"] and x["agree"] for x in cand)  # the same model file agrees with itself
        assert canary.served_by(records, "a") == 40
        assert canary.judge(records, canary.Rules(min_requests=10)).decision == "pass"


def test_controller_promotes_a_good_candidate_and_rolls_back_a_broken_one_under_load(servers, bodies, broken):
    rules = canary.Rules(steps=(0.25, 0.5), min_requests=20)
    count = int(1.5 * sum(rules.min_requests / w for w in rules.steps))
    promoted = []
    with routing.RouterServer(servers["a"], version="a") as r:
        requests = loadgen.build_requests("127.0.0.1", r.port, "/predictions/student", bodies, token=r.key())
        runs = {}
        for name, promote in (("b", lambda: promoted.append(r.configure(stable=routing.spec(servers["b"], "b"), candidate=None,
                                                                         weight=0.0))),
                              ("c", lambda: pytest.fail("a broken candidate must not be promoted"))):
            _, cursor = r.log(since=10**9)
            ctl = canary.Controller(r, routing.spec(servers[name], name), rules, promote=promote, deadline_s=count / 50).start()
            run = loadgen.open_loop("127.0.0.1", r.port, requests, rate=100, count=count, progress=False)
            runs[name] = (ctl.join(30), run, r.log(since=cursor)[0], ctl.events)
    outcome, run, log, events = runs["b"]
    assert outcome == "promoted" and promoted and promoted[0]["stable"] == "b", events
    assert run.statuses == {200: count} and not run.transport_errors
    outcome, run, log, events = runs["c"]
    assert outcome == "rolled back", events
    assert "disagreements" in events[-1]["reasons"][0]
    assert 0 < canary.served_by(log, "c") <= rules.min_requests
    assert run.statuses == {200: count} and not run.transport_errors
    assert broken[1].top1_agreement < rules.min_agreement  # the offline figure says the same as the live one


def test_swap_with_a_drain_loses_no_request_under_load(model, servers, bodies):
    old = asgi.AsgiServer(model).start()
    try:
        with routing.RouterServer(old, version="old") as r:
            requests = loadgen.build_requests("127.0.0.1", r.port, "/predictions/student", bodies, token=r.key())
            job = swap.during(lambda: swap.swap_with_drain(r, servers["a"], "new", old), after_s=1.0)
            run = loadgen.open_loop("127.0.0.1", r.port, requests, rate=100, count=300, progress=False)
            timing = job.join()
            log, _ = r.log()
            assert r.state()["stable"] == "new" and not r.state()["draining"]
        assert run.statuses == {200: 300} and not run.transport_errors, run.summary()
        assert canary.served_by(log, "old") > 50 and canary.served_by(log, "new") > 100  # the swap happened mid-run
        assert not old.processes() and timing["stopped_s"] >= timing["drained_s"]
    finally:
        old.stop()
