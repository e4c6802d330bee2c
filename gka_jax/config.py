"""Model configuration: frozen dataclasses parsed and validated from a Hugging Face ``config.json``.

``ModelConfig.from_hf(dict)`` accepts the ``hybrid_qwen3`` configs that transformers 4.x and 5.x write
(``rope_theta`` + ``rope_scaling`` or ``rope_parameters``), the layer pattern as
``hybrid_override_pattern`` ("*-GKA-*", ``*`` = attention, ``GKA`` = Gated KalmaNet) and/or
``layer_types``, and the nested ``gka_config``. Every problem is a ``ConfigError`` that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

ATTENTION = "attention"
GKA = "gka"

_PATTERN_TOKENS = {"*": ATTENTION, "GKA": GKA}
_ROPE_KINDS = ("default", "linear", "dynamic", "yarn")


class ConfigError(ValueError):
    """A config.json that this package cannot run, with the offending field named."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding. ``kind`` is one of default / linear / dynamic / yarn (HF semantics)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # yarn only
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.kind not in _ROPE_KINDS:
            raise ConfigError(
                f"rope type {self.kind!r} is not supported (supported: {', '.join(_ROPE_KINDS)})")
        if not self.theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.theta}")
        if self.kind != "default" and not self.factor > 0:
            raise ConfigError(f"rope {self.kind} needs a 'factor' > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class GKAConfig:
    """Options of a Gated KalmaNet layer, with the reference's defaults (the 16 ``gka_config`` keys)."""

    num_iter: int = 30
    ridge_strength: float = 0.02
    conv_size: int = 4
    chunk_size: int = 64
    use_gate: bool = True
    use_beta_gate: bool = True
    use_alpha_connection: bool = True
    use_v_conv: bool = True
    use_forgetting_gate: bool = True
    use_forgetting_gate_kk: bool = True
    gla_rescale: bool = True
    norm_eps: float = 1e-6
    kv_proj_rank: int | None = None
    kv_learnable_residual: bool = False
    bp_lambda: bool = True
    solver_type: str = "chebyshev"

    def __post_init__(self):
        if not isinstance(self.num_iter, int) or isinstance(self.num_iter, bool) or self.num_iter < 0:
            raise ConfigError(f"gka_config.num_iter must be an integer >= 0, got {self.num_iter!r}")
        if not self.ridge_strength > 0:
            raise ConfigError(f"gka_config.ridge_strength must be > 0, got {self.ridge_strength}")
        if not isinstance(self.conv_size, int) or self.conv_size < 1:
            raise ConfigError(f"gka_config.conv_size must be an integer >= 1, got {self.conv_size!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"gka_config.chunk_size must be an integer >= 1, got {self.chunk_size!r}")
        if self.solver_type != "chebyshev":
            raise ConfigError(f"gka_config.solver_type {self.solver_type!r} is not supported (only 'chebyshev')")
        if self.kv_proj_rank is not None and (not isinstance(self.kv_proj_rank, int) or self.kv_proj_rank < 1):
            raise ConfigError(f"gka_config.kv_proj_rank must be null or an integer >= 1, got {self.kv_proj_rank!r}")
        if self.kv_learnable_residual and self.kv_proj_rank is None:
            raise ConfigError("gka_config.kv_learnable_residual needs kv_proj_rank to be set")
        if not self.norm_eps > 0:
            raise ConfigError(f"gka_config.norm_eps must be > 0, got {self.norm_eps}")

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any] | None) -> "GKAConfig":
        raw = dict(raw or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"gka_config has unknown keys {unknown} (known: {sorted(known)})")
        return cls(**raw)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A hybrid Qwen3 model: attention and GKA decoder layers sharing embeddings, norms and MLPs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    rope: RopeConfig = RopeConfig(theta=1e6)
    gka: GKAConfig = GKAConfig()
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    dtype: str = "bfloat16"  # the checkpoint's own dtype ("float32", "bfloat16", ...)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if not self.layer_types:
            raise ConfigError("the model has no layers")
        for i, kind in enumerate(self.layer_types):
            if kind not in (ATTENTION, GKA):
                raise ConfigError(f"layer {i}: unknown layer type {kind!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF parsing
    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> "ModelConfig":
        """Parse a ``config.json`` dict of ``model_type`` ``hybrid_qwen3`` (also plain ``qwen3``)."""
        raw = dict(raw)
        model_type = raw.get("model_type")
        if model_type not in ("hybrid_qwen3", "qwen3"):
            raise ConfigError(f"model_type {model_type!r} is not supported (expected 'hybrid_qwen3')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in raw:
                raise ConfigError(f"config.json is missing {key!r}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (Qwen3 uses 'silu')")
        num_layers = raw["num_hidden_layers"]
        num_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // num_heads
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            layer_types=_parse_layer_types(raw, num_layers),
            rope=_parse_rope(raw),
            gka=GKAConfig.from_hf(raw.get("gka_config")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            max_position_embeddings=raw.get("max_position_embeddings", 40960),
            dtype=str(dtype),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        return cls.from_hf(raw)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict (transformers 5.x spelling) that ``from_hf`` reads back to ``self``."""
        rope = {"rope_type": self.rope.kind, "rope_theta": self.rope.theta}
        if self.rope.kind != "default":
            rope["factor"] = self.rope.factor
            if self.rope.original_max_position_embeddings is not None:
                rope["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        if self.rope.kind == "yarn":
            rope.update(beta_fast=self.rope.beta_fast, beta_slow=self.rope.beta_slow, truncate=self.rope.truncate)
            for key in ("mscale", "mscale_all_dim", "attention_factor"):
                if getattr(self.rope, key) is not None:
                    rope[key] = getattr(self.rope, key)
        tokens = {v: k for k, v in _PATTERN_TOKENS.items()}
        pattern = [tokens[t] for t in self.layer_types]
        return {
            "architectures": ["HybridQwen3ForCausalLM"],
            "model_type": "hybrid_qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "hybrid_override_pattern": "-".join(pattern),
            "layer_types": pattern,
            "gka_config": dataclasses.asdict(self.gka),
            "dtype": self.dtype,
        }


def _parse_layer_types(raw: Mapping[str, Any], num_layers: int) -> tuple[str, ...]:
    pattern = raw.get("hybrid_override_pattern")
    listed = raw.get("layer_types")
    parsed = None
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ConfigError(f"hybrid_override_pattern must be a string, got {pattern!r}")
        parsed = _tokens_to_types(pattern.split("-"), "hybrid_override_pattern")
    if listed is not None:
        if not isinstance(listed, (list, tuple)):
            raise ConfigError(f"layer_types must be a list, got {listed!r}")
        # transformers may write the Qwen3 names ("full_attention") for plain qwen3 configs.
        from_list = _tokens_to_types(
            ["*" if t == "full_attention" else t for t in listed], "layer_types")
        if parsed is not None and from_list != parsed:
            raise ConfigError(f"layer_types {list(listed)} disagrees with hybrid_override_pattern {pattern!r}")
        parsed = from_list
    if parsed is None:
        if raw.get("model_type") == "qwen3":
            parsed = (ATTENTION,) * num_layers
        else:
            raise ConfigError("config.json has neither hybrid_override_pattern nor layer_types")
    if len(parsed) != num_layers:
        raise ConfigError(f"the layer pattern has {len(parsed)} layers but num_hidden_layers is {num_layers}")
    return parsed


def _tokens_to_types(tokens, field: str) -> tuple[str, ...]:
    out = []
    for i, token in enumerate(tokens):
        token = token.strip() if isinstance(token, str) else token
        if token not in _PATTERN_TOKENS:
            raise ConfigError(f"{field}: layer {i} has unsupported layer type {token!r} "
                              f"(supported: '*' = attention, 'GKA' = Gated KalmaNet)")
        out.append(_PATTERN_TOKENS[token])
    return tuple(out)


def _parse_rope(raw: Mapping[str, Any]) -> RopeConfig:
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    if params is not None and not isinstance(params, Mapping):
        raise ConfigError(f"rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ConfigError(f"rope_scaling must be an object or null, got {scaling!r}")
    merged: dict[str, Any] = {}
    if scaling:
        merged.update(scaling)
    if params:
        merged.update(params)
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    known = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor"}
    if kind in _ROPE_KINDS:
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(f"rope parameters {unknown} are not understood for rope type {kind!r}")
        if merged.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial_rotary_factor != 1 is not supported")
    kwargs = dict(theta=float(theta), kind=kind)
    if kind != "default" and kind in _ROPE_KINDS:
        if "factor" not in merged:
            raise ConfigError(f"rope type {kind!r} needs a 'factor'")
        kwargs["factor"] = float(merged["factor"])
        if merged.get("original_max_position_embeddings") is not None:
            kwargs["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    if kind == "yarn":
        for key in ("beta_fast", "beta_slow"):
            if merged.get(key) is not None:
                kwargs[key] = float(merged[key])
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if merged.get(key) is not None:
                kwargs[key] = float(merged[key])
        if merged.get("truncate") is not None:
            kwargs["truncate"] = bool(merged["truncate"])
    return RopeConfig(**kwargs)


# ---------------------------------------------------------------------- presets
def _hqwen3_8b_layer_types() -> tuple[str, ...]:
    # 36 layers, 18 attention + 18 GKA. The released checkpoint's config.json carries the exact
    # layout chosen by selective hybridization; loading it always uses that file's pattern. The
    # preset (for benchmarks and random-weight runs) alternates attention and GKA.
    return tuple(ATTENTION if i % 2 == 0 else GKA for i in range(36))


PRESETS: dict[str, ModelConfig] = {
    "GKA-primed-HQwen3-8B-Reasoner": ModelConfig(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        layer_types=_hqwen3_8b_layer_types(),
        rope=RopeConfig(theta=5e6),
        gka=GKAConfig(),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        dtype="bfloat16",
    ),
}


def preset(name: str) -> ModelConfig:
    """A named architecture that needs no config file (e.g. ``"GKA-primed-HQwen3-8B-Reasoner"``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
