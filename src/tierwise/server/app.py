"""The tier server: Open Inference Protocol v2 over HTTP/REST, as a plain ASGI app.

Endpoints (KServe v2 / Triton REST): `ROUTES` below, which the documentation's route
reference is generated from (docs/reference/routes.md).

Triton's extensions, as its docs/protocol/ describe them: a requested output with
`parameters: {"classification": k}` comes back as BYTES [batch, k] strings
"<value>:<index>[:<label>]", its k highest values first (extension_classification.md); the
repository index answers `[{"name", "version", "state", "reason"}]`
(extension_model_repository.md; load and unload are not offered: the registry installs
models). A model that is not batched (a fixed batch of 1) takes one row per request.

Infer answers carry the server's own timing in headers, so a client can tell link time from
server time: `tierwise-compute-ms` (the batch's compute, stretched when emulated),
`tierwise-queue-ms`, `tierwise-batch-size`, `tierwise-model-version`, `tierwise-tier`; the
same numbers are in the response `parameters` (`tierwise_compute_ms`, ...), which standard OIP
clients ignore. Errors are JSON `{"error": "..."}` with a 4xx/5xx status.

A plain ASGI callable rather than a web framework: on this path the framework's routing,
request objects and middleware cost more than the model (see `tierwise bench serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import orjson

from tierwise import __version__
from tierwise.codecs import CODECS, RAW, CodecError, decode_rows
from tierwise.config import TierConfig, TlsConfig
from tierwise.models.inputs import image_size
from tierwise.net.tls import server_options
from tierwise.protocol.oip import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    decode_infer_request,
    encode_error,
    encode_infer_response,
    numpy_dtype,
    parse_header_length,
)
from tierwise.runtime.batcher import DynamicBatcher
from tierwise.runtime.session import LoadFailure, OnnxModel
from tierwise.server.auth import CredentialError, Principal, TokenVerifier
from tierwise.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tierwise.server.metrics import UNKNOWN_MODEL, ServerMetrics
from tierwise.tasks import TaskError, classification_strings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SERVER_NAME = "tierwise"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
PLATFORM = "onnxruntime_onnx"
REPOSITORY_INDEX = "/v2/repository/index"
READY, UNAVAILABLE = "READY", "UNAVAILABLE"  # model states, as Triton names them
# what the classification extension ranks: per-class scores [batch, classes]
CLASSIFIABLE_DATATYPES = ("FP16", "FP32", "FP64")
# (method, path, what): every route this server answers, as the reference documents them
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/v2/health/live", "200 while the server runs"),
    ("GET", "/v2/health/ready", "200 once every model is loaded, else 503"),
    ("GET", "/v2", "server metadata: name, version, extensions"),
    ("GET", "/v2/models/{name}[/versions/{v}]", "model metadata: platform, versions, inputs "
     "and outputs with datatype and shape"),
    ("GET", "/v2/models/{name}[/versions/{v}]/ready", "200 when the model can infer"),
    ("POST", "/v2/models/{name}[/versions/{v}]/infer", "inference, JSON or binary tensor "
     "data (`Inference-Header-Content-Length`), gzip or deflate bodies; timing in "
     "`tierwise-*` headers"),
    ("POST", REPOSITORY_INDEX, "every model version known: READY, or UNAVAILABLE with the "
     "reason; `{\"ready\": true}`: the READY ones"),
    ("GET", "/metrics", "Prometheus exposition: requests, latency, batch sizes, queue"),
)

log = logging.getLogger("tierwise.server")

_JSON = (b"content-type", b"application/json")
_CLOSE = (b"connection", b"close")
_HEADER_LENGTH_KEY = HEADER_LENGTH.lower().encode()


class HTTPError(Exception):
    """An answer other than 200: its status, its message, and extra headers."""

    def __init__(self, status: int, message: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class _Served:
    """One model version as served: its batcher, metrics and pre-encoded metadata."""

    def __init__(self, model: OnnxModel, batcher: DynamicBatcher, metrics: Any) -> None:
        info = model.info
        self.model = model
        self.info = info
        self.batcher = batcher
        self.metrics = metrics
        self.version = info.version
        self.batched = info.batched
        self.inputs = {spec.name: spec for spec in info.inputs}
        self.outputs = {spec.name: spec for spec in info.outputs}
        self.output_names = [spec.name for spec in info.outputs]
        self.version_header = info.version.encode()
        self.in_flight = 0  # infer requests holding it; a retired version closes at 0
        self.retired = False

    def metadata(self, versions: list[str]) -> bytes:
        info = self.info
        return orjson.dumps({
            "name": info.name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [spec.model_dump() for spec in info.inputs],
            "outputs": [spec.model_dump() for spec in info.outputs],
        })


class TierServer:
    """The ASGI app of one tier. Constructing it loads nothing; it serves `models`, and lists
    `unavailable` (files that did not load) in its repository index."""

    def __init__(self, tier_name: str, tier: TierConfig, models: Mapping[str, OnnxModel],
                 unavailable: Sequence[LoadFailure] = (),
                 verifier: TokenVerifier | None = None) -> None:
        """`verifier`: who a request is from; with one, every route but the health checks
        needs a bearer token (`tiers.<tier>.require_auth`), /metrics an operator's."""
        self.tier_name = tier_name
        self.tier = tier
        self.verifier = verifier
        self._lookups = asyncio.Semaphore(MAX_TOKEN_LOOKUPS)
        self.metrics = ServerMetrics(tier_name, tier.compute_scale)
        # name -> version -> served; `default_version[name]` answers unversioned requests
        self.models: dict[str, dict[str, _Served]] = {}
        self.default_version: dict[str, str] = {}
        # (name, version) -> why it is not served
        self.unavailable: dict[tuple[str, str], str] = {
            (failure.name, failure.version): failure.reason for failure in unavailable}
        self._loop: asyncio.AbstractEventLoop | None = None
        # client (device id header, else address) -> its infer requests in the server now
        self._client_in_flight: dict[bytes, int] = {}
        # called once the event loop runs (a registry subscriber starts there, so that its
        # first update already lands on the loop)
        self.on_startup: list[Callable[[], None]] = []
        self.on_shutdown: list[Callable[[], None]] = []  # before the models close
        # the cores every model's batches share (tiers.<tier>.cores), else none shared
        self._cores = threading.Semaphore(tier.cores) if tier.cores else None
        for model in models.values():
            self._install(model)
        self.server_metadata = orjson.dumps(
            {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})
        self._tier_header = (b"tierwise-tier", tier_name.encode())
        self._routes: dict[str, Callable[[], tuple[bytes, bytes]]] = {
            "/v2": lambda: (self.server_metadata, b"application/json"),
            "/v2/": lambda: (self.server_metadata, b"application/json"),
            "/v2/health/live": lambda: (b'{"live":true}', b"application/json"),
            "/metrics": lambda: (self.metrics.exposition(), METRICS_CONTENT_TYPE.encode()),
        }

    # -- which models it serves: changed while it serves (registry hot swap) --------------

    def update(self, install: list[OnnxModel], retire: list[tuple[str, str]],
               defaults: Mapping[str, str] | None = None) -> None:
        """Serve the loaded models in `install`, stop serving the (name, version)s in
        `retire`, and make `defaults` (name -> version) answer unversioned requests.

        Safe from any thread: the change is made on the server's event loop, between requests.
        A request already running on a retired version finishes on it; its batcher closes
        when the last one has answered. So no request fails or is dropped by a swap."""
        loop = self._loop
        if loop is None or not loop.is_running():
            self._update(install, retire, defaults or {})
            return
        done = asyncio.run_coroutine_threadsafe(
            self._update_async(install, retire, defaults or {}), loop)
        done.result(timeout=60)

    async def _update_async(self, install: list[OnnxModel], retire: list[tuple[str, str]],
                            defaults: Mapping[str, str]) -> None:
        self._update(install, retire, defaults)

    def _update(self, install: list[OnnxModel], retire: list[tuple[str, str]],
                defaults: Mapping[str, str]) -> None:
        for model in install:
            self._install(model)
        for name, version in retire:
            versions = self.models.get(name, {})
            served = versions.pop(version, None)
            if not versions:
                self.models.pop(name, None)
                self.default_version.pop(name, None)
            elif self.default_version.get(name) == version:
                self.default_version[name] = max(versions, key=_version_order)
            if served is not None:
                served.retired = True
                if served.in_flight == 0:
                    served.batcher.close()
        for name, version in defaults.items():
            if version in self.models.get(name, {}):
                self.default_version[name] = version

    def _install(self, model: OnnxModel) -> None:
        name, version = model.info.name, model.info.version
        model_metrics = self.metrics.model(name)
        batcher = DynamicBatcher(model, max_batch_size=self.tier.max_batch_size,
                                 max_queue_delay_ms=self.tier.max_queue_delay_ms,
                                 compute_scale=self.tier.compute_scale,
                                 on_batch=model_metrics.observe_batch, cores=self._cores)
        versions = self.models.setdefault(name, {})
        replaced = versions.get(version)
        versions[version] = _Served(model, batcher, model_metrics)
        self.unavailable.pop((name, version), None)
        self.default_version.setdefault(name, version)
        if replaced is not None:
            replaced.retired = True
            if replaced.in_flight == 0:
                replaced.batcher.close()

    def served_versions(self) -> dict[str, list[str]]:
        """name -> the versions served, the default first."""
        return {name: sorted(versions, key=lambda v: (v != self.default_version[name],
                                                       _version_order(v)))
                for name, versions in self.models.items()}

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every (name, version) served, READY, and unless
        `ready_only` every one that did not load, UNAVAILABLE with the reason; by name, then
        version."""
        entries = [{"name": name, "version": version, "state": READY, "reason": ""}
                   for name, versions in self.models.items() for version in versions]
        if not ready_only:
            entries += [{"name": name, "version": version, "state": UNAVAILABLE,
                         "reason": reason}
                        for (name, version), reason in self.unavailable.items()]
        return sorted(entries, key=lambda entry: (entry["name"],
                                                  _version_order(entry["version"])))

    def close(self) -> None:
        for versions in self.models.values():
            for served in versions.values():
                served.batcher.close()
        if self.verifier is not None:
            self.verifier.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            try:
                await self._http(scope, receive, send)
            except HTTPError as error:
                await send_response(send, error.status, encode_error(error.message),
                            [_JSON, *error.headers])
            except ProtocolError as error:  # a malformed request outside the infer path
                await send_response(send, error.status, encode_error(error.message), [_JSON])
            except Exception as error:  # a bug: answer it, log it, keep serving
                log.exception("%s %s failed", scope["method"], scope["path"])
                await send_response(send, 500, encode_error(
                    f"internal error: {type(error).__name__}: {error}"), [_JSON])
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loop = asyncio.get_running_loop()
                for hook in self.on_startup:
                    hook()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for hook in self.on_shutdown:  # off the loop: a subscriber's stop joins a
                    await asyncio.to_thread(hook)  # thread that may be waiting on the loop
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        principal = None
        if self.verifier is not None and not path.startswith(OPEN_PATHS):
            principal = await self._authenticate(scope, path)
        if path.startswith("/v2/models/"):
            try:
                served, action = self._model_route(path)
            except HTTPError as error:
                if path.endswith("/infer"):
                    self.metrics.model(UNKNOWN_MODEL).observe_error(error.status, 0)
                raise
            if action == "infer":
                if method != "POST":
                    raise HTTPError(405, f"{path}: use POST, not {method}",
                                    [(b"allow", b"POST")])
                client = _client_key(scope, principal)
                held = self._client_in_flight.get(client, 0)
                if held >= self.tier.max_in_flight_per_client:
                    served.metrics.observe_error(429, 0)
                    retry_s = self._retry_after_s(served)
                    raise HTTPError(429, f"this client has {held} requests in the server, the "
                                    f"most it may (max_in_flight_per_client); retry after "
                                    f"{retry_s} s", [(b"retry-after", str(retry_s).encode())])
                self._client_in_flight[client] = held + 1
                served.in_flight += 1
                try:
                    await self._infer(served, scope, receive, send)
                finally:
                    served.in_flight -= 1
                    left = self._client_in_flight[client] - 1
                    if left:
                        self._client_in_flight[client] = left
                    else:
                        del self._client_in_flight[client]
                    if served.retired and served.in_flight == 0:
                        served.batcher.close()
                return
            _require_get(method, path)
            if action == "ready":
                await send_response(send, 200, b'{"ready":true}', [_JSON])
            else:
                versions = self.served_versions().get(served.info.name, [served.version])
                await send_response(send, 200, served.metadata(versions), [_JSON])
            return
        if path == REPOSITORY_INDEX:
            if method != "POST":
                raise HTTPError(405, f"{path}: use POST, not {method}", [(b"allow", b"POST")])
            body, _ = await self._read_body(scope, receive)
            index = self.repository_index(ready_only=_index_ready_only(body))
            await send_response(send, 200, orjson.dumps(index), [_JSON])
            return
        if path == "/v2/health/ready":
            _require_get(method, path)
            if not self.models:  # started from a registry that has not delivered yet
                raise HTTPError(503, "no model loaded yet")
            await send_response(send, 200, b'{"ready":true}', [_JSON])
            return
        route = self._routes.get(path)
        if route is None:
            raise HTTPError(404, f"no such endpoint: {path}")
        _require_get(method, path)
        body, content_type = route()
        await send_response(send, 200, body, [(b"content-type", content_type)])

    async def _authenticate(self, scope: Scope, path: str) -> Principal:
        """The request's principal (HTTPError 401/403/503 otherwise): from the verifier's
        cache on the event loop, else looked up in a worker thread."""
        assert self.verifier is not None
        header = _header(scope, b"authorization")
        principal = self.verifier.cached(header)
        try:
            if principal is None:
                # a few lookups at a time: a flood of made-up tokens (each a query, or a
                # round trip to the cloud) must not take every worker thread
                async with self._lookups:
                    principal = await asyncio.to_thread(self.verifier.authenticate, header)
            if path == "/metrics":
                principal.require_operator()
        except CredentialError as error:
            challenge = [(b"www-authenticate", b'Bearer realm="tierwise"')] \
                if error.status == 401 else []
            raise HTTPError(error.status, str(error), challenge) from None
        return principal

    def _retry_after_s(self, served: _Served) -> int:
        """Retry-After (whole seconds, RFC 9110): the time to work off what the model holds,
        at the compute time per row of its last batch; at least 1."""
        compute_ms = served.metrics.last_compute_ms or 1.0
        return max(1, math.ceil(served.in_flight * compute_ms / 1e3))

    def _model_route(self, path: str) -> tuple[_Served, str]:
        """(model, action) of /v2/models/{name}[/versions/{v}][/ready|/infer]."""
        parts = path[len("/v2/models/"):].split("/")
        name, rest = parts[0], parts[1:]
        version = None
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else ""
        if len(rest) > 1 or action not in ("", "ready", "infer") or not name:
            raise HTTPError(404, f"no such endpoint: {path}")
        versions = self.models.get(name)
        if not versions:
            reasons = [reason for (known, _), reason in self.unavailable.items() if known == name]
            if reasons:
                raise HTTPError(503, f"model {name!r} is unavailable: {reasons[0]}")
            raise HTTPError(404, f"unknown model {name!r}; this server has "
                                 f"{sorted(self.models)}")
        served = versions.get(version if version is not None else self.default_version[name])
        if served is None:
            raise HTTPError(404, f"model {name!r} has no version {version!r}; "
                                 f"available: {sorted(versions, key=_version_order)}")
        return served, action

    async def _infer(self, served: _Served, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        metrics = served.metrics
        body = b""
        try:
            body, header_length = await self._read_body(scope, receive)
            if len(body) > OFF_LOOP_BODY_BYTES and (header_length is None
                                                    or header_length > OFF_LOOP_BODY_BYTES):
                # a long JSON document takes milliseconds to parse: not on the event loop,
                # where every other client's request waits behind it
                request = await asyncio.to_thread(decode_infer_request, body, header_length)
            else:
                request = decode_infer_request(body, header_length)
            _check_rows(request, self.tier.max_rows_per_request)
            inputs = _checked_inputs(served, _decoded_inputs(served, request))
            wanted = _checked_outputs(served, request.outputs)
            classify = _checked_classifications(served, request.output_parameters) \
                if request.output_parameters else None
            try:
                outputs, timing = await served.batcher.infer(inputs)
            except Exception as error:
                log.exception("inference failed on %s", served.info.name)
                raise HTTPError(500, f"inference failed: {type(error).__name__}: {error}") \
                    from None
            if classify:
                outputs = _classified(served, outputs, classify)
        except ProtocolError as error:
            metrics.observe_error(error.status, len(body))
            raise HTTPError(error.status, error.message) from None
        except HTTPError as error:
            metrics.observe_error(error.status, len(body))
            raise
        parameters = {"tierwise_compute_ms": round(timing.compute_ms, 4),
                      "tierwise_queue_ms": round(timing.queue_ms, 4),
                      "tierwise_batch_size": timing.batch_size}
        answer, extra = encode_infer_response(
            {name: outputs[name] for name in wanted},
            model_name=served.info.name, model_version=served.version,
            binary_outputs={name for name in wanted if request.output_binary(name)},
            request_id=request.id, parameters=parameters)
        headers = [
            (b"content-type", extra["Content-Type"].encode()),
            (b"tierwise-compute-ms", b"%.4f" % timing.compute_ms),
            (b"tierwise-queue-ms", b"%.4f" % timing.queue_ms),
            (b"tierwise-batch-size", b"%d" % timing.batch_size),
            (b"tierwise-model-version", served.version_header),
            self._tier_header,
        ]
        if HEADER_LENGTH in extra:
            headers.append((_HEADER_LENGTH_KEY, extra[HEADER_LENGTH].encode()))
        await send_response(send, 200, answer, headers)
        metrics.observe_request(time.perf_counter() - started, timing.queue_ms, len(body),
                                len(answer))

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, int | None]:
        """(body, Inference-Header-Content-Length), refusing a body over `max_body_bytes`
        before reading it."""
        limit = self.tier.max_body_bytes
        header_length: str | None = None
        encoding = b""
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise HTTPError(400, f"Content-Length: not a number: {value!r}") from None
                if declared > limit:
                    # Close the connection: uvicorn then drops the rest of the body unread.
                    raise HTTPError(413, f"the body is {declared} bytes; this server takes at "
                                         f"most {limit} (max_body_bytes)", [_CLOSE])
            elif key == _HEADER_LENGTH_KEY:
                header_length = value.decode("latin-1")
            elif key == b"content-encoding":
                encoding = value.lower()
        message = await receive()
        body: bytes = message.get("body", b"")
        if message.get("more_body"):
            chunks = [body]
            size = len(body)
            while message.get("more_body"):
                message = await receive()
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise HTTPError(413, f"the body is over {limit} bytes (max_body_bytes)",
                                    [_CLOSE])
                chunks.append(chunk)
            body = b"".join(chunks)
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "the client disconnected before sending the whole body")
        if encoding and encoding != b"identity":
            body = _decompress(body, encoding, limit)
        return body, parse_header_length(header_length)


def _decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    """gzip / deflate request bodies (tritonclient's request_compression_algorithm)."""
    if encoding == b"gzip":
        decompressor = zlib.decompressobj(wbits=31)
    elif encoding == b"deflate":
        decompressor = zlib.decompressobj()
    else:
        raise HTTPError(415, f"Content-Encoding {encoding.decode('latin-1')!r} is not "
                             "supported; use gzip, deflate or none")
    try:
        plain = decompressor.decompress(body, limit + 1)
    except zlib.error as error:
        raise HTTPError(400, f"the {encoding.decode()} body does not decompress: {error}") \
            from None
    if len(plain) > limit:
        raise HTTPError(413, f"the decompressed body is over {limit} bytes (max_body_bytes)")
    return plain


def _check_rows(request: InferRequest, limit: int) -> None:
    """Refuse a request of more than `limit` rows before anything is decoded or run (Triton
    refuses a batch over the model's max_batch_size): one request of 20,000 rows grew a
    server by 2.7 GB and held every other client of the model for seconds."""
    for name, array in request.inputs.items():
        rows = array.shape[0] if array.ndim else 1
        if rows > limit:
            raise ProtocolError(f"input {name!r}: {rows:,} rows in one request; this server "
                                f"takes at most {limit:,} (max_rows_per_request)")


def _decoded_inputs(served: _Served, request: InferRequest) -> dict[str, Any]:
    """The request's inputs with every codec payload (`parameters.content_type`) decoded into
    the tensor the model's metadata describes, one payload per batch row."""
    inputs = dict(request.inputs)
    for name, array in request.inputs.items():
        codec = request.input_parameters.get(name, {}).get("content_type")
        if codec is not None and not isinstance(codec, str):
            raise ProtocolError(f"input {name!r}: parameters.content_type must be a codec "
                                f"name, got {codec!r}")
        if codec is None or codec == RAW:
            if array.dtype.kind == "O":
                raise ProtocolError(f"input {name!r}: a BYTES input needs "
                                    "parameters.content_type naming its codec; known: "
                                    f"{sorted(CODECS)}")
            continue
        spec = served.inputs.get(name)
        if spec is None:
            continue  # _checked_inputs names the unknown input
        if array.dtype.kind != "O" or array.ndim != 1:
            raise ProtocolError(f"input {name!r}: content_type {codec!r} needs a BYTES tensor "
                                "of shape [batch], one payload per row")
        row_shape = tuple(spec.shape[1:])
        size = image_size(served.info) if name == served.info.inputs[0].name else None
        if size is not None:  # takes images of any size: the client sent its image size
            row_shape = (*size, row_shape[-1])
        if any(dim < 0 for dim in row_shape):
            raise ProtocolError(f"input {name!r}: content_type {codec!r} needs a known size, "
                                f"and {spec.shape} has a dynamic one; send it raw")
        try:
            inputs[name] = decode_rows(codec, array, row_shape, numpy_dtype(spec.datatype))
        except CodecError as error:
            raise ProtocolError(f"input {name!r}: {error}") from None
    return inputs


def _checked_inputs(served: _Served, inputs: dict[str, Any]) -> dict[str, Any]:
    """The request's inputs in the model's order, after checking names, datatypes, shapes."""
    specs = served.inputs
    for name in inputs:
        if name not in specs:
            raise ProtocolError(f"model {served.info.name!r} has no input {name!r}; its inputs "
                                f"are {list(specs)}")
    checked = {}
    rows = None
    for name, spec in specs.items():
        array = inputs.get(name)
        if array is None:
            raise ProtocolError(f"missing input {name!r} ({spec.datatype} {spec.shape})")
        datatype = _DATATYPE_OF_DTYPE.get(array.dtype.str)
        if datatype != spec.datatype:
            raise ProtocolError(f"input {name!r}: expected datatype {spec.datatype}, got "
                                f"{datatype}")
        shape = array.shape
        if not served.batched and spec.shape[:1] == [1] and shape[:1] != (1,) and \
                len(shape) == len(spec.shape):
            raise ProtocolError(f"input {name!r}: model {served.info.name!r} takes one row per "
                                f"request (it is not batched: its batch is fixed at 1); got "
                                f"{shape[0]} rows")
        if len(shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)):
            raise ProtocolError(f"input {name!r}: expected shape {spec.shape} (-1: any), got "
                                f"{list(shape)}")
        if rows is None:
            rows = shape[0] if shape else None
        elif shape and shape[0] != rows:
            raise ProtocolError(f"input {name!r}: batch size {shape[0]} differs from the "
                                f"other inputs' {rows}")
        checked[name] = array
    if rows == 0:
        raise ProtocolError("the inputs have a batch size of 0")
    return checked


