"""The PyTorch side of `ratios.py` (a worker process, see `workers.py`): the foundation
model's network in PyTorch, trained or slid over a volume with MONAI.

The network has the shape of `unicon_tf.foundation(..., width=16, depth=4)`: a Conv3D
3^3 stem with GroupNorm and SiLU, `depth` levels of pre-activation residual blocks
(GroupNorm, SiLU, Conv3d 3^3, twice; a 1^3 shortcut where the channels change), a stride-2
Conv3d 3^3 before each level but the first, and either the classification head (GroupNorm,
SiLU, average and max pooling, a linear layer) or the segmentation head (a UNet decoder:
nearest upsampling, concatenation with the skip, two Conv3d-GroupNorm-SiLU blocks per level,
1^3 logits). Same parameter count as the Keras model (checked by `ratios.py`).

    python benchmarks/torch_worker.py --threads N   (started by ratios.py)
"""

import argparse
import math
import time

import numpy as np

from workers import peak_rss_mb, serve

try:
    import torch
    from torch import nn
except ImportError:  # the peer column then says "not installed"
    torch = None


def norm(channels):
    return nn.GroupNorm(math.gcd(8, channels), channels)


def conv_norm_act(cin, cout):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), norm(cout), nn.SiLU())


def network(width, depth, task):
    """The foundation model's network (`task`: "classification" or "segmentation")."""

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
            self.stem = conv_norm_act(1, width)
            self.levels, cin = nn.ModuleList(), width
            for level in range(depth):
                cout = width * 2**level
                down = [nn.Conv3d(cin, cout, 3, stride=2, padding=1)] if level else []
                self.levels.append(nn.Sequential(*down, Block(cout if level else cin, cout)))
                cin = cout
            if task == "classification":
                self.norm, self.dense = norm(cin), nn.Linear(2 * cin, 2)
            else:
                self.decoder = nn.ModuleList(
                    nn.Sequential(conv_norm_act(width * 2**level * 3, width * 2**level),
                                  conv_norm_act(width * 2**level, width * 2**level))
                    for level in range(depth - 2, -1, -1))
                self.logits = nn.Conv3d(width, 2, 1)

        def forward(self, x):
            x, skips = self.stem(x), []
            for level in self.levels:
                x = level(x)
                skips.append(x)
            if task == "classification":
                x = nn.functional.silu(self.norm(x))
                return self.dense(torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1))
            for block, skip in zip(self.decoder, reversed(skips[:-1])):
                x = block(torch.cat([nn.functional.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1))
            return self.logits(x)

    torch.manual_seed(0)
    return Network()


class Side:
    """Training steps (Adam, cross-entropy, batch `batch` of `size^3`) and sliding windows."""

    def __init__(self):
        self.trainers = {}

    def prepare(self, size, batch, width, depth):
        net = network(width, depth, "classification")
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
        rng = np.random.default_rng(0)
        inputs = torch.from_numpy(rng.uniform(-1, 1, (batch, 1) + (size,) * 3).astype(np.float32))
        labels = torch.from_numpy(rng.integers(0, 2, batch).astype(np.int64))

        def step():
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(inputs), labels)
            loss.backward()
            optimizer.step()

        self.trainers = {size: step}
        self.step(size, 2)
        return {"params": sum(p.numel() for p in net.parameters()), "threads": torch.get_num_threads()}

    def step(self, size, steps):
        """Median seconds of `steps` training steps."""
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.trainers[size]()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    def window(self, volume, patch, overlap, batch, width, depth):
        """Seconds and peak RSS of MONAI's Gaussian-blended sliding window over a `volume`."""
        from monai.inferers import sliding_window_inference

        net = network(width, depth, "segmentation").eval()
        x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 1) + tuple(volume)).astype(np.float32))
        with torch.inference_mode():
            start = time.perf_counter()
            probabilities = sliding_window_inference(x, tuple(patch), batch, lambda p: torch.softmax(net(p), 1),
                                                     overlap=overlap, mode="gaussian", sigma_scale=0.125)
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "output_shape": list(probabilities.shape),
                "params": sum(p.numel() for p in net.parameters())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    threads = parser.parse_args().threads
    if torch is None:
        serve({}, {"error": "not installed"})
        return
    torch.set_num_threads(threads)
    side = Side()
    serve({"prepare": side.prepare, "step": side.step, "window": side.window},
          {"ready": True, "version": torch.__version__})


if __name__ == "__main__":
    main()
