"""Model configuration: one dataclass, the single source of truth saved with checkpoints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ConfigError(ValueError):
    """A model configuration that qoq cannot build."""


@dataclass
class RopeScaling:
    """RoPE frequency scaling. `rope_type` is "default", "linear" or "llama3"."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    architecture: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: list[int] = field(default_factory=lambda: [2])

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Build from a HuggingFace `config.json` dict (Llama 2/3, Mistral, Qwen2)."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "")
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and model_type in SUPPORTED_ARCHITECTURES.values():
            arch = model_type
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or model_type!r}: qoq serves "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2)"
            )
        missing = [k for k in ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "vocab_size") if not isinstance(hf.get(k), int) or hf[k] <= 0]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)} (or they are not positive integers): "
                              "it is not a complete HuggingFace model config")
        num_heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        eos = hf.get("eos_token_id", 2)
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ConfigError(f"unsupported rope scaling {rope_type!r}: qoq knows default, linear, llama3")
        scaling = RopeScaling(
            rope_type=rope_type,
            factor=float(rope.get("factor", 1.0)),
            low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
        )
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []),
        )


PRECISIONS = ("w16a16kv16", "w4a8kv4", "w4a8kv8", "w8a8kv8", "w8a8kv4")
QUANTIZED_PRECISIONS = PRECISIONS[1:]  # what `qoq quantize` can produce
GROUP_SIZES = (128,)  # the GEMM kernels' K chunk: the one group the progressive format has


@dataclass(frozen=True)
class Granularity:
    """Which 4-bit weights share a scale: each output channel its own (`group_size` None), or each
    group of `group_size` input channels under the channel's int8 scale (progressive,
    docs/quantization.md#progressive-group-quantization). Checkpoints store it as group_size
    -1 or N."""

    group_size: int | None = 128

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size must be 128 or -1 (per-channel), got {self.group_size}")

    @property
    def per_channel(self) -> bool:
        return self.group_size is None

    @classmethod
    def parse(cls, value: int | str) -> "Granularity":
        """From the saved or typed form: -1 / "per-channel" or N / "gN"."""
        text = str(value).strip().lower()
        if text in ("-1", "per-channel"):
            return cls(None)
        try:
            return cls(int(text.removeprefix("g")))
        except ValueError:
            raise ConfigError(f"group size {value!r}: pass 128 (groups of 128) or -1 (per-channel)") from None

    def saved(self) -> int:
        """The checkpoint's group_size: -1 per channel, else the group size."""
        return -1 if self.group_size is None else self.group_size

    def __str__(self) -> str:
        return "per-channel" if self.group_size is None else f"g{self.group_size}"


PER_CHANNEL = Granularity(None)
G128 = Granularity(128)
GRANULARITIES = (G128, PER_CHANNEL)


@dataclass
class QuantConfig:
    """How a model is quantized; saved beside a packed checkpoint as quant_config.json.

    `precision` names weight/activation/KV bits (docs/formats.md#precisions); `granularity`
    applies to 4-bit weights and is ignored otherwise.
    """

    precision: str = "w16a16kv16"
    granularity: Granularity = G128
    steps: dict[str, bool] = field(default_factory=dict)  # which QoQ steps ran (for ablations)
    rotation: str = ""  # which Hadamard construction was used, when rotated
    # q and k multiplied by a head_dim Hadamard after RoPE (in the RoPE kernel; the KV cache then
    # holds rotated keys): scores unchanged, KV4 keys quantize far better. Off for checkpoints
    # that predate it and for the QServe layout.
    qk_hadamard: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if not isinstance(self.granularity, Granularity):
            raise ConfigError(f"granularity must be a Granularity (e.g. G128, PER_CHANNEL), got {self.granularity!r}")

    @property
    def weight_bits(self) -> int:
        return int(self.precision[1 : self.precision.index("a")])

    @property
    def act_bits(self) -> int:
        return int(self.precision[self.precision.index("a") + 1 : self.precision.index("kv")])

    @property
    def kv_bits(self) -> int:
        return int(self.precision[self.precision.index("kv") + 2 :])

    @property
    def grouped_w4(self) -> bool:
        """4-bit weights in groups (progressive two-level), as opposed to per channel or 8-bit."""
        return self.weight_bits == 4 and not self.granularity.per_channel

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["granularity"] = self.granularity.saved()
        return {("group_size" if k == "granularity" else k): v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"granularity"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "group_size" in data:
            kwargs["granularity"] = Granularity.parse(data["group_size"])
        return cls(**kwargs)
