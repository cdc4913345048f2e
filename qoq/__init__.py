"""qoq: W4A8KV4 (QoQ) quantization and serving for Llama-family models."""

__version__ = "0.1.0"
