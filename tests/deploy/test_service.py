"""The cloud service and its client: end to end, under load, against hostile and slow
clients, with a bearer token and TLS."""

import asyncio
import concurrent.futures
import contextlib
import http.server
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import REPO, images as _images
from maxpart_jax.deploy import service

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@contextlib.contextmanager
def _serving(cloud_dir, *flags):
  """``serve_cloud`` in a subprocess: yields ``(url, process)``."""
  server = subprocess.Popen(
      [sys.executable, "-m", "experiments.serve_cloud", f"--artifact={cloud_dir}", "--port=0",
       *flags], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = server.stdout.readline()
    match = re.search(r"serving on (https?://\S+)", line)
    assert match, server.stderr.read()[-3000:] if server.poll() is not None else line
    yield match.group(1), server
  finally:
    server.terminate()
    server.wait(timeout=30)


def _post(url, body, headers=None):
  """``(status, JSON answer)``; every answer of the service must be JSON."""
  request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _raw(port, data, wait=30.0):
  """Sends raw bytes; ``(seconds until the server closed, what it answered)``."""
  with socket.create_connection(("127.0.0.1", port)) as sock:
    sock.sendall(data)
    sock.settimeout(wait)
    start, answer = time.perf_counter(), b""
    while chunk := sock.recv(65536):
      answer += chunk
    return time.perf_counter() - start, answer.decode("latin1")


def _rss_mib(pid):
  with open(f"/proc/{pid}/status") as f:
    return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


@pytest.mark.slow
def test_service_and_client_predict_end_to_end_and_survive_bad_requests(exported, tmp_path):
  """Both scripts on loopback: the client's predictions are the cloud's on the edge's IRs;
  malformed, truncated, oversized and smuggling requests get JSON errors, and the service
  keeps serving."""
  _, _, _, edge, cloud, out = exported
  images = _images(12, seed=6)
  np.savez(tmp_path / "images.npz", image=images)
  expected = cloud.logits(*edge.ir(images)).argmax(-1).tolist()
  with _serving(out / "cloud", f"--max_body_bytes={4 * edge.spec.ir.message_bytes}") as (url, _):
    client = subprocess.run(
        [sys.executable, "-m", "experiments.edge_client", f"--artifact={out / 'edge'}",
         f"--server={url}", f"--images={tmp_path / 'images.npz'}", "--batch_size=4",
         f"--out={tmp_path / 'client.json'}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert client.returncode == 0, client.stderr[-2000:]
    result = json.loads((tmp_path / "client.json").read_text())
    assert result["predictions"] == expected
    assert result["bytes_per_image"] == edge.spec.ir.message_bytes
    messages = edge.messages(images[:3])
    predict = f"{url}/v1/predict"
    port = int(url.rsplit(":", 1)[1])
    status, body = _post(predict, b"not a message")
    assert status == 400 and "truncated" in body["error"]
    status, body = _post(predict, messages[0][:-10])
    assert status == 400 and "truncated" in body["error"]
    status, body = _post(predict, b"".join(messages) * 2)  # 6 messages > 4 allowed
    assert status == 413 and "exceeds the limit" in body["error"]
    assert _post(f"{url}/v2/other", b"")[0] == 404
    for head, status in (
        (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: \xc2\xb2\r\n\r\n", 400),
        (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-length: 3\r\n"
         b"\r\nabc", 400),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
        (b"BREW /v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411)):
      _, answer = _raw(port, head)
      assert answer.startswith(f"HTTP/1.1 {status} "), answer[:200]
      assert "server:" not in answer.lower()  # no version banner
      assert "error" in json.loads(answer.split("\r\n\r\n", 1)[1])
    status, body = _post(predict, b"".join(messages))
    assert status == 200 and body["predictions"] == expected[:3]
    assert service.Client(url).info()["ir"]["artifact_id"] == cloud.ir.artifact_id


@pytest.mark.slow
def test_service_under_load_slow_and_idle_clients(exported):
  """50 concurrent clients × 10 requests of 1-3 messages are all answered correctly; a client
  whose body never ends, one that sends half a header and 200 idle connections are cut off
  after the request timeout (the slow ones with 408) while the others are served at once;
  batch sizes 1-40 compile only the padded sizes 1-8 and leave the memory flat."""
  _, _, _, edge, cloud, out = exported
  images = _images(40, seed=8)
  messages = edge.messages(images)
  expected = cloud.logits(*edge.ir(images)).argmax(-1)
  with _serving(out / "cloud", "--request_timeout_s=3", "--max_batch=8") as (url, server):
    port = int(url.rsplit(":", 1)[1])
    client = service.Client(url)
    rng = np.random.default_rng(0)
    draws = [[rng.choice(40, rng.integers(1, 4), replace=False) for _ in range(10)]
             for _ in range(50)]

    def rounds(picks):
      return all(client.predict([messages[i] for i in pick])["predictions"]
                 == expected[pick].tolist() for pick in picks)

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
      assert all(pool.map(rounds, draws))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      slow_body = pool.submit(_raw, port, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n"
                              b"Content-Length: 5000\r\n\r\n" + messages[0][:100])
      slow_head = pool.submit(_raw, port, b"POST /v1/predict HTTP/1.1\r\nHost:")
      idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
      start = time.perf_counter()
      assert client.predict(messages[:2])["predictions"] == expected[:2].tolist()
      assert time.perf_counter() - start < 2.5  # not held up by the slow or idle ones
      for future in (slow_body, slow_head):
        seconds, answer = future.result(timeout=30)
        assert 2.5 < seconds < 15 and answer.startswith("HTTP/1.1 408 "), (seconds, answer)
      for sock in idle:
        sock.settimeout(15)
        assert sock.recv(10) == b""  # closed by the server
        sock.close()

    before = _rss_mib(server.pid)
    for n in range(1, 41):
      assert client.predict(messages[:n])["predictions"] == expected[:n].tolist()
    compiled = client.info()["batch_sizes_compiled"]
    assert compiled == [1, 2, 4, 8], compiled
    assert _rss_mib(server.pid) - before < 100  # one program per distinct size: ~10 MiB each


class _EchoCloud:
  """A cloud program whose logits are (scale, -scale): each answer names its message."""

  def __init__(self, fail: bool = False):
    self.sizes, self.fail = [], fail

  def logits(self, payload, scales):
    self.sizes.append(len(payload))
    time.sleep(0.02)  # long enough for the other requests to arrive meanwhile
    if self.fail:
      raise RuntimeError("cloud program failed")
    return np.stack([scales, -scales], axis=1)


def test_concurrent_requests_share_batches_in_arrival_order():
  """A 20-message request and five 1-message requests arriving while its first batch runs:
  the five share one padded batch right after that first batch (instead of five calls
  after all of the large request), every answer goes to its own message, and a failing
  cloud program fails every request of its batch."""
  cloud = _EchoCloud()
  inference = service.Inference(cloud, max_batch=8)
  large = np.arange(20, dtype=np.float32)
  small = [np.array([100.0 + i], np.float32) for i in range(5)]
  finished = []

  async def request(name, scales):
    logits = await inference(np.zeros((len(scales), 1)), scales)
    finished.append((name, len(cloud.sizes)))
    return logits

  async def main():
    return await asyncio.gather(request("large", large),
                                *(request(f"small{i}", x) for i, x in enumerate(small)))

  answers = asyncio.run(main())
  for scales, logits in zip([large, *small], answers):
    np.testing.assert_array_equal(logits, np.stack([scales, -scales], axis=1))
  assert cloud.sizes == [8, 8, 8, 4]  # 8 of large; 5 small padded to 8; 8 and 4 of large
  assert inference.calls == 4 and inference.batch_sizes == {4, 8}
  assert sorted(finished)[1:] == [(f"small{i}", 2) for i in range(5)]  # after 2 batches
  assert ("large", 4) in finished

  failing = service.Inference(_EchoCloud(fail=True), max_batch=8)

  async def failed():
    return await asyncio.gather(*(failing(np.zeros((1, 1)), x) for x in small),
                                return_exceptions=True)

  assert all(isinstance(e, RuntimeError) and "cloud program failed" in str(e)
             for e in asyncio.run(failed()))


def test_binding_beyond_loopback_without_token_or_tls_warns(exported, tmp_path, caplog):
  """127.0.0.1 (the default) is quiet; 0.0.0.0 warns without a token, and with a token but
  without TLS; with both it is quiet. An empty token file is refused."""
  cloud = exported[4]
  cases = [("127.0.0.1", None, None, None), ("0.0.0.0", None, None, "without a bearer token"),
           ("0.0.0.0", "t", None, "without TLS"), ("0.0.0.0", "t", "cert.pem", None)]
  for host, token, cert, warning in cases:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      _, sock = service.make_server(cloud, host, 0, service.ServiceConfig(token=token),
                                    ssl_certfile=cert, ssl_keyfile=cert)
    sock.close()
    warned = [r.getMessage() for r in caplog.records if "reachable from other" in r.getMessage()]
    assert (warned and warning in warned[0]) if warning else not warned, (host, warned)
  (tmp_path / "empty").write_text(" \n")
  with pytest.raises(ValueError, match="token file .* is empty"):
    service.read_token(str(tmp_path / "empty"))
  assert service.read_token(None) is None


def _self_signed(tmp_path):
  cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
  subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                  "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                  "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
  return cert, key


@pytest.mark.slow
def test_bearer_token_and_tls(exported, tmp_path):
  """With --token_file and a certificate: HTTPS only, and only with the token (401 JSON
  otherwise); the edge client passes both."""
  _, _, _, edge, cloud, out = exported
  cert, key = _self_signed(tmp_path)
  (tmp_path / "token").write_text("s3cret-token\n")
  images = _images(4, seed=9)
  expected = cloud.logits(*edge.ir(images)).argmax(-1).tolist()
  with _serving(out / "cloud", f"--token_file={tmp_path / 'token'}", f"--ssl_certfile={cert}",
                f"--ssl_keyfile={key}") as (url, _):
    assert url.startswith("https://")
    good = service.Client(url, token="s3cret-token", ca_file=str(cert))
    assert good.predict(edge.messages(images))["predictions"] == expected
    for bad in (service.Client(url, ca_file=str(cert)),
                service.Client(url, token="s3cret-tokeN", ca_file=str(cert))):
      with pytest.raises(service.ServiceError, match="HTTP 401: missing or wrong bearer token"):
        bad.info()
    with pytest.raises(service.ServiceError, match="cannot reach.*CERTIFICATE_VERIFY_FAILED"):
      service.Client(url, token="s3cret-token").info()  # not trusted without the CA
    with pytest.raises(service.ServiceError, match="cannot reach"):
      service.Client(url.replace("https", "http"), token="s3cret-token").info()


class _Impostor(http.server.BaseHTTPRequestHandler):
  """Answers every request with what ``body`` says."""

  body = b"<html>busy</html>"

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header("Content-Length", str(len(self.body)))
    self.end_headers()
    self.wfile.write(self.body)

  do_POST = do_GET

  def log_message(self, *args):
    del args


@pytest.mark.slow
def test_client_reports_a_reply_that_is_not_the_service_in_one_line(exported, tmp_path):
  """A non-JSON answer, JSON without predictions and a closed port are one ServiceError each,
  and the edge client script ends with that one line, no traceback."""
  out = exported[-1]
  np.savez(tmp_path / "images.npz", image=_images(2))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}"
  try:
    with pytest.raises(service.ServiceError, match="is not JSON: b'<html>busy"):
      service.Client(url).info()
    script = subprocess.run(
        [sys.executable, "-m", "experiments.edge_client", f"--artifact={out / 'edge'}",
         f"--server={url}", f"--images={tmp_path / 'images.npz'}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert script.returncode != 0 and "Traceback" not in script.stderr, script.stderr[-2000:]
    assert script.stderr.strip().splitlines()[-1].startswith(
        "edge_client: HTTP 200: the answer of"), script.stderr[-500:]
    _Impostor.body = b'{"ir": {"artifact_id": "x"}, "predictions": "none"}'
    with pytest.raises(service.ServiceError, match="not one class index each"):
      service.Client(url).predict([b"m1", b"m2"])
    _Impostor.body = b"[1, 2]"
    with pytest.raises(service.ServiceError, match="not a JSON object"):
      service.Client(url).info()
  finally:
    server.shutdown()
    server.server_close()
  with pytest.raises(service.ServiceError, match="cannot reach"):
    service.Client(url, timeout_s=5).info()
