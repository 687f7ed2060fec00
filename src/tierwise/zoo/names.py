"""Names of the Fashion-MNIST reference zoo's models (torch-free: benchmarks name them too)."""

DATASET_PREFIX = "fmnist"


def model_name(architecture: str) -> str:
    """`fmnist-<architecture>`: the zoo's model of that architecture (device, edge, cloud)."""
    return f"{DATASET_PREFIX}-{architecture}"
