"""NoteLLM-2 (REFERENCE §3-§5): a note prompt with its image spliced in -> note embeddings.

    out = model(input_ids, attention_mask, pixel_values, has_image)
    out = model(input_ids, attention_mask, has_image=has_image, image_features=(patches, cls))  # cached
    out.multimodal   # [N, d]  n^m: last prompt token (after late fusion and the head)
    out.visual       # [N, d]  n^v: token before <IMG_EMB> (mICL only, else None)
    out.log_scale    # scalar  tau, returned from forward so ZeRO-3 has it gathered

The model only embeds. It knows nothing about distribution or the loss (core.losses, core.step).

Forward, for right-padded prompts [N, T] that each hold one `<IMG>` (basic / micl modes):
1. frozen vision encoder: images -> patches [N, L_p, h_v] and a CLS vector [N, h_v];
2. connector: patches -> L visual tokens [N, L, h_t] (zeros for notes without an image);
3. `<IMG>`'s embedding is replaced by the L tokens: [N, T + L - 1, h_t], padding stays on the right;
4. the LLM's decoder (no LM head: logits over the vocabulary are never needed) -> hidden states;
5. n^m = hidden state at the last real token; n^v = hidden state just before `<IMG_EMB>`;
6. late fusion with the CLS vector (same gate for both), then the optional bias-free head.
Text mode skips 1-3 except that the CLS vector is still computed for late fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.config import PROMPT_MODES


@dataclass
class NoteEmbeddings:
    """What NoteLLM2.forward returns; embeddings are float32 and not normalised."""

    multimodal: torch.Tensor
    """n^m [N, d]: the note embedding used for retrieval."""
    visual: torch.Tensor | None
    """n^v [N, d]: the visual-note embedding (mICL), else None."""
    log_scale: torch.Tensor
    """tau, the contrastive log-scale (scalar parameter)."""


def splice_visual_tokens(
    text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_pos: torch.Tensor, visual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the token at `image_pos` of every row by that row's L visual tokens.

    One gather over [text ; visual] does it for the whole batch: output position j of row i reads
    text j before the image, visual token j - p_i inside it, and text j - L + 1 after it.

    Args:
        text_embeds: [N, T, h] token embeddings (right-padded rows).
        attention_mask: [N, T] 1 for real tokens.
        image_pos: [N] index of the `<IMG>` token in each row.
        visual: [N, L, h] visual tokens.

    Returns:
        (embeds [N, T + L - 1, h], attention_mask [N, T + L - 1]); padding stays on the right.
    """
    n, t, h = text_embeds.shape
    num_visual = visual.shape[1]
    j = torch.arange(t + num_visual - 1, device=text_embeds.device).unsqueeze(0)  # [1, T']
    p = image_pos.unsqueeze(1)  # [N, 1]
    src = torch.where(j < p, j, torch.where(j < p + num_visual, t + j - p, j - num_visual + 1))  # [N, T'] into [text ; visual]
    table = torch.cat([text_embeds, visual.to(text_embeds.dtype)], dim=1)  # [N, T + L, h]
    embeds = table.gather(1, src.unsqueeze(-1).expand(-1, -1, h))  # [N, T', h]
    mask_table = torch.cat([attention_mask, attention_mask.new_ones(n, num_visual)], dim=1)  # [N, T + L]
    return embeds, mask_table.gather(1, src)  # visual tokens are real tokens: mask 1


def token_positions(input_ids: torch.Tensor, token_id: int, name: str) -> torch.Tensor:
    """Index [N] of `token_id` in each row, which must hold it exactly once."""
    hits = input_ids == token_id  # [N, T]
    counts = hits.sum(dim=1)
    if not bool((counts == 1).all()):
        bad = int((counts != 1).nonzero()[0, 0])
        raise ValueError(f"every prompt must contain {name} (id {token_id}) exactly once; row {bad} has it {int(counts[bad])} times")
    return hits.int().argmax(dim=1)


def decoder_of(llm: nn.Module) -> nn.Module:
    """The transformer body of a (possibly peft-wrapped) HF causal LM, i.e. the LM without its head.

    peft injects LoRA layers in place, so calling the body directly still runs the adapters.
    """
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    body = base.base_model  # HF: getattr(model, base_model_prefix), e.g. LlamaForCausalLM.model
    if body is base:
        raise TypeError(f"{type(base).__name__} exposes no decoder body via base_model_prefix")
    return body


