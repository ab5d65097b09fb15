"""KServe V2 gRPC protocol edge."""
