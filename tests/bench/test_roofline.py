import json
from importlib import resources

from qoq.bench.roofline import Ceilings, kv_bytes_per_token, roofline_tokens_per_s, weight_bytes
from qoq.config import PER_CHANNEL, ModelConfig, QuantConfig

CEIL = Ceilings(copy_bytes_per_s=3.0e12, bf16_ops_per_s=723e12, int8_ops_per_s=918e12)


def llama3_8b() -> ModelConfig:
    text = resources.files("qoq").joinpath("configs/llama-3-8b.json").read_text()
    return ModelConfig.from_hf(json.loads(text))


def test_bytes_follow_the_formats():
    cfg = llama3_8b()
    fp16, w4 = QuantConfig("w16a16kv16"), QuantConfig("w4a8kv4", PER_CHANNEL)
    lm_head = cfg.vocab_size * cfg.hidden_size * 2
    assert (weight_bytes(cfg, fp16) - lm_head) == 4 * (weight_bytes(cfg, w4) - lm_head)
    # KV: 32 layers x 2 x 1024 channels, fp16 -> 2 bytes, int4 -> half a byte + per-head scale/zero
    assert kv_bytes_per_token(cfg, fp16) == 2 * 32 * 1024 * 2
    assert kv_bytes_per_token(cfg, QuantConfig("w4a8kv4")) == 2 * 32 * 1024 / 2 + 2 * 32 * 8 * 4


def test_lower_precision_and_larger_batch_raise_the_roof():
    cfg = llama3_8b()
    fp16 = roofline_tokens_per_s(cfg, QuantConfig("w16a16kv16"), 64, 1024, 512, CEIL)
    w4 = roofline_tokens_per_s(cfg, QuantConfig("w4a8kv4"), 64, 1024, 512, CEIL)
    w4_big = roofline_tokens_per_s(cfg, QuantConfig("w4a8kv4"), 256, 1024, 512, CEIL)
    assert fp16 < w4 < w4_big
