"""Data preparation: one script per source, each writing ShareGPT-style conversation JSONL."""
