"""The CPU demo (`tools/demo.py`): a tiny model learns the synthetic shapes world end to end."""
