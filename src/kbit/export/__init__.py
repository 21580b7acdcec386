"""Writing what training produced in formats other tools read: PEFT adapter folders."""

from .adapter import adapter_config, adapter_state_dict, load_adapter, read_adapter_config, save_adapter

__all__ = ["adapter_config", "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"]
