"""What pretraining and evaluation both measure: frozen-model features, the weighted kNN classifier,
the kNN monitor, and the health figures of embeddings (effective rank, spread, nearest-neighbour
distance) with their collapse thresholds. Imports ``core`` and ``data_prep`` only, so that
``train/`` and ``eval/`` both build on it and neither reaches into the other.
"""
