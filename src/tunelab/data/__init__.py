"""Data: row formats, sources, the prepare stage, chat templating with loss masks, batching."""
