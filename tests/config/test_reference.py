"""docs/config.md is the reference generated from the schema, and it documents every key."""
from __future__ import annotations

import pathlib

from genesis_jax.config import reference, schema

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_docs_config_md_is_generated_from_the_schema():
  text = (REPO / "docs" / "config.md").read_text()
  assert text == reference.render(), (
      "docs/config.md is out of date: python -m genesis_jax.config.reference > docs/config.md")


def test_every_key_is_documented_with_a_meaning():
  text = reference.render()
  for path, key in schema.keys():
    assert f"| `{path}` |" in text
    assert key.doc.strip() and key.doc.strip()[-1] in ".)", path
