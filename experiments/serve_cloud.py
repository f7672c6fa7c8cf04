r"""Serves the cloud half of an exported split over HTTP (docs/deploy.md §4).

  python -m experiments.serve_cloud --artifact=workdirs/deploy_quick/cloud --port=8000

POST IR messages to /v1/predict; GET /v1/info names the IR the service expects.
``--port=0`` picks a free port; the line "serving on http://HOST:PORT" says which. It binds
to 127.0.0.1 (this machine only) unless ``--host`` says otherwise, and has no
authentication unless ``--token_file`` names a file holding the bearer token every request
must carry; ``--ssl_certfile`` / ``--ssl_keyfile`` serve HTTPS.
"""

from absl import app, flags

from maxpart_jax.deploy import artifact, service

_ARTIFACT = flags.DEFINE_string("artifact", None, "an exported cloud artifact", required=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every "
                            "interface, reachable from other machines)")
_PORT = flags.DEFINE_integer("port", 8000, "port to listen on (0: any free port)")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", service.DEFAULT_MAX_BODY_BYTES,
                                 "larger requests are refused (413)")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 64, "messages per inference batch (a power of "
                                  "two); larger requests are split")
_TIMEOUT = flags.DEFINE_float("request_timeout_s", 30.0, "a request must arrive whole within "
                              "this long (408 otherwise); idle connections close after it")
_MAX_CONNECTIONS = flags.DEFINE_integer("max_connections", 1024, "more are answered 503")
_TOKEN_FILE = flags.DEFINE_string("token_file", None, "a file holding the bearer token every "
                                  "request must carry (default: no authentication)")
_CERT = flags.DEFINE_string("ssl_certfile", None, "TLS certificate (PEM): serve HTTPS")
_KEY = flags.DEFINE_string("ssl_keyfile", None, "TLS private key (PEM)")


def main(argv: list[str]) -> None:
  del argv
  cloud = artifact.CloudProgram.load(_ARTIFACT.value)
  config = service.ServiceConfig(
      max_body_bytes=_MAX_BODY.value, max_batch=_MAX_BATCH.value,
      request_timeout_s=_TIMEOUT.value, max_connections=_MAX_CONNECTIONS.value,
      token=service.read_token(_TOKEN_FILE.value))
  server, sock = service.make_server(cloud, _HOST.value, _PORT.value, config,
                                     ssl_certfile=_CERT.value, ssl_keyfile=_KEY.value)
  host, port = sock.getsockname()[:2]
  scheme = "https" if _CERT.value else "http"
  print(f"serving on {scheme}://{host}:{port} (IR {cloud.ir.shape} at {cloud.ir.bits} bits, "
        f"deployment {cloud.ir.artifact_id}; "
        f"{'bearer token required' if config.token else 'no authentication'})", flush=True)
  server.run(sockets=[sock])


if __name__ == "__main__":
  app.run(main)
