"""Tiny CPU demo: a synthetic "shapes world" data set to train image and video adapters on."""
