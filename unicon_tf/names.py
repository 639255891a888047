"""The one rule for modality and head names, checked where a name first enters.

A modality name becomes a manifest column, a TFRecord feature, a Keras input and layer
name, and a SavedModel signature argument; a head name becomes an output key, a layer name
and a signature name. TensorFlow rewrites signature argument names it does not like
(lowercasing them and replacing other characters by `_`), so a name such as `t1-ce` or
`T1.post` would be served under another name than the one the model and `unicon.json`
carry. Rather than rename silently, unicon-tf accepts only names that every one of those
places keeps as they are: a lower-case letter, then lower-case letters, digits or `_`, at
most 64 characters.

Example:
>>> check_name("t1_ce", "modality")
't1_ce'
>>> check_name("t1-ce", "modality")
Traceback (most recent call last):
...
unicon_tf.names.InvalidNameError: modality name 't1-ce' is not allowed: use a lower-case letter, then lower-case letters, digits or '_' (at most 64 characters), e.g. 't1_ce'
"""

import keyword
import re
from collections.abc import Iterable

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")

FOLDER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Pipeline, stage and served-model names: they name folders (`stages/NN-<stage>/`,
`saved_models/<model>/`), lineage ids, KFP tasks and TF Serving URLs, so they are plain
ASCII file names: no path separator, no leading `.` or `-`, at most 64 characters."""

STRATEGIES = ("frozen", "adapters", "finetune", "naive")
"""The training strategies a stage may name (see `unicon_tf.train.strategies`)."""

DISTRIBUTE = ("none", "mirrored", "multiworker")
"""How a stage trains across devices and hosts (see `unicon_tf.train.distribute`)."""

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
"""The Keras dtype policies a stage may train under, or `auto`: the machine's fastest one
(see `unicon_tf.train.precision`)."""

SELECT = ("best_val", "last")
"""The weights a stage keeps (`select`, see `unicon_tf.train.selection`)."""

MONITOR = ("auto", "metric", "loss")
"""What a stage's model selection watches (`monitor`, see `unicon_tf.train.selection`)."""


