"""Active learning on the device, end to end: samplers select, the sample queue keeps, the
budget releases, the cloud's label queue stores, across a device restart and a cloud outage;
and nothing unselected crosses the wire."""

from __future__ import annotations

import base64
import io
import re
import sqlite3
import threading
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tierwise.active.labels import LabelStore
from tierwise.active.samplers import Entropy, Margin
from tierwise.bench.processes import free_port, tier_server
from tierwise.client import Client
from tierwise.config import Config, write_config
from tierwise.data import Splits
from tierwise.net.proxy import ShapingProxy
from tierwise.planner.plans import Local
from tierwise.protocol.samples import encode_sample
from tierwise.registry.subscriber import registry_token
from waiting import wait_for

DEVICE = "fmnist-device"


@pytest.fixture
def config(cloud_config: Config) -> Config:
    config = cloud_config.model_copy(deep=True)
    config.active.samplers = ["margin"]
    config.active.min_score = 0.6
    config.active.flush_s = 0.1
    config.active.max_samples = 1000
    config.active.max_bytes = 10_000_000
    config.active.period = "hour"
    return config


def _npy(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(image), allow_pickle=False)
    return buffer.getvalue()


def _client(config: Config, models_dir: Path, url: str, device_id: str) -> Client:
    return Client(config, models_dir=models_dir, collector_url=url, device_id=device_id,
                  plan=Local(DEVICE), probe=False, drift=False, active=True)


def test_selected_samples_reach_the_label_queue_across_a_restart_and_an_outage(
        config: Config, models_dir: Path, splits: Splits, tmp_path: Path) -> None:
    config_path = str(write_config(config, tmp_path / "tierwise.toml"))
    port = free_port()
    wire = bytearray()
    lock = threading.Lock()

    def tap(direction: str, data: bytes) -> None:
        if direction == "up":
            with lock:
                wire.extend(data)

    images = splits.test_x[:160]
    traces: list[str] = []
    observations = {}
    with ShapingProxy(("127.0.0.1", port), None, None, tap=tap) as proxy:
        url = f"http://127.0.0.1:{proxy.address[1]}"
        # the cloud is down: the device answers, selects, and keeps what it selected on disk
        with _client(config, models_dir, url, "al-device") as client:
            assert client.sampling is not None
            traces += [client.infer(image).trace.id for image in images[:100]]
            observations.update({o.trace_id: o for o in client.observations()})
            wait_for(lambda: client.sampling.last_error is not None, what="a failed send")
            queued_before_restart = client.sampling.queue.backlog()
            assert queued_before_restart == client.sampling.selected > 0
        # the device restarts (a new client, the same id and data directory): nothing lost
        with _client(config, models_dir, url, "al-device") as client:
            assert client.sampling is not None
            assert client.sampling.queue.backlog() == queued_before_restart
            traces += [client.infer(image).trace.id for image in images[100:]]
            observations.update({o.trace_id: o for o in client.observations()})
            with tier_server("cloud", models_dir, port=port, config_path=config_path):
                wait_for(lambda: client.sampling.queue.backlog() == 0, timeout_s=60,
                         what="the queue sent")
                token = registry_token("", config.registry_dir)
                summary = httpx.get(f"{url}/active/v1/summary", trust_env=False,
                                    headers={"authorization": f"Bearer {token}"}).json()
            stats = client.sampling.stats()

    # what a sampler selected, recomputed here from what the device saw: exactly that arrived
    selected = {trace for trace in traces if Margin().score(observations[trace]) >= 0.6}
    print(f"selected {len(selected)} of {len(traces)}; {stats}")
    assert 0 < len(selected) < len(traces)
    store = LabelStore(config.active.label_root(config.data_dir))
    items = store.items()
    assert {item.trace_id for item in items} == selected  # zero lost, none extra
    assert {item.sampler for item in items} == {"margin"}
    assert all(item.model == DEVICE and item.state == "candidate" for item in items)
    sizes = {item.trace_id: item.bytes for item in items}
    assert summary["uploads"] == {"al-device": {"samples": len(selected),
                                                "bytes": sum(sizes.values())}}
    assert summary["samples"]["candidate"] == len(selected)
    # each stored sample is the very input the device was given
    by_trace = dict(zip(traces, images, strict=True))
    for item in items:
        np.testing.assert_array_equal(store.array(item.id), by_trace[item.trace_id])

    # on the wire: the digests sent are the selected samples', and no unselected input crossed
    sent = bytes(wire)
    digests = set(re.findall(rb'"sha256":"([0-9a-f]{64})"', sent))
    assert {digest.decode() for digest in digests} == {item.id for item in items}
    for trace, image in by_trace.items():
        encoded = base64.b64encode(_npy(image))
        assert (encoded in sent) == (trace in selected), trace


