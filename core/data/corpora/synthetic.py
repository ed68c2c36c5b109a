"""A seeded synthetic corpus whose relatedness is carried partly by the image, partly by text.

Generator (all from one `numpy.random.default_rng(seed)`):

- Clusters: `num_topics` text topics × `num_variants` visual variants. A note's cluster
  (topic t, variant v) is its relatedness ground truth (`category = "t<t>/v<v>"`).
- Image (PNG, 64×64, PIL-drawn): the topic fixes the *shape* (circle, square, triangle, ...),
  the variant fixes the *colour*; position, size and background noise are random. The image
  alone therefore identifies the cluster.
- Text of a long note: title + content drawn from the topic's own vocabulary plus shared filler
  words; with probability 1/2 the content also names the variant's colour word. Text alone
  identifies the topic but only sometimes the variant.
- Short notes (a `short_fraction` of notes): an uninformative title from a small shared list
  ("my day", "look!"), no topics, no content. Only the image tells their cluster, so a model
  that ignores images measurably loses recall on short notes.
- Users (`simulate_clicks`): each user likes 1-3 clusters (popularity Zipf-like). An event picks
  one of the user's clusters, a viewed note A in it and a clicked note B: from the same cluster
  with probability `p_related` (0.85), otherwise any note (noise). Timestamps increase per user.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from core.data.schema import EVENT_SCHEMA, NOTE_SCHEMA

if TYPE_CHECKING:  # annotations only: the adapters are imported lazily by core.data.corpora
    from core.data.corpora import Corpus

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "bar", "ring", "star")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "orange": (240, 150, 30),
           "purple": (140, 50, 180), "teal": (30, 160, 160)}
TOPIC_WORDS = (
    ("garden", "tulip", "soil", "seed", "bloom", "petal"),
    ("travel", "beach", "hotel", "flight", "island", "map"),
    ("cooking", "recipe", "soup", "oven", "spice", "bread"),
    ("fitness", "run", "yoga", "muscle", "squat", "sweat"),
    ("makeup", "lipstick", "blush", "brush", "palette", "glow"),
    ("pets", "puppy", "kitten", "leash", "treat", "paw"),
    ("study", "exam", "notes", "library", "pencil", "essay"),
    ("music", "guitar", "chord", "song", "drum", "melody"),
)
FILLER = ("today", "really", "love", "this", "share", "tips", "my", "new", "best", "try", "little", "week")
SHORT_TITLES = ("my day", "look!", "new post", "so nice", "wow", "today", "hi all", "guess what")


def build_synthetic(num_notes: int = 400, seed: int = 0, short_fraction: float = 0.3, num_topics: int = 4,
                    num_variants: int = 2, image_px: int = 64, num_users: int | None = None,
                    events_per_user: int = 30) -> "Corpus":
    """Generate the synthetic corpus (see module docstring).

    Args:
        num_notes: number of notes.
        seed: seed of everything.
        short_fraction: fraction of notes whose text is stripped to an uninformative title.
        num_topics: text topics (<= 8); num_variants: colours per topic (<= 6).
        image_px: side of the generated PNGs.
        num_users: simulated users (default num_notes // 2).
        events_per_user: click events per user.
    """
    from core.data.corpora import Corpus

    if not 1 <= num_topics <= len(TOPIC_WORDS) or not 1 <= num_variants <= len(COLOURS):
        raise ValueError(f"num_topics in [1, {len(TOPIC_WORDS)}], num_variants in [1, {len(COLOURS)}]")
    rng = np.random.default_rng(seed)
    n_clusters = num_topics * num_variants
    cluster = np.arange(num_notes) % n_clusters  # balanced clusters
    rng.shuffle(cluster)
    short = rng.random(num_notes) < short_fraction
    colour_names = list(COLOURS)
    rows = {name: [] for name in NOTE_SCHEMA.names}
    for i in range(num_notes):
        topic, variant = divmod(int(cluster[i]), num_variants)
        words = TOPIC_WORDS[topic]
        colour = colour_names[variant]
        if short[i]:
            title, content, topics = str(rng.choice(SHORT_TITLES)), "", []
        else:
            title = f"{words[0]} {rng.choice(words[1:])} {rng.choice(FILLER)}"
            body = [str(w) for w in rng.choice(words[1:] + FILLER, size=8)]
            if rng.random() < 0.5:
                body.insert(int(rng.integers(0, len(body))), colour)
            content = " ".join(body)
            topics = [words[0]]
        rows["note_id"].append(i)
        rows["title"].append(title)
        rows["topics"].append(topics)
        rows["content"].append(content)
        rows["image"].append(draw_shape(SHAPES[topic], COLOURS[colour], image_px, rng))
        rows["image_uri"].append(None)
        rows["category"].append(f"t{topic}/v{variant}")
        rows["source_id"].append(None)
    notes = pa.table(rows, schema=NOTE_SCHEMA)
    events = simulate_clicks(cluster, num_users=num_users or max(2, num_notes // 2), events_per_user=events_per_user, seed=seed + 1)
    return Corpus("synthetic", notes, events)


def draw_shape(shape: str, rgb: tuple, px: int, rng: np.random.Generator) -> bytes:
    """A PNG of one coloured shape at a random place and size on a noisy light background."""
    from PIL import Image, ImageDraw

    bg = (235 + rng.integers(-15, 16, size=(px, px, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    r = int(px * rng.uniform(0.22, 0.36))
    cx, cy = (int(rng.integers(r + 1, px - r - 1)) for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    jitter = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in rgb)
    if shape == "circle":
        d.ellipse(box, fill=jitter)
    elif shape == "square":
        d.rectangle(box, fill=jitter)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=jitter)
    elif shape == "cross":
        w = max(2, r // 3)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=jitter)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=jitter)
    elif shape == "bar":
        d.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=jitter)
    elif shape == "ring":
        d.ellipse(box, outline=jitter, width=max(2, r // 3))
    else:  # star
        ang = np.linspace(0, 2 * np.pi, 11)[:-1] - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        d.polygon([(cx + float(rr * np.cos(a)), cy + float(rr * np.sin(a))) for a, rr in zip(ang, rad)], fill=jitter)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def subsample(items: list, num_notes: int | None, rng: np.random.Generator, report) -> list:
    """A seeded subset of `num_notes` items in their order (all when None or more), the rest
    counted as `source.not_sampled` (the real-corpus adapters share it)."""
    if num_notes is None or num_notes >= len(items):
        return items
    pick = np.sort(rng.choice(len(items), size=num_notes, replace=False))
    report.skip("source", "not_sampled", len(items) - num_notes)
    return [items[i] for i in pick]


def short_note(rng: np.random.Generator) -> tuple[str, str, list]:
    """(title, content, topics) of a short note: an uninformative title, nothing else."""
    return SHORT_TITLES[int(rng.integers(len(SHORT_TITLES)))], "", []


def simulate_clicks(categories, *, num_users: int, events_per_user: int, seed: int, p_related: float = 0.85,
                    max_interests: int = 3, extra_categories=None) -> pa.Table:
    """Simulate a click log from category interests (vectorised; see module docstring).

    Args:
        categories: per-note category labels (any hashable values), index = position in the
            note table; note ids are those positions.
        num_users, events_per_user: log size.
        seed: RNG seed.
        p_related: probability the clicked note shares the viewed note's category.
        max_interests: each user likes 1..max_interests categories.
        extra_categories: optional per-note lists of further categories the note also belongs
            to (graded relatedness: such a note is drawn for any of its categories). None or
            empty lists give exactly the single-category log.

    Returns:
        Table in EVENT_SCHEMA.
    """
    rng = np.random.default_rng(seed)
    categories = np.asarray(categories)
    n_notes = len(categories)
    member = np.arange(n_notes)  # one membership per (note, category); the primary ones first
    if extra_categories is not None:
        if len(extra_categories) != n_notes:
            raise ValueError(f"extra_categories has {len(extra_categories)} entries for {n_notes} notes")
        extra_note = [i for i, extra in enumerate(extra_categories) for _ in extra]
        if extra_note:
            categories = np.asarray(list(categories) + [c for extra in extra_categories for c in extra])
            member = np.concatenate([member, np.asarray(extra_note)])
    cats, codes = np.unique(categories, return_inverse=True)
    n_cats = len(cats)
    order = member[np.argsort(codes, kind="stable")]  # notes grouped by category (a note once per category)
    sizes = np.bincount(codes, minlength=n_cats)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    popularity = 1.0 / np.arange(1, n_cats + 1) ** 0.7
    popularity = rng.permutation(popularity / popularity.sum())

    n_int = rng.integers(1, max_interests + 1, size=num_users)
    interests = np.stack([rng.choice(n_cats, size=num_users, p=popularity) for _ in range(max_interests)], axis=1)
    user = np.repeat(np.arange(num_users, dtype=np.int64), events_per_user)
    pick = (rng.random(len(user)) * n_int[user]).astype(np.int64)
    cat = interests[user, pick]
    viewed = order[offsets[cat] + (rng.random(len(user)) * sizes[cat]).astype(np.int64)]
    same = order[offsets[cat] + (rng.random(len(user)) * sizes[cat]).astype(np.int64)]
    noise = rng.integers(0, n_notes, size=len(user))
    clicked = np.where(rng.random(len(user)) < p_related, same, noise)
    ts = np.tile(np.arange(events_per_user, dtype=np.float64), num_users) * 60.0 + 1.7e9
    return pa.table({"user_id": user, "viewed_note_id": viewed.astype(np.int64), "clicked_note_id": clicked.astype(np.int64), "ts": ts},
                    schema=EVENT_SCHEMA)
