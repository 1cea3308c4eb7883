"""Qwen2-VL configuration: the family's geometry, preprocessing settings and special token ids.

Kept apart from `train/model/config.py` (Qwen-VL): each family owns its ids. The model package takes token ids
and pixel patches; every id it needs comes from `Qwen2SpecialIds`, never from a tokenizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass
class Qwen2VisionConfig:
    """The Qwen2-VL ViT (~675M at full size): 2D rotary, patch 14, temporal patch 2, 2x2 patch merger."""

    patch_size: int = 14
    temporal_patch_size: int = 2  # an image is its frame repeated temporal_patch_size times
    in_channels: int = 3
    width: int = 1280  # embed_dim
    layers: int = 32  # depth
    heads: int = 16
    mlp_ratio: int = 4
    merge_size: int = 2  # spatial_merge_size: merge x merge patches -> one LLM token
    rope_theta: float = 10000.0
    ln_eps: float = 1e-6
    grad_checkpointing: bool = False

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_width(self) -> int:
        return self.width * self.mlp_ratio

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch vector: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass
class Qwen2LLMConfig:
    """Qwen2 decoder: GQA, q/k/v bias, RMSNorm, SwiGLU, M-RoPE over `mrope_section` frequency pairs."""

    vocab_size: int = 152064
    hidden: int = 3584
    layers: int = 28
    heads: int = 28
    kv_heads: int = 4
    intermediate: int = 18944
    rms_eps: float = 1e-6
    rope_base: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)  # temporal, height, width pairs; sums to head_dim / 2
    tie_embeddings: bool = False
    max_position: int = 32768
    grad_checkpointing: bool = False
    attn_impl: str = "auto"  # packed-row attention path, as train/model/attention.py

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class Qwen2SpecialIds:
    """Special token ids of the Qwen2-VL tokenizer: `added_tokens_decoder` of the published
    Qwen/Qwen2-VL-2B-Instruct and -7B-Instruct tokenizer_config.json (the same in both; ../shared/SPEC.md §7).
    transformers' Qwen2VLConfig defaults (image_token_id, video_token_id, vision_start/end_token_id) agree;
    tests/test_qwen2_vl.py checks those four against the installed reference."""

    eod: int = 151643  # <|endoftext|> (pad)
    im_start: int = 151644  # <|im_start|>
    im_end: int = 151645  # <|im_end|> (eos of the Instruct models)
    object_ref_start: int = 151646  # <|object_ref_start|>
    object_ref_end: int = 151647  # <|object_ref_end|>
    box_start: int = 151648  # <|box_start|>
    box_end: int = 151649  # <|box_end|>
    quad_start: int = 151650  # <|quad_start|>
    quad_end: int = 151651  # <|quad_end|>
    vision_start: int = 151652  # <|vision_start|>
    vision_end: int = 151653  # <|vision_end|>
    vision_pad: int = 151654  # <|vision_pad|>
    image_pad: int = 151655  # <|image_pad|>: one per merged image token, overwritten by the merger output
    video_pad: int = 151656  # <|video_pad|>


@dataclass
class Qwen2PreprocessConfig:
    """Pixel preprocessing the weights were trained with; saved beside them as preprocessor_config.json so
    training and inference resize the same way (Qwen2VLImageProcessor defaults)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclass
