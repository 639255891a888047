"""The benchmark of ratios: every figure against its reference, measured in the same run,
in turns (A B A B ...) so that machine drift cancels; a JSON file and a printed table.

| ratio                    | figure / reference                                       | target  |
|--------------------------|----------------------------------------------------------|---------|
| package overhead         | ContinualModel step / plain keras.Model.fit step         | <= 1.05 |
| model FLOP utilisation   | (graph FLOPs per step / step time) / bare Conv3D peak    | >= 0.6  |
| framework peer           | PyTorch step / unicon-tf step, same network shape        | >= 1.3  |
| strategy overhead        | MirroredStrategy (1 device) step / no-strategy step      | <= 1.05 |
| growth FLOPs             | four-stage forward FLOPs / stage 0, per adapter_start    | <= 2.5  |
| feed, caching, serving,  | benchmarks/data_pipeline.py, feature_caching.py,         | (their  |
| sliding window, expand   | serving.py, expand_cost.py at smaller sizes              |  own)   |

The network is the stage-0 foundation model (classification, width 16, depth 4) on a batch
of 2 in memory, trained with Adam on the classification loss. Step times are medians of
per-step times (keras callbacks / perf_counter), FLOPs are counted from the traced
training step's graph (`common.graph_flops`), and the Conv3D peak is the best throughput
of a bare Conv3D forward pass at the shapes of the encoder's levels.
PyTorch (the framework of MONAI) is used when installed (`pip install torch==2.13.0`, the
CPU wheel), else the peer figure is a note.

    python benchmarks/ratios.py [--json ratios.json] [--quick]
"""

import argparse
import json
import os
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf

import unicon_tf
from common import StepTimer, graph_flops, interleaved_seconds
from unicon_tf.train import ContinualModel
from unicon_tf.tasks.losses import classification_loss

WIDTH, DEPTH, BATCH = 16, 4, 2


def batch_of(size, seed=0):
    rng = np.random.default_rng(seed)
    x = {"ct": rng.uniform(-1, 1, (BATCH,) + (size,) * 3 + (1,)).astype(np.float32)}
    y = rng.integers(0, 2, BATCH).astype(np.int32)
    return x, y


class Trainer:
    """A `fit` of `steps` steps per call on one in-memory batch; `run()` returns the
    median step time of that call."""

    def __init__(self, model, x, y, steps):
        self.model, self.steps, self.timer = model, steps, StepTimer()
        self.data = tf.data.Dataset.from_tensors((x, {"classification": y})).repeat()

    def __call__(self):
        self.model.fit(self.data, epochs=1, steps_per_epoch=self.steps, verbose=0, callbacks=[self.timer])
        return float(np.median(self.timer.times[1:]))


def keras_trainers(size, steps, strategy=None):
    """`{"plain": keras fit of the network, "continual": ContinualModel fit}` (and under
    `strategy` when given, the ContinualModel only)."""
    x, y = batch_of(size)
    keras.utils.set_random_seed(0)
    if strategy is not None:
        with strategy.scope():
            network = unicon_tf.foundation((size,) * 3, width=WIDTH, depth=DEPTH)
            trainer = ContinualModel(network, {"classification": "classification"})
            trainer.compile(optimizer=keras.optimizers.Adam(1e-4))
        return {"mirrored": Trainer(trainer, x, y, steps)}
    network = unicon_tf.foundation((size,) * 3, width=WIDTH, depth=DEPTH)
    plain = keras.Model(network.input, network.output)
    plain.compile(optimizer=keras.optimizers.Adam(1e-4), loss={"classification": classification_loss})
    trainer = ContinualModel(keras.models.clone_model(network), {"classification": "classification"})
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4))
    return {"plain": Trainer(plain, x, y, steps), "continual": Trainer(trainer, x, y, steps), "network": network}


def in_turns(trainers, repeats):
    """Median over `repeats` turns of each trainer's median step time (first call warms up)."""
    for trainer in trainers.values():
        trainer()
    times = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            times[name].append(trainer())
    return {name: float(np.median(values)) for name, values in times.items()}


def training_step_flops(network, size):
    """FLOPs of one training step (forward, loss, gradients) counted from its graph."""
    x, y = batch_of(size)

    @tf.function
    def step(inputs, labels):
        with tf.GradientTape() as tape:
            loss = classification_loss(labels, network(inputs, training=True)["classification"])
        return tape.gradient(loss, network.trainable_variables)

    return graph_flops(step.get_concrete_function({"ct": tf.constant(x["ct"])}, tf.constant(y)))


def conv3d_peak(size, repeats):
    """Best FLOP/s of a bare Conv3D 3^3 forward pass at the encoder levels' shapes
    (channels WIDTH * 2**l at size / 2**l), and the shape that reached it."""
    best = (0.0, None)
    for level in range(DEPTH):
        channels, side = WIDTH * 2**level, size // 2**level
        conv = keras.layers.Conv3D(channels, 3, padding="same")
        x = tf.constant(np.random.default_rng(level).uniform(-1, 1, (BATCH,) + (side,) * 3 + (channels,)),
                        tf.float32)
        forward = tf.function(lambda inputs, conv=conv: conv(inputs))
        flops = graph_flops(forward.get_concrete_function(x))
        seconds = interleaved_seconds({"conv": lambda f=forward, x=x: f(x)}, repeats)["conv"]
        best = max(best, (flops / seconds, f"{channels}ch@{side}^3"), key=lambda b: b[0])
    return best


