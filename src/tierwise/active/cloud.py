"""What the cloud computes over the label queue: embeddings for the core-set sampler, and
the oracle that labels from a dataset's ground truth (benchmarks only).

Embeddings are the device model's own features: the activations at its last cut point (the
tensor before its classifier head, for the zoo's models; Sener & Savarese take the last
hidden layer the same way), flattened, from its ONNX graph with that tensor made an extra
output. A model without cut points falls back to its output (logits), which still separates
what the model tells apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tierwise.models.inputs import as_batch
from tierwise.models.store import MODEL_FILE, load_info, model_dir


def model_embeddings(models_dir: Path, model: str) -> Callable[[list[np.ndarray]], np.ndarray]:
    """A function from samples (each as the device got it) to float32 [n, d] embeddings by
    `model` in `models_dir`."""
    import onnx
    import onnxruntime as ort

    from tierwise.models.graph import value_infos

    info = load_info(model_dir(models_dir, model))
    graph = onnx.load(str(model_dir(models_dir, model) / MODEL_FILE))
    outputs = [output.name for output in graph.graph.output]
    feature = info.cuts[-1].tensor if info.cuts else outputs[0]
    if feature not in outputs:
        graph.graph.output.append(value_infos(graph).get(feature) or
                                  onnx.helper.make_empty_tensor_value_info(feature))
    session = ort.InferenceSession(graph.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def embed(samples: list[np.ndarray]) -> np.ndarray:
        if not samples:
            return np.zeros((0, 1), dtype=np.float32)
        rows = []
        batch_size = 256 if info.batched else 1
        inputs = np.concatenate([as_batch(info, sample) for sample in samples])
        for start in range(0, len(inputs), batch_size):
            (features,) = session.run([feature], {input_name: inputs[start:start + batch_size]})
            rows.append(np.asarray(features, dtype=np.float32).reshape(len(features), -1))
        return np.concatenate(rows)

    return embed


def pixel_key(array: np.ndarray) -> str:
    """What the oracle knows an image by: the sha256 of its pixels as uint8, whatever shape
    the device gave it in ([28, 28], [1, 28, 28]...)."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.uint8).tobytes()).hexdigest()


def dataset_oracle(images: np.ndarray, labels: np.ndarray
                   ) -> Callable[[str, np.ndarray], int | None]:
    """The ground truth of `images` (uint8 [n, ...]) as the label store's oracle takes it:
    a sample's label if its pixels are one of the images, else None."""
    truth = {pixel_key(image): int(label) for image, label in zip(images, labels, strict=True)}

    def oracle(sample_id: str, array: np.ndarray) -> int | None:
        if array.dtype != np.uint8:
            return None
        return truth.get(pixel_key(array))

    return oracle


def fashion_mnist_oracle(path: str | None = None) -> Callable[[str, np.ndarray], int | None]:
    """The oracle over every Fashion-MNIST image (train and test sets)."""
    from tierwise.data.fashion_mnist import load_fashion_mnist

    train_x, train_y = load_fashion_mnist(path, "train")
    test_x, test_y = load_fashion_mnist(path, "test")
    return dataset_oracle(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]))