def _checked_outputs(served: _Served, requested: dict[str, bool | None]) -> list[str]:
    if not requested:
        return served.output_names
    for name in requested:
        if name not in served.output_names:
            raise ProtocolError(f"model {served.info.name!r} has no output {name!r}; its "
                                f"outputs are {served.output_names}")
    return list(requested)


def _checked_classifications(served: _Served,
                             output_parameters: dict[str, dict[str, Any]]) -> dict[str, int]:
    """output name -> k, for the requested outputs whose `parameters.classification` asks
    for their top k classes (Triton's classification extension)."""
    classify = {}
    for name, parameters in output_parameters.items():
        count = parameters.get("classification")
        if count is None:
            continue
        if type(count) is not int or count < 1:
            raise ProtocolError(f"output {name!r}: parameters.classification must be a class "
                                f"count of at least 1, got {count!r}")
        spec = served.outputs[name]  # _checked_outputs has checked the name
        if len(spec.shape) != 2 or spec.datatype not in CLASSIFIABLE_DATATYPES:
            raise ProtocolError(f"output {name!r}: classification ranks class scores "
                                f"[batch, classes] of {'/'.join(CLASSIFIABLE_DATATYPES)}; "
                                f"this output is {spec.datatype} {spec.shape}")
        classify[name] = count
    return classify


