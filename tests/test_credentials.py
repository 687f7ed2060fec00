"""Per-device credentials against the real cloud routes: every route and role, enrolment,
rotation with an overlap window, revocation (issue "Hardening", identity)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tierwise.config import Config
from tierwise.registry.credentials import Credentials
from tierwise.registry.signing import keygen
from tierwise.registry.store import Registry
from tierwise.registry.subscriber import registry_token
from waiting import wait_for

DIGEST = "0" * 64


@pytest.fixture
def cloud(cloud_config: Config) -> Iterator[tuple[str, Config]]:
    from tierwise.cloud import hosted
    from tierwise.server.app import TierServer, serve_in_thread

    config = cloud_config
    Registry(config.registry_dir).rollouts()  # an empty index
    with serve_in_thread(hosted(TierServer("cloud", config.tier("cloud"), {}), config)) as url:
        yield url, config


def _trace() -> dict:
    from tierwise.client.trace import StageTrace, Trace

    return Trace(plan="local(m)", total_ms=1.0,
                 stages=[StageTrace("local", "device", "m", "1", 1.0, 1.0)]).to_dict()


def _statuses(url: str, token: str | None) -> dict[str, int]:
    """What each route answers this token (None: no Authorization header)."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        def traces(device: str) -> int:
            body = orjson.dumps({"device": device, "traces": [_trace()]})
            return http.post("/telemetry/v1/traces", content=body).status_code
        return {
            "models": http.get("/registry/v1/models").status_code,
            "own deployment": http.get("/registry/v1/deployments/stable",
                                       params={"device": "cam-1"}).status_code,
            "other deployment": http.get("/registry/v1/deployments/stable",
                                         params={"device": "cam-2"}).status_code,
            "blob": http.get(f"/registry/v1/blobs/sha256/{DIGEST}").status_code,
            "own traces": traces("cam-1"),
            "other traces": traces("cam-2"),
            "summary": http.get("/telemetry/v1/summary").status_code,
            "introspect": http.post("/devices/v1/introspect",
                                    data={"token": "anything"}).status_code,
            "devices": http.get("/devices/v1").status_code,
            "enrol": http.post("/devices/v1/new-cam").status_code,
            "dashboard": http.get("/dashboard/data").status_code,
            "fleet": http.get("/fleet/v1/sites").status_code,
        }


def test_every_route_refuses_a_credential_outside_its_scope(
        cloud: tuple[str, Config]) -> None:
    url, config = cloud
    credentials = Credentials(Registry(config.registry_dir).index_location)
    device = credentials.enroll("cam-1", "device")
    edge = credentials.enroll("cam-1-edge", "edge")
    operator = registry_token("", config.registry_dir)
    seen = {role: _statuses(url, token) for role, token in
            (("none", None), ("wrong", "not-a-token"), ("device", device), ("edge", edge),
             ("operator", operator))}
    for role, statuses in seen.items():
        print(role, statuses)
    assert set(seen["none"].values()) == {401}
    assert set(seen["wrong"].values()) == {401}
    # a device reads its own deployment and the blobs (404: allowed, no such blob) and
    # writes its own traces; nothing else
    closed = {"introspect": 403, "devices": 403, "enrol": 403, "dashboard": 403}
    assert seen["device"] == {"models": 403, "own deployment": 200, "other deployment": 403,
                              "blob": 404, "own traces": 200, "other traces": 403,
                              "summary": 403, "fleet": 200, **closed}
    # an edge server's id is its own: another's deployment and any device's traces are not;
    # it may ask whose a device's token is (an unknown one: {"active": false})
    assert seen["edge"] == {"models": 403, "own deployment": 403, "other deployment": 403,
                            "blob": 404, "own traces": 403, "other traces": 403,
                            "summary": 403, "fleet": 200, **closed, "introspect": 200}
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {edge}"}) as http:
        assert http.get("/registry/v1/deployments/stable",
                        params={"device": "cam-1-edge"}).status_code == 200
    assert seen["operator"] == {"models": 200, "own deployment": 200, "other deployment": 200,
                                "blob": 404, "own traces": 200, "other traces": 200,
                                "summary": 200, "introspect": 200, "devices": 200,
                                "enrol": 201, "dashboard": 200, "fleet": 200}
    # the dashboard is the operator's only
    for token, status in ((device, 401), (operator, 303)):
        assert httpx.post(url + "/dashboard/login", data={"token": token}).status_code == status


