"""Rotation "auto": quantize with and without the Hadamard rotation, keep the variant whose
calibration logits are closer to the float model's, in place, and record the decision."""

import pytest
import torch

from qoq.quant import pipeline
from qoq.quant.calibrate import CalibConfig
from qoq.quant.pipeline import QoQOptions, RotationDecision, calibration_kl, quantize_model
from quant_helpers import tiny_model

CALIB = torch.randint(0, 101, (4, 32), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(5))


def _model(seed=0):
    model = tiny_model(hidden=128, heads=4, kv_heads=2, head_dim=32, inter=256, seed=seed, dtype=torch.float32)
    with torch.no_grad():  # tied head: small embeddings keep the next-token distributions soft
        model.embed_tokens.weight.mul_(0.05)
    return model


def _opts(rotation):
    return QoQOptions(rotation=rotation, progress=False, search_tokens=64, auto_rotation_seqs=2,
                      calib=CalibConfig(num_seqs=4, seq_len=32, chunk_seqs=2))


def _logits(model):
    with torch.no_grad():
        return model.compute_logits(model(TOKENS))


def test_calibration_kl_is_zero_for_the_same_model_and_positive_otherwise():
    fp, other = _model(), _model(seed=1)
    assert calibration_kl(fp, fp, CALIB[:2]) == pytest.approx(0.0, abs=1e-9)
    assert calibration_kl(fp, other, CALIB[:2]) > 0.01


@pytest.mark.parametrize("rotated_wins", [True, False])
def test_auto_keeps_the_lower_kl_variant_in_place(monkeypatch, rotated_wins):
    scores = iter([0.1, 0.2] if rotated_wins else [0.2, 0.1])  # rotated variant is scored first
    monkeypatch.setattr(pipeline, "calibration_kl", lambda ref, model, tokens: next(scores))
    model = _model()
    assert quantize_model(model, None, _opts("auto"), calib_tokens=CALIB) is model
    decision = model.rotation_decision
    assert isinstance(decision, RotationDecision) and decision.rotated == rotated_wins
    assert decision.tokens == 2 * 32
    assert model.quant_config.steps["rotation"] == rotated_wins
    assert model.quant_config.steps["rotation_auto"]
    assert bool(model.quant_config.rotation) == rotated_wins  # the Hadamard construction's name, or ""
    explicit = _model()
    quantize_model(explicit, None, _opts(rotated_wins), calib_tokens=CALIB)
    assert torch.equal(_logits(model), _logits(explicit))  # exactly the chosen variant


def test_auto_measures_both_variants():
    fp, model = _model(), _model()
    quantize_model(model, None, _opts("auto"), calib_tokens=CALIB)
    d = model.rotation_decision
    assert d.kl_rotated > 0 and d.kl_unrotated > 0
    assert d.rotated == (d.kl_rotated < d.kl_unrotated)
    kept = calibration_kl(fp, model, CALIB[:2])
    assert kept == pytest.approx(min(d.kl_rotated, d.kl_unrotated), rel=1e-6)
    assert "rotation auto" in str(d)


def test_rotation_option_is_checked():
    with pytest.raises(ValueError, match="auto"):
        quantize_model(_model(), None, _opts("sometimes"), calib_tokens=CALIB)
