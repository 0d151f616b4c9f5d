"""Shared pytest setup: CPU, deterministic, offline."""

import os

# Never reach a hub at test time: weights come from local files the tests write.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