class NoteLLM2(nn.Module):
    """Multimodal large representation model: frozen vision encoder, connector, LLM, late fusion, head."""

    def __init__(
        self,
        llm: nn.Module,
        vision: nn.Module | None,
        connector: nn.Module | None,
        fusion: nn.Module | None,
        head: nn.Module | None,
        *,
        prompt_mode: str,
        num_visual_tokens: int,
        img_token_id: int,
        img_emb_token_id: int,
        log_scale_init: float = 3.0,
        learnable_temperature: bool = True,
    ):
        """
        Args:
            llm: HF causal LM (possibly peft-wrapped); only its decoder body is run.
            vision: frozen encoder (`core.model.vision`); None only when nothing uses images.
            connector: patches -> visual tokens; None in text mode.
            fusion: `LateFusionGate` or None.
            head: bias-free Linear(h_t -> d) or None.
            prompt_mode: `text`, `basic` or `micl` (must match the tokenised prompts).
            num_visual_tokens: L.
            img_token_id, img_emb_token_id: ids of `<IMG>` / `<IMG_EMB>` in the tokenizer.
            log_scale_init: initial tau (LossConfig.temperature_init).
            learnable_temperature: whether tau trains.
        """
        super().__init__()
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode {prompt_mode!r}: allowed {', '.join(PROMPT_MODES)}")
        if (connector is None) != (prompt_mode == "text"):
            raise ValueError(f"prompt_mode {prompt_mode!r} needs {'no' if prompt_mode == 'text' else 'a'} connector")
        if vision is None and (connector is not None or fusion is not None):
            raise ValueError("a connector or late fusion needs a vision encoder")
        self.llm = llm
        self.vision = vision
        self.connector = connector
        self.fusion = fusion
        self.head = head
        self.prompt_mode = prompt_mode
        self.num_visual_tokens = int(num_visual_tokens)
        self.img_token_id = int(img_token_id)
        self.img_emb_token_id = int(img_emb_token_id)
        # Shape [1], not a 0-dim scalar: DeepSpeed's gloo broadcast cannot view 0-dim tensors as bytes.
        self.log_scale = nn.Parameter(torch.tensor([float(log_scale_init)]), requires_grad=learnable_temperature)

    @property
    def uses_image(self) -> bool:
        """Whether forward reads pixel_values at all (visual tokens or late fusion)."""
        return self.connector is not None or self.fusion is not None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        image_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> NoteEmbeddings:
        """Embed a batch of notes.

        Args:
            input_ids: int [N, T] right-padded prompt ids (`core.prompts.tokenize_notes`).
            attention_mask: int [N, T].
            pixel_values: uint8 [N, 3, S, S] (0-255) or float (0-1); None treats every note as
                image-less (text-only evaluation, or models that use no image).
            has_image: bool [N]; False rows get zero visual tokens and skip late fusion.
                None means every row has an image (when pixel_values or image_features is given).
            image_features: instead of pixel_values, the frozen encoder's outputs computed earlier
                (patches [N, L_p, h_v], cls [N, h_v]; `core.data.features`), handed to the vision
                module in place of the images.

        Returns:
            NoteEmbeddings with float32 [N, d] embeddings.
        """
        n = input_ids.shape[0]
        embed = self.llm.get_input_embeddings()
        dtype = embed.weight.dtype  # compute in the LLM's dtype
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        if pixel_values is None and image_features is None:
            has_image = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
        elif has_image is None:
            has_image = torch.ones(n, dtype=torch.bool, device=input_ids.device)
        has_image = has_image.to(device=input_ids.device, dtype=torch.bool)

        patches = cls = None
        if (pixel_values is not None or image_features is not None) and self.uses_image:
            patches, cls = self.vision(pixel_values, features=image_features)  # [N, L_p, h_v], [N, h_v]; no grad
            patches, cls = patches.to(dtype), cls.to(dtype)

        inputs = embed(input_ids)  # [N, T, h_t]
        mask = attention_mask
        shift = 0
        if self.connector is not None:
            if patches is not None:
                visual = self.connector(patches)  # [N, L, h_t]
                visual = torch.where(has_image.view(-1, 1, 1), visual, torch.zeros_like(visual))
            else:
                visual = inputs.new_zeros(n, self.num_visual_tokens, inputs.shape[-1])
            image_pos = token_positions(input_ids, self.img_token_id, "<IMG>")
            inputs, mask = splice_visual_tokens(inputs, attention_mask, image_pos, visual)  # [N, T + L - 1, ...]
            shift = self.num_visual_tokens - 1

        hidden = decoder_of(self.llm)(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state  # [N, T', h_t]
        rows = torch.arange(n, device=hidden.device)
        last = attention_mask.sum(dim=1) - 1 + shift  # [N] last real token of the spliced rows
        multimodal = hidden[rows, last]  # [N, h_t]
        visual_note = None
        if self.prompt_mode == "micl":
            # <IMG_EMB> follows <IMG>, so it moved right by L - 1; n^v is the token before it.
            slot = token_positions(input_ids, self.img_emb_token_id, "<IMG_EMB>") + shift
            visual_note = hidden[rows, slot - 1]  # [N, h_t]

        if self.fusion is not None and cls is not None:
            v = self.fusion.project(cls)  # [N, h_t], shared by both embeddings
            multimodal = self.fusion(multimodal, v, has_image)
            if visual_note is not None:
                visual_note = self.fusion(visual_note, v, has_image)
        if self.head is not None:
            multimodal = self.head(multimodal)
            visual_note = None if visual_note is None else self.head(visual_note)
        return NoteEmbeddings(
            multimodal=multimodal.float(),
            visual=None if visual_note is None else visual_note.float(),
            log_scale=self.log_scale.reshape(()),
        )
