"""HIVE's feedback store: models, engine, image store, write and read sides, exports.

Knows nothing of torch or Gradio. See docs/db.md.
"""
