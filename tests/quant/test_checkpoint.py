"""The pipeline end to end on a tiny model; packed and QServe checkpoints; corrupt inputs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qoq.config import G128, PER_CHANNEL
from qoq.model.checkpoint import CheckpointError, save_checkpoint
from qoq.model.loader import load_any_weights
from qoq.model.weights import LoadError
from qoq.quant.calibrate import CalibConfig
from qoq.quant.pipeline import QoQOptions, quantize_model
from quant_helpers import tiny_model
from qserve_layout import write_qserve


def _quantized(precision="w4a8kv4", granularity=G128, **kw):
    model = tiny_model(hidden=128, heads=4, kv_heads=2, head_dim=32, inter=256, dtype=torch.float32)
    calib = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(0))
    opts = QoQOptions(precision=precision, granularity=granularity, progress=False, search_tokens=64,
                      calib=CalibConfig(num_seqs=4, seq_len=32, chunk_seqs=2), **kw)
    fp = tiny_model(hidden=128, heads=4, kv_heads=2, head_dim=32, inter=256, dtype=torch.float32)
    quantize_model(model, None, opts, calib_tokens=calib)
    with torch.no_grad():  # what the checkpoint stores: fp16 embeddings, head and norms
        for p in model.parameters():
            p.copy_(p.half().float())
    return model, fp


def _logits(model, tokens):
    with torch.no_grad():
        return model.compute_logits(model(tokens))


TOKENS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("precision,granularity", [("w4a8kv4", G128), ("w4a8kv8", PER_CHANNEL), ("w8a8kv8", G128)])
def test_round_trip(tmp_path, precision, granularity):
    model, fp = _quantized(precision, granularity)
    q, ref = _logits(model, TOKENS), _logits(fp, TOKENS)
    assert torch.isfinite(q).all()
    # a random tiny model is no accuracy test, only a sanity bound: quantized logits stay near
    assert (q - ref).abs().mean() < 0.5 * ref.abs().mean()
    save_checkpoint(model, tmp_path)
    meta = json.loads((tmp_path / "quant_config.json").read_text())
    assert meta["precision"] == precision and meta["format"] == "qoq-packed"
    loaded = load_any_weights(tmp_path)
    assert loaded.quant_config.kv_bits == model.quant_config.kv_bits
    # the default quantization rotates q/k after RoPE for a quantized cache, and the checkpoint says so
    assert model.quant_config.qk_hadamard and loaded.quant_config.qk_hadamard and meta["qk_hadamard"]
    assert torch.allclose(_logits(loaded, TOKENS), q, atol=1e-5)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "layers.0.self_attn.qkv_proj"
    if precision.startswith("w4"):
        assert tensors[f"{name}.qweight"].dtype == torch.uint8 and tensors[f"{name}.qweight"].shape == (256, 64)
        assert tensors[f"{name}.s1"].dtype == torch.float16
        if granularity == G128:
            assert tensors[f"{name}.s2"].dtype == torch.int8 and tensors[f"{name}.sz"].dtype == torch.int8


@pytest.mark.parametrize("granularity", [G128, PER_CHANNEL])
def test_qserve_layout_loads(tmp_path, granularity):
    # QServe's checkpoints carry no q/k Hadamard (its kernels have none): quantize without it
    model, _ = _quantized(granularity=granularity, reorder=False, qk_hadamard=False)
    write_qserve(model, tmp_path)
    loaded = load_any_weights(tmp_path)
    assert loaded.quant_config.granularity == granularity and loaded.quant_config.kv_bits == 4
    assert torch.allclose(_logits(loaded, TOKENS), _logits(model, TOKENS), atol=1e-5)
    _drop(tmp_path / "model.safetensors", "model.layers.0.self_attn.k_proj.s1_scales")
    with pytest.raises(LoadError, match="lacks .*k_proj.s1_scales"):
        load_any_weights(tmp_path)


def _drop(path, name):
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed")
    save_checkpoint(_quantized()[0], folder)
    return folder


def _copy(packed, tmp_path):
    import shutil

    return shutil.copytree(packed, tmp_path / "ckpt")


def test_corrupt_safetensors(packed, tmp_path):
    folder = _copy(packed, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="cannot read safetensors"):
        load_any_weights(folder)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"])
def test_an_index_naming_a_file_outside_the_checkpoint_is_refused(packed, tmp_path, name):
    folder = _copy(packed, tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    weight_map = dict.fromkeys(load_file(str(folder / "model.safetensors")), name)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(LoadError, match="outside the model folder"):
        load_any_weights(folder)


def test_corrupt_quant_config(packed, tmp_path):
    folder = _copy(packed, tmp_path)
    (folder / "quant_config.json").write_text("{not json")
    with pytest.raises(LoadError, match="not valid JSON"):
        load_any_weights(folder)
    (folder / "quant_config.json").write_text(json.dumps({"format": "qoq-packed", "precision": "w4a8kv4", "group_size": -1}))
    with pytest.raises(LoadError, match="does not match its config"):
        load_any_weights(folder)


def test_out_of_range_group_scales(packed, tmp_path):
    folder = _copy(packed, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["layers.1.mlp.down_proj.s2"][0, 0] = 0
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LoadError, match="group scales must be 1..16"):
        load_any_weights(folder)


def test_fake_quant_models_cannot_be_packed(tmp_path):
    model, _ = _quantized(fake_quant=True, reorder=False, clip=False)
    with pytest.raises(CheckpointError, match="float simulation"):
        save_checkpoint(model, tmp_path)


def test_cli_rejects_bad_options(capsys):
    from qoq.cli import main

    with pytest.raises(SystemExit):
        main(["quantize", "--out", "/tmp/x", "--group-size", "64"])
    with pytest.raises(SystemExit):
        main(["quantize", "--out", "/tmp/x", "--precision", "w3a8kv4"])


def test_default_steps_and_their_switches():
    """Defaults: GPTQ + the q/k Hadamard, SmoothAttention only where the Hadamard is off; the
    quant config records what ran, and the CLI's switches reach the options."""
    from qoq.cli import build_parser, quantize_options

    opts = QoQOptions()
    assert opts.gptq and opts.qk_hadamard and not opts.smooth_attention and not opts.v_rotation
    assert QoQOptions(qk_hadamard=False).smooth_attention and QoQOptions(smooth_attention=True).smooth_attention
    qc = opts.quant_config()
    assert qc.qk_hadamard and qc.steps["qk_hadamard"] and not qc.steps["smooth_attention"]
    assert QoQOptions(precision="w8a8kv8").quant_config().qk_hadamard  # any quantized KV cache

    def parsed(*flags):
        return quantize_options(build_parser().parse_args(["quantize", "m", "--out", "o", *flags]))

    assert parsed().qk_hadamard and not parsed().smooth_attention
    o = parsed("--no-qk-hadamard", "--v-rotation", "--no-gptq")
    assert not o.qk_hadamard and o.smooth_attention and o.v_rotation and not o.gptq
    assert not parsed("--no-qk-hadamard", "--no-smooth-attention").smooth_attention
