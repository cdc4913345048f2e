"""Tensor parallelism on the CPU: gloo, 2 and 4 processes, tiny random models of every precision.

One spawn per group size runs every case in the workers (starting processes is the slow part);
the tests compare what they wrote back with the single-process model run here.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qserve_layout import write_qserve

from qoq.bench.random_hf import write_random_hf_folder
from qoq.bench.random_model import random_float_model, random_model
from qoq.config import G128, PER_CHANNEL, ConfigError, ModelConfig, QuantConfig
from qoq.distributed import (NVLINK_MULTICAST_OFF, TPGroup, destroy, disable_nvlink_multicast, free_port,
                             init_from_env, init_process_group, spawn)
from qoq.kernels import unpack_w4
from qoq.layers.formats import W4ChannelParams, W4G128Params, W8Params, padded_k
from qoq.layers.parallel import slice_input_columns
from qoq.layers.quant_linear import W4A8G128Linear, W4A8PerChannelLinear, W8A8Linear
from qoq.model.checkpoint import load_checkpoint, save_checkpoint
from qoq.model.loader import load_weights
from qoq.model.qserve_format import load_qserve_checkpoint
from qoq.model.tensor_parallel import ShardPlan, load_checkpoint_shard, load_hf_shard, load_qserve_shard, shard_model

STEPS = 5  # greedy tokens generated per case
PROMPT = torch.tensor([[5, 17, 300, 999, 42, 7, 1000, 3], [9, 8, 7, 6, 5, 4, 3, 2]])

# Two shapes that every group size of 2 and 4 splits, g128 included (q_size and intermediate
# size / 4 are multiples of 128): GQA with 2 KV heads (fewer than 4 ranks: replicated; as many
# as 2 ranks: split) and 8 KV heads (more than the ranks), with a qkv bias and tied embeddings.
# The vocabulary (1001) splits unevenly, so the padded last slice is exercised.
CONFIGS = {
    "gqa2": ModelConfig(vocab_size=1001, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8,
                        num_kv_heads=2, head_dim=64, max_position_embeddings=64),
    "gqa8": ModelConfig(architecture="qwen2", vocab_size=1001, hidden_size=256, intermediate_size=512, num_layers=2,
                        num_heads=16, num_kv_heads=8, head_dim=32, attention_bias=True, tie_word_embeddings=True,
                        max_position_embeddings=64),
}
PRECISIONS = {  # name -> (precision, granularity)
    "fp32": ("w16a16kv16", G128),
    "w8a8kv8": ("w8a8kv8", G128),
    "w4a8kv4-per-channel": ("w4a8kv4", PER_CHANNEL),
    "w4a8kv4-g128": ("w4a8kv4", G128),
}
CASES = [(c, p) for c in CONFIGS for p in PRECISIONS]


def build_model(config_name: str, precision_name: str):
    config = copy.deepcopy(CONFIGS[config_name])
    precision, granularity = PRECISIONS[precision_name]
    if precision == "w16a16kv16":
        return random_float_model(config, seed=1)
    quant = QuantConfig(precision, granularity, qk_hadamard=True)
    model = random_model(config, quant, device="cpu", dtype=torch.float32, seed=1)
    for m in model.modules():  # scales fp16 as a checkpoint holds them (.to(float32) widened them),
        for name in ("s1", "s", "szero"):  # and varied per channel so that a wrong slice shows
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                setattr(m, name, (t * (0.5 + torch.rand_like(t))).half())
    return model


@torch.inference_mode()
def run(model) -> dict[str, torch.Tensor]:
    """Logits of the prompt and greedy tokens, no cache: the model's default attention reads K/V
    as its KV4/KV8 cache would hold them (per token and head, this rank's KV heads only). The
    engine's paged cache per rank comes with the engine's tensor parallelism."""
    out = {"logits": model.compute_logits(model(PROMPT))}
    ids = PROMPT
    for _ in range(STEPS):
        ids = torch.cat([ids, model.compute_logits(model(ids)[:, -1]).argmax(-1, keepdim=True)], 1)
    out["greedy"] = ids[:, PROMPT.shape[1]:]
    return out


def _tp_worker(tp: TPGroup, models: dict, checkpoint: str, hf_folder: str, qserve_folder: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {key: run(shard_model(model, tp)) for key, model in models.items()}
    results["checkpoint"] = run(load_checkpoint_shard(checkpoint, tp))
    results["checkpoint_in_memory"] = run(shard_model(load_checkpoint(checkpoint), tp))
    results["hf"] = run(load_hf_shard(hf_folder, tp))
    results["hf_in_memory"] = run(shard_model(load_weights(Path(hf_folder)), tp))
    results["qserve"] = run(load_qserve_shard(qserve_folder, tp))
    results["qserve_in_memory"] = run(shard_model(load_qserve_checkpoint(qserve_folder), tp))
    torch.save(results, Path(out_dir) / f"rank{tp.rank}.pt")


@pytest.fixture(scope="module")
def models():
    return {case: build_model(*case) for case in CASES}


@pytest.fixture(scope="module")
def single(models):
    """run() of the single-process model of a case, computed once for both group sizes."""
    cache: dict = {}

    def get(case):
        if case not in cache:
            cache[case] = run(models[case])
        return cache[case]

    return get


@pytest.fixture(scope="module")
def checkpoint(models, tmp_path_factory):
    return save_checkpoint(models["gqa2", "w4a8kv4-g128"], tmp_path_factory.mktemp("ckpt") / "q")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A HF safetensors folder (random fp32 weights, GQA, qkv bias, tied embeddings), a layer per file."""
    return write_random_hf_folder(copy.deepcopy(CONFIGS["gqa8"]), tmp_path_factory.mktemp("hf") / "m",
                                  dtype=torch.float32)


@pytest.fixture(scope="module")
def qserve_folder(models, tmp_path_factory):
    """The g128 W4A8 model of one case in QServe's model-zoo layout."""
    folder = tmp_path_factory.mktemp("qserve")
    write_qserve(models["gqa2", "w4a8kv4-g128"], folder)
    return folder


@pytest.fixture(scope="module", params=[2, 4])
def tp_results(request, models, checkpoint, hf_folder, qserve_folder, tmp_path_factory):
    """Every rank's results for one group size: [rank] -> {case: run(...)}."""
    world_size = request.param
    out = tmp_path_factory.mktemp(f"tp{world_size}")
    spawn(_tp_worker, world_size, models, str(checkpoint), str(hf_folder), str(qserve_folder), str(out),
          backend="gloo", timeout_s=120)
    return world_size, [torch.load(out / f"rank{r}.pt") for r in range(world_size)]


class SplitInput(nn.Module):
    """The single-process oracle of a row-parallel quantized linear: the input split into
    world_size column slices, each quantized per token on its own and multiplied by its own
    linear, built here from the unpacked codes (not through qoq.layers.parallel's byte slicing);
    the outputs summed."""

    def __init__(self, linear: nn.Module, world_size: int) -> None:
        super().__init__()
        width = linear.in_features // world_size
        self.bounds = [(r * width, (r + 1) * width) for r in range(world_size)]
        self.parts = nn.ModuleList(self._part(linear, k0, k1) for k0, k1 in self.bounds)

    @staticmethod
    def _part(linear, k0, k1):
        def cols(w):
            return F.pad(w[:, k0:k1], (0, padded_k(k1 - k0) - (k1 - k0)))

        if isinstance(linear, W4A8G128Linear):
            g = linear.group_size
            params = W4G128Params(cols(unpack_w4(linear.qweight)), linear.s1, linear.s2[:, k0 // g:k1 // g],
                                  linear.sz[:, k0 // g:k1 // g], g)
            return W4A8G128Linear(k1 - k0, params)
        if isinstance(linear, W4A8PerChannelLinear):
            return W4A8PerChannelLinear(k1 - k0, W4ChannelParams(cols(unpack_w4(linear.qweight)), linear.s1,
                                                                 linear.szero))
        assert isinstance(linear, W8A8Linear)
        return W8A8Linear(k1 - k0, W8Params(cols(linear.weight), linear.s))

    def forward(self, x):
        return sum(part(x[..., k0:k1]) for part, (k0, k1) in zip(self.parts, self.bounds))


def split_reference(model, world_size: int):
    ref = copy.deepcopy(model)
    for layer in ref.layers:
        layer.self_attn.o_proj = SplitInput(layer.self_attn.o_proj, world_size)
        layer.mlp.down_proj = SplitInput(layer.mlp.down_proj, world_size)
    return ref


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_tp_equals_single_process(case, models, single, tp_results):
    world_size, ranks = tp_results
    for other in ranks[1:]:  # every rank ends with the same gathered logits and tokens
        for key in ("logits", "greedy"):
            assert torch.equal(other[case][key], ranks[0][case][key])
    got, model = ranks[0][case], models[case]
    if case[1] == "fp32":
        # Same float math, summed in another order (partial sums over the ranks): rounding only.
        want = single(case)
        assert _max_rel(got["logits"], want["logits"]) < 1e-5
    else:
        # Quantized: the same packed codes, but each rank quantizes its slice of the o_proj / down_proj
        # input per token with its own scale. The oracle does exactly that in one process, so
        # the integer products agree and only the float order of the scaled partial sums could
        # differ (gloo sums in rank order as the oracle does: equal to the bit here).
        want = run(split_reference(model, world_size))
        assert _max_rel(got["logits"], want["logits"]) < 1e-6
        # Against the plain single-process model the activation scales differ (a slice's max
        # |x| instead of the row's): the int8 rounding of those inputs differs by up to half a
        # step, 1/254 of the row's max |x| per element, i.e. the activation quantization noise
        # itself: up to 2% of the logits' range on these random models (per-channel W4, whose
        # zero term makes the largest outputs), where a wrong slice is of the order of 100%.
        plain = single(case)
        assert _max_rel(got["logits"], plain["logits"]) < 0.05
    assert torch.equal(got["greedy"], want["greedy"])


def test_checkpoint_shard_loads_as_shard_model(tp_results):
    """Each rank reading its slice of the one checkpoint (a layer at a time), of a HF folder or of
    a QServe checkpoint gets exactly the model that slicing the whole loaded one gives."""
    _, ranks = tp_results
    for rank in ranks:
        for key in ("logits", "greedy"):
            assert torch.equal(rank["checkpoint"][key], rank["checkpoint_in_memory"][key])
            assert torch.equal(rank["hf"][key], rank["hf_in_memory"][key])
            assert torch.equal(rank["qserve"][key], rank["qserve_in_memory"][key])


# -- plans, launcher environment ---------------------------------------------------------------

def test_plan_heads_and_kv_replication():
    cfg = CONFIGS["gqa2"]  # 8 heads, 2 KV heads
    plans = [ShardPlan(cfg, r, 4) for r in range(4)]
    assert [(p.num_heads, p.num_kv_heads, p.first_kv_head) for p in plans] == [(2, 1, 0), (2, 1, 0), (2, 1, 1), (2, 1, 1)]
    two = [ShardPlan(cfg, r, 2) for r in range(2)]
    assert [(p.num_heads, p.num_kv_heads, p.first_kv_head) for p in two] == [(4, 1, 0), (4, 1, 1)]
    rows = two[1].qkv_rows()  # q heads 4..7, then k and v of KV head 1
    assert rows[0] == 4 * 64 and rows[4 * 64] == cfg.q_size + 64 and rows[5 * 64] == cfg.q_size + cfg.kv_size + 64


def test_plan_rejects_splits_that_do_not_fit():
    with pytest.raises(ConfigError, match="heads"):
        ShardPlan(CONFIGS["gqa2"], 0, 3)
    with pytest.raises(ConfigError, match="group size 128"):  # 512 / 8 = 64 inputs a rank for o_proj
        ShardPlan(CONFIGS["gqa2"], 0, 8, group_size=128)
    ShardPlan(CONFIGS["gqa2"], 0, 8)  # per channel and W8 split anywhere


def test_launcher_turns_nvlink_multicast_off_whatever_the_environment(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    monkeypatch.delenv("NVSHMEM_DISABLE_NVLS", raising=False)
    disable_nvlink_multicast()
    assert {k: os.environ[k] for k in NVLINK_MULTICAST_OFF} == NVLINK_MULTICAST_OFF
    env = disable_nvlink_multicast({"NCCL_NVLS_ENABLE": "1"})
    assert env == NVLINK_MULTICAST_OFF


def test_single_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is None  # not launched by torchrun
    assert init_process_group(0, 1, "unused") is None
    model = random_float_model(copy.deepcopy(CONFIGS["gqa2"]))
    assert shard_model(model, None) is model and model.tp is None


# -- a failing rank ----------------------------------------------------------------------------

def _failing_worker(rank: int, world_size: int, init_method: str, mode: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    tp = init_process_group(rank, world_size, init_method, "gloo", timeout_s=3)
    out = Path(out_dir)
    if rank == 1:
        if mode == "dies":
            raise RuntimeError("rank 1 fails before the collective")
        while not (out / "rank0.err").exists():  # "stuck": alive, never joins the collective
            time.sleep(0.1)
        return
    try:
        tp.all_reduce(torch.ones(4))
    except Exception as err:  # noqa: BLE001 - what the test looks for
        (out / "rank0.err").write_text(f"{type(err).__name__}: {err}")
        raise
    finally:
        destroy(tp)


@pytest.mark.parametrize("mode", ["dies", "stuck"])
def test_a_failing_rank_makes_the_others_fail_not_hang(mode, tmp_path):
    """Rank 1 raises (its process exits) or stays alive without joining: rank 0's all-reduce
    raises within the group's timeout (3 s here) and its process exits non-zero."""
    ctx = multiprocessing.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_failing_worker, args=(r, 2, init_method, mode, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    start = time.monotonic()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    assert procs[0].exitcode != 0 and (tmp_path / "rank0.err").exists()
    assert time.monotonic() - start < 120


# -- input-column splits that cut inside a 128-channel chunk -----------------------------------

@pytest.mark.parametrize("kind", ["w4a8-per-channel", "w8a8"])
@pytest.mark.parametrize("in_features,world_size", [(320, 2), (576, 2), (576, 4)])
def test_input_split_inside_a_chunk_sums_to_the_split_oracle(kind, in_features, world_size):
    """Slices of 160 / 288 / 144 inputs: per-channel W4 is unpacked, cut and packed again, W8 cut
    and padded, and the last slice ends at an unpadded K; the ranks' outputs (summed here, as the
    all-reduce sums them) equal the oracle built from the unpacked codes."""
    torch.manual_seed(0)
    n, kp = 48, padded_k(in_features)
    q = torch.zeros(n, kp, dtype=torch.uint8)
    if kind == "w8a8":
        q = q.to(torch.int8)
        q[:, :in_features] = torch.randint(-127, 128, (n, in_features), dtype=torch.int8)
        whole = W8A8Linear(in_features, W8Params(q, torch.rand(n).half() * 0.01))
    else:
        q[:, :in_features] = torch.randint(0, 16, (n, in_features), dtype=torch.uint8)
        whole = W4A8PerChannelLinear(in_features, W4ChannelParams(q, torch.rand(n).half() * 0.01,
                                                                  torch.rand(n).half() * 0.05))
    x = torch.randn(5, in_features)
    width = in_features // world_size
    total = 0
    for r in range(world_size):
        k0, k1 = r * width, (r + 1) * width
        local = {name: slice_input_columns(name, t, k0, k1, in_features) for name, t in whole.state_dict().items()}
        if kind == "w8a8":
            part = W8A8Linear(width, W8Params(local["weight"], local["s"]))
        else:
            part = W4A8PerChannelLinear(width, W4ChannelParams(unpack_w4(local["qweight"]), local["s1"], local["szero"]))
            assert torch.equal(part.qweight, local["qweight"])
        total = total + part(x[:, k0:k1])
    assert torch.equal(total, SplitInput(whole, world_size)(x))
