"""The model registry: signed, versioned artifacts and their staged rollout."""


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked; the message says why."""
