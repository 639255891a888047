"""What every component shares: typed artifacts, a spec, and an executor.

A component is a `ComponentSpec` (typed input and output artifacts, parameter names) and
an executor function `execute(inputs, parameters, context) -> {output name: Artifact}`
that calls the library. Components never import each other; the runner wires them.
An artifact is a folder (`uri`) with a JSON record of its type, producer, fingerprint and
properties.
"""

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass
class Artifact:
    """A typed output of a component run: a folder and what is known about it."""

    type: str
    uri: str
    producer: str
    fingerprint: str
    properties: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """Typed inputs (`{name: artifact type}`; optional ones end with `?`), outputs, parameters."""

    name: str
    inputs: dict
    outputs: dict
    parameters: tuple

    def check(self, inputs: Mapping[str, "Artifact"], parameters: Mapping[str, Any]) -> None:
        """Raise ValueError for a missing or mistyped input, or an unknown parameter."""
        for name, kind in self.inputs.items():
            optional = kind.endswith("?")
            artifact = inputs.get(name)
            if artifact is None and not optional:
                raise ValueError(f"{self.name}: input '{name}' ({kind}) is missing.")
            if artifact is not None and artifact.type != kind.rstrip("?"):
                raise ValueError(f"{self.name}: input '{name}' must be {kind.rstrip('?')}, got {artifact.type}.")
        unknown = set(parameters) - set(self.parameters)
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {sorted(unknown)}.")


def fingerprint(*parts: Any) -> str:
    """SHA-256 of JSON-serialisable parts: what a component run depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
