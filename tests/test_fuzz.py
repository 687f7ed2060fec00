"""A bounded, seeded fuzzer against a real cloud server process (tier server, registry API,
telemetry collector): thousands of malformed OIP requests (every field, type, size and
encoding), malformed trace batches, and malformed control-plane requests (enrolment,
introspection, sign-in, deployments, blob ranges). Nothing may answer 5xx, the server must
stay up, and its memory must stay within 2x of what it used idle (issue "Hardening",
targets)."""

from __future__ import annotations

import copy
import gzip
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from tierwise.bench.processes import free_port, tier_server
from tierwise.bench.serve import child_pid_on_port
from tierwise.config import Config, write_config
from tierwise.protocol.oip import HEADER_LENGTH, encode_infer_request
from tierwise.registry.store import Registry
from tierwise.registry.subscriber import registry_token

MODEL = "fmnist-edge"
REQUESTS = 3000
SEED = 20261130

ODD_VALUES: list[Any] = [
    None, True, 0, -1, 2**31, 2**63, 10**30, -(10**30), 1.5, 1e308, -1e308, "", "a" * 5000,
    "\x00\x1b[31m", "NaN", [], [[]], [None], {}, {"a": 1}, [1] * 5000, "ü" * 100,
]


def _dumps(document: Any) -> bytes:
    """JSON text of `document`, big integers included (orjson stops at 64 bits)."""
    try:
        return orjson.dumps(document)
    except TypeError:
        return json.dumps(document).encode()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _mutate(document: Any, rng: random.Random, depth: int = 0) -> Any:
    """`document` (JSON-like) with one thing changed somewhere: a key removed or renamed, a
    value replaced by an odd one, a list emptied, grown or truncated."""
    if isinstance(document, dict) and document and rng.random() < 0.8:
        key = rng.choice(list(document))
        changed = dict(document)
        roll = rng.random()
        if roll < 0.2:
            del changed[key]
        elif roll < 0.3:
            changed[key + "_"] = changed.pop(key)
        elif roll < 0.6 or depth > 6:
            changed[key] = rng.choice(ODD_VALUES)
        else:
            changed[key] = _mutate(changed[key], rng, depth + 1)
        return changed
    if isinstance(document, list) and document and rng.random() < 0.8:
        changed = list(document)
        roll = rng.random()
        if roll < 0.2:
            return changed[: rng.randrange(len(changed))]
        if roll < 0.35:
            return changed * rng.choice([2, 3])
        index = rng.randrange(len(changed))
        changed[index] = rng.choice(ODD_VALUES) if roll < 0.6 else _mutate(
            changed[index], rng, depth + 1)
        return changed
    return rng.choice(ODD_VALUES)


def _control_cases(rng: random.Random, token: str
                   ) -> Callable[[], tuple[str, str, bytes, dict[str, str]]]:
    """Malformed control-plane requests: odd ids, bodies, queries and ranges on the
    registry, enrolment, introspection and sign-in routes, with the operator's token (so
    they reach the routes' own checks) or an odd credential."""
    auth = {"authorization": f"Bearer {token}"}
    odd_ids = ["", ".", "..", "a/b", "%00", "%2e%2e", "[/]", "%1B[31m", "a" * 300, "ü",
               "introspect", "cam-1"]
    odd_bodies = [b"", b"{", b"[]", b"null", b'{"role": 7}', b'{"role": "god"}',
                  b'{"overlap_s": -1}', b'{"overlap_s": 1e400}', b'{"overlap_s": true}',
                  b"token=", b"token=" + b"a" * 5000, b"\xff\xfe", b"a" * 10_000]

    def one() -> tuple[str, str, bytes, dict[str, str]]:
        body = rng.choice(odd_bodies)
        headers = dict(auth) if rng.random() < 0.8 else {
            "authorization": rng.choice(["Bearer", "bearer x", "Basic abc", b"Bearer \xff",
                                         "bearer " + token])}
        name = rng.choice(odd_ids)
        query = rng.choice(["", "?device=", f"?device={name}", "?device=a&device=b",
                            "?device=%ff"])
        ranges = ["bytes=0-", "bytes=-5", "bytes=5-1", "bytes=0-1,2-3", "bytes=x-",
                  "bytes=99999999999999999999-", "items=0-"]
        form = {**headers, "content-type": "application/x-www-form-urlencoded"}
        return rng.choice([
            ("POST", f"/devices/v1/{name}", body, headers),
            ("POST", f"/devices/v1/{name}/rotate", body, headers),
            ("DELETE", f"/devices/v1/{name}", body, headers),
            ("POST", "/devices/v1/introspect", body, form),
            ("POST", "/dashboard/login", body, form),
            ("GET", f"/registry/v1/deployments/{rng.choice(['stable', 'x', ''])}{query}", b"",
             headers),
            ("GET", f"/registry/v1/blobs/sha256/{rng.choice(['0' * 64, name])}", b"",
             {**headers, "range": rng.choice(ranges)}),
        ])
    return one


