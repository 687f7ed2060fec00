"""Serving any ONNX model, for real: models with and without metadata.json, bare .onnx files,
several inputs and outputs, a fixed batch of 1, a broken file; Triton's classification and
model-repository extensions, checked with tritonclient and httpx against a server on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import orjson
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper, numpy_helper

from onnx_builders import pinned_batch_net
from tierwise.config import TierConfig
from tierwise.models.importer import add_model
from tierwise.protocol.oip import (
    HEADER_LENGTH,
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    parse_header_length,
)
from tierwise.runtime.batcher import DynamicBatcher
from tierwise.runtime.session import (
    LoadFailure,
    OnnxModel,
    describe_onnx,
    load_models,
    load_repository,
    session_options,
)
from tierwise.server.app import create_app, serve_in_thread

LABELS = ["ant", "bee", "cat", "dog", "eel"]
SERVED = {"tiny-classifier", "spatial", "pair", "pinned"}


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], weights: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tiny_classifier() -> onnx.ModelProto:
    """features FP32 [N, 4] -> logits FP32 [N, 5]: one linear layer."""
    rng = np.random.default_rng(1)
    return _model(
        [helper.make_node("Gemm", ["features", "w", "b"], ["logits"], transB=1)],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "b")])


def spatial_net() -> onnx.ModelProto:
    """image FP32 [N, 3, H, W] (any size) -> pooled FP32 [N, 4]: Conv, Relu, global pooling."""
    rng = np.random.default_rng(2)
    return _model(
        [helper.make_node("Conv", ["image", "w"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["relu"]),
         helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
         helper.make_node("Flatten", ["gap"], ["pooled"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")])


def pair_net() -> onnx.ModelProto:
    """Two inputs, two outputs: a FP32 [N, 3] and b INT64 [N, 3] -> scores FP32 [N, 4]
    = (a + b) @ w, and shifted INT64 [N, 3] = b + 1."""
    rng = np.random.default_rng(3)
    return _model(
        [helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["a", "b_float"], ["summed"]),
         helper.make_node("MatMul", ["summed", "w"], ["scores"]),
         helper.make_node("Add", ["b", "one"], ["shifted"])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("shifted", TensorProto.INT64, ["N", 3])],
        [numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array(1, np.int64), "one")])


def text_net() -> onnx.ModelProto:
    """A model of text tensors (tensor(string)), which OIP here does not carry."""
    return _model([helper.make_node("Identity", ["text"], ["same"])],
                  [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
                  [helper.make_tensor_value_info("same", TensorProto.STRING, ["N"])], [])


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory as users fill it: an imported classifier with labels
    (metadata.json), a directory holding only model.onnx, a bare .onnx file, an imported
    model pinned to a batch of 1; and three that cannot be served: a file that is not ONNX,
    a hand-broken metadata.json and a model of text tensors."""
    root = tmp_path_factory.mktemp("any-models")
    add_model(root, "tiny-classifier", tiny_classifier(), task="classification", labels=LABELS)
    (root / "spatial").mkdir()
    onnx.save(spatial_net(), str(root / "spatial" / "model.onnx"))
    onnx.save(pair_net(), str(root / "pair.onnx"))
    add_model(root, "pinned", pinned_batch_net(), task="generic")
    (root / "broken.onnx").write_bytes(b"this is not an ONNX model, just bytes\n" * 10)
    onnx.save(text_net(), str(root / "text.onnx"))
    (root / "bad-metadata").mkdir()
    shutil.copy(root / "spatial" / "model.onnx", root / "bad-metadata" / "model.onnx")
    (root / "bad-metadata" / "metadata.json").write_text("{not json")
    return root


@pytest.fixture(scope="module")
def loaded(repository: Path) -> tuple[dict[str, OnnxModel], list[LoadFailure]]:
    return load_repository(repository)


@pytest.fixture(scope="module")
def models(loaded: tuple[dict[str, OnnxModel], list[LoadFailure]]) -> dict[str, OnnxModel]:
    return loaded[0]


@pytest.fixture(scope="module")
def server_url(loaded: tuple[dict[str, OnnxModel], list[LoadFailure]]) -> Iterator[str]:
    models, failures = loaded
    # A queue delay lets concurrent requests batch, so the unbatched model's batches of one
    # are its own doing.
    tier = TierConfig(max_batch_size=8, max_queue_delay_ms=50)
    with serve_in_thread(create_app("edge", tier, models, failures)) as url:
        yield url


@pytest.fixture()
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=30) as http:
        yield http


@pytest.fixture()
def triton_client(server_url: str) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(url=server_url.removeprefix("http://"))
    try:
        yield connection
    finally:
        connection.close()