def test_a_rotated_token_overlaps_then_ends_and_a_revoked_one_ends_at_once(
        cloud: tuple[str, Config]) -> None:
    url, config = cloud
    # another instance on the same table, as `tierwise devices` is another process
    credentials = Credentials(Registry(config.registry_dir).index_location)

    def deployment(token: str) -> int:
        return httpx.get(url + "/registry/v1/deployments/stable", params={"device": "cam-1"},
                         headers={"authorization": f"Bearer {token}"}).status_code
    old = credentials.enroll("cam-1")
    assert deployment(old) == 200
    new = credentials.rotate("cam-1", overlap_s=1.5)
    assert deployment(new) == 200 and deployment(old) == 200  # both, during the overlap
    wait_for(lambda: deployment(old) == 401, timeout_s=10, what="the old token to expire")
    assert deployment(new) == 200
    credentials.revoke("cam-1")
    started = time.monotonic()
    wait_for(lambda: deployment(new) == 401, timeout_s=10, what="the revoked token refused")
    print(f"revocation seen by the server after {time.monotonic() - started:.2f} s")
    stored = credentials.list()
    assert [row["id"] for row in stored] == ["cam-1", "cam-1"]
    assert all(row["revoked_at"] for row in stored)
    assert "token" not in str(stored)  # hashes only, never shown


def test_enrolment_refuses_bad_ids_roles_and_a_second_enrolment(tmp_path: Path) -> None:
    credentials = Credentials(tmp_path / "index.db")
    credentials.enroll("cam-1")
    for device, role, expected in (("cam-1", "device", "enrolled already"),
                                   ("[x]", "device", "device_id"),
                                   ("cam-2", "root", "role")):
        with pytest.raises(ValueError, match=expected):
            credentials.enroll(device, role)
    with pytest.raises(ValueError, match="no credential to rotate"):
        credentials.rotate("nobody")
    with pytest.raises(ValueError, match="no credential to revoke"):
        credentials.revoke("nobody")


def test_the_signing_key_and_the_api_token_are_replaced_apart(tmp_path: Path) -> None:
    from tierwise.registry.signing import PRIVATE_KEY_FILE, TOKEN_FILE, rotate_token

    keys = tmp_path / "keys"
    keygen(keys)
    key, token = (keys / PRIVATE_KEY_FILE).read_bytes(), (keys / TOKEN_FILE).read_bytes()
    keygen(keys, overwrite=True)  # a new signing key: the token stays
    assert (keys / PRIVATE_KEY_FILE).read_bytes() != key
    assert (keys / TOKEN_FILE).read_bytes() == token
    key = (keys / PRIVATE_KEY_FILE).read_bytes()
    rotate_token(keys)  # a new token: the signing key stays
    assert (keys / TOKEN_FILE).read_bytes() != token
    assert (keys / PRIVATE_KEY_FILE).read_bytes() == key
    assert oct((keys / TOKEN_FILE).stat().st_mode & 0o777) == "0o600"


def test_dashboard_session_cookie_is_httponly_strict_and_needed(cloud_config: Config) -> None:
    from tierwise.cloud import hosted
    from tierwise.server.app import TierServer, serve_in_thread

    config = cloud_config
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as http:
        assert http.get("/dashboard/data").status_code == 401
        assert http.get("/dashboard/").status_code == 303  # to the sign-in page
        operator = registry_token("", config.registry_dir)
        assert http.get("/dashboard/data", params={"token": operator}).status_code == 401
        assert http.post("/dashboard/login", data={"token": "wrong"}).status_code == 401
        signed_in = http.post("/dashboard/login", data={"token": operator})
        assert signed_in.status_code == 303
        cookie = signed_in.headers["set-cookie"]
        for attribute in ("httponly", "samesite=strict", "path=/dashboard"):
            assert attribute in cookie.lower()  # attribute names: any case (RFC 6265)
        page = http.get("/dashboard/")
        assert page.status_code == 200 and "token" not in page.text.lower().replace(
            "operator token", "")
        assert http.get("/dashboard/data").status_code == 200
        assert http.get("/dashboard/plot/latency.png").status_code == 200
        assert http.post("/dashboard/logout").status_code == 303
        assert http.get("/dashboard/data").status_code == 401


