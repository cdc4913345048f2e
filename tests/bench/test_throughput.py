"""The throughput benchmark's machinery on the CPU: random packed models (whole, and a rank's
shard drawn on its own), a full engine run, and one over 2 processes (gloo)."""

import json
import os
import subprocess

import pytest
import torch

from qoq.bench.random_model import bench_quant_config, bundled_config, random_model
from qoq.bench.throughput import run_throughput
from qoq.cli import main
from qoq.config import G128, PER_CHANNEL, ModelConfig, QuantConfig
from qoq.distributed import TPGroup
from qoq.layers.quant_linear import W4A8G128Linear, W4A8PerChannelLinear, W8A8Linear
from qoq.model.tensor_parallel import shard_model

TINY = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.mark.parametrize("precision, group, cls", [
    ("w4a8kv4", G128, W4A8G128Linear), ("w4a8kv4", PER_CHANNEL, W4A8PerChannelLinear), ("w8a8kv8", G128, W8A8Linear)])
def test_random_models_have_the_packed_layers_and_finite_outputs(tiny_config, precision, group, cls):
    model = random_model(bundled_config(tiny_config), QuantConfig(precision, group), device="cpu",
                         dtype=torch.float32)
    assert isinstance(model.layers[0].self_attn.qkv_proj, cls)
    logits = model.compute_logits(model(torch.randint(0, 256, (2, 9))))
    assert torch.isfinite(logits).all()


def test_run_throughput_generates_every_token(tiny_config):
    result = run_throughput(tiny_config, "w4a8kv4", G128, batch=3, input_len=12, output_len=5, device="cpu")
    assert result.batch == 3 and result.tokens_per_s > 0 and result.seconds > 0
    assert result.decode_forward_ms <= result.decode_step_ms
    phases = result.phases  # every prompt token prefilled once; the rest of the tokens decoded
    assert sum(p["prefill_tokens"] for p in phases.values()) == 3 * 12
    assert sum(p["decode_tokens"] for p in phases.values()) <= 3 * (5 - 1)
    assert sum(p["seconds"] for p in phases.values()) <= result.seconds + 1e-3


def test_unknown_config_is_refused():
    with pytest.raises(ValueError, match="unknown config 'gpt-9'"):
        bundled_config("gpt-9")


# Splits over 2 and 4 ranks at g128 (q_size and intermediate size / 4 are multiples of 128), KV
# heads split over 2 and replicated over 4, and a vocabulary that splits unevenly.
SPLITTABLE = ModelConfig(vocab_size=1001, hidden_size=256, intermediate_size=1024, num_layers=2, num_heads=8,
                         num_kv_heads=2, head_dim=64, max_position_embeddings=64)


@pytest.mark.parametrize("precision, group", [
    ("w16a16kv16", G128), ("w8a8kv8", G128), ("w4a8kv4", PER_CHANNEL), ("w4a8kv4", G128)])
def test_a_ranks_random_shard_is_its_slice_of_the_one_process_model(precision, group):
    """Each rank draws only its shard (a layer at a time), and it is exactly the slice shard_model
    takes of the one-process model of the same seed: one model whatever the group size."""
    quant = bench_quant_config(precision, group)
    whole = random_model(SPLITTABLE, quant, device="cpu", dtype=torch.float32, seed=3)
    for world_size in (2, 4):
        for rank in range(world_size):
            tp = TPGroup(rank, world_size)  # no process group: drawing a shard needs no collective
            got = random_model(SPLITTABLE, quant, device="cpu", dtype=torch.float32, seed=3, tp=tp).state_dict()
            want = shard_model(whole, tp).state_dict()
            assert got.keys() == want.keys()
            for name, t in want.items():
                assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_bench_throughput_over_two_processes(capsys):
    """`qoq bench throughput --tensor-parallel-size 2` end to end: rank 1 a process of its own
    (gloo), each rank drawing its shard of the tiny config's random model."""
    code = main(["bench", "throughput", "--config", "tiny", "--precision", "w16a16kv16", "--batch", "3",
                 "--input-len", "12", "--output-len", "5", "--device", "cpu", "--tensor-parallel-size", "2",
                 "--threads", "1"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["tensor_parallel_size"] == 2 and record["config"] == "tiny" and record["batch"] == 3
    assert record["input_len"] == 12 and record["output_len"] == 5
    assert record["tokens_per_s"] > 0 and record["seconds"] > 0
    assert record["roofline_tokens_per_s"] is None  # the roofline is one GPU's
    phases = record["phases"]
    assert sum(p["prefill_tokens"] for p in phases.values()) == 3 * 12
    assert sum(p["decode_tokens"] for p in phases.values()) <= 3 * (5 - 1)
    _assert_no_worker_left()


def test_max_batch_over_two_processes_probes_then_runs(tiny_config):
    """--batch max under tensor parallelism: a probe group sizes the KV cache, is stopped, and a
    second group runs the batch that fits."""
    result = run_throughput(tiny_config, "w16a16kv16", G128, batch=0, input_len=12, output_len=3, device="cpu",
                            max_batch=2, tensor_parallel_size=2, threads=1)
    assert result.tensor_parallel_size == 2 and 1 <= result.batch <= 2 and result.tokens_per_s > 0
    _assert_no_worker_left()


def _assert_no_worker_left() -> None:
    ps = subprocess.run(["ps", "-o", "args=", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
    assert "_worker_main" not in ps
