"""The files people keep and share: parameter files and their descriptions,
checkpoints, configs, ONNX export. Every one read is untrusted."""