def _classified(served: _Served, outputs: dict[str, np.ndarray],
                classify: dict[str, int]) -> dict[str, np.ndarray]:
    """`outputs` with each output in `classify` replaced by its top-k classes, BYTES
    [batch, min(k, classes)] "<value>:<index>[:<label>]" (labels: the model's, when they
    name this output's classes)."""
    classified = dict(outputs)
    labels = served.info.labels
    for name, count in classify.items():
        scores = outputs[name]
        own_labels = labels if scores.ndim == 2 and len(labels) == scores.shape[1] else ()
        try:
            rows = classification_strings(scores, count, own_labels)
        except TaskError as error:  # the model broke its own declared shape
            raise HTTPError(500, f"output {name!r}: {error}") from None
        classified[name] = np.array([[text.encode() for text in row] for row in rows],
                                    dtype=object)
    return classified


def _index_ready_only(body: bytes) -> bool:
    """The `ready` flag of a repository index request (the body may be empty)."""
    if not body.strip():
        return False
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise HTTPError(400, f"repository index: the body is not valid JSON: {error}") \
            from None
    ready = request.get("ready", False) if isinstance(request, dict) else None
    if not isinstance(ready, bool):
        raise HTTPError(400, 'repository index: expected an empty body or {"ready": true|false},'
                             f" got {body[:80]!r}")
    return ready


