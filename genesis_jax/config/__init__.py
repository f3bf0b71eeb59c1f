"""The config: `keys` (the vocabulary: families, modes, Key, Range), `schema` (every key, its type,
range and meaning, and the builders per mode), `validate` (the one check before a run), `loading`
(config files and overrides), `resume` (what a resumed run may change) and `reference`
(docs/config.md, generated from the schema)."""