def torch_network(size):
    """The foundation model's shape in PyTorch: conv stem, residual GroupNorm/SiLU levels,
    avg+max pooled classification head."""
    import math

    import torch
    from torch import nn

    def norm(channels):
        return nn.GroupNorm(math.gcd(8, channels), channels)

    class Block(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()
            self.body = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv3d(cin, cout, 3, padding=1),
                                      norm(cout), nn.SiLU(), nn.Conv3d(cout, cout, 3, padding=1))

        def forward(self, x):
            return self.shortcut(x) + self.body(x)

    class Network(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv3d(1, WIDTH, 3, padding=1), norm(WIDTH), nn.SiLU())
            levels, cin = [], WIDTH
            for level in range(DEPTH):
                cout = WIDTH * 2**level
                down = [nn.Conv3d(cin, cout, 3, stride=2, padding=1)] if level else []
                levels.append(nn.Sequential(*down, Block(cout if level else cin, cout)))
                cin = cout
            self.levels = nn.Sequential(*levels)
            self.norm = norm(cin)
            self.dense = nn.Linear(2 * cin, 2)

        def forward(self, x):
            x = torch.nn.functional.silu(self.norm(self.levels(self.stem(x))))
            return self.dense(torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1))

    torch.manual_seed(0)
    return Network()


def torch_trainer(size, steps):
    """`(run, info)`: `run()` gives the median step time of `steps` PyTorch training steps
    (Adam, cross-entropy); `info` the parameter count and the thread count used."""
    import torch

    network = torch_network(size)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    x, y = batch_of(size)
    inputs = torch.from_numpy(np.moveaxis(x["ct"], -1, 1).copy())
    labels = torch.from_numpy(y.astype(np.int64))

    def run(count=steps):
        times = []
        for _ in range(count):
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(network(inputs), labels)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    # The peer gets its faster thread count: OpenMP threads that spin on a shared, loaded
    # machine can make all cores slower than one.
    probes = {}
    for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
        torch.set_num_threads(threads)
        probes[threads] = run(3)
    threads = min(probes, key=probes.get)
    torch.set_num_threads(threads)
    return run, {"params": sum(p.numel() for p in network.parameters()), "threads": threads,
                 "probe_step_seconds": probes}


def measure(quick=False, echo=print):
    sizes = (32,) if quick else (32, 64)
    steps, repeats = (4, 2) if quick else (6, 3)
    result = {"machine": {"cpus": os.cpu_count(), "tensorflow": tf.__version__, "keras": keras.__version__},
              "batch": BATCH, "network": {"width": WIDTH, "depth": DEPTH}, "sizes": {}}
    try:
        import torch

        result["machine"]["torch"] = torch.__version__
    except ImportError:
        torch = None

    for size in sizes:
        echo(f"{size}^3: ContinualModel vs keras fit, torch peer, FLOPs, Conv3D peak")
        trainers = keras_trainers(size, steps)
        network = trainers.pop("network")
        peer = None
        if torch is not None:
            trainers["torch"], peer = torch_trainer(size, steps)
        seconds = in_turns(trainers, repeats)
        flops = training_step_flops(network, size)
        peak, peak_shape = conv3d_peak(size, repeats=3 * repeats)
        entry = {
            "step_seconds": seconds, "params": network.count_params(), "step_flops": flops,
            "conv3d_peak_flops_per_s": peak, "conv3d_peak_shape": peak_shape,
            "package_overhead": seconds["continual"] / seconds["plain"],
            "model_flop_utilisation": flops / seconds["continual"] / peak,
            "model_flop_utilisation_plain_fit": flops / seconds["plain"] / peak,
        }
        if torch is not None:
            entry["torch"] = peer
            entry["peer_speedup"] = seconds["torch"] / seconds["continual"]
        result["sizes"][str(size)] = entry

    echo("strategy overhead: MirroredStrategy over one CPU device vs no strategy")
    size = sizes[0]
    strategy = tf.distribute.MirroredStrategy(devices=["/cpu:0"])
    trainers = {**{k: v for k, v in keras_trainers(size, steps).items() if k == "continual"},
                **keras_trainers(size, steps, strategy=strategy)}
    seconds = in_turns(trainers, repeats)
    result["strategy"] = {"size": size, "step_seconds": seconds,
                          "overhead": seconds["mirrored"] / seconds["continual"]}

    echo("growth: four-stage forward FLOPs vs stage 0 per adapter_start (benchmarks/growth_cost.py has Dice)")
    result["growth_flops"] = growth_flops(24)

    import data_pipeline
    import expand_cost
    import feature_caching
    import serving

    echo("folded in: feed ratio, feature caching, serving, sliding window, expand cost")
    result["feed"] = data_pipeline.measure(patients=12 if quick else 24, size=32, batch=2, steps=8 if quick else 12)
    result["caching"] = feature_caching.measure(patients=16 if quick else 24, size=32, epochs=3)
    result["serving"] = serving.measure(size=32, batch=4, repeats=3, volume_shape=(96, 96, 64) if quick else
                                        (128, 128, 96))
    result["expand_cost"] = expand_cost.measure(size=32, batch=2, repeats=3)
    return result


