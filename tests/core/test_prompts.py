"""Prompt building and tokenisation (REFERENCE §3, §4): templates, cleaning, truncation."""

from __future__ import annotations

import pytest

from core.config import ModelConfig
from core.model.builders import build_tokenizer
from core.prompts import (
    IMG_EMB_TOKEN,
    IMG_TOKEN,
    NoteText,
    bos_prefix,
    build_prompt,
    clean_note_text,
    prompt_length_bound,
    prompt_segments,
    tokenize_notes,
)
from tests.conftest import has_assets, tiny_model_dict

NOTE = NoteText(title="T", topics=["a", "b"], content="C")


def tiny_cfg(**over) -> ModelConfig:
    return ModelConfig(**tiny_model_dict(**over))


@pytest.mark.parametrize(
    "language, mode, expected",
    [
        ("zh", "text", '笔记：{"标题":"T","话题":"a,b","内容":"C"}，压缩为一个词：“'),
        ("zh", "basic", '笔记：{"图片":"<IMG>","标题":"T","话题":"a,b","内容":"C"}，压缩为一个词：“'),
        ("zh", "micl", '笔记：{"图片":"<IMG>"}，压缩为一个词：“<IMG_EMB>”。笔记：{"标题":"T","话题":"a,b","内容":"C"}，压缩为一个词：“'),
        ("en", "text", 'Note: {"title":"T","topics":"a,b","content":"C"}, compress into one word: "'),
        ("en", "basic", 'Note: {"image":"<IMG>","title":"T","topics":"a,b","content":"C"}, compress into one word: "'),
        ("en", "micl", 'Note: {"image":"<IMG>"}, compress into one word: "<IMG_EMB>". Note: {"title":"T","topics":"a,b","content":"C"}, compress into one word: "'),
    ],
)
def test_templates_render_the_reference_shapes(language, mode, expected):
    assert build_prompt(NOTE, mode=mode, language=language) == expected


def test_quotes_inside_fields_keep_the_json_valid():
    import json

    head, body, tail = prompt_segments(NoteText('say "hi"', [], "x"), mode="text", language="en")
    assert json.loads("{" + body + "}")["title"] == 'say "hi"'


@pytest.mark.parametrize("content, topics, kept", [
    ("I code in C# and F# daily", [], "I code in C# and F# daily"),  # not hashtags: no word between the #s
    ("Ranked #1 and #2", [], "Ranked #1 and #2"),
    ("#a_very_long_tag# end", [], "#a_very_long_tag# end"),  # 17 characters with both #s: over the limit
    ("#fourteen_char# end", ["fourteen_char"], "end"),
    ("#exactly14chars# end", ["exactly14chars"], "end"),  # 16 characters with both #s: the limit
    ("看 #旅行[话题]# 和 #美食#", ["旅行", "美食"], "看  和"),  # [话题] removed first; Chinese words match
])
def test_hashtag_pattern_of_the_reference(content, topics, kept):
    text = clean_note_text("t", [], content)
    assert text.topics == topics and text.content == kept


def test_bos_only_where_the_tokenizer_starts_with_one():
    tok = build_tokenizer(tiny_cfg())
    assert bos_prefix(tok) == [tok.bos_token_id]
    ids = tokenize_notes(tok, [{"title": "x"}], tiny_cfg())["input_ids"][0]
    assert ids[0] == tok.bos_token_id and list(ids).count(tok.bos_token_id) == 1

    class NoBos:  # GPT-2-style: a BOS token exists but is not put in front of a text
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    assert bos_prefix(NoBos()) == []


def test_hashtags_become_topics_and_leave_the_content():
    text = clean_note_text("Trip", ["travel"], "Sunny day #beach[话题]# and #food# and #beach#", language="en")
    assert text.topics == ["travel", "beach", "food"]  # deduplicated, order kept
    assert "#" not in text.content and "Sunny day" in text.content
    capped = clean_note_text("t", [f"t{i}" for i in range(15)], "", max_topics=10)
    assert capped.topics == [f"t{i}" for i in range(10)]


