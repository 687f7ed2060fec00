"""A remote call: one OIP v2 inference on a server, answered as plain outputs and timings.

`TierConnections` holds one keep-alive httpx client per tier, whose transport emulates the
tier's link and measures every transfer (`tierwise.net.shaping`).

`remote_infer` encodes the request (binary tensors; a codec's rows as BYTES), posts it through
the tier's httpx client (whose transport emulates the link and measures the `Transfer`),
gives up at `abort_at`, and decodes the answer. It is the bottom layer of a remote stage, in
httpx's manner: it knows nothing of estimators, prices, plans or traces; the stage above it
(`tierwise.client.stages`) learns from and prices what it returns.
"""

from __future__ import annotations

import email.utils
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
import numpy as np

from tierwise.codecs import RAW, encode_rows
from tierwise.config import Config
from tierwise.net.shaping import (
    ABORT_AT_EXTENSION,
    TRANSFER_EXTENSION,
    EmulatedLink,
    Transfer,
    shaped_client,
)
from tierwise.net.tls import client_context, scheme
from tierwise.planner.plans import RemoteStageError
from tierwise.protocol.oip import (
    HEADER_LENGTH,
    ProtocolError,
    decode_infer_response,
    encode_infer_request,
    infer_path,
    parse_header_length,
)

# An OIP request's HTTP request line and headers, near enough (measured on loopback).
HTTP_HEADER_BYTES = 300


@dataclass(frozen=True)
class RemoteAnswer:
    """What one remote inference returned and took. `network_ms` is the round trip minus the
    server's compute and queue time (its headers); `bytes_up`/`bytes_down` are what crossed
    the link (the transport's `Transfer`); `payload_bytes` is the encoded input tensor alone,
    `request_bytes` the whole request as sent (body and `HTTP_HEADER_BYTES`)."""

    outputs: dict[str, np.ndarray]
    total_ms: float
    compute_ms: float
    queue_ms: float
    network_ms: float
    batch_size: int  # the server's batch this request ran in
    bytes_up: int
    bytes_down: int
    payload_bytes: int
    request_bytes: int
    model_version: str


class RemoteTimeoutError(RemoteStageError):
    """No answer by `abort_at`: after `waited_ms`, with `request_bytes` (body and headers)
    sent or on their way. What a link estimator learns from a timeout."""

    def __init__(self, message: str, tier: str, waited_ms: float, request_bytes: int) -> None:
        super().__init__(message, tier)
        self.waited_ms = waited_ms
        self.request_bytes = request_bytes


def retry_after_s(headers: httpx.Headers, default_s: float = 1.0) -> float:
    """Retry-After in seconds (RFC 9110: delta-seconds or an HTTP date), else `default_s`."""
    value = headers.get("retry-after", "")
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default_s
    return max(0.0, when.timestamp() - time.time())


FORGOTTEN_CLOSE_S = 120.0  # longer than any request's timeout


class TierConnections:
    """One keep-alive httpx client per remote tier, made on first use, through the tier's
    link. A tier's URL is `tier_urls[tier]`, else `http://{host}:{port}` from `config`."""

    def __init__(self, config: Config, tier_urls: Mapping[str, str],
                 links: Mapping[str, EmulatedLink | None], device_id: str = "") -> None:
        self.config = config
        self.device_id = device_id  # sent as `tierwise-device`: the server's per-client limit
        self.tls = client_context(config.tls)  # None: plain HTTP
        self.tier_urls = tier_urls
        self.links = links
        self._clients: dict[str, httpx.Client] = {}
        self._lock = threading.Lock()

    def has_url(self, tier: str) -> bool:
        """Whether `tier` can be called at all: a URL given, or a port in the config."""
        return tier in self.tier_urls or self.config.tier(tier).port != 0

    def get(self, tier: str, timeout_s: float) -> httpx.Client:
        """The client to `tier` (`timeout_s`: its default timeout, if it is made now).
        Raises RemoteStageError when the tier has no URL."""
        client = self._clients.get(tier)
        if client is None:
            url = self.tier_urls.get(tier)
            if url is None:
                settings = self.config.tier(tier)
                if settings.port == 0:
                    raise RemoteStageError(f"tier {tier!r}: no URL (set tiers.{tier}.port or "
                                           "pass tier_urls)", tier)
                url = f"{scheme(self.config.tls)}://{settings.host}:{settings.port}"
            with self._lock:
                client = self._clients.get(tier)
                if client is None:
                    client = shaped_client(url, self.links.get(tier), timeout_s,
                                           verify=self.tls or True)
                    if self.device_id:
                        client.headers["tierwise-device"] = self.device_id
                    known = self.config.tiers.get(tier)  # None: known by URL only
                    if known is not None and known.require_auth:
                        client.headers["authorization"] = f"Bearer {self._token(tier)}"
                    self._clients[tier] = client
        return client

    def _token(self, tier: str) -> str:
        """This device's own credential, the one it polls the registry with."""
        from tierwise.registry.subscriber import registry_token

        try:
            return registry_token(self.config.registry.token, self.config.registry_dir)
        except FileNotFoundError:
            raise RemoteStageError(f"tier {tier!r} requires a token (tiers.{tier}.require_auth)"
                                   " and this device has none: set registry.token to its own "
                                   "(`tierwise devices enroll`)", tier) from None

    def forget(self, tier: str) -> None:
        """Drop `tier`'s connection (its URL or settings changed): the next request opens a
        new one. The old one is closed a while later, not now: a request may be using it."""
        with self._lock:
            client = self._clients.pop(tier, None)
        if client is not None:
            timer = threading.Timer(FORGOTTEN_CLOSE_S, client.close)
            timer.daemon = True
            timer.start()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()