def test_the_budget_sends_the_highest_scores_first_and_holds_the_rest(
        config: Config, models_dir: Path, splits: Splits) -> None:
    from tierwise.cloud import hosted
    from tierwise.server.app import TierServer, serve_in_thread

    config.active.samplers = ["entropy"]
    config.active.min_score = 0.0  # every input a candidate: the budget alone decides
    config.active.max_samples = 12
    config.active.flush_s = 3600  # sent below, once every input is queued
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url, _client(config, models_dir, url, "budget-1") as client:
        assert client.sampling is not None
        traces = [client.infer(image).trace.id for image in splits.test_x[:80]]
        observations = {o.trace_id: o for o in client.observations()}
        assert client.sampling.flush() and client.sampling.sent_samples == 12
        client.sampling.flush()  # nothing more is due within the window
        assert client.sampling.sent_samples == 12
        assert client.sampling.queue.backlog() == 80 - 12
        sent_bytes = client.sampling.sent_bytes
        exposed = client.metrics.exposition().decode()
        assert "tierwise_client_samples_sent_total 12.0" in exposed
        assert f"tierwise_client_sample_bytes_sent_total {float(sent_bytes)}" in exposed
    scores = sorted(((Entropy().score(observations[t]), t) for t in traces), reverse=True)
    store = LabelStore(config.active.label_root(config.data_dir))
    assert {item.trace_id for item in store.items()} == {t for _, t in scores[:12]}
    assert store.uploads()["budget-1"] == {"samples": 12, "bytes": sent_bytes}

    # a byte budget: as many as fit
    one = len(_npy(splits.test_x[0]))
    config.active.max_samples = 1000
    config.active.max_bytes = 3 * one + one // 2
    with serve_in_thread(app) as url, _client(config, models_dir, url, "budget-2") as client:
        assert client.sampling is not None
        for image in splits.test_x[:20]:
            client.infer(image)
        client.sampling.flush()
        client.sampling.flush()
        assert client.sampling.sent_samples == 3 and client.sampling.sent_bytes == 3 * one


def test_feedback_selects_what_users_called_wrong_and_its_verdicts_reach_the_cloud(
        config: Config, models_dir: Path, splits: Splits) -> None:
    from tierwise.cloud import hosted
    from tierwise.server.app import TierServer, serve_in_thread

    config.active.samplers = ["feedback"]
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url, _client(config, models_dir, url, "fb-device") as client:
        assert client.sampling is not None
        results = [client.infer(image) for image in splits.test_x[:20]]
        client.sampling.flush()
        assert client.sampling.sent_samples == 0  # nothing said yet: nothing selected
        wrong = results[:3]
        for result in wrong:
            client.feedback(result.trace.id, label=(int(result.label) + 1) % 10)
        for result in results[3:5]:
            client.feedback(result.trace.id, correct=True)
        assert client.sampling.flush()
        assert client.sampling.sent_samples == 3
    store = LabelStore(config.active.label_root(config.data_dir))
    items = {item.trace_id: item for item in store.items()}
    assert set(items) == {result.trace.id for result in wrong}
    for result in wrong:
        item = items[result.trace.id]
        assert item.sampler == "feedback" and item.feedback_correct is False
        assert item.feedback_label == (int(result.label) + 1) % 10
    assert store.feedback(DEVICE) == {results[0].trace.answered_by.model_version:
                                      {"correct": 2, "wrong": 3}}


def test_bad_uploads_are_refused_whole_and_a_resend_is_stored_once(
        config: Config, splits: Splits) -> None:
    from tierwise.cloud import hosted
    from tierwise.server.app import TierServer, serve_in_thread

    digest, data = encode_sample(splits.test_x[0])
    good = {"trace_id": "t1", "sampler": "margin", "score": 0.9, "model": DEVICE,
            "model_version": "1", "device_label": 3, "classes": 10, "sha256": digest,
            "data": data}
    token = registry_token("", config.registry_dir)
    auth = {"authorization": f"Bearer {token}"}
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)

    def upload(http: httpx.Client, *samples: dict, device: str = "up-device",
               headers: dict | None = None) -> httpx.Response:
        return http.post("/active/v1/samples", headers=auth if headers is None else headers,
                         content=orjson.dumps({"device": device, "samples": list(samples)}))

    with serve_in_thread(app) as url, httpx.Client(base_url=url, trust_env=False) as http:
        cases = {
            "samples[1].sha256": {**good, "trace_id": "t2", "sha256": "0" * 64},
            "samples[1].data: not base64": {**good, "trace_id": "t2", "data": "@@@"},
            "samples[1].device_label: 12 is not one of the model's 10 classes":
                {**good, "trace_id": "t2", "device_label": 12},
            "samples[1].score": {**good, "trace_id": "t2", "score": 1.5},
        }
        for expected, bad in cases.items():
            answer = upload(http, good, bad)
            assert answer.status_code == 400 and expected in answer.json()["error"], \
                answer.text
        pickled = base64.b64encode(b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': "
                                   b"False, 'shape': (1,), }" + b" " * 40 + b"\n").decode()
        answer = upload(http, {**good, "trace_id": "t3", "data": pickled, "sha256":
                               __import__("hashlib").sha256(base64.b64decode(pickled))
                               .hexdigest()})
        assert answer.status_code == 400 and "samples[0].data" in answer.json()["error"]
        assert upload(http, good, headers={}).status_code == 401
        assert http.post("/active/v1/samples", headers=auth, content=b"{").status_code == 400
        store = LabelStore(config.active.label_root(config.data_dir))
        assert store.items() == []  # nothing of a refused upload was kept
        assert upload(http, good).json() == {"accepted": 1, "duplicates": 0}
        assert upload(http, good).json() == {"accepted": 0, "duplicates": 1}  # answer lost
        # the same content from another trace: counted as sent, stored once
        assert upload(http, {**good, "trace_id": "t9"}).json() == {"accepted": 0,
                                                                   "duplicates": 1}
        assert "tierwise_active_samples_received_total" in http.get("/metrics").text
    assert len(store.items()) == 1
    assert store.uploads()["up-device"]["samples"] == 2


