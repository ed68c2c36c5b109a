"""NoteLLM-2 building blocks: configs, model, losses, data, metrics. Imports neither ray nor deepspeed."""
