"""LoRA over PEFT and the label-only loss.

A LoRA layer computes ``x ↦ W0·x + (α/r)·B·A·x`` (``α/√r`` with rsLoRA), with ``W0`` frozen and
only ``A`` (r × in) and ``B`` (out × r) trained. Where the hardware has fast bf16 the frozen base
is *stored* in bf16 (no re-cast per use, half the memory) while ``A``, ``B`` and the optimizer
state stay in fp32; elsewhere everything is fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraforge.data.templates import IGNORE_INDEX
from loraforge.errors import ConfigError
from loraforge.models.packed_attention import ATTENTION_NAME, segments_from_positions

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel


def add_lora(
    model: PreTrainedModel,
    *,
    r: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str,
    use_rslora: bool,
    use_dora: bool,
) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters (fp32 weights whatever the base dtype).

    Raises:
        ConfigError: ``target_modules`` names nothing in the model (the message lists what exists).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int, accepts float
        lora_dropout=dropout,
        target_modules=target_modules,
        use_rslora=use_rslora,
        use_dora=use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"target_modules {target_modules!r} matches no layer of the model ({e}); "
            f"its linear layers are: {', '.join(linear)}"
        ) from e
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model


class LabelOnlyLM(nn.Module):
    """Causal-LM loss that projects to the vocabulary only at positions that have a target.

    The output head of SmolLM2 is 49,152 wide; materialising logits for prompt tokens would cost
    memory and a full-width log-softmax for nothing. Going through ``forward`` keeps the module
    wrappable by DDP/FSDP (accelerate).
    """

    def __init__(self, model: PeftModel) -> None:
        super().__init__()
        self.model = model

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``(B, T, H)`` of a packed batch."""
        base: Any = self.model.get_base_model()
        kwargs: dict[str, Any] = {}
        if getattr(base.config, "_attn_implementation", None) == ATTENTION_NAME:
            kwargs["packed_segments"] = segments_from_positions(position_ids)
        out = base.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)
        return out.last_hidden_state  # type: ignore[no-any-return]

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: ``(B, T)`` tensors. Returns: (sum of token losses, number of targets, number of
        targets the model ranks first — for the mean token accuracy), all scalars.

        Sequences are told apart by ``position_ids`` restarting at 0; no attention mask is passed,
        so transformers builds the block-diagonal causal mask of a packed batch.
        """
        h = self.hidden_states(input_ids, position_ids)  # (B, T, H)
        base: Any = self.model.get_base_model()
        selected = targets != IGNORE_INDEX  # (B, T)
        logits = base.get_output_embeddings()(h[selected])  # (N, V), N = targets in the batch
        loss_sum = nn.functional.cross_entropy(logits.float(), targets[selected], reduction="sum")
        with torch.no_grad():
            correct = (logits.argmax(dim=-1) == targets[selected]).sum()
        return loss_sum, selected.sum(), correct

    def token_losses(self, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-position loss ``(B, T)``, 0 where there is no target (for tests and evaluation)."""
        h = self.hidden_states(input_ids, position_ids)
        base: Any = self.model.get_base_model()
        selected = targets != IGNORE_INDEX
        out = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        logits = base.get_output_embeddings()(h[selected]).float()
        out[selected] = nn.functional.cross_entropy(logits, targets[selected], reduction="none")
        return out
