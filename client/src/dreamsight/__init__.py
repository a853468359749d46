"""dreamsight: the typed Python client of the self-hosted multimodal AI platform.

The generated contract lives in one module per proto package:
``dreamsight.vision.v1``, ``dreamsight.diffusion.v1``, ``dreamsight.gateway.v1``
and ``dreamsight.common.v1`` (``*_pb2`` messages, ``*_pb2_grpc`` stubs).
"""

__version__ = "0.1.0"
