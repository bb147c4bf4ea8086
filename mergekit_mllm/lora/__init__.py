"""LoRA experts in, LoRA adapter out.

* :mod:`~mergekit_mllm.lora.adapter` reads a peft adapter as per-module
  factors (scaling × B·A, rank/alpha patterns, rsLoRA, modules_to_save);
* :mod:`~mergekit_mllm.lora.inputs` makes adapter directories mergekit inputs
  that are never materialised, and hands the paper's methods exact low-rank
  task vectors;
* :mod:`~mergekit_mllm.lora.extract` writes a merged model as a rank-k adapter
  over its base (truncated SVD, energy kept reported);
* :mod:`~mergekit_mllm.lora.recipe` wires both into ``run_merge`` (the
  ``lora_output:`` recipe section).
"""

from mergekit_mllm.lora.adapter import AdapterError, LoraAdapter, is_adapter_dir

__all__ = ["AdapterError", "LoraAdapter", "is_adapter_dir"]
