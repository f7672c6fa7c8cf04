"""Split deployment: an integer edge program, the IR wire format and a float cloud program.

* :mod:`~maxpart_jax.deploy.integer`: the integer arithmetic (fixed-point multipliers,
  dynamic per-image activation codes, integer convolutions with wide accumulators) and
  the integer form of every block type.
* :mod:`~maxpart_jax.deploy.wire`: the IR message (header + packed codes) the edge sends.
* :mod:`~maxpart_jax.deploy.artifact`: export of a searched genome to an edge artifact
  (packed integer weights + serialized StableHLO) and a cloud artifact, and their loaders.
* :mod:`~maxpart_jax.deploy.service`: the HTTP cloud service and its client.

docs/deploy.md describes the formats and what is exact and what is not.
"""
