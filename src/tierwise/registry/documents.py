"""The registry's wire documents, one pydantic model each: a version's manifest, and the
deployment a subscriber polls. The registry builds them through these models and a
subscriber reads them through them, so a malformed document is refused naming the field
(`files[2].sha256: String should match pattern ...`) instead of failing on a missing key.

Signatures are made and checked over the documents as JSON objects (canonical JSON,
`tierwise.registry.signing`); the models check their shape after the signature verified.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from tierwise.protocol.traces import PLAIN_CHARACTERS, describe_errors


def _not_dots(name: str) -> str:
    if name in (".", ".."):
        raise ValueError("'.' and '..' name no file")
    return name


# one path component of letters, digits, '.', '_', '@' or '-' (the device id rule)
PlainName = Annotated[str, StringConstraints(pattern=rf"^[{PLAIN_CHARACTERS}]{{1,200}}$"),
                      AfterValidator(_not_dots)]
Digest = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
VersionNumber = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,12}$")]
Tier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class _Document(BaseModel):
    # A field this version does not know is ignored, so a newer registry can add one without
    # breaking older subscribers. That is safe here: the signature was checked over the whole
    # document as sent, so whatever it holds, the registry signed it.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class FileEntry(_Document):
    path: Annotated[str, StringConstraints(min_length=3, max_length=500)]  # <member>/<file>
    sha256: Digest
    size: Annotated[int, Field(ge=0, le=2**40)]


class Lineage(_Document):
    previous_version: VersionNumber | None
    parent: PlainName | None
    parent_version: VersionNumber | None
    step: Annotated[str, StringConstraints(max_length=100)]


class Manifest(_Document):
    """One signed version of a model and its heads and tails (`Registry.push`)."""

    schema_version: int = Field(alias="schema", ge=1, le=1)
    model: PlainName
    version: VersionNumber
    created_at: Annotated[str, StringConstraints(max_length=64)]
    runs_on: dict[PlainName, list[Tier]]  # bundle member -> the tiers that run it
    lineage: Lineage
    metadata: dict[str, Any]
    files: Annotated[list[FileEntry], Field(min_length=1, max_length=10_000)]


class SignedManifest(BaseModel):
    """A manifest as it travels with its signature. Both are checked per version, by the
    signature and `Manifest`, so one bad version is refused alone and the others install."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    manifest: Any
    signature: Any = None


class RolloutState(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)  # Rollout's fields, as it grows

    model: PlainName
    stable: int | None
    canary: int | None
    canary_share: Annotated[float, Field(ge=0, le=1)]


class DeployedModel(_Document):
    version: VersionNumber  # what this subscriber runs
    rollout: RolloutState
    versions: dict[VersionNumber, SignedManifest]  # every active version, signed


class Deployment(_Document):
    """What a subscriber on a channel runs now (`Registry.deployment`), signed whole."""

    channel: Annotated[str, StringConstraints(pattern=r"^(stable|canary)$")]
    device: PlainName
    models: dict[PlainName, DeployedModel]
    # its index (None: from a registry older than instance ids, which the subscriber then
    # orders by sequence alone)
    registry: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")] | None = None
    sequence: Annotated[int, Field(ge=0)]
    issued_at: float
    expires_at: float
    signature: dict[str, Any] | None = None


def parse_manifest(document: Any) -> Manifest:
    """`document` as a Manifest; ValueError naming the fields that are wrong."""
    try:
        return Manifest.model_validate(document)
    except ValidationError as error:
        raise ValueError(f"the manifest is malformed: {describe_errors(error)}") from None


def parse_deployment(document: Any) -> Deployment:
    """`document` as a Deployment; ValueError naming the fields that are wrong."""
    try:
        return Deployment.model_validate(document)
    except ValidationError as error:
        raise ValueError(f"the deployment is malformed: {describe_errors(error)}") from None