def test_cleaning_truncates_and_replaces_newlines():
    text = clean_note_text("line one\nline two is long", None, "a\n\nb" + "z" * 200, language="zh", title_max_chars=12, content_max_chars=80)
    assert text.title == "line one。line"[:12] and len(text.title) == 12
    assert text.content.startswith("a。b") and len(text.content) == 80
    assert clean_note_text(None, None, None) == NoteText("", [], "")


@pytest.mark.parametrize("mode", ["text", "basic", "micl"])
def test_truncation_never_cuts_the_compression_suffix(mode):
    cfg = tiny_cfg(prompt_mode=mode, max_text_tokens=8, content_max_chars=80)
    tok = build_tokenizer(cfg)
    notes = [{"title": "A very long title indeed", "content": "word " * 40}, {"title": "short", "content": ""}]
    batch = tokenize_notes(tok, notes, cfg)
    head, _, tail = prompt_segments(NoteText("", [], ""), mode=mode, language=cfg.language)
    head_ids = [tok.bos_token_id] + tok(head, add_special_tokens=False)["input_ids"]  # the tiny tokenizer is Llama-style
    tail_ids = tok(tail, add_special_tokens=False)["input_ids"]
    lengths = batch["attention_mask"].sum(axis=1)
    assert lengths[0] == len(head_ids) + 8 + len(tail_ids)  # body cut to exactly the budget
    for row, n in zip(batch["input_ids"], lengths):
        assert list(row[:n][-len(tail_ids):]) == tail_ids  # every prompt ends with the instruction
        assert list(row[: len(head_ids)]) == head_ids
    assert lengths.max() <= prompt_length_bound(tok, cfg)


@pytest.mark.parametrize("mode, n_img, n_emb", [("text", 0, 0), ("basic", 1, 0), ("micl", 1, 1)])
def test_special_tokens_appear_once_per_prompt(mode, n_img, n_emb):
    cfg = tiny_cfg(prompt_mode=mode)
    tok = build_tokenizer(cfg)
    img, emb = tok.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN])
    # a note that mentions the placeholder text itself must not add another one... it is plain text
    batch = tokenize_notes(tok, [{"title": "cat", "content": "meow"}, {"title": "", "content": ""}], cfg)
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        real = row[mask.astype(bool)]
        assert (real == img).sum() == n_img and (real == emb).sum() == n_emb
    if mode == "micl":
        row = list(batch["input_ids"][0])
        assert row.index(img) < row.index(emb)  # the visual note comes first


def test_right_padding_to_a_fixed_width_and_too_small_width():
    cfg = tiny_cfg()
    tok = build_tokenizer(cfg)
    notes = [{"title": "a", "content": "b"}, {"title": "longer", "content": "much longer text"}]
    batch = tokenize_notes(tok, notes, cfg, max_length=200)
    assert batch["input_ids"].shape == (2, 200)
    mask = batch["attention_mask"]
    assert (mask[:, 1:] <= mask[:, :-1]).all() and (batch["input_ids"][mask == 0] == tok.pad_token_id).all()
    assert batch["text_chars"].tolist() == [2, len("longer") + len("much longer text")]
    with pytest.raises(ValueError, match="max_length"):
        tokenize_notes(tok, notes, cfg, max_length=10)


@pytest.mark.assets
@pytest.mark.skipif(not has_assets(), reason="offline assets missing: python -m rayjobs.fetch_assets")
@pytest.mark.parametrize("language", ["en", "zh"])
def test_smollm2_tokenizer_keeps_special_tokens_whole(language):
    cfg = ModelConfig(language=language)
    tok = build_tokenizer(cfg)
    img, emb = tok.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN])
    assert len(tok) == 49152 + 2 and {img, emb} == {49152, 49153}
    assert bos_prefix(tok) == []  # SmolLM2's BPE tokenizer puts no BOS in front of a text
    batch = tokenize_notes(tok, [{"title": "猫" if language == "zh" else "cat", "content": "#pets# meow"}], cfg)
    ids = list(batch["input_ids"][0])
    assert ids.count(img) == 1 and ids.count(emb) == 1
