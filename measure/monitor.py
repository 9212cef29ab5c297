"""The kNN monitor of pretraining: the backbone's weighted-kNN accuracy on the test beton, with the
training beton as the bank, every ``run.knn_every`` epochs.

Both betons are decoded once, at the first evaluation, into uint8 tensors on the device when they
fit in ``cache_bytes`` (CIFAR-10's 60,000 images: 184 MB), so each later evaluation is forward
passes in eval mode (bf16, channels-last, large batches) and one similarity search: nothing is
read or decoded again. Larger betons stream through their loaders at every evaluation.

With ``verify`` the images and labels the monitor evaluates are compared with the betons read on
the CPU, image by image (a checksum of each image's bytes, and its label), at every evaluation:
a mismatch raises :class:`~data_prep.loader.CorruptBatchError` naming the batch.
"""
from __future__ import annotations

import torch
from torch import nn

from core.config import ConfigError
from data_prep.loader import BetonLoader, CorruptBatchError
from measure.features import embed_images, extract_features, feature_batch, image_checksums, read_images
from measure.knn import check_label_sets, knn_accuracy

CACHE_BYTES = {"cuda": 4 * 2**30, "cpu": 2 * 2**30}  # betons up to this size (bank + queries) are kept decoded


def read_checksums(loader: BetonLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's checksum and label over one eval-mode pass of ``loader``: two (N,) int64 CPU tensors."""
    sums, labels = [], []
    for batch in loader:
        sums.append(image_checksums(batch.images))
        labels.append(batch.labels)
    return torch.cat(sums).cpu(), torch.cat(labels).cpu()


def compare_reads(reference: tuple[torch.Tensor, torch.Tensor], checksums: torch.Tensor, labels: torch.Tensor,
                  batch_size: int, source) -> None:
    """Raises :class:`CorruptBatchError` naming the first batch whose image checksums or labels differ
    from ``reference`` (the same beton read on the CPU, in the same order)."""
    ref_sums, ref_labels = reference
    checksums, labels = checksums.cpu(), labels.cpu()
    if len(checksums) != len(ref_sums):
        raise CorruptBatchError(f"{source}: {len(checksums)} images read on the device, {len(ref_sums)} on the CPU")
    bad = (checksums != ref_sums) | (labels != ref_labels)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise CorruptBatchError(
            f"batch {first // batch_size} of {source} differs from the beton read on the CPU at image {first} "
            f"(label {int(labels[first])} for {int(ref_labels[first])}, checksum {int(checksums[first])} for "
            f"{int(ref_sums[first])}; {int(bad.sum())} image(s) differ in all)")


class KnnMonitor:
    """kNN top-1/top-5 of a backbone: ``train_beton`` is the bank, ``test_beton`` the queries.

    Refuses (:class:`ConfigError`) a test beton none of whose classes the training beton has.
    :meth:`evaluate` returns ``{"knn_top1", "knn_top5"}``, and ``probe_test_top1`` when given a probe.
    """

    def __init__(self, train_beton, test_beton, device: torch.device, image_size: int, num_workers: int = 0,
                 k: int = 200, temperature: float = 0.1, verify: bool = False, cache_bytes: int | None = None) -> None:
        self.device, self.k, self.temperature, self.verify = device, k, temperature, verify
        self.batch_size = feature_batch(device, image_size)
        self.loaders = tuple(BetonLoader(path, self.batch_size, train=False, device=device, num_workers=num_workers,
                                         image_size=image_size) for path in (train_beton, test_beton))
        train_info, test_info = (loader.info for loader in self.loaders)
        if not test_info.labelled:
            raise ConfigError(f"the kNN monitor needs a labelled test beton; {test_info.path} is unlabelled "
                              "(set run.knn_every=0, or name a labelled data.test_beton)")
        check_label_sets(train_info, test_info)
        self.num_classes = max(train_info.num_classes, test_info.num_classes)
        images = train_info.num_samples + test_info.num_samples
        budget = CACHE_BYTES[device.type] if cache_bytes is None else cache_bytes
        self.cached = images * 3 * image_size * image_size <= budget
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._reference = None  # per beton: (checksums, labels) read on the CPU, when verifying
        if verify:
            self._reference = [read_checksums(BetonLoader(path, 512, train=False, device="cpu", num_workers=num_workers,
                                                          image_size=image_size)) for path in (train_beton, test_beton)]

    def evaluate(self, backbone: nn.Module, transform: nn.Module, amp: bool, probe=None,
                 progress: bool = False) -> dict[str, float]:
        """The monitor's figures for ``backbone`` (eval mode during, restored after)."""
        if self.cached:
            if self._cache is None:
                self._cache = [read_images(loader, progress, desc=f"kNN {name}: reading")
                               for loader, name in zip(self.loaders, ("bank", "queries"))]
            embedded = [(embed_images(backbone, images, transform, self.batch_size, amp=amp), labels)
                        for images, labels in self._cache]
            if self._reference is not None:
                for loader, (images, labels), reference in zip(self.loaders, self._cache, self._reference):
                    compare_reads(reference, image_checksums(images), labels, self.batch_size, loader.info.path)
        else:
            embedded = []
            for loader, name, reference in zip(self.loaders, ("bank", "queries"), self._reference or (None, None)):
                checksums = [] if reference is not None else None
                features, labels = extract_features(backbone, loader, transform, amp=amp, progress=progress,
                                                    desc=f"kNN {name}", checksums=checksums)
                if reference is not None:
                    compare_reads(reference, torch.cat(checksums), labels, self.batch_size, loader.info.path)
                embedded.append((features, labels))
        (bank, bank_labels), (queries, labels) = embedded
        accuracy = knn_accuracy(bank, bank_labels, queries, labels, self.k, self.temperature, self.num_classes)
        figures = {"knn_top1": accuracy["top1"], "knn_top5": accuracy["top5"]}
        if probe is not None:
            figures["probe_test_top1"] = probe.top1(queries, labels)
        return figures