def remote_infer(http: httpx.Client, model: str, tensor: np.ndarray, codec: str,
                 input_name: str, abort_at: float, version: str | None = None, *,
                 tier: str) -> RemoteAnswer:
    """One OIP v2 inference of `model` (of `version`, else the server's default) on the
    server `http` talks to, `tensor` sent as `input_name` encoded with `codec`, abandoned at
    `abort_at` (a `time.perf_counter()`). `tier` names the server in errors.

    Raises RemoteTimeoutError when no answer came in time, and RemoteStageError for any other
    unusable answer (`tier_down` where the server looks unreachable or answered 5xx)."""
    if codec == RAW:
        inputs, parameters, payload_bytes = {input_name: tensor}, None, tensor.nbytes
    else:
        encoded = encode_rows(codec, tensor)
        inputs = {input_name: encoded}
        parameters = {input_name: {"content_type": codec}}
        payload_bytes = sum(len(row) for row in encoded)
    body, headers = encode_infer_request(inputs, binary=True, outputs=None, binary_outputs=True,
                                         input_parameters=parameters)
    request_bytes = len(body) + HTTP_HEADER_BYTES
    started = time.perf_counter()
    try:
        response = http.post(infer_path(model, version), content=body, headers=headers,
                             timeout=max(abort_at - started, 0.001),
                             extensions={ABORT_AT_EXTENSION: abort_at})
    except httpx.TimeoutException as error:
        waited_ms = (time.perf_counter() - started) * 1e3
        raise RemoteTimeoutError(f"no answer in {waited_ms:.0f} ms ({type(error).__name__})",
                                 tier, waited_ms, request_bytes) from None
    except httpx.HTTPError as error:
        raise RemoteStageError(f"{type(error).__name__}: {error}", tier, tier_down=True) from None
    total_ms = (time.perf_counter() - started) * 1e3
    if response.status_code == 429:  # load: the tier is up and says when to come back
        raise RemoteStageError(f"{tier} answered 429: {response.text[:200]}", tier,
                               retry_after_s=retry_after_s(response.headers))
    if response.status_code != 200:
        raise RemoteStageError(f"{tier} answered {response.status_code}: {response.text[:200]}",
                               tier, tier_down=response.status_code >= 500)
    try:
        decoded = decode_infer_response(
            response.content, parse_header_length(response.headers.get(HEADER_LENGTH)))
    except ProtocolError as error:
        raise RemoteStageError(f"undecodable answer: {error}", tier) from None
    transfer: Transfer = response.extensions[TRANSFER_EXTENSION]
    compute_ms = float(response.headers.get("tierwise-compute-ms", 0.0))
    queue_ms = float(response.headers.get("tierwise-queue-ms", 0.0))
    return RemoteAnswer(
        outputs=decoded.outputs, total_ms=total_ms, compute_ms=compute_ms, queue_ms=queue_ms,
        network_ms=max(0.0, total_ms - compute_ms - queue_ms),
        batch_size=int(response.headers.get("tierwise-batch-size", 1)),
        bytes_up=transfer.bytes_up, bytes_down=transfer.bytes_down,
        payload_bytes=payload_bytes, request_bytes=request_bytes,
        model_version=response.headers.get("tierwise-model-version",
                                           decoded.model_version or ""))
