"""zofsdp: zeroth-order fine-tuning of Hugging Face causal LMs sharded with FSDP2 or DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
