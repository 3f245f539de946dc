"""Named Llama configurations on litgpt's `Config`/`GPT`, their sizes, FLOPs and initialisation.

The model knows nothing of sharding: everything here works on an ordinary `litgpt.model.GPT`.
"""
from models.configs import CONFIG_NAMES, build_model, get_config
from models.flops import count_params, flops_per_token
from models.init import init_model, init_weights, mark_for_init

__all__ = ["CONFIG_NAMES", "build_model", "count_params", "flops_per_token", "get_config", "init_model", "init_weights",
           "mark_for_init"]
