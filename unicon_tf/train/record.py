"""The record of a trained stage (`stage.json`), as a typed object.

`StageRecord.to_json` writes the keys stage.json has always held, in their order;
`StageRecord.from_json` reads any stage.json, also those written before a key existed
(the key takes the value that meant "none": no cache, one replica, no resume changes).

Example:
>>> record = StageRecord(stage="grade", index=0, fingerprint="f", pipeline="p", head="classification",
...                      task="classification", modalities=["ct"], heads=[], spec={}, strategy="scratch")
>>> old = {k: v for k, v in record.to_json().items() if k not in ("cache_bytes", "resume_changes")}
>>> StageRecord.from_json(old) == record
True
"""

from __future__ import annotations

import dataclasses
import datetime


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """What a stage's folder records of how its model was made.

    Attributes:
        stage, index: the stage's name and position in the pipeline.
        fingerprint: SHA-256 of the stage's definition (`StageSpec.fingerprint`).
        pipeline: the pipeline's name.
        head, task, modalities: the head the stage trained, its task and the modalities it reads.
        heads: every head so far (`head`, `task`, `data`), earlier stages' first.
        spec: the stage's spec (`StageSpec.to_json`, overrides applied).
        strategy: the stage's strategy; `scratch` for stage 0, which trains everything.
        plugins: each plugin's `describe()`.
        cached_features, cache_bytes: whether the head trained on cached encoder features,
            and their size in bytes.
        teacher: `{stage, model, sha256}` of the previous stage's model, `{init, sha256}`
            of `--init`, or None.
        data: `{path, fingerprint}` of the stage's data folder.
        history: per-epoch Keras logs.
        train_seconds: wall time of the epochs, s.
        finished: ISO 8601 UTC time the stage finished.
        unicon_tf, tensorflow, keras: the versions that trained it.
        fisher: the file name of EWC's Fisher information, or None.
        replicas: replicas in sync (1 without a distribution strategy).
        selection: the epoch kept, the monitored value and why training stopped
            (`unicon_tf.train.selection.Selection.record`).
        resume_changes: the changes resumes accepted (`after_epoch`, `changes`
            `{field: [checkpoint's, now]}`).
    """

    stage: str
    index: int
    fingerprint: str
    pipeline: str
    head: str
    task: str
    modalities: list
    heads: list
    spec: dict
    strategy: str
    plugins: list = dataclasses.field(default_factory=list)
    cached_features: bool = False
    cache_bytes: int = 0
    teacher: dict | None = None
    data: dict = dataclasses.field(default_factory=dict)
    history: list = dataclasses.field(default_factory=list)
    train_seconds: float = 0.0
    finished: str = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    unicon_tf: str | None = None
    tensorflow: str | None = None
    keras: str | None = None
    fisher: str | None = None
    replicas: int = 1
    selection: dict | None = None
    resume_changes: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        """The stage.json mapping (every key, in field order)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, record: dict) -> StageRecord:
        """The record of a stage.json mapping; keys it lacks take their defaults, keys that
        are not fields (e.g. `folder`, which `StageFolder.record` adds) are left out.

        Raises:
            KeyError: a key every stage.json holds (e.g. `stage`, `fingerprint`) is missing.
        """
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in record]
        if missing:
            raise KeyError(f"stage record lacks {missing}")
        return cls(**{f.name: record[f.name] for f in fields if f.name in record})
