"""Generated protobuf module of config.pbtxt (Triton's ModelConfig), a repository file
format read by the core; regenerate with protos/generate.py. No grpc here."""
