"""The NoteLLM-2 model: frozen vision encoder, connector, LLM, late fusion, head (REFERENCE §3-§5).

    from core.model import build_model
    model, tokenizer = build_model(run_cfg.model, run_cfg.loss, seed=0)
    out = model(input_ids, attention_mask, pixel_values, has_image)   # NoteEmbeddings
"""

from core.model.builders import build_model, build_tokenizer, count_parameters
from core.model.notellm2 import NoteEmbeddings, NoteLLM2

__all__ = ["NoteEmbeddings", "NoteLLM2", "build_model", "build_tokenizer", "count_parameters"]
