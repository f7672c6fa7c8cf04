"""The cloud half of a split as an HTTP service (Starlette on uvicorn), and its client.

``POST /v1/predict`` takes one or more IR messages (:mod:`~maxpart_jax.deploy.wire`)
concatenated in the body and answers ``{"predictions": [...], "logits": [[...], ...]}``
(``logits`` only with ``?logits=1``). ``GET /v1/info`` answers the IR spec the service
expects, so a client can check that it runs the matching edge artifact.

Every answer is JSON; errors are ``{"error": ...}``: 400 for a malformed, truncated, corrupt
or mismatched message or request, 401 without the bearer token (when one is set), 404 / 405
for other paths and methods, 408 for a request that did not arrive whole within
``request_timeout_s``, 411 without a Content-Length (chunked bodies are not taken), 413 for a
body over the size limit, 414 for a request line over 8 KiB, 431 for headers over 16 KiB, 503
beyond ``max_connections`` connections. A bad request never
stops the service, and a slow or idle client is cut off without holding up the others.

Inference runs on padded batches of at most ``max_batch`` messages (sizes 1, 2, 4, ...,
``max_batch``: a bounded set of compiled programs, whatever batch sizes clients send), one
batch at a time in arrival order, so a small request waits for at most one batch of a large
one.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import http
import ipaddress
import json
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from absl import logging
import anyio
import h11
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from maxpart_jax.deploy import wire
from maxpart_jax.deploy.artifact import CloudProgram, EdgeProgram

DEFAULT_MAX_BODY_BYTES = 64 * 2 ** 20
MAX_HEADER_BYTES = 16 * 2 ** 10
MAX_REQUEST_LINE = 8 * 2 ** 10


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
  """Limits of the service.

  Attributes:
    max_body_bytes: larger request bodies are refused (413) before they are read.
    max_batch: messages per inference batch (a power of two); larger bodies are split.
    request_timeout_s: a connection must deliver a whole request (headers and body) within
      this long of opening or of its previous answer, or it is answered 408 and closed.
    max_connections: open connections beyond this are answered 503 and closed.
    token: if set, every request needs ``Authorization: Bearer <token>``.
  """

  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
  max_batch: int = 64
  request_timeout_s: float = 30.0
  max_connections: int = 1024
  token: str | None = None

  def __post_init__(self):
    if self.max_batch < 1 or self.max_batch & (self.max_batch - 1):
      raise ValueError(f"max_batch must be a power of two, got {self.max_batch}")
    for name in ("max_body_bytes", "request_timeout_s", "max_connections"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class Inference:
  """The cloud program on padded batches, one batch at a time, in arrival order.

  A request sends its messages in chunks of at most ``max_batch``, one chunk at a time. One
  worker takes the waiting chunks in arrival order and runs as many together as fit in
  ``max_batch`` (from different requests), padded to a power of two: concurrent small
  requests share one call, and a request waits for at most one batch of a large one.
  """

  def __init__(self, cloud: CloudProgram, max_batch: int):
    self.cloud, self.max_batch = cloud, max_batch
    self.batch_sizes: set[int] = set()  # the padded sizes run so far (one program each)
    self.calls = 0  # batches run
    self._loop: asyncio.AbstractEventLoop | None = None
    self._waiting: collections.deque = collections.deque()
    self._ready: asyncio.Event | None = None
    self._worker: asyncio.Task | None = None  # held: the loop keeps only a weak reference

  def padded_size(self, n: int) -> int:
    """The smallest power of two >= n (n <= max_batch)."""
    return 1 << max(n - 1, 0).bit_length()

  def _logits(self, payload: np.ndarray, scales: np.ndarray) -> np.ndarray:
    n, size = len(payload), self.padded_size(len(payload))
    pad = size - n
    if pad:
      payload = np.concatenate([payload, np.zeros((pad, *payload.shape[1:]), payload.dtype)])
      scales = np.concatenate([scales, np.ones(pad, scales.dtype)])
    self.batch_sizes.add(size)
    self.calls += 1
    return self.cloud.logits(payload, scales)[:n]

  def _start(self) -> None:
    """One worker per event loop (a server runs one; tests may start several in turn)."""
    loop = asyncio.get_running_loop()
    if self._loop is not loop:
      self._loop, self._waiting, self._ready = loop, collections.deque(), asyncio.Event()
      self._worker = loop.create_task(self._work())

  async def _work(self) -> None:
    while True:
      await self._ready.wait()
      taken, n = [], 0
      while self._waiting and (not taken or n + len(self._waiting[0][0]) <= self.max_batch):
        taken.append(self._waiting.popleft())
        n += len(taken[-1][0])
      if not self._waiting:
        self._ready.clear()
      try:
        logits = await anyio.to_thread.run_sync(
            self._logits, np.concatenate([t[0] for t in taken]),
            np.concatenate([t[1] for t in taken]))
      except Exception as e:  # pylint: disable=broad-except  (each request answers it)
        for _, _, future in taken:
          if not future.done():
            future.set_exception(e)
        continue
      offsets = np.cumsum([0] + [len(t[0]) for t in taken])
      for (_, _, future), a, b in zip(taken, offsets[:-1], offsets[1:]):
        if not future.done():  # its client may have gone
          future.set_result(logits[a:b])

  async def __call__(self, payload: np.ndarray, scales: np.ndarray) -> np.ndarray:
    self._start()
    out = []
    for start in range(0, len(payload), self.max_batch):
      future = self._loop.create_future()
      self._waiting.append((payload[start:start + self.max_batch],
                            scales[start:start + self.max_batch], future))
      self._ready.set()
      out.append(await future)
    return np.concatenate(out)


def _error(status: int, message: str, close: bool = False, **headers: str) -> JSONResponse:
  headers = {**headers, **({"connection": "close"} if close else {})}
  return JSONResponse({"error": message}, status_code=status, headers=headers)


def make_app(cloud: CloudProgram, config: ServiceConfig = ServiceConfig()) -> Starlette:
  """The ASGI application serving ``cloud``."""
  inference = Inference(cloud, config.max_batch)

  async def info(request: Request) -> JSONResponse:
    del request
    return JSONResponse({"ir": cloud.ir.to_json(), "num_classes": cloud.num_classes,
                         "max_body_bytes": config.max_body_bytes, "max_batch": config.max_batch,
                         "batch_sizes_compiled": sorted(inference.batch_sizes)})

  async def predict(request: Request) -> JSONResponse:
    lengths = request.headers.getlist("content-length")
    if len(lengths) > 1:
      return _error(400, "more than one Content-Length header", close=True)
    if not lengths:
      return _error(411, "a Content-Length header is required", close=True)
    length = int(lengths[0])  # the HTTP parser admits digits only
    if length > config.max_body_bytes:
      return _error(413, f"body of {length} bytes exceeds the limit of {config.max_body_bytes}",
                    close=True)
    body = await request.body()
    try:
      payload, scales = await anyio.to_thread.run_sync(wire.decode_all, body, cloud.ir)
    except wire.WireError as e:
      return _error(400, str(e))
    logits = await inference(payload, scales)
    if not np.all(np.isfinite(logits)):
      return _error(500, "the cloud program produced non-finite logits for this IR")
    reply = {"predictions": np.argmax(logits, axis=-1).tolist()}
    if request.query_params.get("logits") == "1":
      reply["logits"] = np.asarray(logits, np.float64).tolist()
    return JSONResponse(reply)

  async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = {404: f"unknown path {request.url.path}; use GET /v1/info or POST /v1/predict",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(
                   exc.status_code, str(exc.detail))
    return _error(exc.status_code, message)

  async def server_error(request: Request, exc: Exception) -> JSONResponse:
    del request
    logging.exception("internal error: %s", exc)
    return _error(500, f"internal error: {type(exc).__name__}")

  async def disconnected(request: Request, exc: Exception) -> JSONResponse:
    del request, exc
    return _error(400, "the client went away", close=True)

  app = Starlette(routes=[Route("/v1/info", info, methods=["GET"]),
                          Route("/v1/predict", predict, methods=["POST"])],
                  exception_handlers={HTTPException: http_error, ClientDisconnect: disconnected,
                                      Exception: server_error})
  app.state.inference = inference
  if config.token is None:
    return app
  token = config.token.encode()

  async def authenticated(scope, receive, send):
    if scope["type"] == "http":
      given = dict(scope["headers"]).get(b"authorization", b"")
      if not hmac.compare_digest(given, b"Bearer " + token):
        response = _error(401, "missing or wrong bearer token", close=True,
                          **{"www-authenticate": "Bearer"})
        return await response(scope, receive, send)
    return await app(scope, receive, send)

  return authenticated


def _raw_json(status: int, message: str) -> bytes:
  """A whole HTTP/1.1 answer, for the moments no request is there to answer through h11."""
  body = json.dumps({"error": message}).encode()
  return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
          f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
          "connection: close\r\n\r\n").encode() + body


def _refuse_head(head: bytes) -> tuple[int, str] | None:
  """``(status, reason)`` for a request head to refuse before parsing it, else None: a
  request line over :data:`MAX_REQUEST_LINE` bytes, a head over :data:`MAX_HEADER_BYTES`,
  or more than one Content-Length (which proxies may read differently: request smuggling)."""
  lines = head.split(b"\r\n")
  if len(lines[0]) > MAX_REQUEST_LINE:
    return 414, f"request line over {MAX_REQUEST_LINE} bytes"
  if len(head) > MAX_HEADER_BYTES:
    return 431, f"request headers over {MAX_HEADER_BYTES} bytes"
  lengths = [line for line in lines[1:] if line.lower().startswith(b"content-length:")]
  if len(lengths) > 1 or any(b"," in line for line in lengths):
    return 400, "more than one Content-Length"
  return None


class _Protocol(H11Protocol):
  """uvicorn's h11 protocol with JSON errors, a deadline for each whole request, and a
  connection limit. :func:`make_server` sets the two class attributes."""

  request_timeout_s = 30.0
  max_connections = 1024

  def __init__(self, *args: Any, **kwargs: Any):
    super().__init__(*args, **kwargs)
    self._deadline: asyncio.TimerHandle | None = None
    self._protocol_error: h11.RemoteProtocolError | None = None
    self._head: bytearray | None = bytearray()  # the request head's bytes, until complete
    next_event = self.conn.next_event

    def recording_next_event():
      try:
        return next_event()
      except h11.RemoteProtocolError as e:
        self._protocol_error = e
        raise

    self.conn.next_event = recording_next_event

  def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
    super().connection_made(transport)
    if len(self.connections) > self.max_connections:
      transport.write(_raw_json(503, "too many open connections; try again later"))
      transport.close()
      return
    self._arm()

  def data_received(self, data: bytes) -> None:
    if self._head is not None:
      self._head += data
      end = self._head.find(b"\r\n\r\n")
      if end >= 0 or len(self._head) > MAX_HEADER_BYTES:
        head, self._head = bytes(self._head[:end] if end >= 0 else self._head), None
        refusal = _refuse_head(head)
        if refusal:
          self.transport.write(_raw_json(*refusal))
          self.transport.close()
          return
    super().data_received(data)

  def _arm(self) -> None:
    self._disarm()
    self._deadline = self.loop.call_later(self.request_timeout_s, self._expired)

  def _disarm(self) -> None:
    if self._deadline is not None:
      self._deadline.cancel()
      self._deadline = None

  def _expired(self) -> None:
    self._deadline = None
    if self.transport.is_closing():
      return
    cycle = self.cycle
    if cycle is not None and cycle.response_started and not cycle.response_complete:
      return  # the request is complete and being answered
    if self._head is None or self._head:  # part of a request came: say why it is cut off
      self.transport.write(_raw_json(
          408, f"the request did not arrive whole within {self.request_timeout_s:g} s"))
    self.transport.close()

  def handle_events(self) -> None:
    super().handle_events()
    cycle = self.cycle
    if self.transport.is_closing() or (cycle is not None and not cycle.more_body
                                       and not cycle.response_complete):
      self._disarm()  # a whole request is in and being answered (or the connection is gone)

  def on_response_complete(self) -> None:
    self._arm()  # the next request must arrive within the deadline too
    self._head = bytearray()
    super().on_response_complete()

  def connection_lost(self, exc: Exception | None) -> None:
    self._disarm()
    super().connection_lost(exc)

  def timeout_keep_alive_handler(self) -> None:
    """Idle connections are closed by the request deadline instead."""

  def send_400_response(self, msg: str) -> None:
    error = self._protocol_error
    status = getattr(error, "error_status_hint", 400) if error is not None else 400
    detail = f"{msg} ({error})" if error is not None and str(error) else msg
    self.transport.write(_raw_json(status, detail))
    self.transport.close()


def make_server(cloud: CloudProgram, host: str = "127.0.0.1", port: int = 8000,
                config: ServiceConfig = ServiceConfig(), ssl_certfile: str | None = None,
                ssl_keyfile: str | None = None) -> tuple[uvicorn.Server, socket.socket]:
  """A uvicorn server for ``cloud`` and its listening socket (port 0 picks a free port):
  call ``server.run(sockets=[sock])``. Warns when it listens beyond this machine without a
  token or TLS."""
  if not _is_loopback(host) and (config.token is None or ssl_certfile is None):
    logging.warning("serving on %s, reachable from other machines, %s: anyone who reaches "
                    "the port can use or read the service", host,
                    "without a bearer token" if config.token is None else "without TLS")
  protocol = type("Protocol", (_Protocol,), {"request_timeout_s": config.request_timeout_s,
                                             "max_connections": config.max_connections})
  server = uvicorn.Server(uvicorn.Config(
      make_app(cloud, config), http=protocol, ws="none", lifespan="off", server_header=False,
      access_log=False, log_level="warning", h11_max_incomplete_event_size=MAX_HEADER_BYTES,
      timeout_graceful_shutdown=5, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile))
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  return server, sock


def _is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def read_token(path: str | None) -> str | None:
  """The bearer token in the file ``path`` (surrounding whitespace stripped); None without
  a path. Kept in a file, not on the command line, where other users could read it."""
  if path is None:
    return None
  with open(path) as f:
    token = f.read().strip()
  if not token:
    raise ValueError(f"the token file {path} is empty")
  return token


class ServiceError(RuntimeError):
  """The service could not be reached, answered with an error status, or answered
  something that is not the service's JSON."""

  def __init__(self, status: int, message: str):
    super().__init__(f"HTTP {status}: {message}" if status else message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Client:
  """Where the service is and how to reach it.

  Attributes:
    server: ``http://host:port`` or ``https://host:port``.
    token: the bearer token, if the service requires one.
    ca_file: a CA certificate (PEM) to verify a TLS server with (e.g. a self-signed one).
    timeout_s: for each request.
  """

  server: str
  token: str | None = None
  ca_file: str | None = None
  timeout_s: float = 60.0

  def request(self, path: str, body: bytes | None = None) -> dict[str, Any]:
    """One request; the JSON answer, or :class:`ServiceError` with a one-line reason."""
    url = f"{self.server.rstrip('/')}{path}"
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    if body is not None:
      request.add_header("Content-Type", "application/octet-stream")
    if self.token:
      request.add_header("Authorization", f"Bearer {self.token}")
    context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as response:
        status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
      raw = e.read()
      raise ServiceError(e.code, _error_message(raw) or str(e.reason)) from None
    except (urllib.error.URLError, OSError) as e:
      reason = getattr(e, "reason", e)
      raise ServiceError(0, f"cannot reach {url}: {reason}") from None
    try:
      reply = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ServiceError(status, f"the answer of {url} is not JSON: {raw[:80]!r}") from None
    if not isinstance(reply, dict):
      raise ServiceError(status, f"the answer of {url} is not a JSON object: {raw[:80]!r}")
    return reply

  def info(self) -> dict[str, Any]:
    """``GET /v1/info``."""
    reply = self.request("/v1/info")
    if not isinstance(reply.get("ir"), dict) or "artifact_id" not in reply["ir"]:
      raise ServiceError(200, f"{self.server}/v1/info does not name an IR spec: {reply}")
    return reply

  def predict(self, messages: list[bytes], logits: bool = False) -> dict[str, Any]:
    """Sends ``messages`` in one request; the service's answer, checked to hold one
    prediction per message."""
    reply = self.request(f"/v1/predict{'?logits=1' if logits else ''}", b"".join(messages))
    predictions = reply.get("predictions")
    if (not isinstance(predictions, list) or len(predictions) != len(messages)
        or not all(isinstance(p, int) for p in predictions)):
      raise ServiceError(200, f"the service answered {len(messages)} messages with "
                              f"{str(reply)[:120]}, not one class index each")
    return reply


def _error_message(raw: bytes) -> str | None:
  try:
    reply = json.loads(raw)
    return str(reply["error"])
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
    return raw[:200].decode("utf-8", "replace") if raw else None


def run_client(edge: EdgeProgram, client: Client, images: np.ndarray,
               labels: np.ndarray | None = None, batch_size: int = 64) -> dict[str, Any]:
  """Runs the edge on ``images`` and sends their IRs, ``batch_size`` per request.

  Checks first that the service serves this edge artifact's deployment. Returns the
  predictions, the accuracy (with ``labels``), images per second end to end (edge program,
  messages and round trips), and bytes sent per image against the raw image.
  """
  served = client.info()["ir"]["artifact_id"]
  if served != edge.spec.ir.artifact_id:
    raise ValueError(f"the service at {client.server} serves deployment {served}; this edge "
                     f"artifact is {edge.spec.ir.artifact_id} (export both halves together)")
  predictions, sent = [], 0
  start = time.perf_counter()
  for i in range(0, len(images), batch_size):
    messages = edge.messages(images[i:i + batch_size])
    sent += sum(len(m) for m in messages)
    predictions += client.predict(messages)["predictions"]
  seconds = time.perf_counter() - start
  out = {"images": len(images), "predictions": predictions,
         "images_per_second": len(images) / seconds, "bytes_per_image": sent / len(images),
         "raw_image_bytes": int(np.prod(images.shape[1:]))}
  if labels is not None:
    out["accuracy"] = float(np.mean(np.asarray(predictions) == np.asarray(labels)))
  return out
