"""Splitting a labelled dataset across federated clients: IID, Dirichlet over labels, k labels.

The schemes follow NIID-Bench (Li et al., "Federated Learning on Non-IID Data Silos", 2022),
so results can be set beside its tables:
- `iid`: a seeded shuffle cut into equal parts.
- `dirichlet`: for each class, the share each client gets is drawn from Dir(alpha); drawn
  again until every client holds at least `min_samples` (small alpha: few classes per client).
- `labels`: each client holds `k` classes ("#C=k"); classes are dealt round-robin so every
  class is held by someone, and a class's samples are split evenly among its holders.

Every scheme is a pure function of (labels, clients, seed): each client recomputes the same
partition from the seed and keeps only its own part, so no index list has to be shipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMES = ("iid", "dirichlet", "labels")


@dataclass(frozen=True)
class Partition:
    """The sample indices of each client, and how they were made."""

    scheme: str
    seed: int
    parts: tuple[np.ndarray, ...]
    alpha: float | None = None
    labels_per_client: int | None = None

    def histogram(self, labels: np.ndarray, classes: int = 10) -> np.ndarray:
        """[clients, classes] sample counts."""
        return np.stack([np.bincount(labels[part], minlength=classes) for part in self.parts])

    def report(self, labels: np.ndarray, classes: int = 10) -> dict:
        """Samples and label histogram per client: what `tierwise fl run` prints and saves."""
        histogram = self.histogram(labels, classes)
        return {
            "scheme": self.scheme, "seed": self.seed, "alpha": self.alpha,
            "labels_per_client": self.labels_per_client,
            "clients": [
                {"client": i, "samples": int(row.sum()), "label_histogram": row.tolist(),
                 "classes_held": int((row > 0).sum())}
                for i, row in enumerate(histogram)
            ],
        }


def partition(labels: np.ndarray, clients: int, scheme: str, *, seed: int = 0,
              alpha: float = 0.5, labels_per_client: int = 2, min_samples: int = 10,
              classes: int = 10) -> Partition:
    if clients < 1:
        raise ValueError(f"clients: expected at least 1, got {clients}")
    if clients * min_samples > len(labels):
        raise ValueError(f"{len(labels)} samples cannot give {clients} clients "
                         f"{min_samples} each")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), clients)
        return Partition(scheme, seed, tuple(np.sort(p) for p in parts))
    if scheme == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"alpha: expected > 0, got {alpha}")
        return Partition(scheme, seed, _dirichlet(labels, clients, alpha, min_samples, classes,
                                                  rng), alpha=alpha)
    if scheme == "labels":
        if not 1 <= labels_per_client <= classes:
            raise ValueError(f"labels_per_client: expected 1..{classes}, got {labels_per_client}")
        return Partition(scheme, seed, _k_labels(labels, clients, labels_per_client, classes,
                                                 rng), labels_per_client=labels_per_client)
    raise ValueError(f"partition scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")


def _dirichlet(labels: np.ndarray, clients: int, alpha: float, min_samples: int, classes: int,
               rng: np.random.Generator, attempts: int = 1000) -> tuple[np.ndarray, ...]:
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(classes)]
    for _ in range(attempts):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for indices in by_class:
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
            for client, chunk in enumerate(np.split(indices, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(len(p) for p in merged) >= min_samples:
            return tuple(merged)
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw in {attempts} gave every one of "
                     f"{clients} clients {min_samples} samples; raise alpha or lower clients")


def _k_labels(labels: np.ndarray, clients: int, k: int, classes: int,
              rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    # deal classes round-robin from a shuffled order, so each class is held when clients*k >= 10
    order = rng.permutation(classes)
    held = [[int(order[(client * k + j) % classes]) for j in range(k)]
            for client in range(clients)]
    holders: dict[int, list[int]] = {c: [] for c in range(classes)}
    for client, cls in enumerate(held):
        for c in cls:
            holders[c].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c, owners in holders.items():
        if not owners:
            continue
        indices = rng.permutation(np.flatnonzero(labels == c))
        for owner, chunk in zip(owners, np.array_split(indices, len(owners)), strict=True):
            parts[owner].append(chunk)
    return tuple(np.sort(np.concatenate(chunks)) for chunks in parts)
