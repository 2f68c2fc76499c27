"""The detector stage: face detection models behind one interface, served over gRPC."""
