"""4-bit NF4 base models (bitsandbytes), as the seed's 4-bit runs: double quantisation, bf16 compute.

bitsandbytes is imported only here and only when 4-bit is asked for on a machine with a CUDA GPU.
"""

from __future__ import annotations

import torch

from ..models.lm import LM


def require_4bit() -> None:
    """Raise a clear error unless 4-bit loading can work here (a CUDA GPU and bitsandbytes)."""
    if not torch.cuda.is_available():
        raise ValueError(
            "--4bit (NF4 via bitsandbytes) needs a CUDA GPU and none is available here; "
            "run without --4bit to tune the float32 model"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("--4bit needs bitsandbytes: pip install bitsandbytes") from None


def load_4bit(name_or_path: str | None) -> LM:
    """The model in NF4 with double quantisation and bf16 compute, prepared for k-bit training (peft)."""
    require_4bit()
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if name_or_path is None:
        from ..models.loading import bundled_gguf_path, converted_gguf_folder

        name_or_path = str(converted_gguf_folder(bundled_gguf_path()))
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(name_or_path, quantization_config=quant, device_map={"": 0})
    model = prepare_model_for_kbit_training(model)
    return LM.wrap(model, AutoTokenizer.from_pretrained(name_or_path), name=f"{name_or_path} (NF4)")