def check_strategy(strategy: str) -> None:
    """Raise ValueError for a strategy not in `STRATEGIES`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy '{strategy}': expected one of {list(STRATEGIES)}.")


def check_distribute(kind: str) -> None:
    """Raise ValueError for a `distribute` value not in `DISTRIBUTE`."""
    if kind not in DISTRIBUTE:
        raise ValueError(f"Unknown distribute '{kind}': expected one of {list(DISTRIBUTE)}.")


def check_precision(precision: str) -> None:
    """Raise ValueError for a `precision` value not in `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision '{precision}': expected one of {list(PRECISIONS)}.")


class InvalidNameError(ValueError):
    """A name that the model, its records, its signatures or its folders cannot hold."""


def suggest_name(name: object) -> str:
    """The closest valid name to `name` (lower-cased, other characters replaced by `_`).

    Example:
    >>> suggest_name("T1.post"), suggest_name("3d ct")
    ('t1_post', 'x3d_ct')
    """
    candidate = re.sub(r"[^a-z0-9_]", "_", str(name).strip().lower()) or "x"
    return (candidate if candidate[0].isalpha() else "x" + candidate)[:64]


def check_name(name: object, kind: str) -> str:
    """Return `name` if it is a valid modality or head name, else raise.

    Args:
        name: the name to check.
        kind: what it names, for the message (`"modality"`, `"head"`).

    Returns:
        `name`, unchanged.

    Raises:
        InvalidNameError: `name` does not match `[a-z][a-z0-9_]{0,63}`; the message
            names it and suggests a valid one.
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidNameError(
            f"{kind} name {name!r} is not allowed: use a lower-case letter, then lower-case "
            f"letters, digits or '_' (at most 64 characters), e.g. {suggest_name(name)!r}")
    return name


def check_folder_name(name: object, kind: str) -> str:
    """Return `name` if it is a valid pipeline, stage or served-model name, else raise.

    Args:
        name: the name to check.
        kind: what it names, for the message (`"stage"`, `"pipeline"`, `"model"`).

    Returns:
        `name`, unchanged.

    Raises:
        InvalidNameError: `name` does not match `FOLDER_NAME_PATTERN` (a letter or digit,
            then letters, digits, `_`, `-` or `.`, at most 64 characters).

    Example:
    >>> check_folder_name("Seg-2", "stage")
    'Seg-2'
    >>> check_folder_name("../seg", "stage")
    Traceback (most recent call last):
    ...
    unicon_tf.names.InvalidNameError: stage name '../seg' is not allowed: it names a folder, so use a letter or digit, then letters, digits, '_', '-' or '.' (at most 64 characters), e.g. 'seg'
    """
    if not isinstance(name, str) or not FOLDER_NAME_PATTERN.fullmatch(name):
        suggestion = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).lstrip("._-")[:64] or "x"
        raise InvalidNameError(
            f"{kind} name {name!r} is not allowed: it names a folder, so use a letter or digit, then letters, "
            f"digits, '_', '-' or '.' (at most 64 characters), e.g. {suggestion!r}")
    return name


ENGINES = ("identifier", "kfp_pipeline", "serving")
"""Where a pipeline, stage or source name (`check_folder_name`'s rule) goes beyond our own
folders, and each engine's rule (`engine_name` maps a name to it):

| engine         | used for                                        | rule                          |
|----------------|-------------------------------------------------|-------------------------------|
| `identifier`   | KFP pipeline parameters (`<stage>_examples`,    | a Python identifier: letters, |
|                | `<source>_manifest`), Python function arguments | digits, `_`; not a digit first|
| `kfp_pipeline` | the KFP pipeline's name                         | `[a-z0-9][a-z0-9-]{0,127}`    |
| `serving`      | TF Serving model names (folder and REST URL)    | the folder rule, unchanged    |
"""


def engine_name(name: str, engine: str) -> str:
    """`name` (a valid folder name) as engine `engine` accepts it (see `ENGINES`).

    Args:
        name: a pipeline, stage, source or served-model name (or one with a suffix, e.g.
            `seg-2_examples`).
        engine: one of `ENGINES`.

    Returns:
        The engine's name: `-` and `.` become `_` and a leading digit gets an `x` for an
        identifier; lower case with `-` for a KFP pipeline; the name itself for serving.

    Raises:
        ValueError: an unknown engine.

    Example:
    >>> [engine_name(n, "identifier") for n in ("seg-2_examples", "cls.v1_examples", "2nd_examples")]
    ['seg_2_examples', 'cls_v1_examples', 'x2nd_examples']
    >>> engine_name("Chest.CT", "kfp_pipeline")
    'chest-ct'
    """
    if engine == "identifier":
        candidate = re.sub(r"[^A-Za-z0-9_]", "_", str(name)) or "x"
        candidate = candidate if not candidate[0].isdigit() else "x" + candidate
        return candidate + "_" if keyword.iskeyword(candidate) else candidate
    if engine == "kfp_pipeline":
        return re.sub(r"[^a-z0-9-]+", "-", str(name).lower()).strip("-")[:128].strip("-") or "unicon"
    if engine == "serving":
        return name
    raise ValueError(f"unknown engine {engine!r}: expected one of {list(ENGINES)}")


def engine_names(names: Iterable[str], engine: str, kind: str = "name") -> dict[str, str]:
    """`{name: engine_name(name, engine)}` of several names, refusing two that the engine
    would merge into one (`seg-2` and `seg_2` are one KFP parameter).

    Raises:
        InvalidNameError: two names map to one engine name (the message names both).

    Example:
    >>> engine_names(["seg-2", "seg_2"], "identifier", "stage")
    Traceback (most recent call last):
    ...
    unicon_tf.names.InvalidNameError: stage names 'seg-2' and 'seg_2' are both 'seg_2' as an identifier (a KFP parameter or Python name): rename one
    """
    mapped, seen = {}, {}
    for name in names:
        mapped[name] = engine_name(name, engine)
        other = seen.setdefault(mapped[name], name)
        if other != name:
            what = {"identifier": "an identifier (a KFP parameter or Python name)",
                    "kfp_pipeline": "a KFP pipeline name"}.get(engine, engine)
            raise InvalidNameError(f"{kind} names {other!r} and {name!r} are both {mapped[name]!r} as {what}: "
                                   "rename one")
    return mapped