def test_a_device_cannot_upload_as_another(config: Config, splits: Splits) -> None:
    from tierwise.cloud import cloud_credentials, hosted
    from tierwise.server.app import TierServer, serve_in_thread

    credentials = cloud_credentials(config)
    token = credentials.enroll("cam-1", "device")
    digest, data = encode_sample(splits.test_x[0])
    sample = {"trace_id": "t1", "sampler": "margin", "score": 0.5, "model": DEVICE,
              "classes": 10, "sha256": digest, "data": data}
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config, credentials)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, trust_env=False) as http:
        headers = {"authorization": f"Bearer {token}"}
        for device, status in (("cam-2", 403), ("cam-1", 200)):
            answer = http.post("/active/v1/samples", headers=headers, content=orjson.dumps(
                {"device": device, "samples": [sample]}))
            assert answer.status_code == status, answer.text


def test_sampling_never_costs_an_answer_and_keeps_what_requests_keep_on_the_device(
        config: Config, models_dir: Path, splits: Splits) -> None:
    config.active.samplers = ["random"]
    config.active.min_score = 0.0  # every input selected, unless the request forbids it
    config.active.keep_inputs = 2
    with _client(config, models_dir, "", "private-1") as client:
        assert client.sampling is not None
        for image in splits.test_x[:5]:
            client.infer(image, keep_input_on_device=True)
            client.infer(image, regions={"eu-west"})
        assert client.sampling.selected == 0 and client.sampling.queue.backlog() == 0
        first = client.infer(splits.test_x[0])
        for image in splits.test_x[1:5]:
            client.infer(image)
        assert client.sampling.selected == 5
        # feedback on an inference whose input is no longer held: its verdict still counts
        client.feedback(first.trace.id, correct=False)
        verdicts = client.sampling.queue.feedback_due()
        assert [v["trace_id"] for v in verdicts] == [first.trace.id]
        assert verdicts[0]["correct"] is False and verdicts[0]["model"] == DEVICE
        # the queue's file is gone and a directory is in its way: answers still come
        path = client.sampling.queue.path
        path.unlink()
        path.mkdir()
        result = client.infer(splits.test_x[7])
        assert result.label is not None
        assert client.sampling.errors >= 1 and "sample queue" in client.sampling.last_error
        client.feedback(result.trace.id, correct=True)  # no exception either
        path.rmdir()


def test_a_sample_the_cloud_refuses_is_set_aside_and_the_rest_still_go(
        config: Config, models_dir: Path, splits: Splits) -> None:
    from tierwise.active.samplers import Observation
    from tierwise.cloud import hosted
    from tierwise.server.app import TierServer, serve_in_thread

    config.active.samplers = ["random"]
    config.active.min_score = 0.0
    config.active.flush_s = 3600
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url, _client(config, models_dir, url, "refusal-1") as client:
        assert client.sampling is not None
        for image in splits.test_x[:4]:
            client.infer(image)
        # a sample whose answer is not one of its model's classes: the cloud refuses it
        bad = Observation("bad-trace", device_label=12, classes=10)
        assert client.sampling.queue.offer(bad, splits.test_x[9], "random", 1.0, model=DEVICE)
        assert client.sampling.flush()
        assert client.sampling.refused == 1 and client.sampling.sent_samples == 4
        assert client.sampling.queue.backlog() == 0
        with sqlite3.connect(client.sampling.queue.path) as db:
            (reason,) = db.execute("SELECT reason FROM refused WHERE trace_id = 'bad-trace'"
                                   ).fetchone()
        assert "400" in reason and "samples[0].device_label" in reason  # kept, with why
        # refused for good: offered again, it is not queued again
        assert not client.sampling.queue.offer(bad, splits.test_x[9], "random", 1.0)
    store = LabelStore(config.active.label_root(config.data_dir))
    assert len(store.items()) == 4 and "bad-trace" not in {i.trace_id for i in store.items()}
