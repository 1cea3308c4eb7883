"""Model configuration: the one place the Qwen-VL geometry and special token ids live.

The model package takes token ids and pixel tensors; every id it needs comes from here,
never from the tokenizer (which lives in `data/`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace


@dataclass
class VisionConfig:
    """OpenCLIP ViT-bigG/14 geometry (SPEC §1)."""

    image_size: int = 448  # input resolution in pixels (224 in stage 1, 448 after)
    patch_size: int = 14  # ViT patch side in pixels
    width: int = 1664  # ViT hidden size
    layers: int = 48  # ViT transformer blocks
    heads: int = 16  # ViT attention heads
    mlp_width: int = 8192  # ViT MLP inner size
    ln_eps: float = 1e-6  # ViT LayerNorm epsilon
    pos_grid: int = 16  # grid of the stored positional embedding (224 px); interpolated at run time
    drop_path: float = 0.0  # stochastic depth rate of the ViT blocks
    window_size: int = 0  # 0 = global attention (paper default); >0 = windowed attention in patches
    grad_checkpointing: bool = False  # recompute ViT activations in backward (engine.grad_checkpointing)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class AdapterConfig:
    """Position-aware cross-attention adapter ("resampler")."""

    n_queries: int = 256  # learned queries = image tokens per image (pos_grid**2)
    pos_grid: int = 16  # queries form a 16x16 grid for the 2D sin-cos table
    head_dim: int = 128  # heads = llm hidden // head_dim
    ln_eps: float = 1e-6  # adapter LayerNorm epsilon


@dataclass
class LLMConfig:
    """Qwen-7B decoder geometry."""

    vocab_size: int = 151936  # embedding / output vocabulary (the Qwen tokenizer's)
    hidden: int = 4096  # LLM hidden size
    layers: int = 32  # LLM decoder blocks
    heads: int = 32  # LLM attention heads
    intermediate: int = 11008  # official config.json stores 2x this (22016); the code halves it
    rms_eps: float = 1e-6  # RMSNorm epsilon
    rope_base: float = 10000.0  # rotary embedding base
    max_position: int = 8192  # longest sequence the rotary tables cover
    grad_checkpointing: bool = False  # recompute LLM activations in backward (engine.grad_checkpointing)
    # Packed-row attention (train/model/attention.py): auto = flash-attn varlen on CUDA with a half compute
    # dtype, else FlexAttention on CUDA, else per-document SDPA (CPU); flex | flash | sdpa_docs | sdpa_dense.
    attn_impl: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class SpecialIds:
    """Token ids the model itself needs (SPEC §2)."""

    eod: int = 151643  # <|endoftext|>: end of document
    im_start: int = 151644  # <|im_start|> (ChatML)
    im_end: int = 151645  # <|im_end|> (ChatML)
    img_start: int = 151857  # <img>: opens an image span
    img_end: int = 151858  # </img>: closes an image span
    img_pad: int = 151859  # image placeholder the adapter's outputs replace


@dataclass
class QwenVLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    ids: SpecialIds = field(default_factory=SpecialIds)
    loss_chunk_tokens: int = 1024  # tokens per chunk in the chunked cross-entropy
    loss_impl: str = "fused_fwd_grad"  # fused_fwd_grad | chunked | naive | liger (train/model/loss.py)
    debug_checks: bool = False  # validate image spans in every forward (host syncs; the pipeline checks)

    def validate(self) -> QwenVLConfig:
        v, a, m = self.vision, self.adapter, self.llm
        _check(v.width % v.heads == 0, "vision.width must be divisible by vision.heads")
        _check(v.image_size % v.patch_size == 0, "vision.image_size must be a multiple of vision.patch_size")
        _check(m.hidden % m.heads == 0, "llm.hidden must be divisible by llm.heads")
        _check(m.hidden % a.head_dim == 0, "llm.hidden must be divisible by adapter.head_dim")
        _check(a.n_queries == a.pos_grid**2, "adapter.n_queries must equal adapter.pos_grid**2")
        _check(m.vocab_size > max(asdict(self.ids).values()), "llm.vocab_size must exceed every special id")
        _check(0.0 <= v.drop_path < 1.0, "vision.drop_path must be in [0, 1)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QwenVLConfig:
        """Build from a nested dict (e.g. a Hydra node); unknown keys are an error naming the key."""
        sub = {"vision": VisionConfig, "adapter": AdapterConfig, "llm": LLMConfig, "ids": SpecialIds}
        kwargs = {}
        for k, val in d.items():
            if k in sub:
                known = {f.name for f in fields(sub[k])}
                bad = sorted(set(val) - known)
                _check(not bad, f"unknown model config key(s): {', '.join(f'{k}.{b}' for b in bad)}")
                kwargs[k] = sub[k](**val)
            elif k in {f.name for f in fields(cls)}:
                kwargs[k] = val
            else:
                raise ValueError(f"unknown model config key: {k}")
        return cls(**kwargs).validate()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def qwen_vl_9b6() -> QwenVLConfig:
    """Full-size Qwen-VL: ViT-bigG/14 (1.84B) + adapter (0.08B) + Qwen-7B (7.72B)."""
    return QwenVLConfig().validate()


def tiny(image_size: int = 224) -> QwenVLConfig:
    """Small model for tests and the CPU demo. Keeps 256 queries (image spans are 258 tokens)
    and the full vocabulary (the real tokenizer's ids must fit)."""
    return QwenVLConfig(
        vision=VisionConfig(image_size=image_size, width=64, layers=2, heads=4, mlp_width=256),
        llm=LLMConfig(hidden=128, layers=2, heads=4, intermediate=256, max_position=4096),
    ).validate()


def micro(image_size: int = 56) -> QwenVLConfig:
    """Even smaller (4x4 patch grid, small vocab) for fast unit tests of the model alone."""
    return QwenVLConfig(
        vision=VisionConfig(image_size=image_size, width=32, layers=2, heads=2, mlp_width=64),
        llm=LLMConfig(vocab_size=151936, hidden=64, layers=2, heads=2, intermediate=128, max_position=2048),
        adapter=AdapterConfig(head_dim=32),
    ).validate()


NAMED = {"qwen_vl_9b6": qwen_vl_9b6, "tiny": tiny, "micro": micro}


def get_config(name: str, **overrides) -> QwenVLConfig:
    """A named config, with top-level section overrides, e.g. get_config("tiny", vision={"image_size": 448})."""
    if name not in NAMED:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(sorted(NAMED))}")
    cfg = NAMED[name]()
    for section, vals in overrides.items():
        cur = getattr(cfg, section)
        cfg = replace(cfg, **{section: replace(cur, **vals) if isinstance(vals, dict) else vals})
    return cfg.validate()
