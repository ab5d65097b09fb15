"""Load generator, benchmark suite and the ONNX model builders they (and the tests) share."""