def _oip_cases(rng: random.Random, images: np.ndarray) -> Callable[[], tuple[str, bytes,
                                                                             dict[str, str]]]:
    json_body, _ = encode_infer_request({"image": images[:2]}, binary=False)
    template = orjson.loads(json_body)
    binary_body, binary_headers = encode_infer_request({"image": images[:2]}, binary=True)
    length = int(binary_headers[HEADER_LENGTH])
    header = orjson.loads(binary_body[:length])
    tail = binary_body[length:]
    paths = [f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/1/infer",
             "/v2/models/" + "x" * 3000 + "/infer", "/v2/models/%00/infer",
             "/v2/models/../../etc/passwd/infer", f"/v2/models/{MODEL}/versions/-1/infer",
             "/v2/repository/index", "/v2/models/\u00fc/infer"]

    def case() -> tuple[str, bytes, dict[str, str]]:
        path = paths[0] if rng.random() < 0.8 else rng.choice(paths)
        kind = rng.random()
        if kind < 0.45:  # a JSON request with something wrong in it
            document = copy.deepcopy(template)
            for _ in range(rng.randint(1, 3)):
                document = _mutate(document, rng)
            return path, _dumps(document), {"content-type": "application/json"}
        if kind < 0.75:  # a binary request: its JSON header, its sizes or its data
            changed = _mutate(copy.deepcopy(header), rng) if rng.random() < 0.6 else header
            text = _dumps(changed)
            data = tail[: rng.randrange(len(tail) + 1)] if rng.random() < 0.4 else tail
            declared = rng.choice([str(len(text)), "-5", "abc", str(len(text) + 7), "0",
                                   str(10**12)]) if rng.random() < 0.4 else str(len(text))
            return path, text + data, {HEADER_LENGTH: declared,
                                       "content-type": "application/octet-stream"}
        if kind < 0.85:  # a codec payload that is not what it says
            codec = rng.choice(["png", "jpeg-q90", "webp-q80", "zstd", "fp16-zstd",
                                "int8-zstd", "nope", "raw"])
            payloads = [rng.randbytes(rng.choice([0, 10, 900, 5000])) for _ in range(2)]
            body, headers = encode_infer_request(
                {"image": np.array(payloads, dtype=object)}, binary=True,
                input_parameters={"image": {"content_type": codec}})
            return path, body, headers
        if kind < 0.93:  # bytes that are no request at all, maybe "compressed"
            body = rng.randbytes(rng.choice([0, 1, 50, 4000]))
            headers = {"content-type": rng.choice(["application/json", "text/plain",
                                                   "application/octet-stream"])}
            if rng.random() < 0.5:
                headers["content-encoding"] = rng.choice(["gzip", "deflate", "br", "zstd"])
                if rng.random() < 0.5:
                    body = gzip.compress(body)[: rng.randrange(1, 40)]
            return path, body, headers
        # a gzip bomb: 10 MB of zeros in ~10 KB
        return path, gzip.compress(b"0" * 10_000_000), {"content-type": "application/json",
                                                        "content-encoding": "gzip"}
    return case


def test_thousands_of_malformed_requests_get_no_5xx_and_leave_the_server_well(
        cloud_config: Config, models_dir: Path, splits: Any, tmp_path: Path) -> None:
    config = cloud_config
    Registry(config.registry_dir).rollouts()  # an index: the registry routes are ready
    token = registry_token("", config.registry_dir)
    config_path = str(write_config(config, tmp_path / "tierwise.toml"))
    rng = random.Random(SEED)
    images = splits.test_x[:2]
    trace = {"id": "a" * 32, "plan": "local(m)", "started_at": 1.7e9, "total_ms": 1.0,
             "stages": [{"kind": "local", "tier": "device", "model": "m", "model_version": "1",
                         "total_ms": 1.0, "compute_ms": 1.0}],
             "slo": {"deadline_ms": 100.0, "min_accuracy": 0.5}, "emulated": []}
    port = free_port()
    statuses: Counter[int] = Counter()
    fives: list[str] = []
    with tier_server("cloud", models_dir, port=port, config_path=config_path) as url, \
            httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        pid = child_pid_on_port(port)
        assert pid is not None
        valid, valid_headers = encode_infer_request({"image": images}, binary=True)
        for _ in range(200):  # warm: what it holds serving good requests
            assert http.post(f"/v2/models/{MODEL}/infer", content=valid,
                             headers=valid_headers).status_code == 200
        idle_kib = _rss_kib(pid)
        oip = _oip_cases(rng, images)
        control = _control_cases(rng, token)
        for index in range(REQUESTS):
            method = "POST"
            if index % 5 == 4:  # a trace batch with something wrong in it
                batch = _mutate({"device": "fuzz", "traces": [trace, trace]}, rng)
                path, body = "/telemetry/v1/traces", _dumps(batch)
                headers = {"authorization": f"Bearer {token}",
                           "content-type": "application/json"}
            elif index % 5 == 3:  # the control plane's other routes
                method, path, body, headers = control()
            else:
                path, body, headers = oip()
            answer = http.request(method, path, content=body, headers=headers)
            statuses[answer.status_code] += 1
            if answer.status_code >= 500:
                fives.append(f"{method} {path} {headers} {body[:120]!r} -> {answer.status_code} "
                             f"{answer.text[:200]}")
        after_kib = _rss_kib(pid)
        assert http.get("/v2/health/ready").status_code == 200
        assert http.post(f"/v2/models/{MODEL}/infer", content=valid,
                         headers=valid_headers).status_code == 200
    print(f"{REQUESTS} malformed requests: statuses {dict(sorted(statuses.items()))}; server "
          f"RSS {idle_kib / 1024:.0f} MiB idle -> {after_kib / 1024:.0f} MiB after")
    assert not fives, "\n".join(fives[:10])
    assert after_kib < 2 * idle_kib