def _datatype_table() -> dict[str, str]:
    from tierwise.protocol.oip import DATATYPES

    return {numpy_dtype(datatype).str: datatype for datatype in DATATYPES}


_DATATYPE_OF_DTYPE = _datatype_table()


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (-1, version)


DEVICE_HEADER = b"tierwise-device"
# open with require_auth too: orchestrators' liveness and readiness probes carry no token
OPEN_PATHS = ("/v2/health/",)
MAX_TOKEN_LOOKUPS = 4  # uncached token checks in flight at once, per server
# JSON bodies longer than this are parsed in a worker thread (a binary body's JSON header
# is short, whatever its tensors weigh)
OFF_LOOP_BODY_BYTES = 64 * 1024


def _header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return value
    return None


def _client_key(scope: Scope, principal: Principal | None) -> bytes:
    """Whose request this is, for the per-client limit: its credential's id when the server
    requires one (a key the client cannot choose), else the device id it sends
    (`tierwise-device`), else its address."""
    if principal is not None:
        return b"id:" + principal.id.encode()
    device = _header(scope, DEVICE_HEADER)
    if device is not None:
        return b"device:" + device[:128]
    client = scope.get("client")
    return f"addr:{client[0] if client else ''}".encode()


def _require_get(method: str, path: str) -> None:
    if method not in ("GET", "HEAD"):
        raise HTTPError(405, f"{path}: use GET, not {method}", [(b"allow", b"GET")])


