from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierwise.bench.processes import free_port, tier_server
from tierwise.client import Client
from tierwise.config import Config
from tierwise.data import Splits
from tierwise.planner.plans import Local, Remote
from tierwise.profile.calibration import softmax
from tierwise.runtime.session import load_models


@pytest.fixture(scope="module")
def edge_url(models_dir: Path) -> Iterator[str]:
    with tier_server("edge", models_dir) as url:
        yield url


def test_local_and_remote_answer_like_in_process_onnxruntime(
    small_config: Config, models_dir: Path, splits: Splits, edge_url: str
) -> None:
    images = splits.test_x[:20]
    reference = load_models(models_dir, names=["fmnist-device", "fmnist-edge"])
    with Client(small_config, tier_urls={"edge": edge_url}) as client:
        for plan, name in ((Local("fmnist-device"), "fmnist-device"),
                           (Remote("edge", "fmnist-edge"), "fmnist-edge")):
            expected = softmax(reference[name].run(images), reference[name].info.temperature)
            for image, probs in zip(images, expected, strict=True):
                result = client.infer(image, plan)
                np.testing.assert_allclose(result.probabilities, probs, atol=1e-5)
                assert result.label == int(probs.argmax())


def test_remote_trace_records_tier_time_bytes_and_cost(
    small_config: Config, splits: Splits, edge_url: str
) -> None:
    with Client(small_config, tier_urls={"edge": edge_url}) as client:
        trace = client.infer(splits.test_x[0], Remote("edge", "fmnist-edge")).trace
    (stage,) = trace.stages
    assert stage.kind == "remote" and stage.tier == "edge" and stage.error is None
    assert stage.model_version == "1"
    assert stage.bytes_up > 784 and stage.bytes_down > 40  # the binary image, the logits
    assert stage.compute_ms > 0 and stage.total_ms >= stage.compute_ms
    # the emulated edge link: 2 MB/s up and a 4 ms RTT cannot be beaten
    assert stage.total_ms >= small_config.links["edge"].rtt_ms
    assert trace.cost_usd > 0 and trace.fallback is None
    assert any("link device->edge: emulated" in label for label in trace.emulated)


def test_unreachable_tier_falls_back_to_the_device(small_config: Config, splits: Splits) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with Client(small_config, tier_urls={"cloud": dead}, timeout_s=2.0) as client:
        result = client.infer(splits.test_x[0], Remote("cloud", "fmnist-cloud"))
        local = client.infer(splits.test_x[0], Local("fmnist-device"))
    assert result.trace.fallback is not None and "cloud failed" in result.trace.fallback
    assert [s.tier for s in result.trace.stages] == ["cloud", "device"]
    assert result.trace.stages[0].error is not None
    assert result.label == local.label


def test_device_compute_scale_is_emulated(small_config: Config, splits: Splits) -> None:
    slow = small_config.model_copy(deep=True)
    slow.tiers["device"].compute_scale = 50.0
    with Client(slow) as client:
        stage = client.infer(splits.test_x[0], Local("fmnist-device")).trace.stages[0]
        labels = client.emulation_labels()
    assert stage.total_ms >= stage.compute_ms * 0.9
    assert any("device compute: emulated at 50x" in label for label in labels)


def test_bad_image_is_refused_clearly(small_config: Config) -> None:
    with Client(small_config) as client:
        with pytest.raises(TypeError, match="expected dtype uint8"):
            client.infer(np.zeros((28, 28), dtype=np.float32))
        with pytest.raises(ValueError, match=r"expected one sample of image: UINT8 \[\?, 1, "
                                             r"28, 28\]"):
            client.infer(np.zeros((2, 1, 28, 28), dtype=np.uint8))
        # a 29x28 image: refused before anything runs, not deep inside ONNX Runtime
        with pytest.raises(ValueError, match=r"got shape \[29, 28\]"):
            client.infer(np.zeros((29, 28), dtype=np.uint8))
