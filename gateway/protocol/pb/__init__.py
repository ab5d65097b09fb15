"""Generated protobuf/gRPC modules; regenerate with protos/generate.py."""
