"""Synthetic data sets small enough to learn on a CPU, for tests, benchmarks and the demo.

``shapes``: the "shapes world" captioning images + motion videos (WebDataset shards, JSONL);
``chat_sets``: shapes-world conversation (SFT) and preference (DPO) sets in the real JSONL
formats. No paths outside the output folder a caller passes in.
"""
