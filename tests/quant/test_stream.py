"""`qoq quantize` layer by layer from a folder: the same checkpoint as quantizing in memory, never
a half-written checkpoint, and clear errors before any long work."""

import json

import pytest
import torch
from quant_helpers import tiny_model, write_hf_folder
from safetensors import safe_open

import qoq.cli
import qoq.model.loader
import qoq.quant.calibrate
from qoq.config import G128, PER_CHANNEL
from qoq.model.checkpoint import CheckpointError, save_checkpoint
from qoq.model.loader import load_any_weights
from qoq.model.weights import LoadError
from qoq.quant.calibrate import CalibConfig
from qoq.quant.pipeline import QoQOptions, quantize_model
from qoq.quant.stream import REPORT_FILE, StreamingLayers, quantize_folder

CALIB = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(1))


def _tiny(tie=True):
    model = tiny_model(hidden=128, heads=4, kv_heads=2, head_dim=32, inter=256, layers=3, dtype=torch.float32)
    if not tie:
        model.untie_lm_head()
    return model


def _opts(**kw):
    return QoQOptions(progress=False, search_tokens=64, calib=CalibConfig(num_seqs=4, seq_len=32, chunk_seqs=2), **kw)


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as shard:
            out.update({k: shard.get_tensor(k) for k in shard.keys()})
    return out


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("granularity", [G128, PER_CHANNEL])
def test_streaming_equals_in_memory(tmp_path, tie, granularity):
    model = _tiny(tie)
    folder = write_hf_folder(model, tmp_path / "hf")
    report = quantize_folder(folder, tmp_path / "streamed", _opts(granularity=granularity), CALIB, None,
                             torch.device("cpu"))
    quantize_model(model, None, _opts(granularity=granularity), CALIB)
    save_checkpoint(model, tmp_path / "in_memory")
    streamed, in_memory = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "in_memory")
    assert streamed.keys() == in_memory.keys()
    for name, t in in_memory.items():
        assert torch.equal(streamed[name], t), name
    # a shard per layer and one for the embedding / head, listed in the index
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4 and set(index["weight_map"]) == set(streamed)
    assert report["layers"] == 3 and set(report["step_seconds"]) >= {"capture", "clip", "gptq", "load", "store"}
    assert json.loads((tmp_path / "streamed" / REPORT_FILE).read_text())["precision"] == "w4a8kv4"
    loaded = load_any_weights(tmp_path / "streamed")
    ids = torch.randint(0, 101, (1, 16))
    with torch.inference_mode():
        assert torch.equal(loaded(ids), load_any_weights(tmp_path / "in_memory")(ids))


def test_interrupted_quantize_leaves_no_checkpoint(tmp_path, monkeypatch):
    folder = write_hf_folder(_tiny(), tmp_path / "hf")
    real = StreamingLayers.store

    def store(self, index, layer):
        if index == 1:
            raise KeyboardInterrupt
        real(self, index, layer)

    monkeypatch.setattr(StreamingLayers, "store", store)
    with pytest.raises(KeyboardInterrupt):
        quantize_folder(folder, tmp_path / "out", _opts(), CALIB, None, torch.device("cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no out, no partial folder left


def _cli(monkeypatch, *argv):
    monkeypatch.setattr(qoq.model.loader, "load_tokenizer", lambda folder: None)
    monkeypatch.setattr(qoq.quant.calibrate, "calibration_tokens", lambda tok, cfg, text=None: CALIB)
    return qoq.cli.main(["quantize", *map(str, argv), "--device", "cpu", "--no-gptq", "--no-clip"])


def test_cli_refuses_an_existing_out_unless_overwrite(tmp_path, monkeypatch, capsys):
    folder = write_hf_folder(_tiny(), tmp_path / "hf")
    out = tmp_path / "out"
    assert _cli(monkeypatch, folder, "--out", out) == 0
    assert "qoq serve" in capsys.readouterr().err
    assert _cli(monkeypatch, folder, "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _cli(monkeypatch, folder, "--out", out, "--overwrite") == 0
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert _cli(monkeypatch, folder, "--out", other, "--overwrite") == 2
    assert "not a qoq checkpoint" in capsys.readouterr().err and (other / "keep.txt").exists()


def test_cli_errors_before_any_work(tmp_path, monkeypatch, capsys):
    pickles = tmp_path / "bin"
    write_hf_folder(_tiny(), pickles)
    for f in pickles.glob("*.safetensors*"):
        f.unlink()
    (pickles / "pytorch_model.bin").write_bytes(b"not really")
    assert _cli(monkeypatch, pickles, "--out", tmp_path / "o1") == 2
    assert "pickle" in capsys.readouterr().err

    gpt2 = write_hf_folder(_tiny(), tmp_path / "gpt2")
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert _cli(monkeypatch, gpt2, "--out", tmp_path / "o2") == 2
    assert "unsupported architecture" in capsys.readouterr().err

    folder = write_hf_folder(_tiny(), tmp_path / "hf")
    assert _cli(monkeypatch, folder, "--out", tmp_path / "q") == 0
    assert qoq.cli.main(["quantize", str(tmp_path / "q"), "--out", str(tmp_path / "qq")]) == 2
    assert "already" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_short_calibration_text_is_refused(tmp_path):
    from qoq.model.loader import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(None))
    with pytest.raises(ValueError, match="calibration needs"):
        qoq.quant.calibrate.calibration_tokens(tokenizer, CalibConfig(num_seqs=64, seq_len=512), "too short")


def test_layer_store_rejects_a_mismatched_layer(tmp_path):
    from qoq.model.loader import build_layer
    from qoq.model.weights import ShardedWeights

    model = _tiny()
    folder = write_hf_folder(model, tmp_path / "hf")
    weights = ShardedWeights(folder)
    state = weights.layer_state(model.config, 0)
    state["layers.0.mlp.down_proj.weight"] = state["layers.0.mlp.down_proj.weight"][:, :8]
    with pytest.raises(LoadError, match="mismatched shape"):
        build_layer(model.config, 0, state)
    with pytest.raises(LoadError, match="decoder layer 7"):
        weights.layer_state(model.config, 7)


def test_checkpoint_writer_refuses_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        save_checkpoint(quantize_model(_tiny(), None, QoQOptions.rtn(progress=False)), target)


def test_not_enough_gpu_memory_for_one_layer_is_refused_up_front(monkeypatch):
    from qoq.bench.random_model import bundled_config
    from qoq.quant import stream

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    config = bundled_config("qwen1.5-72b")
    with pytest.raises(ValueError, match=r"needs about \d+\.\d GiB .* 8\.0 GiB are free"):
        stream._check_device_memory(config, 64 * 512, torch.device("cuda"))
    stream._check_device_memory(bundled_config("tiny"), 8 * 512, torch.device("cuda"))  # fits: no error
