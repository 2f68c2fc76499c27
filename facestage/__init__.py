"""facestage: face swapping as a platform service.

The shared library of every facestage process: generated stubs (``facestage.<area>.v1``),
types, errors, settings, ONNX Runtime sessions, the model manifest, image codecs,
alignment, the gRPC server bootstrap, dynamic batching and metrics.
"""

__version__ = "0.1.0"
