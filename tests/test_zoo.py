import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from tierwise.data import Splits
from tierwise.models.store import METADATA_FILE, list_models, sha256_file
from tierwise.runtime.session import load_models


def test_zoo_has_three_calibrated_block_models(models_dir: Path) -> None:
    found = {name: entry for name, entry in list_models(models_dir).items()
             if entry[0].role == "full"}  # the rest are split heads and tails
    assert set(found) == {"fmnist-device", "fmnist-edge", "fmnist-cloud"}
    device, edge, cloud = (found[f"fmnist-{a}"][0] for a in ("device", "edge", "cloud"))
    assert device.parameters <= 100_000 < edge.parameters < cloud.parameters
    for info, path in found.values():
        assert info.trained is not None
        blocks = info.trained.blocks
        assert len(blocks) >= 4 and blocks[0] == "stem"
        # imported like any model: the block boundaries are the split candidates, each a cut
        # point the graph analysis finds, and the task and labels are set
        assert len(info.cuts) == len(blocks) - 1
        assert info.task == "classification" and len(info.labels) == 10
        assert info.runs_on == [info.name.removeprefix("fmnist-")]
        assert info.inputs[0].datatype == "UINT8" and info.inputs[0].shape == [-1, 1, 28, 28]
        assert info.bytes == path.stat().st_size and info.sha256 == sha256_file(path)
        assert 0.05 < info.temperature < 20
        assert 0.5 < info.trained.test_accuracy <= 1.0  # 4k images: well above chance
        metadata = json.loads((path.parent / METADATA_FILE).read_text())
        assert metadata["calibration"]["temperature"] == info.temperature


def test_onnx_files_are_self_contained_with_dynamic_batch(models_dir: Path, splits: Splits) -> None:
    for name, model in load_models(models_dir).items():
        if model.info.role != "full":
            continue  # split heads and tails: tests/test_planner.py
        graph = onnx.load(str(model.path), load_external_data=False)
        assert not any(init.external_data for init in graph.graph.initializer), name
        assert model.session.get_inputs()[0].shape[0] == "batch"
        one = model.run(splits.test_x[:1])
        seven = model.run(splits.test_x[:7])
        assert one.shape == (1, 10) and seven.shape == (7, 10)
        np.testing.assert_allclose(one[0], seven[0], rtol=1e-4, atol=1e-4)


def test_device_sdk_and_server_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import tierwise, tierwise.client, tierwise.server.app, tierwise.protocol.oip\n"
        "from tierwise import Client\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
