"""The benchmark of ratios: unicon-tf's training step against plain Keras and PyTorch,
each figure against its reference measured in the same run, in turns (A B A B ...).

| ratio                  | figure / reference                                         | target   |
|------------------------|------------------------------------------------------------|----------|
| framework peer         | PyTorch step / unicon-tf step, same network, both float32  | >= 1.1 at|
|                        |                                                            | 32^3, 1.5|
|                        |                                                            | 64, 96^3 |
| package overhead       | ContinualModel step / plain keras.Model.fit step           | <= 1.05  |
| bfloat16 speed-up      | float32 step / mixed_bfloat16 step (ContinualModel)        | (report) |
| model FLOP utilisation | (graph FLOPs per step / step time) / peak, two peaks: the  | (report) |
|                        | best Conv3D 3^3 forward throughput at the network's level  |          |
|                        | shapes, and a 2048^2 float32 matmul                        |          |
| sliding window         | PyTorch+MONAI / unicon-tf: time and peak RSS over 256^3    | (report) |

How it is fair: each framework runs in worker processes of its own (`keras_worker.py`,
`torch_worker.py`; TensorFlow and a CUDA build of torch cannot share a process), started
once per thread count (1 and all cores); a probe picks each side's faster count, printed
and recorded. Every variant is built and warmed (traced, one fit) before timing. A round
asks each variant in turn for the median of `steps` step times; the figure is the median
over `rounds` rounds (median of medians). The network is the stage-0 foundation model
(classification, width 16, depth 4, 1,468,258 parameters on both sides), batch 2 in
memory, Adam. The sliding windows run in fresh workers (peak RSS of the process): the
segmentation network over a 256^3 volume, 64^3 patches, overlap 0.25 (MONAI's default),
Gaussian blending, 4 patches per batch. The load average before and after is recorded: a
figure taken at a load above the core count is not a measurement of the code.

PyTorch (`pip install torch`, the CPU wheel or the CUDA one) and MONAI (`pip install
monai`, for the sliding window) are optional: without them the peer column says "not
installed". Neither is a dependency of unicon-tf.

    python benchmarks/ratios.py            # 32^3, 64^3, 96^3, 256^3 windows: ~10-12 min, 2 quiet cores
    python benchmarks/ratios.py --quick    # 32^3, a 96^3 window volume: ~2 min
    python benchmarks/ratios.py --extras   # also strategy overhead, growth FLOPs, feed, caching, serving

Writes benchmarks/results/ratios.json (ratios_quick.json with --quick) and a table (.md).
"""

import argparse
import json
import os
import pathlib
import statistics
import time

from workers import Worker

WIDTH, DEPTH, BATCH = 16, 4, 2
NETWORK = {"batch": BATCH, "width": WIDTH, "depth": DEPTH}
VARIANTS = ("continual", "keras", "bfloat16")
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PEER_TARGET = {32: 1.1}  # other sizes: 1.5
SETTINGS = {
    False: {"sizes": (32, 64, 96), "steps": 5, "rounds": 3, "window": {"volume": (256,) * 3, "patch": (64,) * 3}},
    True: {"sizes": (32,), "steps": 3, "rounds": 2, "window": {"volume": (96,) * 3, "patch": (32,) * 3}},
}


def fastest(workers, size, steps, echo):
    """The worker (one per thread count) with the shortest step at `size`, the others
    closed; probed in turns after a warm-up. `(worker, {threads: probe seconds})`."""
    for worker in workers:
        worker("prepare", size=size, **NETWORK, **({"variants": ["continual"]} if worker.keras else {}))
    probes = {w.threads: [] for w in workers}
    for _ in range(2):
        for worker in workers:
            probes[worker.threads].append(worker("step", size=size, steps=steps, **worker.variant("continual")))
    probes = {threads: min(times) for threads, times in probes.items()}
    best = min(workers, key=lambda w: probes[w.threads])
    for worker in workers:
        if worker is not best:
            worker.close()
    echo(f"  {best.framework}: {best.threads} thread(s) (probe step seconds by threads: "
         + ", ".join(f"{t}: {s:.3f}" for t, s in probes.items()) + ")")
    return best, probes


class Side(Worker):
    """A worker of one framework (`keras` or `torch`) and how its step requests are spelt."""

    def __init__(self, framework, threads):
        self.framework, self.keras = framework, framework == "keras"
        super().__init__(f"{framework}_worker.py", threads)

    def variant(self, name):
        return {"variant": name} if self.keras else {}


def start(framework, threads):
    """Workers of `framework`, one per thread count, or None when it is not installed."""
    workers = [Side(framework, count) for count in threads]
    if "error" in workers[0].ready:
        for worker in workers:
            worker.close()
        return None
    return workers


