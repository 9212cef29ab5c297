"""The named choices of the method, declared once: the config's ``Choice`` parameters and the code
that acts on them (the loss, the augmentation, the device) both read these tuples."""

# The self-supervised methods of the pipeline; what each needs (loss, options, predictor): train/methods.py.
METHODS: tuple[str, ...] = ("simmer", "vicreg", "barlow_twins", "simclr", "simsiam")
# The rank term of the SimMER loss (train.loss.rank_loss).
RANK_VARIANTS: tuple[str, ...] = ("tlsm", "nuclear", "nuclear_spectral", "nuclear_frobenius")
# How the rank term gets its singular values: "auto" is "newton_schulz" on a GPU (no host sync)
# and "svdvals" on the CPU, where it measured faster (docs/BENCHMARKS.md).
SVD_METHODS: tuple[str, ...] = ("auto", "newton_schulz", "svdvals")
DEFAULT_SVD = "auto"
# L_TV over the D dims: the mean (docs/LOSS.md) or the sum (the paper's squared norm).
TV_REDUCTIONS: tuple[str, ...] = ("mean", "sum")
