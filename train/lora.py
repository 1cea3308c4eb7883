"""LoRA and Q-LoRA on the LLM, with peft (SPEC §5: r 64, alpha 16, dropout 0.05 on c_attn, attn.c_proj, w1, w2).

peft's adapters are injected into our own `QwenVL` (no Hugging Face wrapper needed). Two things the official
fine-tuning code gets wrong are handled here:
- Q-LoRA adapters "cannot be merged" there because the base is 4-bit. We never merge into the 4-bit weights:
  `merged_state_dict` adds each adapter's delta (B @ A x scale) to the full-precision base weights (taken from
  the model for LoRA, or from the original checkpoint for Q-LoRA), giving ordinary weights to export.
- Q-LoRA under ZeRO-3 "cannot work" there: here the 4-bit base is kept out of partitioning (train/qlora.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

# Internal names (DESIGN.md): only the decoder's linear layers; the ViT's mlp.c_proj must not match.
DEFAULT_TARGETS: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2")
ADAPTER = "default"
TOP_LEVEL = ("visual", "adapter", "llm")  # a target starting with one is a full-path regex


class LoraError(ValueError):
    """A LoRA / Q-LoRA setting that cannot work; the message names the setting."""


def target_regex(targets: Sequence[str]) -> str:
    """peft full-match regex. A target naming a top-level module (`visual.…`, `adapter.…`, `llm.…`) is a
    full-path regex (LoRA on the ViT or the adapter); any other is a suffix inside the LLM's blocks,
    `llm.h.N.<target>`."""
    if not targets:
        raise LoraError("lora.targets is empty")
    llm = [re.escape(t) for t in targets if not t.startswith(TOP_LEVEL)]
    paths = [t for t in targets if t.startswith(TOP_LEVEL)]
    for t in paths:
        try:
            re.compile(t)
        except re.error as err:
            raise LoraError(f"lora.targets: {t!r} is not a valid regex ({err})") from err
    alts = ([rf"llm\.h\.\d+\.(?:{'|'.join(llm)})"] if llm else []) + [f"(?:{t})" for t in paths]
    return "|".join(alts) if len(alts) > 1 else alts[0]


def _check_modules(model: nn.Module, key: str, paths: Sequence[str]) -> None:
    known = dict(model.named_modules())
    unknown = [m for m in paths if m not in known or not m]
    if unknown:
        tops = sorted(n for n in known if n and "." not in n)
        raise LoraError(f"{key}: unknown module(s) {unknown}; give module paths such as {tops} or llm.wte")


def apply_lora(model: nn.Module, *, r: int = 64, alpha: float = 16, dropout: float = 0.05,
               targets: Sequence[str] = DEFAULT_TARGETS, train_modules: Sequence[str] = (),
               modules_to_save: Sequence[str] = (), rslora: bool = False, dora: bool = False) -> nn.Module:
    """Inject LoRA adapters in place. Everything else is frozen except `train_modules` (top-level module
    names, e.g. ["adapter"], trained fully as the official full-adapter fine-tune does) and `modules_to_save`
    (any module paths, e.g. ["llm.wte", "llm.lm_head"] for new tokens; trained in place, not copied as
    peft's own modules_to_save would, so the names and the export stay those of the plain model).
    `targets`: LLM block suffixes (`attn.c_attn`) and/or full-path regexes for the ViT or the adapter
    (`visual.transformer.resblocks.[0-9]+.mlp.c_fc`), see `target_regex`."""
    from peft import LoraConfig, inject_adapter_in_model

    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise LoraError(f"need lora.r >= 1, lora.alpha > 0 and 0 <= lora.dropout < 1; got {r}, {alpha}, {dropout}")
    names = dict(model.named_children())
    unknown = [m for m in train_modules if m not in names]
    if unknown:
        raise LoraError(f"lora.train_modules: unknown module(s) {unknown}; known: {sorted(names)}")
    _check_modules(model, "lora.modules_to_save", modules_to_save)
    # fixed by design (e.g. adapter.pos_embed): stays fixed even inside a fully trained module
    fixed = {name for name, p in model.named_parameters() if not p.requires_grad}
    regex = target_regex(targets)
    # torch's MultiheadAttention never calls its out_proj's forward (it reads the weight): an adapter there
    # would silently train nothing
    dead = [n for n, m in model.named_modules() if re.fullmatch(regex, n)
            and isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]
    if dead:
        raise LoraError(f"lora.targets match {dead[:3]}: a MultiheadAttention out_proj, whose forward torch never "
                        "calls (an adapter there would have no effect); target e.g. mlp.c_fc / mlp.c_proj in the "
                        "ViT blocks or adapter.kv_proj")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex, bias="none",
                     use_rslora=rslora, use_dora=dora)
    try:
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    except ValueError as err:  # peft's NoMatchingPeftModuleError
        raise LoraError(f"lora.targets {list(targets)} matched no linear layer ({err})") from err
    full = tuple(f"{m}." for m in (*train_modules, *modules_to_save))
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or (name.startswith(full) and name not in fixed))
    return model


def lora_layers(model: nn.Module):
    """(name, layer) of every injected LoRA layer."""
    from peft.tuners.lora import LoraLayer

    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable parameters (adapters + fully trained modules): what a LoRA checkpoint must hold."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def base_key(key: str) -> str:
    """Internal name of a parameter with peft's wrapping removed (`x.base_layer.weight` -> `x.weight`)."""
    return key.replace(".base_layer.", ".")


def merge_lora_state(state: Mapping[str, torch.Tensor], scaling: float, expected: Mapping[str, torch.Size],
                     base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Plain internal state dict: W = W_base + scaling * B @ A for every adapted linear (DoRA: then each row
    scaled to magnitude / its norm) (`X.base_layer.weight`
    + `X.lora_A/B.default.weight`), peft's wrapping removed. Works on any state dict (a ZeRO-3 consolidated
    one included). `expected`: the plain model's key -> shape. `base` (internal names) supplies the weights
    the state holds in another form (Q-LoRA's packed 4-bit ones); bitsandbytes' quantisation buffers go."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        k = base_key(key)
        if ".lora_" in key or k not in expected:
            continue
        if tuple(t.shape) != tuple(expected[k]) or not torch.is_floating_point(t):
            if base is None or k not in base:
                raise LoraError(f"{k}: the state holds a {t.dtype} {tuple(t.shape)} tensor, the model needs "
                                f"{tuple(expected[k])}; pass the full-precision base weights")
            t = base[k]
        out[k] = t.detach().clone()
    if base is not None:  # weights the state does not hold at all (Q-LoRA's 4-bit base is never saved)
        for k in expected:
            if k not in out and k in base:
                out[k] = base[k].detach().clone()
    suffix_a, suffix_b = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"
    for key, a in state.items():
        if not key.endswith(suffix_a):
            continue
        prefix = key[: -len(suffix_a)]
        k = base_key(prefix + ".weight")
        if k not in out:
            raise LoraError(f"{k}: the state holds LoRA adapters for it but not its base weight; pass the "
                            "full-precision base weights")
        w, b = out[k], state[prefix + suffix_b]
        merged = w.float() + scaling * (b.float() @ a.float())
        mag = state.get(f"{prefix}.lora_magnitude_vector.{ADAPTER}.weight")
        if mag is not None:  # DoRA: each output row rescaled to its trained magnitude (peft's merge)
            merged = merged * (mag.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)
        out[k] = merged.to(w.dtype)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise LoraError(f"merged LoRA state lacks {len(missing)} weights, e.g. {missing[:3]}")
    return out


def merged_state_dict(model: nn.Module, base: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`merge_lora_state` of a LoRA-injected model: its plain state dict with the adapters merged in."""
    scalings = {layer.scaling[ADAPTER] for _, layer in lora_layers(model)}
    if len(scalings) != 1:
        raise LoraError(f"expected one LoRA scaling (alpha / r) across layers, found {sorted(scalings)}")
    state = model.state_dict()
    # the plain model's shapes: from the full-precision base when given (Q-LoRA's own base is packed)
    expected = ({k: t.shape for k, t in base.items()} if base is not None else
                {base_key(k): t.shape for k, t in state.items() if ".lora_" not in k})
    return merge_lora_state(state, scalings.pop(), expected, base)


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """peft's scale of B @ A: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def check_engine(qlora: bool, zero_stage: int, device: str) -> None:
    """Every engine and device runs LoRA and Q-LoRA (bitsandbytes has CPU and CUDA 4-bit kernels, and the
    4-bit base is kept out of ZeRO-3's partitioning, train/qlora.py); only a missing bitsandbytes is refused."""
    if qlora:
        from train.qlora import QLoraError, bnb_module

        try:
            bnb_module()
        except QLoraError as err:
            raise LoraError(str(err)) from err


def quantize_llm_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      quant_type: str = "nf4", double_quant: bool = True) -> int:
    """`train.qlora.quantize_llm_4bit`: the LLM's block linears in 4-bit (CPU or CUDA); returns how many."""
    from train.qlora import quantize_llm_4bit as quantize

    return quantize(model, compute_dtype=compute_dtype, device=device, quant_type=quant_type,
                    double_quant=double_quant)
