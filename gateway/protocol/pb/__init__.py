"""Generated protobuf/gRPC modules of the wire protocol; regenerate with protos/generate.py.

``model_config_pb2`` lives in ``gateway.modelconfig_pb`` (config.pbtxt is a repository file
format, read by the core); the name is kept here so ``from gateway.protocol.pb import
model_config_pb2`` goes on working for code written before the move.
"""

from gateway.modelconfig_pb import model_config_pb2  # noqa: F401
