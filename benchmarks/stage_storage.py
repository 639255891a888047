"""Disk per stage of a run: what each stage's `model.keras` adds, with bases by reference
(`unicon_tf.model.storage`), against the self-contained `.keras` it replaces.

For each stage of `<run>/stages/` in order: the stage file's bytes, the bytes of the base
weights files it is the first to reference (the base is written once, by stage 0), the
cumulative total, and (with `--plain`) the size of the same model saved as Keras's plain
self-contained `.keras` (it is loaded and saved again into a temporary folder). Then the
run's baselines (`<run>/baselines/**/model.keras`) and the SavedModels the Pusher exported
(`--served`, each version folder: self-contained, holding every weight).

The goal (issue 24): each later stage adds less than 10 % of the first stage's bytes.

    python benchmarks/stage_storage.py RUN [--served SAVED_MODELS] [--plain] [--json out.json] [--md out.md]
"""

import argparse
import json
import pathlib
import tempfile

from unicon_tf.model.storage import load_model, read_manifest, save_model


def folder_bytes(folder: pathlib.Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def stage_rows(files: list[pathlib.Path], plain: bool) -> list[dict]:
    """One row per stage file: its bytes, the new base bytes it brings, the running total."""
    rows, seen, total = [], set(), 0
    for file in files:
        manifest = read_manifest(file) or {"bases": {}}
        new_bases = [(digest, entry) for digest, entry in manifest["bases"].items() if digest not in seen]
        seen.update(digest for digest, _ in new_bases)
        base_bytes = sum((file.parent / entry["path"]).stat().st_size for _, entry in new_bases)
        size = file.stat().st_size
        total += size + base_bytes
        row = {"stage": file.parent.name, "stage_file_bytes": size, "new_base_bytes": base_bytes,
               "added_bytes": size + base_bytes, "total_bytes": total, "by_reference": bool(manifest["bases"])}
        if plain:
            with tempfile.TemporaryDirectory() as scratch:
                out = pathlib.Path(scratch) / "model.keras"
                row["plain_keras_bytes"] = save_model(load_model(file), out, by_reference=False)["bytes"]
        rows.append(row)
    first = rows[0]["added_bytes"] if rows else 0
    for row in rows:
        row["added_vs_first"] = round(row["added_bytes"] / first, 5) if first else None
    return rows


def markdown(result: dict) -> str:
    """The tables of `result` as Markdown (MB = 10^6 bytes)."""
    mb = lambda b: f"{b / 1e6:,.1f}"  # noqa: E731
    plain = "plain_keras_bytes" in (result["stages"] or [{}])[0]
    lines = [f"Run: `{result['run']}`", "",
             "| stage | stage file (MB) | new base (MB) | added (MB) | added / first | total (MB) |"
             + (" self-contained .keras (MB) |" if plain else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if plain else "")]
    for row in result["stages"]:
        lines.append(f"| {row['stage']} | {mb(row['stage_file_bytes'])} | {mb(row['new_base_bytes'])} | "
                     f"{mb(row['added_bytes'])} | {row['added_vs_first']:.4f} | {mb(row['total_bytes'])} |"
                     + (f" {mb(row['plain_keras_bytes'])} |" if plain else ""))
    lines += ["", f"Weights store `weights/`: {mb(result['store_bytes'])} MB; baselines' model files: "
              f"{mb(result['baseline_model_bytes'])} MB ({result['baseline_models']} files)."]
    if result["served"]:
        lines += ["", "| SavedModel version (self-contained) | MB |", "|---|---:|"]
        lines += [f"| {name} | {mb(size)} |" for name, size in result["served"].items()]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=pathlib.Path)
    parser.add_argument("--served", type=pathlib.Path, help="the TF Serving base folder the Pusher wrote")
    parser.add_argument("--plain", action="store_true", help="also measure each stage saved self-contained")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument("--md", type=pathlib.Path)
    args = parser.parse_args()
    baselines = sorted((args.run / "baselines").rglob("model.keras"))
    served = {}
    if args.served:
        served = {str(v.relative_to(args.served)): folder_bytes(v) for v in sorted(args.served.glob("*/*"))
                  if v.is_dir() and v.name.isdigit()}
    result = {"run": str(args.run), "stages": stage_rows(sorted(args.run.glob("stages/*/model.keras")), args.plain),
              "store_bytes": folder_bytes(args.run / "weights") if (args.run / "weights").is_dir() else 0,
              "baseline_model_bytes": sum(f.stat().st_size for f in baselines), "baseline_models": len(baselines),
              "served": served}
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.md:
        args.md.write_text(text)


if __name__ == "__main__":
    main()