def post_infer(client: httpx.Client, model: str, body: dict) -> httpx.Response:
    return client.post(f"/v2/models/{model}/infer", content=orjson.dumps(body),
                       headers={"content-type": "application/json"})


def json_input(name: str, array: np.ndarray, datatype: str) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": datatype,
            "data": array.reshape(-1).tolist()}


def decoded(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    return decode_infer_response(
        response.content, parse_header_length(response.headers.get(HEADER_LENGTH))).outputs


def top_k_strings(scores: np.ndarray, k: int, labels: list[str] = ()) -> list[list[str]]:
    """Triton's classification strings, computed here with numpy from the raw scores."""
    rows = []
    for row in scores:
        order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
        rows.append([f"{row[index]:f}:{index}" + (f":{labels[index]}" if labels else "")
                     for index in order])
    return rows


# -- what is served, and how it is described ------------------------------------------------


def test_every_loadable_model_is_served_and_broken_files_are_reported(
        loaded: tuple[dict[str, OnnxModel], list[LoadFailure]], repository: Path) -> None:
    models, failures = loaded
    assert set(models) == SERVED
    by_name = {failure.name: failure for failure in failures}
    assert set(by_name) == {"broken", "bad-metadata", "text"}
    assert "ONNX Runtime cannot load it" in by_name["broken"].reason
    assert str(repository / "broken.onnx") in by_name["broken"].reason
    assert "metadata.json: unreadable" in by_name["bad-metadata"].reason
    assert "Invalid JSON" in by_name["bad-metadata"].reason
    assert "input 'text' is tensor(string)" in by_name["text"].reason
    assert set(load_models(repository)) == SERVED  # skips them too, without raising
    with pytest.raises(RuntimeError, match=r"model broken: .*cannot load"):
        load_models(repository, names=["pair", "broken"])


def test_a_model_without_metadata_is_described_by_onnx_runtime(
        repository: Path, tmp_path: Path) -> None:
    path = repository / "pair.onnx"
    info = describe_onnx(path, "pair")
    assert info.model_dump(include={"name", "version", "task", "inputs", "outputs",
                                    "batched", "bytes", "sha256"}) == {
        "name": "pair", "version": "1", "task": "generic", "batched": True,
        "inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 3]},
                   {"name": "b", "datatype": "INT64", "shape": [-1, 3]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 4]},
                    {"name": "shifted", "datatype": "INT64", "shape": [-1, 3]}],
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    spatial = describe_onnx(repository / "spatial" / "model.onnx", "spatial")
    assert spatial.inputs[0].shape == [-1, 3, -1, -1]
    # A fixed batch of 1 (no import to make it dynamic): not batched.
    onnx.save(pinned_batch_net(), str(tmp_path / "pinned.onnx"))
    pinned = describe_onnx(tmp_path / "pinned.onnx", "pinned")
    assert not pinned.batched
    assert pinned.inputs[0].shape == [1, 3, 2, 2]


def test_only_shapes_that_vary_beyond_the_batch_turn_the_arena_off(
        models: dict[str, OnnxModel]) -> None:
    spatial = session_options(models["spatial"].info)
    assert not spatial.enable_cpu_mem_arena and not spatial.enable_mem_pattern
    for name in ("tiny-classifier", "pair", "pinned"):
        options = session_options(models[name].info)
        assert options.enable_cpu_mem_arena and options.enable_mem_pattern, name


def test_onnx_model_runs_one_array_or_every_input_by_name(models: dict[str, OnnxModel]) -> None:
    rng = np.random.default_rng(4)
    features = rng.normal(size=(6, 4)).astype(np.float32)
    classifier = models["tiny-classifier"]
    assert classifier.run(features).shape == (6, 5)
    np.testing.assert_array_equal(classifier.run({"features": features}),
                                  classifier.run(features))
    pair = models["pair"]
    a = rng.normal(size=(300, 3)).astype(np.float32)
    b = rng.integers(-5, 5, size=(300, 3))
    scores = pair.run({"a": a, "b": b})
    w = numpy_helper.to_array(pair_net().graph.initializer[0])
    np.testing.assert_allclose(scores, (a + b) @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pair.run_batched({"a": a, "b": b}, batch_size=128), scores,
                               rtol=1e-6)
    outputs = pair.run_all({"a": a, "b": b})
    assert list(outputs) == ["scores", "shifted"]
    np.testing.assert_array_equal(outputs["shifted"], b + 1)


# -- serving them -----------------------------------------------------------------------------


def test_metadata_of_a_described_model_is_served(client: httpx.Client) -> None:
    assert client.get("/v2/models/spatial").json() == {
        "name": "spatial", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]}],
        "outputs": [{"name": "pooled", "datatype": "FP32", "shape": [-1, 4]}]}
    for name in SERVED:
        assert client.get(f"/v2/models/{name}/ready").status_code == 200