def test_a_rotated_operator_token_takes_effect_without_a_restart(
        cloud: tuple[str, Config]) -> None:
    from tierwise.registry.signing import rotate_token

    url, config = cloud
    old = registry_token("", config.registry_dir)

    def models(token: str) -> int:
        return httpx.get(url + "/registry/v1/models",
                         headers={"authorization": f"Bearer {token}"}).status_code
    assert models(old) == 200
    browser = httpx.Client(base_url=url)  # a dashboard session signed in with the old token
    assert browser.post("/dashboard/login", data={"token": old}).status_code == 303
    assert browser.get("/dashboard/data").status_code == 200
    rotate_token(config.registry_dir / "keys")
    new = registry_token("", config.registry_dir)
    assert models(new) == 200 and models(old) == 401
    # the session ends with its token (checked again on every request)
    assert browser.get("/dashboard/data").status_code == 401
    browser.close()
    # an enrolled operator may sign in to the dashboard too; a device may not
    credentials = Credentials(Registry(config.registry_dir).index_location)
    operator = credentials.enroll("ops-1", "operator")
    assert httpx.post(url + "/dashboard/login", data={"token": operator}).status_code == 303
    assert httpx.post(url + "/dashboard/login", data={"token": old}).status_code == 401


def test_an_operator_enrols_rotates_and_revokes_devices_over_http(
        cloud: tuple[str, Config]) -> None:
    url, config = cloud
    operator = {"authorization": f"Bearer {registry_token('', config.registry_dir)}"}
    with httpx.Client(base_url=url, headers=operator) as http:
        made = http.post("/devices/v1/cam-9", json={"role": "device"})
        assert made.status_code == 201 and made.headers["cache-control"] == "no-store"
        token = made.json()["token"]
        assert http.post("/devices/v1/cam-9", json={"role": "device"}).status_code == 409
        for bad, field in ((b'{"role": "king"}', "role"), (b'{"role": 3}', "role"),
                           (b'{"colour": "red"}', "colour"), (b"[1]", "object"),
                           (b"{", "JSON")):
            answer = http.post("/devices/v1/cam-10", content=bad)
            assert answer.status_code == 400 and field in answer.json()["error"], bad
        assert http.post("/devices/v1/a%20b").status_code == 400  # not a plain id
        device = {"authorization": f"Bearer {token}"}
        # a device may not enrol anyone, itself included
        assert httpx.get(url + "/devices/v1", headers=device).status_code == 403
        assert httpx.post(url + "/devices/v1/cam-11", headers=device).status_code == 403
        assert any(row["id"] == "cam-9" for row in http.get("/devices/v1").json())
        rotated = http.post("/devices/v1/cam-9/rotate", json={"overlap_s": 0})
        assert rotated.status_code == 200
        new = {"authorization": f"Bearer {rotated.json()['token']}"}
        own = {"device": "cam-9"}
        wait_for(lambda: httpx.get(url + "/registry/v1/deployments/stable", params=own,
                                   headers=device).status_code == 401, timeout_s=10)
        assert httpx.get(url + "/registry/v1/deployments/stable", params=own,
                         headers=new).status_code == 200
        # both of its tokens: the one rotated away and the new one
        assert http.delete("/devices/v1/cam-9").json() == {"id": "cam-9", "revoked": 2}
        assert http.delete("/devices/v1/cam-9").status_code == 404
        wait_for(lambda: httpx.get(url + "/registry/v1/deployments/stable", params=own,
                                   headers=new).status_code == 401, timeout_s=10)
        assert http.post("/devices/v1/nobody/rotate").status_code == 404
        wrong = http.put("/devices/v1/cam-9")  # the methods of every route of the path
        assert wrong.status_code == 405 and wrong.headers["allow"] == "DELETE, POST"
        assert "use POST, not GET" in http.get("/devices/v1/cam-9/rotate").json()["error"]
        # a token that is not even ASCII is nobody's, not a crash
        euro = {"content-type": "application/x-www-form-urlencoded"}
        assert http.post("/devices/v1/introspect", content=b"token=%E2%82%AC",
                         headers=euro).json() == {"active": False}
        assert httpx.post(url + "/dashboard/login", content=b"token=%E2%82%AC",
                          headers=euro).status_code == 401


# -- tier servers that require a credential (tiers.<tier>.require_auth) ----------------------


def _infer(url: str, token: str | None) -> httpx.Response:
    import numpy as np

    from tierwise.protocol.oip import encode_infer_request

    body, headers = encode_infer_request({"image": np.zeros((1, 1, 28, 28), np.uint8)},
                                         binary=True)
    if token:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(url + "/v2/models/fmnist-edge/infer", content=body, headers=headers,
                      timeout=30)