def measure(quick=False, extras=False, echo=print):
    settings = SETTINGS[quick]
    steps, rounds = settings["steps"], settings["rounds"]
    threads = sorted({1, os.cpu_count() or 1})
    result = {"machine": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()}, "network": NETWORK,
              "steps_per_call": steps, "rounds": rounds, "sizes": {}}
    keras_side = start("keras", threads)
    torch_side = start("torch", threads)
    result["machine"]["tensorflow"] = keras_side[0].ready["version"]
    result["machine"]["torch"] = torch_side[0].ready["version"] if torch_side else "not installed"
    echo("thread counts (probe at 32^3):")
    keras_side, result["keras_threads_probe"] = fastest(keras_side, 32, steps, echo)
    if torch_side:
        torch_side, result["torch_threads_probe"] = fastest(torch_side, 32, steps, echo)
    result["threads"] = {"keras": keras_side.threads, "torch": torch_side.threads if torch_side else None}

    for size in settings["sizes"]:
        echo(f"{size}^3: {', '.join(VARIANTS)}{', torch' if torch_side else ''} in turns, {rounds} rounds")
        entry = keras_side("prepare", size=size, **NETWORK)
        runs = {name: (keras_side, keras_side.variant(name)) for name in VARIANTS}
        if torch_side:
            entry["torch"] = torch_side("prepare", size=size, **NETWORK)
            runs["torch"] = (torch_side, {})
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (worker, args) in runs.items():
                times[name].append(worker("step", size=size, steps=steps, **args))
        seconds = {name: statistics.median(values) for name, values in times.items()}
        peaks = keras_side("peaks", size=size, batch=BATCH, width=WIDTH, depth=DEPTH, repeats=3 * rounds)
        achieved = entry["step_flops"] / seconds["continual"]
        entry.update({
            "step_seconds": seconds, "step_seconds_per_round": times, "peaks_flops_per_s": peaks,
            "achieved_flops_per_s": achieved, "mfu_conv3d": achieved / peaks["conv3d"],
            "mfu_matmul": achieved / peaks["matmul"],
            "package_overhead": seconds["continual"] / seconds["keras"],
            "bfloat16_speedup": seconds["continual"] / seconds["bfloat16"],
        })
        if torch_side:
            entry["peer_speedup"] = seconds["torch"] / seconds["continual"]
        result["sizes"][str(size)] = entry

    echo(f"sliding window over {'x'.join(map(str, settings['window']['volume']))}, fresh workers")
    result["window"] = window(settings["window"], keras_side.threads, torch_side.threads if torch_side else None)
    if extras:
        echo("extras: strategy overhead, growth FLOPs, feed, caching, serving, expand cost")
        result["extras"] = keras_side("extras", quick=quick)
    for worker in (keras_side, torch_side):
        if worker:
            worker.close()
    result["machine"]["load_average_after"] = os.getloadavg()
    return result


def window(settings, keras_threads, torch_threads):
    """Sliding-window inference in a fresh worker per framework (peak RSS its own)."""
    args = {"volume": list(settings["volume"]), "patch": list(settings["patch"]), "overlap": 0.25, "batch": 4,
            "width": WIDTH, "depth": DEPTH}
    out = {"settings": args}
    for framework, threads in (("keras", keras_threads), ("torch", torch_threads)):
        if threads is None:
            out[framework] = "not installed"
            continue
        worker = Side(framework, threads)
        try:
            out[framework] = worker("window", **args)
        except RuntimeError as error:  # monai missing: the torch worker exits on the import
            out[framework] = f"not installed ({error})"
        worker.close()
    return out


def table(result):
    """The result as a markdown table (one row per size) and the window's figures."""
    load = result["machine"]
    lines = [f"load average before {load['load_average_before'][0]:.2f}, after {load['load_average_after'][0]:.2f} "
             f"on {load['cpus']} cores; threads: unicon-tf {result['threads']['keras']}, PyTorch "
             f"{result['threads']['torch'] or '-'}; {load['tensorflow']}, torch {load['torch']}", "",
             "| size | unicon-tf step | plain Keras fit | bfloat16 step | PyTorch step | PyTorch / unicon-tf "
             "(target) | overhead vs Keras (<= 1.05) | float32 / bfloat16 | GFLOP/s | Conv3D peak | matmul peak "
             "| MFU (Conv3D, matmul) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for size, entry in result["sizes"].items():
        seconds, peaks = entry["step_seconds"], entry["peaks_flops_per_s"]
        if "peer_speedup" in entry:
            target = PEER_TARGET.get(int(size), 1.5)
            met = "met" if entry["peer_speedup"] >= target else "MISSED"
            peer = f"{seconds['torch']:.3f} s", f"**{entry['peer_speedup']:.2f}** (>= {target}: {met})"
        else:
            peer = "not installed", "-"
        lines.append(
            f"| {size}^3 | {seconds['continual']:.3f} s | {seconds['keras']:.3f} s | {seconds['bfloat16']:.3f} s | "
            f"{peer[0]} | {peer[1]} | {entry['package_overhead']:.3f} | {entry['bfloat16_speedup']:.2f} | "
            f"{entry['achieved_flops_per_s'] / 1e9:.0f} | {peaks['conv3d'] / 1e9:.0f} ({peaks['conv3d_shape']}) | "
            f"{peaks['matmul'] / 1e9:.0f} | {entry['mfu_conv3d']:.2f}, {entry['mfu_matmul']:.2f} |")
    window = result["window"]
    settings = window["settings"]
    lines += ["", f"sliding window over {'x'.join(map(str, settings['volume']))}, patch "
              f"{'x'.join(map(str, settings['patch']))}, overlap {settings['overlap']}, {settings['batch']} per batch:"]
    for framework, label in (("keras", "unicon-tf sliding_window"), ("torch", "MONAI sliding_window_inference")):
        figures = window[framework]
        lines.append(f"- {label}: " + (figures if isinstance(figures, str) else
                                       f"{figures['seconds']:.1f} s, peak RSS {figures['peak_rss_mb']:.0f} MiB"))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32^3 only, fewer rounds, a small window volume.")
    parser.add_argument("--extras", action="store_true", help="Also the in-process extras (a few minutes more).")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON path (default benchmarks/results/ratios[_quick].json; the table beside it, .md).")
    args = parser.parse_args()
    started = time.perf_counter()
    result = measure(quick=args.quick, extras=args.extras)
    result["seconds"] = time.perf_counter() - started
    out = args.out or RESULTS / ("ratios_quick.json" if args.quick else "ratios.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"{result['seconds']:.0f} s; {out}")


if __name__ == "__main__":
    main()
