"""Note -> compression prompt -> token ids (REFERENCE §3, §4).

A prompt is three segments: a fixed head (with `<IMG>`, and for mICL the whole visual note and
its `<IMG_EMB>` slot), the note's JSON fields (truncated to a token budget) and a fixed tail
ending in the compression instruction. Segments are tokenised separately so truncation can
never cut the compression suffix; the last token of every prompt is the multimodal
compression position.

    tok = build_tokenizer(cfg)                      # core.model.builders: adds IMG tokens
    batch = tokenize_notes(tok, notes, cfg, max_length=96)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

IMG_TOKEN = "<IMG>"
IMG_EMB_TOKEN = "<IMG_EMB>"
SPECIAL_TOKENS = (IMG_TOKEN, IMG_EMB_TOKEN)

_TEMPLATES = {
    # language: (note prefix, image field, field names, compression instruction, slot open, slot close)
    "en": ("Note: {", '"image":"' + IMG_TOKEN + '"', ("title", "topics", "content"), ", compress into one word: ", '"', '". '),
    "zh": ("笔记：{", '"图片":"' + IMG_TOKEN + '"', ("标题", "话题", "内容"), "，压缩为一个词：", "“", "”。"),
}
_SENTENCE_MARK = {"en": ". ", "zh": "。"}
_TOPIC_MARK = "[话题]"
# REFERENCE §3: `#`, one word (letters, digits, underscore), `#`, ≤ 16 characters with both `#`s,
# so "C# and F#" or "#1 and #2" hold no hashtag (\w is Unicode-aware: Chinese words match)
_HASHTAG = re.compile(r"#(\w{1,14})#")


@dataclass(frozen=True)
class NoteText:
    """A note's text after the official preprocessing."""

    title: str
    topics: list[str]
    content: str


def clean_note_text(title, topics, content, *, language="en", title_max_chars=20, content_max_chars=80, max_topics=10) -> NoteText:
    """Official text preprocessing: hashtags -> topics, newlines -> sentence marks, truncation.

    `[话题]` marks are removed, then hashtags `#word#` (one word of letters, digits or underscore,
    ≤ 16 characters with both `#`s) are removed from the content and appended to the topics; at
    most `max_topics` topics are kept. Missing fields become empty strings.
    """
    title = "" if title is None else str(title)
    content = "" if content is None else str(content).replace(_TOPIC_MARK, "")
    topics = [str(t) for t in (topics if topics is not None else []) if t is not None and str(t).strip()]
    topics += _HASHTAG.findall(content)
    content = _HASHTAG.sub("", content)
    mark = _SENTENCE_MARK[language]
    title = re.sub(r"\s*\n+\s*", mark, title.strip())
    content = re.sub(r"\s*\n+\s*", mark, content.strip())
    seen, unique = set(), []
    for t in topics:
        if t not in seen:
            seen.add(t)
            unique.append(t)
    return NoteText(title[:title_max_chars], unique[:max_topics], content[:content_max_chars])


def prompt_segments(text: NoteText, *, mode: str, language: str = "en") -> tuple[str, str, str]:
    """(head, body, tail) of the prompt for one note; only the body may be truncated."""
    prefix, image_field, names, instruction, slot_open, slot_close = _TEMPLATES[language]
    values = (text.title, ",".join(text.topics), text.content)
    # json.dumps escapes quotes inside fields so the note stays a JSON object, as in the paper
    body = ",".join(f"{json.dumps(k, ensure_ascii=False)}:{json.dumps(v, ensure_ascii=False)}" for k, v in zip(names, values))
    tail = "}" + instruction + slot_open
    if mode == "text":
        head = prefix
    elif mode == "basic":
        head = prefix + image_field + ","
    elif mode == "micl":
        visual_note = prefix + image_field + "}" + instruction + slot_open + IMG_EMB_TOKEN + slot_close
        head = visual_note + prefix
    else:
        raise ValueError(f"prompt mode {mode!r}: allowed text, basic, micl")
    return head, body, tail


def build_prompt(text: NoteText, *, mode: str, language: str = "en") -> str:
    """The full prompt string (untruncated), e.g. for display and docs."""
    return "".join(prompt_segments(text, mode=mode, language=language))


def bos_prefix(tokenizer) -> list[int]:
    """`[bos_id]` when the tokenizer starts every sequence with its BOS (Llama-style), else `[]`.

    The prompt segments are tokenised without special tokens (so truncation never cuts the
    suffix); what the tokenizer itself puts in front of an empty text tells whether its model
    expects a BOS (GPT-2-style BPE tokenizers such as SmolLM2's put nothing there)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and ids[:1] == [bos] else []


def tokenize_notes(tokenizer, notes: list[dict], model_cfg, max_length: int | None = None) -> dict:
    """Tokenise notes into right-padded id matrices.

    Args:
        tokenizer: a tokenizer holding `SPECIAL_TOKENS` (see `core.model.builders.build_tokenizer`).
        notes: dicts with `title`, `topics`, `content` (any may be missing/None).
        model_cfg: `ModelConfig` (prompt mode, language, truncation budgets).
        max_length: pad every row to this length (fixed shapes for Ray Data); None pads to the
            longest row. Rows longer than `max_length` raise: the budget is set too small.

    Returns:
        {"input_ids": int64 [N, T], "attention_mask": int64 [N, T], "text_chars": int64 [N]}
        where text_chars is len(title) + len(content) after cleaning (the 'short note' measure).
    """
    import numpy as np

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, chars = [], []
    bos = bos_prefix(tokenizer)
    cache: dict[str, list[int]] = {}

    def encode_fixed(s: str) -> list[int]:
        if s not in cache:  # heads and tails repeat for every note
            cache[s] = tokenizer(s, add_special_tokens=False)["input_ids"]
        return cache[s]

    for note in notes:
        text = clean_note_text(
            note.get("title"), note.get("topics"), note.get("content"), language=model_cfg.language,
            title_max_chars=model_cfg.title_max_chars, content_max_chars=model_cfg.content_max_chars,
            max_topics=model_cfg.max_topics,
        )
        head, body, tail = prompt_segments(text, mode=model_cfg.prompt_mode, language=model_cfg.language)
        body_ids = tokenizer(body, add_special_tokens=False)["input_ids"][: model_cfg.max_text_tokens]
        rows.append(bos + encode_fixed(head) + body_ids + encode_fixed(tail))
        chars.append(len(text.title) + len(text.content))
    width = max(len(r) for r in rows) if rows else 1
    if max_length is not None:
        if width > max_length:
            raise ValueError(f"a prompt has {width} tokens but max_length={max_length}; raise the limit or lower model.max_text_tokens")
        width = max_length
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "text_chars": np.asarray(chars, dtype=np.int64)}


def prompt_length_bound(tokenizer, model_cfg) -> int:
    """An upper bound on prompt length: BOS (if any) + fixed head + tail + the body budget."""
    head, _, tail = prompt_segments(NoteText("", [], ""), mode=model_cfg.prompt_mode, language=model_cfg.language)
    fixed = len(bos_prefix(tokenizer)) + len(tokenizer(head, add_special_tokens=False)["input_ids"]) \
        + len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    return fixed + model_cfg.max_text_tokens
