"""Federated learning end to end: a real Flower SuperLink, SuperNodes and warm SuperExecs as
processes on loopback, each client behind its own shaping proxy at the default emulated rates
(250 KB/s up, 500 KB/s down), real Fashion-MNIST partitions, the real CNN."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tierwise.config import DEVICE_TIER, Config, config_from_dict
from tierwise.data.fashion_mnist import load_fashion_mnist
from tierwise.learn.federation import (
    MODEL_NAME,
    Federation,
    FederationError,
    Schedule,
    run_federation,
)
from tierwise.learn.flower_app import client_data
from tierwise.learn.model import fedavg_cnn
from tierwise.learn.partition import partition
from tierwise.learn.publish import export_global, push_global
from tierwise.registry.signing import keygen
from tierwise.registry.store import Registry

FLOAT_MODEL_BYTES = 4 * sum(p.numel() for p in fedavg_cnn().parameters())


def _config(tmp_path: Path, **fl: object) -> Config:
    return config_from_dict({"data_dir": str(tmp_path / "data"), "fl": {
        "local_steps": 5, "eval_images": 500, "compressor": "topk:0.01+q8", "downlink": "q8",
        "round_deadline_s": 60, **fl}})


def _uplink_tap() -> tuple[bytearray, Callable[[str, bytes], None]]:
    """(what a client sends, the proxy tap that records it)."""
    uplink = bytearray()
    lock = threading.Lock()

    def tap(direction: str, data: bytes) -> None:
        if direction == "up":
            with lock:
                uplink.extend(data)
    return uplink, tap


def test_three_clients_two_rounds_over_real_processes_then_a_registry_version(tmp_path):
    config = _config(tmp_path, clients=3, rounds=2)
    uplink, tap = _uplink_tap()
    summary = run_federation(config, tmp_path / "run", taps={0: tap}, timeout_s=400)

    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["answered"] == 3 and r["aggregated"] for r in rounds)
    assert all(r["answered_clients"] == [0, 1, 2] for r in rounds)
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.1
    # bytes on the wire: the proxies' counts, and compression shows in them
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rounds)
    per_update = rounds[1]["bytes_up"] / 3
    assert 16_000 < per_update < FLOAT_MODEL_BYTES / 20  # >= 1% of values, 1 B each, and small
    assert rounds[1]["bytes_down"] / 3 > FLOAT_MODEL_BYTES / 4 * 0.95  # the 8-bit global model
    assert summary["emulated"] is True and "250KB/s" in summary["links"]

    # no raw sample left client 0: none of its training images is in what it sent up
    images, labels = client_data("", config.data.validation_size, config.data.seed)
    mine = partition(labels, 3, "dirichlet", alpha=0.5, seed=0).parts[0]
    sent = bytes(uplink)
    assert len(sent) > 2 * 16_000  # we inspected the real updates
    rng = np.random.default_rng(0)
    for index in rng.choice(mine, 300, replace=False):
        assert images[index].tobytes() not in sent

    # the global model as an ONNX device model, then a signed registry version
    info = export_global(config, Path(summary["weights"]), config.models_dir, MODEL_NAME,
                         {"rounds": 2.0})
    session = ort.InferenceSession(str(config.models_dir / MODEL_NAME / "model.onnx"))
    test_x, test_y = load_fashion_mnist(None, "test")
    logits = session.run(None, {"image": test_x})[0]
    onnx_accuracy = float((logits.argmax(1) == test_y).mean())
    assert abs(onnx_accuracy - summary["final_accuracy"]) < 0.002
    assert info.training_record().test_accuracy == pytest.approx(onnx_accuracy, abs=0.002)
    # its torch weights are kept, so active learning can fine-tune it (`learn retrain`)
    from tierwise.zoo.build import load_trained

    module, _ = load_trained(config.models_dir, MODEL_NAME)
    with torch.inference_mode():
        again = module(torch.from_numpy(np.ascontiguousarray(test_x[:64]))).numpy()
    np.testing.assert_allclose(again, logits[:64], rtol=1e-3, atol=1e-3)

    assert push_global(config, config.models_dir, MODEL_NAME) is None  # no registry yet
    keygen(config.registry_dir / "keys")
    pushed = push_global(config, config.models_dir, MODEL_NAME)
    assert pushed is not None and pushed["version"] == 1 and pushed["channel"] == "stable"
    (version,) = Registry(config.registry_dir).versions(MODEL_NAME)
    assert version["runs_on"] == [DEVICE_TIER]
    assert version["test_accuracy"] == pytest.approx(onnx_accuracy, abs=0.002)


def test_a_killed_client_neither_hangs_nor_corrupts_a_round_and_a_late_client_joins(tmp_path):
    deadline = 25.0
    config = _config(tmp_path, clients=4, rounds=3, round_deadline_s=deadline,
                     min_fraction=0.5)
    summary = run_federation(config, tmp_path / "run", Schedule(kill={1: 2}, join={3: 2}),
                             timeout_s=400)
    first, second, third = summary["rounds"]
    assert first["answered_clients"] == [0, 1, 2]  # client 3 not started yet
    # round 2: client 1 dies a second in, after it was sent the round's work; the round
    # closes at its deadline, without it
    assert 1 in second["sent_clients"] and 1 not in second["answered_clients"]
    assert second["aggregated"] and second["answered"] >= 2
    # client 1 was sent round 2's work and never answered: the round either waited for it
    # until the deadline or got Flower's error reply for the dead node
    assert second["answered"] < second["sent"]
    assert second["failed"] or second["round_s"] >= deadline - 1
    assert second["round_s"] < deadline + 5
    # round 3: the dead client gets no more work; the late one answers
    assert 3 in third["answered_clients"] and 1 not in third["answered_clients"]
    assert third["aggregated"]
    # the aggregate was not corrupted by the lost update
    assert np.isfinite(summary["final_loss"])
    assert summary["final_accuracy"] > first["accuracy"] - 0.05
    clients = {c["client"]: c for c in summary["clients"]}
    assert clients[1]["killed_at_round"] == 2 and clients[3]["joined_at_round"] == 2


def test_a_schedule_naming_a_client_that_does_not_exist_is_refused(tmp_path):
    with pytest.raises(FederationError, match="kill 7@1"):
        run_federation(_config(tmp_path, clients=3, rounds=1), tmp_path / "run",
                       Schedule(kill={7: 1}))


def test_a_server_app_that_dies_before_writing_is_reported_not_waited_on(tmp_path):
    config = _config(tmp_path, clients=2, rounds=1)
    with Federation(config, tmp_path / "run") as federation:
        federation.submit({"no": "progress file named"})  # main() fails on its first line
        with pytest.raises(FederationError, match="ended without a result"):
            federation.follow(tmp_path / "run" / "progress.jsonl", timeout_s=180)


def test_flower_links_run_over_tls_when_the_config_has_certificates(tmp_path):
    from tierwise.net.tls import init_certs

    issued = init_certs(tmp_path / "certs", ["127.0.0.1", "localhost"], [])
    config = _config(tmp_path, clients=2, rounds=1)
    config.tls.ca, config.tls.cert, config.tls.key = (
        str(issued.ca), str(issued.server_cert), str(issued.server_key))
    uplink, tap = _uplink_tap()
    summary = run_federation(config, tmp_path / "run", taps={0: tap}, timeout_s=300)
    (round_,) = summary["rounds"]
    assert round_["answered"] == 2 and round_["aggregated"]
    sent = bytes(uplink)
    # what client 0 put on the wire is TLS records (a handshake first), never plaintext
    # HTTP/2 (gRPC's connection preface)
    assert sent[:1] == b"\x16" and sent[1:3] in (b"\x03\x01", b"\x03\x03"), sent[:8]
    assert b"PRI * HTTP/2.0" not in sent and len(sent) > 16_000


def test_flower_tls_needs_the_ca_and_the_key_too(tmp_path):
    config = _config(tmp_path, clients=2, rounds=1)
    config.tls.cert = str(tmp_path / "server.pem")
    with pytest.raises(FederationError, match=r"tls\.ca"):
        Federation(config, tmp_path / "run")