async def send_response(send: Send, status: int, body: bytes,
                        headers: Sequence[tuple[bytes, bytes]]) -> None:
    """One whole response: `headers` (not changed) and a Content-Length, then `body`."""
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


# -- running it -----------------------------------------------------------------------------


def create_app(tier_name: str, tier: TierConfig, models: Mapping[str, OnnxModel],
               unavailable: Sequence[LoadFailure] = (),
               verifier: TokenVerifier | None = None) -> TierServer:
    """The ASGI app serving `models` as tier `tier_name`; `unavailable`: files that did not
    load, listed by its repository index; `verifier`: checks bearer tokens
    (`require_auth`)."""
    return TierServer(tier_name, tier, models, unavailable, verifier)


class RequestLimits:
    """The outermost ASGI layer of every server (`tierwise serve`, the cloud's hosted APIs):
    a request whose header block is over `tier.max_header_bytes` is answered 431 (RFC 6585)
    before any route runs (a longer one already while it arrives, `_bounded_http_protocol`),
    and a body that stops arriving for `tier.body_timeout_s`, or is not whole after
    `tier.body_deadline_s`, ends the request with 408, so a slow or incomplete upload
    cannot hold the server."""

    def __init__(self, app: Any) -> None:
        self.app = app
        tier: TierConfig = app.tier
        self.max_header_bytes = tier.max_header_bytes
        self.body_timeout_s = tier.body_timeout_s
        self.body_deadline_s = tier.body_deadline_s

    def __getattr__(self, name: str) -> Any:  # the wrapped server's API (tier, update, ...)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if size > self.max_header_bytes:
            await send_response(send, 431, encode_error(
                f"the request line and headers are {size:,} bytes; this server takes at most "
                f"{self.max_header_bytes:,} (max_header_bytes)"), [_JSON, _CLOSE])
            return
        body_done = False
        timeout_s = self.body_timeout_s
        deadline = time.monotonic() + self.body_deadline_s

        async def receive_in_time() -> Message:
            nonlocal body_done
            if body_done:  # after the body, a receive waits for the disconnect: no limit
                return await receive()
            left_s = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(timeout_s, left_s)))
            except TimeoutError:
                if left_s < timeout_s:  # a body trickling in, a little now and then
                    raise HTTPError(408, f"the request body took over "
                                         f"{self.body_deadline_s:g} s (body_deadline_s)",
                                    [_CLOSE]) from None
                raise HTTPError(408, f"the request body stalled: nothing arrived for "
                                     f"{timeout_s:g} s (body_timeout_s)", [_CLOSE]) from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, receive_in_time, send)