def test_two_inputs_and_any_of_the_outputs(client: httpx.Client,
                                           models: dict[str, OnnxModel]) -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 3)).astype(np.float32)
    b = rng.integers(0, 9, size=(3, 3))
    expected = models["pair"].run_all({"a": a, "b": b})
    inputs = [json_input("a", a, "FP32"), json_input("b", b, "INT64")]
    for wanted in (["scores"], ["shifted"], ["shifted", "scores"], None):
        body: dict = {"inputs": inputs}
        if wanted is not None:
            body["outputs"] = [{"name": name} for name in wanted]
        outputs = decoded(post_infer(client, "pair", body))
        assert list(outputs) == (wanted or ["scores", "shifted"])
        for name, array in outputs.items():
            np.testing.assert_allclose(array, expected[name], rtol=1e-6)
    # binary tensors both ways, through the protocol module
    request, headers = encode_infer_request({"a": a, "b": b}, binary=True,
                                            outputs=["shifted", "scores"])
    outputs = decoded(client.post("/v2/models/pair/infer", content=request, headers=headers))
    np.testing.assert_array_equal(outputs["shifted"], b + 1)
    np.testing.assert_allclose(outputs["scores"], expected["scores"], rtol=1e-6)
    missing = post_infer(client, "pair", {"inputs": inputs[:1]})
    assert missing.status_code == 400 and "missing input 'b'" in missing.json()["error"]


def test_images_of_any_size_are_served(client: httpx.Client,
                                       models: dict[str, OnnxModel]) -> None:
    rng = np.random.default_rng(6)
    for height, width in ((8, 8), (17, 5), (40, 33)):
        image = rng.random((2, 3, height, width), dtype=np.float32)
        request, headers = encode_infer_request({"image": image}, binary=True)
        outputs = decoded(client.post("/v2/models/spatial/infer", content=request,
                                      headers=headers))
        np.testing.assert_allclose(outputs["pooled"], models["spatial"].run(image),
                                   rtol=1e-5, atol=1e-6)


def test_an_unbatched_model_runs_one_request_of_one_row_at_a_time(
        server_url: str, client: httpx.Client, models: dict[str, OnnxModel]) -> None:
    pinned = models["pinned"]
    assert not pinned.info.batched
    rng = np.random.default_rng(7)
    samples = rng.normal(size=(12, 1, 3, 2, 2)).astype(np.float32)

    async def concurrently(model: str, name: str, arrays: np.ndarray) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server_url, timeout=30) as http:
            async def one(array: np.ndarray) -> httpx.Response:
                body, headers = encode_infer_request({name: array}, binary=True)
                return await http.post(f"/v2/models/{model}/infer", content=body,
                                       headers=headers)
            return list(await asyncio.gather(*(one(array) for array in arrays)))

    answers = asyncio.run(concurrently("pinned", "x", samples))
    assert [int(answer.headers["tierwise-batch-size"]) for answer in answers] == [1] * 12
    for sample, answer in zip(samples, answers, strict=True):
        np.testing.assert_allclose(decoded(answer)["y"], pinned.run(sample), rtol=1e-6)
    # The same load on a batched model does batch: the batches of one above are the rule.
    images = rng.random((12, 1, 3, 6, 6), dtype=np.float32)
    batched = asyncio.run(concurrently("spatial", "image", images))
    assert max(int(answer.headers["tierwise-batch-size"]) for answer in batched) > 1
    two_rows = post_infer(client, "pinned", {"inputs": [
        json_input("x", samples[:2].reshape(2, 3, 2, 2), "FP32")]})
    assert two_rows.status_code == 400
    assert "input 'x'" in two_rows.json()["error"]
    assert "one row per request" in two_rows.json()["error"]
    assert DynamicBatcher(pinned, max_batch_size=32).max_batch_size == 1


# -- Triton's extensions ------------------------------------------------------------------------


def test_server_metadata_lists_the_extensions(triton_client: triton.InferenceServerClient
                                              ) -> None:
    extensions = triton_client.get_server_metadata()["extensions"]
    assert {"binary_tensor_data", "classification", "model_repository"} <= set(extensions)


