"""Notes, click logs and related pairs: schemas, corpus adapters, mining, splitting, streaming.

- `core.data.schema`: the Parquet schemas of a prepared directory, validation, fail-fast reads.
- `core.data.corpora`: adapters (`synthetic`, `tuxpaint`, `movielens`, `qilin`, `openclipart`, `parquet`) -> notes + events.
- `core.data.pairs.mine_pairs`: weighted co-occurrence mining (REFERENCE §2).
- `core.data.split`: leakage-free train/test split, greedy test de-duplication, short flags.
- `core.data.images`: decoding/validation/resizing shared by preparation and streaming.
- `core.data.pipeline`: Ray Data datasets of preprocessed notes and pairs (imports ray lazily).

`core.data.prepare.prepare` ties them together; `python -m rayjobs.prepare_data` is its command line.
"""