def _bounded_http_protocol(max_head_bytes: int) -> type:
    """uvicorn's httptools protocol, refusing a request head (request line and headers)
    longer than `max_head_bytes` while it is still arriving: 431, and the connection closed.
    httptools keeps a header's bytes until the header ends, so without this an 8 MB header
    would be held whole before any ASGI layer could refuse it. Counted per read, so a head
    is refused within two reads (each at most a socket buffer) past the limit; a head
    between the limit and that is refused by `RequestLimits`, which sees it whole."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = True
        _head_bytes = 0
        _began = False  # a message began in the read being parsed

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes, self._began = True, 0, True

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            self._began = False
            super().data_received(data)
            if not self._in_head or self.transport.is_closing():
                return
            # the read a head began in may also hold the previous message's body: counted
            # from the next read on, so a head is refused within one read past the limit
            if not self._began:
                self._head_bytes += len(data)
            if self._head_bytes > max_head_bytes:
                message = encode_error(
                    f"the request line and headers are over {max_head_bytes:,} bytes, the "
                    "most this server takes (max_header_bytes)")
                self.transport.write(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: "
                    b"application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                    % len(message) + message)
                self.transport.close()

    return BoundedHttpToolsProtocol


def _uvicorn_config(app: Any, **kwargs: Any) -> Any:
    import uvicorn

    tier: TierConfig = app.tier
    return uvicorn.Config(
        RequestLimits(app), loop="uvloop", http=_bounded_http_protocol(tier.max_header_bytes),
        ws="none", interface="asgi3", lifespan="on",
        access_log=False, proxy_headers=False, server_header=False, log_level="warning",
        **kwargs)


def run(app: Any, host: str, port: int, banner: str, tls: TlsConfig | None = None) -> None:
    """Run the ASGI `app` on host:port until interrupted (over TLS with `tls.cert`); print
    `banner` with the URL and the tier's settings once bound."""
    import uvicorn

    options = server_options(tls) if tls else {}
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    tier: TierConfig = app.tier
    mutual = " (mutual TLS)" if "ssl_ca_certs" in options else ""
    if tier.require_auth:
        mutual += " (bearer tokens required)"
    print(f"{banner} on {'https' if options else 'http'}://{host}:{bound_port}{mutual} "
          f"max_batch_size {tier.max_batch_size} max_queue_delay_ms "
          f"{tier.max_queue_delay_ms:g} compute_scale {tier.compute_scale:g}", flush=True)
    uvicorn.Server(_uvicorn_config(app, **options)).run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0,
                    tls: TlsConfig | None = None) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread (over TLS with `tls.cert`); yields its
    base URL, e.g. for tests."""
    import uvicorn

    options = server_options(tls) if tls else {}
    sock = _bind(host, port)
    server = uvicorn.Server(_uvicorn_config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="tierwise-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the tier server did not start")
        time.sleep(0.01)
    try:
        yield f"{'https' if options else 'http'}://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
