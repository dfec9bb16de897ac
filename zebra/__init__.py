"""zebra: distil a pre-trained Llama-family Transformer into an MLA + Mamba2 hybrid (Zebra-Llama).

Importing `zebra` registers the hybrid with the transformers Auto classes, so
`AutoModelForCausalLM.from_pretrained(exported_dir)` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from zebra.model import ZebraConfig, ZebraForCausalLM

AutoConfig.register("zebra", ZebraConfig, exist_ok=True)
AutoModelForCausalLM.register(ZebraConfig, ZebraForCausalLM, exist_ok=True)

__all__ = ["ZebraConfig", "ZebraForCausalLM"]