class Qwen2VLConfig:
    vision: Qwen2VisionConfig = field(default_factory=Qwen2VisionConfig)
    llm: Qwen2LLMConfig = field(default_factory=Qwen2LLMConfig)
    ids: Qwen2SpecialIds = field(default_factory=Qwen2SpecialIds)
    preprocess: Qwen2PreprocessConfig = field(default_factory=Qwen2PreprocessConfig)
    loss_chunk_tokens: int = 1024
    loss_impl: str = "fused_fwd_grad"  # as QwenVLConfig (train/model/loss.py)
    debug_checks: bool = False  # validate image tokens against the grids in every forward (host syncs)

    family = "qwen2_vl"

    def validate(self) -> Qwen2VLConfig:
        v, m, p = self.vision, self.llm, self.preprocess
        _check(v.width % v.heads == 0, "vision.width must be divisible by vision.heads")
        _check(v.head_dim % 4 == 0, "vision head dim (width / heads) must be divisible by 4 (2D rotary)")
        _check(m.hidden % m.heads == 0, "llm.hidden must be divisible by llm.heads")
        _check(m.heads % m.kv_heads == 0, "llm.heads must be divisible by llm.kv_heads")
        _check(m.head_dim % 2 == 0, "llm head dim must be even (rotary)")
        _check(len(m.mrope_section) == 3 and sum(m.mrope_section) == m.head_dim // 2,
               f"llm.mrope_section {list(m.mrope_section)} must have 3 entries summing to head_dim/2 = "
               f"{m.head_dim // 2}")
        _check(m.vocab_size > max(asdict(self.ids).values()), "llm.vocab_size must exceed every special id")
        for k in ("patch_size", "merge_size", "temporal_patch_size"):
            _check(getattr(p, k) == getattr(v, k), f"preprocess.{k} ({getattr(p, k)}) must equal vision.{k} "
                   f"({getattr(v, k)})")
        _check(0 < p.min_pixels <= p.max_pixels, "preprocess: need 0 < min_pixels <= max_pixels")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["llm"]["mrope_section"] = list(self.llm.mrope_section)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Qwen2VLConfig:
        """Build from a nested dict (e.g. a Hydra node); unknown keys are an error naming the key."""
        sub = {"vision": Qwen2VisionConfig, "llm": Qwen2LLMConfig, "ids": Qwen2SpecialIds,
               "preprocess": Qwen2PreprocessConfig}
        kwargs = {}
        for k, val in d.items():
            if k in ("name", "family"):
                continue
            if k in sub:
                known = {f.name for f in fields(sub[k])}
                bad = sorted(set(val) - known)
                _check(not bad, f"unknown model config key(s): {', '.join(f'{k}.{b}' for b in bad)}")
                val = dict(val)
                if "mrope_section" in val:
                    val["mrope_section"] = tuple(int(x) for x in val["mrope_section"])
                kwargs[k] = sub[k](**val)
            elif k in {f.name for f in fields(cls)}:
                kwargs[k] = val
            else:
                raise ValueError(f"unknown model config key: {k}")
        return cls(**kwargs).validate()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def qwen2_vl_7b() -> Qwen2VLConfig:
    """Qwen2-VL-7B (published config.json): untied, vocab 152064."""
    return Qwen2VLConfig().validate()


def qwen2_vl_2b() -> Qwen2VLConfig:
    """Qwen2-VL-2B (published config.json): hidden 1536, 12 heads / 2 KV heads, tied embeddings."""
    return Qwen2VLConfig(
        llm=Qwen2LLMConfig(vocab_size=151936, hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
                           tie_embeddings=True),
    ).validate()


def tiny() -> Qwen2VLConfig:
    """Small model for tests and the CPU demo: full vocabulary (the real tokenizer's ids must fit)."""
    return Qwen2VLConfig(
        vision=Qwen2VisionConfig(width=32, layers=2, heads=2, mlp_ratio=4),
        llm=Qwen2LLMConfig(vocab_size=151936, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                           mrope_section=(2, 3, 3), max_position=4096),
        preprocess=Qwen2PreprocessConfig(max_pixels=224 * 224),  # demo images stay a few dozen tokens
    ).validate()


NAMED = {"qwen2_vl_7b": qwen2_vl_7b, "qwen2_vl_2b": qwen2_vl_2b, "qwen2_vl_tiny": tiny}


def get_config(name: str, **overrides) -> Qwen2VLConfig:
    """A named config with per-section overrides, e.g. get_config("qwen2_vl_tiny", llm={"layers": 1})."""
    if name not in NAMED:
        raise ValueError(f"unknown Qwen2-VL model config {name!r}; known: {', '.join(sorted(NAMED))}")
    cfg = NAMED[name]()
    for section, vals in overrides.items():
        cur = getattr(cfg, section)
        cfg = replace(cfg, **{section: replace(cur, **vals) if isinstance(vals, dict) else vals})
    return cfg.validate()