def test_an_edge_that_requires_auth_asks_the_cloud_whose_a_token_is(
        cloud: tuple[str, Config], models_dir: Path, splits) -> None:
    from tierwise.client import Client
    from tierwise.cloud import token_verifier
    from tierwise.config import ConfigError
    from tierwise.planner.plans import Remote
    from tierwise.runtime.session import load_models
    from tierwise.server.app import create_app, serve_in_thread

    cloud_url, config = cloud
    credentials = Credentials(Registry(config.registry_dir).index_location)
    device = credentials.enroll("cam-1", "device")
    other = credentials.enroll("cam-2", "device")
    edge_token = credentials.enroll("edge-1", "edge")
    config = config.model_copy(deep=True)
    config.tiers["edge"].require_auth = True
    with pytest.raises(ConfigError, match=r"registry\.url"):
        token_verifier("edge", config.tier("edge"), config)
    config.registry.url = cloud_url
    config.registry.token = edge_token
    verifier = token_verifier("edge", config.tier("edge"), config)
    assert verifier is not None
    verifier.cache_s = 0.2  # a revocation shows within this long
    models = load_models(models_dir, names=["fmnist-edge"])
    with serve_in_thread(create_app("edge", config.tier("edge"), models, verifier=verifier)
                         ) as edge:
        assert _infer(edge, None).status_code == 401
        assert "Bearer" in _infer(edge, None).headers["www-authenticate"]
        assert _infer(edge, "not-a-token").status_code == 401
        for empty in ("Bearer", "Basic abc", "bearer"):  # refused here, not asked about
            answer = httpx.get(edge + "/v2/models/fmnist-edge", headers={"authorization": empty})
            assert answer.status_code == 401, empty
        assert _infer(edge, device).status_code == 200
        assert httpx.get(edge + "/v2/health/ready").status_code == 200  # probes stay open
        assert httpx.get(edge + "/v2/models/fmnist-edge").status_code == 401
        metrics = {"authorization": f"Bearer {device}"}
        assert httpx.get(edge + "/metrics", headers=metrics).status_code == 403
        # the device's Client sends its own token to a tier that requires one
        device_config = config.model_copy(deep=True)
        device_config.registry.token = other
        device_config.registry.url = ""  # no registry subscription: only the edge link
        with Client(device_config, models_dir=models_dir, tier_urls={"edge": edge},
                    probe=False, collector_url="") as client:
            trace = client.infer(splits.test_x[0], Remote("edge", "fmnist-edge")).trace
        assert trace.fallback is None and trace.stages[0].error is None, trace
        credentials.revoke("cam-1")
        wait_for(lambda: _infer(edge, device).status_code == 401, timeout_s=10,
                 what="the revoked token refused at the edge")
        assert _infer(edge, other).status_code == 200
    # a device's token cannot introspect: the edge says so (503), it does not crash
    config.registry.token = other
    misconfigured = token_verifier("edge", config.tier("edge"), config)
    with serve_in_thread(create_app("edge", config.tier("edge"), models,
                                    verifier=misconfigured)) as edge:
        refused = _infer(edge, other)
        assert refused.status_code == 503 and "introspection" in refused.json()["error"]
    # the servers closed their verifiers' connections to the cloud on shutdown
    for used in (verifier, misconfigured):
        assert used is not None and used.lookup._http.is_closed


def test_a_cloud_that_requires_auth_keys_its_client_limit_on_the_credential(
        cloud_config: Config, models_dir: Path) -> None:
    from tierwise.cloud import hosted, token_verifier
    from tierwise.runtime.session import load_models
    from tierwise.server.app import TierServer, _client_key, serve_in_thread
    from tierwise.server.auth import Principal

    config = cloud_config
    config.tiers["cloud"].require_auth = True
    Registry(config.registry_dir).rollouts()
    device = Credentials(Registry(config.registry_dir).index_location).enroll("cam-1")
    operator = registry_token("", config.registry_dir)
    server = TierServer("cloud", config.tier("cloud"), load_models(models_dir,
                        names=["fmnist-edge"]),
                        verifier=token_verifier("cloud", config.tier("cloud"), config))
    with serve_in_thread(hosted(server, config)) as url:
        assert _infer(url, None).status_code == 401
        assert _infer(url, device).status_code == 200
        assert httpx.get(url + "/metrics", headers={
            "authorization": f"Bearer {operator}"}).status_code == 200
        assert httpx.get(url + "/metrics").status_code == 401
    # with a credential, the header a client picks freely no longer names it
    spoofed = {"headers": [(b"tierwise-device", b"someone-else")], "client": ("10.0.0.1", 1)}
    assert _client_key(spoofed, Principal("cam-1", "device")) == b"id:cam-1"
    assert _client_key(spoofed, None) == b"device:someone-else"
