"""LoRA and Q-LoRA on the LLM, with peft (SPEC §5: r 64, alpha 16, dropout 0.05 on c_attn, attn.c_proj, w1, w2).

peft's adapters are injected into our own `QwenVL` (no Hugging Face wrapper needed). Two things the official
fine-tuning code gets wrong are handled here:
- Q-LoRA adapters "cannot be merged" there because the base is 4-bit. We never merge into the 4-bit weights:
  `merged_state_dict` adds each adapter's delta (B @ A x scale) to the full-precision base weights (taken from
  the model for LoRA, or from the original checkpoint for Q-LoRA), giving ordinary weights to export.
- Q-LoRA under ZeRO-3 cannot work (4-bit parameters cannot be partitioned): `check_engine` refuses it early.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

# Internal names (DESIGN.md): only the decoder's linear layers; the ViT's mlp.c_proj must not match.
DEFAULT_TARGETS: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2")
ADAPTER = "default"


class LoraError(ValueError):
    """A LoRA / Q-LoRA setting that cannot work; the message names the setting."""


def target_regex(targets: Sequence[str]) -> str:
    """peft full-match regex for the LLM's blocks: `llm.h.N.<target>`."""
    if not targets:
        raise LoraError("lora.targets is empty")
    alts = "|".join(re.escape(t) for t in targets)
    return rf"llm\.h\.\d+\.(?:{alts})"


def apply_lora(model: nn.Module, *, r: int = 64, alpha: float = 16, dropout: float = 0.05,
               targets: Sequence[str] = DEFAULT_TARGETS, train_modules: Sequence[str] = ()) -> nn.Module:
    """Inject LoRA adapters into the LLM in place. Everything else is frozen except `train_modules`
    (top-level module names, e.g. ["adapter"], trained fully as the official full-adapter fine-tune does)."""
    from peft import LoraConfig, inject_adapter_in_model

    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise LoraError(f"need lora.r >= 1, lora.alpha > 0 and 0 <= lora.dropout < 1; got {r}, {alpha}, {dropout}")
    names = dict(model.named_children())
    unknown = [m for m in train_modules if m not in names]
    if unknown:
        raise LoraError(f"lora.train_modules: unknown module(s) {unknown}; known: {sorted(names)}")
    # fixed by design (e.g. adapter.pos_embed): stays fixed even inside a fully trained module
    fixed = {name for name, p in model.named_parameters() if not p.requires_grad}
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex(targets), bias="none")
    try:
        inject_adapter_in_model(cfg, model, adapter_name=ADAPTER)
    except ValueError as err:  # peft's NoMatchingPeftModuleError
        raise LoraError(f"lora.targets {list(targets)} matched no linear layer of the LLM ({err})") from err
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or (name.split(".", 1)[0] in train_modules and name not in fixed))
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
    """Plain internal state dict: W = W_base + scaling * B @ A for every adapted linear (`X.base_layer.weight`
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
    suffix_a, suffix_b = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"
    for key, a in state.items():
        if not key.endswith(suffix_a):
            continue
        prefix = key[: -len(suffix_a)]
        k = prefix + ".weight"
        w, b = out[k], state[prefix + suffix_b]
        out[k] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
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


def check_engine(qlora: bool, zero_stage: int, device: str) -> None:
    """Q-LoRA needs CUDA (bitsandbytes kernels) and cannot be sharded by ZeRO-3."""
    if not qlora:
        return
    if zero_stage == 3:
        raise LoraError("lora.qlora=true cannot run under engine.zero_stage=3 (4-bit weights cannot be partitioned); "
                        "use engine=zero2")
    if device != "cuda":
        raise LoraError("lora.qlora=true needs a CUDA device (bitsandbytes 4-bit kernels); use plain LoRA on the CPU")


def quantize_llm_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace the LLM's block linears with bitsandbytes NF4 layers (Q-LoRA base); returns how many.
    lm_head and embeddings stay in full precision, as in QLoRA. Call before `apply_lora`, on CUDA."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise LoraError("lora.qlora=true needs bitsandbytes: pip install 'qwenvl-train[gpu]'") from err
    n = 0
    for name, parent in list(model.named_modules()):
        if not re.fullmatch(r"llm\.h\.\d+\.(?:attn|mlp)", name):
            continue
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(parent, child_name, q.cuda())
                n += 1
    return n
