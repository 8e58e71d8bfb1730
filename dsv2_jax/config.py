"""ModelConfig: every field of a Hugging Face ``deepseek_v2`` config.json, validated.

The dataclass is frozen and hashable so it can sit inside jitted modules as static data.
``ModelConfig.from_hf`` accepts a dict, a config.json path or a checkpoint folder; ``to_hf_dict`` writes it
back. Both rope styles are understood: the released files' ``rope_scaling`` + ``rope_theta`` and
transformers 5's ``rope_parameters`` (with ``rope_type``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

ROPE_TYPES = ("default", "linear", "yarn")
TOPK_METHODS = ("greedy", "group_limited_greedy")
SCORING_FUNCS = ("softmax",)


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """The rotary settings with every default filled in (see REFERENCE.md, YaRN)."""

    rope_type: str
    theta: float
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True, eq=False)
class ModelConfig:
    """Hyper-parameters of a DeepSeek-V2 model, named and defaulted as in Hugging Face's config.json."""

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | tuple[int, ...] | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float | None = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    # Keys of config.json that this class does not model (architectures, auto_map, torch_dtype, ...):
    # kept so that to_hf_dict() gives them back.
    extra: dict = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------ construction
    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self._validate()
        # Hashed on every jitted call (the config is static data of the model): compute the key once.
        object.__setattr__(self, "_frozen_key", _freeze(self.to_hf_dict()))

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> "ModelConfig":
        """Builds a config from a dict, a config.json path or a folder holding config.json."""
        if isinstance(source, dict):
            data = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path!r}")
            try:
                with open(path) as f:
                    data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        model_type = data.get("model_type", "deepseek_v2")
        if model_type != "deepseek_v2":
            raise ValueError(f"model_type is {model_type!r}; this library implements 'deepseek_v2'")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names and k != "model_type"}
        # transformers 5 spells num_experts as an alias of n_routed_experts.
        if "num_experts" in extra and "n_routed_experts" not in known:
            known["n_routed_experts"] = extra.pop("num_experts")
        return cls(**known, extra=extra)

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        """One of the files in configs/: 'deepseek-v2', 'deepseek-v2-lite', 'tiny'."""
        path = os.path.join(CONFIGS_DIR, f"{name}.json")
        if not os.path.isfile(path):
            presets = sorted(p[:-5] for p in os.listdir(CONFIGS_DIR) if p.endswith(".json"))
            raise ValueError(f"unknown preset {name!r}; known: {presets}")
        return cls.from_hf(path)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_hf_dict(self, rope_style: str | None = None) -> dict:
        """The config.json dict. rope_style: None keeps the style this config came with,
        'rope_scaling' writes the released files' style, 'rope_parameters' transformers 5's."""
        out = {"model_type": "deepseek_v2"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        if rope_style is None:
            return out
        spec = self.rope
        if rope_style == "rope_scaling":
            out.pop("rope_parameters", None)
            out["rope_theta"] = spec.theta
            out["rope_scaling"] = None if spec.rope_type == "default" else _rope_dict(spec, "type")
        elif rope_style == "rope_parameters":
            out.pop("rope_scaling", None)
            out.pop("rope_theta", None)
            out["rope_parameters"] = _rope_dict(spec, "rope_type")
            out["rope_parameters"]["rope_theta"] = spec.theta
        else:
            raise ValueError(f"rope_style must be None, 'rope_scaling' or 'rope_parameters', not {rope_style!r}")
        return out

    def save(self, path: str | os.PathLike, rope_style: str | None = None) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(rope_style), f, indent=2, sort_keys=True)
            f.write("\n")

    # ------------------------------------------------------------------ identity
    def _key(self):
        return self._frozen_key

    def __eq__(self, other):
        return isinstance(other, ModelConfig) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    # ------------------------------------------------------------------ derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_experts(self) -> int:
        return self.n_routed_experts or 0

    @property
    def num_groups(self) -> int:
        return self.n_group or 1

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """'dense' or 'moe' for each layer, in order."""
        return tuple("moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers))

    @property
    def num_dense_layers(self) -> int:
        return self.layer_kinds.count("dense")

    @property
    def num_moe_layers(self) -> int:
        return self.layer_kinds.count("moe")

    @property
    def rope(self) -> RopeSpec:
        """The rope settings from either style; rope_parameters wins when both are present."""
        params = dict(self.rope_parameters or self.rope_scaling or {})
        rope_type = params.pop("rope_type", params.pop("type", "default")) or "default"
        theta = params.pop("rope_theta", None) or self.rope_theta or 10000.0
        if rope_type == "default":
            return RopeSpec("default", float(theta))
        kwargs = dict(
            factor=float(params.get("factor") or 1.0),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=float(params["mscale"]) if params.get("mscale") is not None else 1.0,
            mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )
        if rope_type == "yarn" and kwargs["original_max_position_embeddings"] is None:
            kwargs["original_max_position_embeddings"] = self.max_position_embeddings
        return RopeSpec(rope_type, float(theta), **kwargs)

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        spec = self.rope
        if spec.rope_type == "yarn" and spec.mscale_all_dim:
            m = yarn_mscale(spec.factor, spec.mscale_all_dim)
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ validation
    def _validate(self):
        def fail(field, msg):
            raise ValueError(f"ModelConfig.{field}: {msg}")

        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "max_position_embeddings", "moe_layer_freq",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", f"must be a positive integer or null (plain q_proj), got {self.q_lora_rank!r}")
        if self.num_key_value_heads != self.num_attention_heads:
            fail("num_key_value_heads", f"MLA has one key/value per query head: must equal num_attention_heads "
                 f"({self.num_attention_heads}), got {self.num_key_value_heads}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                 f"got {self.first_k_dense_replace}")
        if not self.rms_norm_eps > 0:
            fail("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        if self.hidden_act != "silu":
            fail("hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.attention_bias:
            fail("attention_bias", "biases in attention projections are not supported (DeepSeek-V2 has none)")
        if self.mlp_bias:
            fail("mlp_bias", "biases in MLPs are not supported (DeepSeek-V2 has none)")
        if self.n_routed_experts is not None and (not isinstance(self.n_routed_experts, int) or
                                                  self.n_routed_experts < 0):
            fail("n_routed_experts", f"must be a non-negative integer or null, got {self.n_routed_experts!r}")
        needs_dense = self.num_dense_layers > 0
        if needs_dense and (not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0):
            fail("intermediate_size", f"must be a positive integer, got {self.intermediate_size!r}")
        if self.num_experts:
            self._validate_moe(fail)
        self._validate_rope(fail)

    def _validate_moe(self, fail):
        E = self.num_experts
        if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", f"must be a positive integer, got {self.moe_intermediate_size!r}")
        if self.n_shared_experts is not None and (not isinstance(self.n_shared_experts, int) or
                                                  self.n_shared_experts < 0):
            fail("n_shared_experts", f"must be a non-negative integer or null, got {self.n_shared_experts!r}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"unknown method {self.topk_method!r}; expected one of {TOPK_METHODS}")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"unknown scoring function {self.scoring_func!r}; expected one of {SCORING_FUNCS}")
        k = self.num_experts_per_tok
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            fail("num_experts_per_tok", f"must be a positive integer when n_routed_experts is set, got {k!r}")
        if k > E:
            fail("num_experts_per_tok", f"{k} is more than n_routed_experts={E}")
        if not self.routed_scaling_factor > 0:
            fail("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}")
        if self.n_group is not None and (not isinstance(self.n_group, int) or self.n_group <= 0):
            fail("n_group", f"must be a positive integer or null, got {self.n_group!r}")
        G = self.num_groups
        if E % G:
            fail("n_group", f"n_routed_experts={E} is not divisible by n_group={G}")
        if self.topk_method == "group_limited_greedy":
            tg = self.topk_group
            if not isinstance(tg, int) or tg <= 0:
                fail("topk_group", f"group_limited_greedy needs a positive topk_group, got {tg!r}")
            if tg > G:
                fail("topk_group", f"topk_group={tg} is larger than n_group={G}")
            if k > tg * (E // G):
                fail("num_experts_per_tok", f"{k} experts cannot be chosen from topk_group={tg} groups of "
                     f"{E // G} experts ({tg * (E // G)} in all)")

    def _validate_rope(self, fail):
        field = "rope_parameters" if self.rope_parameters else "rope_scaling"
        for name in ("rope_scaling", "rope_parameters"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                fail(name, f"must be a dict or null, got {value!r}")
        spec = self.rope
        if spec.rope_type not in ROPE_TYPES:
            fail(field, f"unknown rope type {spec.rope_type!r}; expected one of {ROPE_TYPES}")
        if not spec.theta > 0:
            fail("rope_theta", f"must be > 0, got {spec.theta}")
        if spec.rope_type != "default" and not spec.factor > 0:
            fail(field, f"factor must be > 0, got {spec.factor}")
        if spec.rope_type == "yarn" and (spec.original_max_position_embeddings or 0) <= 0:
            fail(field, "yarn needs a positive original_max_position_embeddings")


def _rope_dict(spec: RopeSpec, type_key: str) -> dict:
    out = {type_key: spec.rope_type, "factor": spec.factor}
    if spec.rope_type == "yarn":
        out.update(
            original_max_position_embeddings=spec.original_max_position_embeddings,
            beta_fast=spec.beta_fast,
            beta_slow=spec.beta_slow,
            mscale=spec.mscale,
            mscale_all_dim=spec.mscale_all_dim,
        )
        if spec.attention_factor is not None:
            out["attention_factor"] = spec.attention_factor
        if not spec.truncate:
            out["truncate"] = False
    return out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·m·ln(s) + 1 (1 for s <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
