"""The cloud half of a split as an HTTP service (standard library only), and its client.

``POST /v1/predict`` takes one or more IR messages (:mod:`~maxpart_jax.deploy.wire`)
concatenated in the body and answers ``{"predictions": [...], "logits": [[...], ...]}``
(``logits`` only with ``?logits=1``). ``GET /v1/info`` answers the IR spec the service
expects, so a client can check that it runs the matching edge artifact.

Errors are JSON ``{"error": ...}``: 400 for a malformed, truncated, corrupt or mismatched
message, 411 without a Content-Length, 413 for a body over the size limit, 404 for other
paths. A bad request never stops the service.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from maxpart_jax.deploy import wire
from maxpart_jax.deploy.artifact import CloudProgram, EdgeProgram

DEFAULT_MAX_BODY_BYTES = 64 * 2 ** 20


def make_server(cloud: CloudProgram, host: str = "127.0.0.1", port: int = 8000,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> http.server.ThreadingHTTPServer:
  """An HTTP server for ``cloud`` (call ``serve_forever``; port 0 picks a free port)."""
  lock = threading.Lock()  # one inference at a time; other requests wait their turn

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, body: dict[str, Any]) -> None:
      data = json.dumps(body).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # pylint: disable=redefined-builtin
      del format, args  # the service logs nothing per request

    def do_GET(self) -> None:  # pylint: disable=invalid-name
      if urllib.parse.urlparse(self.path).path != "/v1/info":
        return self._reply(404, {"error": f"unknown path {self.path}; use /v1/info or /v1/predict"})
      self._reply(200, {"ir": cloud.ir.to_json(), "num_classes": cloud.num_classes,
                        "max_body_bytes": max_body_bytes})

    def do_POST(self) -> None:  # pylint: disable=invalid-name
      url = urllib.parse.urlparse(self.path)
      if url.path != "/v1/predict":
        return self._reply(404, {"error": f"unknown path {url.path}; POST to /v1/predict"})
      length = self.headers.get("Content-Length")
      if length is None or not length.isdigit():
        self.close_connection = True
        return self._reply(411, {"error": "a Content-Length header is required"})
      if int(length) > max_body_bytes:
        self.close_connection = True  # the body is not read
        return self._reply(413, {"error": f"body of {length} bytes exceeds the limit of "
                                          f"{max_body_bytes}"})
      body = self.rfile.read(int(length))
      if len(body) < int(length):
        self.close_connection = True
        return self._reply(400, {"error": f"body ended after {len(body)} of {length} bytes"})
      try:
        with lock:
          logits = cloud.predict_messages(body)
      except wire.WireError as e:
        return self._reply(400, {"error": str(e)})
      reply = {"predictions": np.argmax(logits, axis=-1).tolist()}
      if urllib.parse.parse_qs(url.query).get("logits") == ["1"]:
        reply["logits"] = np.asarray(logits, np.float64).tolist()
      self._reply(200, reply)

  return http.server.ThreadingHTTPServer((host, port), Handler)


class ServiceError(RuntimeError):
  """The service answered with an error status."""

  def __init__(self, status: int, message: str):
    super().__init__(f"HTTP {status}: {message}")
    self.status = status


def _request(url: str, body: bytes | None = None, timeout: float = 60.0) -> dict[str, Any]:
  request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
  if body is not None:
    request.add_header("Content-Type", "application/octet-stream")
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return json.loads(response.read())
  except urllib.error.HTTPError as e:
    raise ServiceError(e.code, json.loads(e.read() or b"{}").get("error", e.reason)) from None


def info(server: str) -> dict[str, Any]:
  """``GET /v1/info`` of the service at ``server`` (``http://host:port``)."""
  return _request(f"{server.rstrip('/')}/v1/info")


def predict(server: str, messages: list[bytes], logits: bool = False) -> dict[str, Any]:
  """Sends ``messages`` in one request; the service's JSON answer (:class:`ServiceError` on
  an error status)."""
  query = "?logits=1" if logits else ""
  return _request(f"{server.rstrip('/')}/v1/predict{query}", b"".join(messages))


def run_client(edge: EdgeProgram, server: str, images: np.ndarray,
               labels: np.ndarray | None = None, batch_size: int = 64) -> dict[str, Any]:
  """Runs the edge on ``images`` and sends their IRs, ``batch_size`` per request.

  Checks first that the service serves this edge artifact's deployment. Returns the
  predictions, the accuracy (with ``labels``), images per second end to end (edge program,
  messages and round trips), and bytes sent per image against the raw image.
  """
  served = info(server)["ir"]["artifact_id"]
  if served != edge.spec.ir.artifact_id:
    raise ValueError(f"the service at {server} serves deployment {served}; this edge artifact "
                     f"is {edge.spec.ir.artifact_id} (export both halves together)")
  predictions, sent = [], 0
  start = time.perf_counter()
  for i in range(0, len(images), batch_size):
    messages = edge.messages(images[i:i + batch_size])
    sent += sum(len(m) for m in messages)
    predictions += predict(server, messages)["predictions"]
  seconds = time.perf_counter() - start
  out = {"images": len(images), "predictions": predictions,
         "images_per_second": len(images) / seconds, "bytes_per_image": sent / len(images),
         "raw_image_bytes": int(np.prod(images.shape[1:]))}
  if labels is not None:
    out["accuracy"] = float(np.mean(np.asarray(predictions) == np.asarray(labels)))
  return out