def growth_flops(size):
    """Forward FLOPs of the four-stage model (UNICON order, rank-8 adapters) / stage 0, per
    adapter_start; and of one segmentation decoder (the floor sharing cannot remove)."""
    x = {m: tf.zeros((BATCH,) + (size,) * 3 + (1,)) for m in ("ct", "pet")}

    def flops(model):
        inputs = {m: x[m] for m in model.input}
        return graph_flops(tf.function(lambda i: model(i, training=False)).get_concrete_function(inputs))

    stage0 = unicon_tf.foundation((size,) * 3, width=WIDTH, depth=DEPTH)
    reference = flops(stage0)
    with_prognosis = unicon_tf.expand(stage0, task="prognosis")
    decoder = flops(unicon_tf.expand(with_prognosis, task="segmentation")) - flops(with_prognosis)
    result = {"size": size, "segmentation_decoder_vs_stage0": decoder / reference, "adapter_start": {}}
    for start in range(DEPTH):
        model = unicon_tf.expand(unicon_tf.foundation((size,) * 3, width=WIDTH, depth=DEPTH), task="prognosis")
        model = unicon_tf.expand(model, task="segmentation", adapters=8, adapter_start=start)
        model = unicon_tf.expand(model, modality="pet", task="segmentation", adapters=8, adapter_start=start)
        result["adapter_start"][str(start)] = flops(model) / reference
    return result


TARGETS = {"package_overhead": ("<=", 1.05), "model_flop_utilisation": (">=", 0.6), "peer_speedup": (">=", 1.3),
           "strategy_overhead": ("<=", 1.05), "growth_forward_flops": ("<=", 2.5)}


def verdict(name, value):
    op, target = TARGETS[name]
    met = value <= target if op == "<=" else value >= target
    return f"target {op} {target}: " + ("met" if met else f"MISSED by {abs(value - target) / target:.0%}")


def table(result):
    lines = [f"{'ratio':<40}{'value':>10}  verdict"]

    def row(label, name, value):
        lines.append(f"{label:<40}{value:>10.3f}  {verdict(name, value)}")

    for size, entry in result["sizes"].items():
        row(f"package overhead {size}^3", "package_overhead", entry["package_overhead"])
        row(f"model FLOP utilisation {size}^3", "model_flop_utilisation", entry["model_flop_utilisation"])
        if "peer_speedup" in entry:
            row(f"peer: torch step / unicon-tf step {size}^3", "peer_speedup", entry["peer_speedup"])
        else:
            lines.append(f"{'peer ' + size + '^3':<40}{'-':>10}  torch not installed (pip install torch==2.13.0)")
    row(f"strategy overhead {result['strategy']['size']}^3", "strategy_overhead", result["strategy"]["overhead"])
    growth = result["growth_flops"]
    for start, ratio in growth["adapter_start"].items():
        row(f"growth FLOPs {growth['size']}^3, adapter_start={start}", "growth_forward_flops", ratio)
    lines.append(f"{'  of which one segmentation decoder':<40}{growth['segmentation_decoder_vs_stage0']:>10.3f}  "
                 "x stage 0 (two in the four-stage model)")
    feed = result["feed"]["feed"]
    lines.append(f"{'feed ratio (no aug / aug)':<40}{feed['False']['ratio']:>10.3f}  / {feed['True']['ratio']:.3f} "
                 "(target <= 1.05)")
    lines.append(f"{'feature caching speed-up per epoch':<40}{result['caching']['speedup_per_epoch']:>10.1f}  "
                 "(target >= 5)")
    lines.append(f"{'serving_default / model.predict':<40}{result['serving']['ratio']:>10.3f}")
    window = result["serving"]
    lines.append(f"{'sliding window ' + 'x'.join(map(str, window['window_volume'])):<40}"
                 f"{window['window_seconds']:>9.1f}s  peak RSS +{window['window_peak_rss_mb']:.0f} MB")
    for entry in result["expand_cost"]:
        lines.append(f"{'expand: ' + entry['model']:<40}{entry['ratio']:>10.2f}  forward time vs stage 0")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("ratios.json"))
    parser.add_argument("--quick", action="store_true", help="32^3 only, fewer turns (a smoke run).")
    args = parser.parse_args()
    started = time.perf_counter()
    result = measure(quick=args.quick)
    result["seconds"] = time.perf_counter() - started
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"{result['seconds']:.0f} s; JSON: {args.json}")


if __name__ == "__main__":
    main()