def test_repository_index_reports_ready_and_unavailable_models(
        triton_client: triton.InferenceServerClient, client: httpx.Client) -> None:
    index = triton_client.get_model_repository_index()
    assert [(entry["name"], entry["version"], entry["state"]) for entry in index] == [
        ("bad-metadata", "1", "UNAVAILABLE"), ("broken", "1", "UNAVAILABLE"),
        ("pair", "1", "READY"), ("pinned", "1", "READY"), ("spatial", "1", "READY"),
        ("text", "1", "UNAVAILABLE"), ("tiny-classifier", "1", "READY")]
    reasons = {entry["name"]: entry["reason"] for entry in index}
    assert "ONNX Runtime cannot load it" in reasons["broken"]
    assert reasons["pair"] == ""
    ready = client.post("/v2/repository/index", content=b'{"ready": true}').json()
    assert {entry["name"] for entry in ready} == SERVED
    assert client.post("/v2/repository/index", content=b'{"ready": false}').json() == index
    assert client.get("/v2/repository/index").status_code == 405
    bad = client.post("/v2/repository/index", content=b'{"ready": "yes"}')
    assert bad.status_code == 400 and "ready" in bad.json()["error"]
    # The broken model's own endpoints say why it is not served.
    assert not triton_client.is_model_ready("broken")
    answer = client.get("/v2/models/broken/ready")
    assert answer.status_code == 503 and "unavailable" in answer.json()["error"]
    # and the others are served
    features = np.ones((1, 4), np.float32)
    assert post_infer(client, "tiny-classifier", {
        "inputs": [json_input("features", features, "FP32")]}).status_code == 200


def test_classification_is_the_top_k_of_the_raw_output(
        triton_client: triton.InferenceServerClient, models: dict[str, OnnxModel]) -> None:
    rng = np.random.default_rng(8)
    features = rng.normal(size=(6, 4)).astype(np.float32)
    raw = models["tiny-classifier"].run(features)
    for binary in (True, False):
        tensor = triton.InferInput("features", list(features.shape), "FP32")
        tensor.set_data_from_numpy(features, binary_data=binary)
        asked = triton.InferRequestedOutput("logits", binary_data=binary, class_count=3)
        result = triton_client.infer("tiny-classifier", [tensor], outputs=[asked])
        strings = result.as_numpy("logits")
        assert strings.shape == (6, 3)
        assert result.get_output("logits")["datatype"] == "BYTES"
        texts = [[item.decode() if isinstance(item, bytes) else item for item in row]
                 for row in strings]
        assert texts == top_k_strings(raw, 3, LABELS)
        assert texts[0][0].endswith(f":{LABELS[int(raw[0].argmax())]}")


def test_classification_without_labels_and_k_past_the_classes(
        client: httpx.Client, models: dict[str, OnnxModel]) -> None:
    rng = np.random.default_rng(9)
    a = rng.normal(size=(2, 3)).astype(np.float32)
    b = rng.integers(0, 3, size=(2, 3))
    raw = models["pair"].run({"a": a, "b": b})
    inputs = [json_input("a", a, "FP32"), json_input("b", b, "INT64")]
    answer = post_infer(client, "pair", {"inputs": inputs, "outputs": [
        {"name": "scores", "parameters": {"classification": 10}}, {"name": "shifted"}]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    scores = next(output for output in body["outputs"] if output["name"] == "scores")
    assert scores["datatype"] == "BYTES" and scores["shape"] == [2, 4]  # only 4 classes
    assert np.reshape(scores["data"], (2, 4)).tolist() == top_k_strings(raw, 4)
    assert decoded(answer)["shifted"].tolist() == (b + 1).tolist()


@pytest.mark.parametrize(("output", "parameters", "words"), [
    ("shifted", {"classification": 2}, "output 'shifted': classification ranks class scores"),
    ("scores", {"classification": 0}, "output 'scores': parameters.classification must be"),
    ("scores", {"classification": "3"}, "output 'scores': parameters.classification must be"),
])
def test_classification_that_cannot_be_done_is_a_400(
        client: httpx.Client, output: str, parameters: dict, words: str) -> None:
    a = np.zeros((1, 3), np.float32)
    b = np.zeros((1, 3), np.int64)
    answer = post_infer(client, "pair", {
        "inputs": [json_input("a", a, "FP32"), json_input("b", b, "INT64")],
        "outputs": [{"name": output, "parameters": parameters}]})
    assert answer.status_code == 400
    assert words in answer.json()["error"]


def test_protocol_keeps_output_parameters_and_text_outputs_round_trip() -> None:
    request = decode_infer_request(orjson.dumps({
        "inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1.0]}],
        "outputs": [{"name": "scores", "parameters": {"classification": 3,
                                                      "binary_data": False}},
                    {"name": "plain"}]}), None)
    assert request.output_parameters == {"scores": {"classification": 3,
                                                    "binary_data": False}}
    assert request.outputs == {"scores": False, "plain": None}
    strings = np.array([[b"0.500000:1:bee", b"0.250000:0:ant"]], dtype=object)
    for binary in (True, False):
        body, headers = encode_infer_response({"scores": strings}, model_name="m",
                                              binary_outputs=binary)
        back = decode_infer_response(body, parse_header_length(headers.get(HEADER_LENGTH)))
        assert back.outputs["scores"].tolist() == strings.tolist()
