"""Selection for causal language models: a small Llama-style transformer of Hugging Face
``transformers``, built from a config (random initialisation, nothing downloaded), as a
:class:`~auxilia.selection.learner.Learner`.

Why Llama and not GPT-2: the ``gradient`` and ``tawt`` methods project per-sample gradients with
the engine's ``sketch`` mode, which factors ``nn.Linear`` and ``nn.Embedding`` exactly from the
layer's inputs and output gradients (per-sample gradients are never formed). Every matrix of a
Llama model is one of those; its RMSNorm weights (a ``transformers`` class, not ``nn.RMSNorm``)
take the engine's exact ``torch.func`` fallback, which forms only ``width`` numbers per sample
and norm. GPT-2's ``Conv1D`` would take that fallback for every matrix (materialising N copies
of each weight), and its position embedding sees one row of positions for the whole batch,
which the sketch mode cannot map to samples (it refuses the model).

Samples are byte tokens (:mod:`auxilia.selection.tokens`): ``x`` = ids [N, context] padded on the
right with ``PAD``, ``y`` = lengths [N]. Batches are cut to their longest row before the forward
pass. The model is given no attention mask: with causal attention and padding on the right, a
real token never sees a padded one, so its output is the one of the unpadded row (and the
forward stays free of data-dependent branches, which ``torch.func`` needs); padding is then
left out of the losses and of the mean representation by the mask of real tokens.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from auxilia.errors import ConfigError, DataError
from auxilia.selection.tokens import PAD, VOCAB, attention_mask

LM_EXTRA = "pip install 'auxilia[lm]' (Hugging Face transformers)"


def transformers_missing() -> str | None:
    """``None`` when ``transformers`` can be imported, else what to install."""
    if importlib.util.find_spec("transformers") is None:
        return f"causal language models need transformers: {LM_EXTRA}"
    return None


@dataclass(frozen=True)
class CausalLMSpec:
    """The size of the model: ``layers`` blocks of ``width`` features in ``heads`` attention
    heads, ``context`` tokens at most, an MLP of ``mlp`` features (default 4 · width)."""

    layers: int = 2
    width: int = 64
    heads: int = 4
    context: int = 128
    mlp: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "width", "heads", "mlp"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {value}")
        if self.context < 2:
            raise ConfigError(f"context: expected at least 2 tokens, got {self.context}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(
                f"width {self.width} must be heads ({self.heads}) times an even number "
                "(the rotary position embedding of each head pairs its features)"
            )

    def build(self) -> nn.Module:
        """A freshly initialised ``LlamaForCausalLM`` over the byte vocabulary (torch's RNG)."""
        missing = transformers_missing()
        if missing is not None:
            raise ConfigError(missing)
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=self.width,
            intermediate_size=self.mlp or 4 * self.width,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            max_position_embeddings=self.context,
            tie_word_embeddings=False,
            use_cache=False,
        )
        model: nn.Module = LlamaForCausalLM(config)
        return model


def _trimmed(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids cut to the batch's longest row, and the mask of real tokens."""
    if x.dim() != 2 or y.shape != x.shape[:1]:
        raise DataError(
            f"language model: expected ids [N, T] and lengths [N], got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    try:
        low, width = (int(y.min()), int(y.max())) if len(y) else (1, 0)
    except RuntimeError:  # under torch.func's vmap values cannot be read: keep every column
        return x.long(), attention_mask(y, x.shape[1])
    if low < 1 or width > x.shape[1]:
        raise DataError(f"language model: lengths must lie in [1, {x.shape[1]}]")
    return x[:, :width].long(), attention_mask(y, width)


class LanguageModelLearner:
    """A causal LM as selection sees it: the loss of a sample is its mean next-token negative
    log-likelihood over its real tokens (padding excluded); the representation is the mean of
    the last hidden state over them; every parameter is shared (one output head, so ``head``
    is not used)."""

    def __init__(self, model: nn.Module) -> None:
        self.module: nn.Module = model

    def losses(self, x: torch.Tensor, y: torch.Tensor, head: str) -> torch.Tensor:
        ids, mask = _trimmed(x, y)
        logits: torch.Tensor = self.module(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
        )  # [N, T-1]: predicting token t+1 from tokens up to t
        real = mask[:, 1:].to(nll.dtype)
        losses: torch.Tensor = (nll * real).sum(dim=1) / real.sum(dim=1).clamp_min(1.0)
        return losses

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        ids, real = _trimmed(x, (x != PAD).sum(dim=1))  # rows are padded on the right
        body: nn.Module = cast(Any, self.module).base_model  # the transformer without lm_head
        out: torch.Tensor = body(input_ids=ids, use_cache=False).last_hidden_state
        mask = real.unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def compared(self, head: str, *, encoder_only: bool = False) -> list[nn.Parameter]:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if encoder_only:
            output: nn.Module = cast(Any, self.module).get_output_embeddings()
            skip = {id(p) for p in output.parameters()}
            params = [p for p in params if id(p) not in skip]
        return params

    def clone(self, state: Mapping[str, torch.Tensor] | None = None) -> LanguageModelLearner:
        model = copy.deepcopy(self.module)
        if state is not None:
            model.load_state_dict(state)
        return LanguageModelLearner(model)
