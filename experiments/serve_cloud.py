r"""Serves the cloud half of an exported split over HTTP (docs/deploy.md).

  python -m experiments.serve_cloud --artifact=workdirs/deploy_quick/cloud --port=8000

POST IR messages to /v1/predict; GET /v1/info names the IR the service expects.
``--port=0`` picks a free port; the line "serving on http://HOST:PORT" says which.
"""

from absl import app, flags

from maxpart_jax.deploy import artifact, service

_ARTIFACT = flags.DEFINE_string("artifact", None, "an exported cloud artifact", required=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "address to listen on")
_PORT = flags.DEFINE_integer("port", 8000, "port to listen on (0: any free port)")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", service.DEFAULT_MAX_BODY_BYTES,
                                 "larger requests are refused (413)")


def main(argv: list[str]) -> None:
  del argv
  cloud = artifact.CloudProgram.load(_ARTIFACT.value)
  server = service.make_server(cloud, _HOST.value, _PORT.value, _MAX_BODY.value)
  host, port = server.server_address[:2]
  print(f"serving on http://{host}:{port} (IR {cloud.ir.shape} at {cloud.ir.bits} bits, "
        f"deployment {cloud.ir.artifact_id})", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  app.run(main)
