"""Images/s of the pre-training loader on the built-in data, side by side: the batched path
(data_sets.BatchedLoader, the default for data held in memory) and the per-sample worker path
(SeededDataset in DataLoader workers, as with MIM_WORKER_DATA=1), at the cpu preset (32 px, batch
128, 1 worker), through loader_bench.loader_throughput as `bench --data` measures them, with the
set-up time beside.

    python experiments/batched_vs_workers.py [--batches 16] [--device cpu] [--threads N]

--threads sets torch's threads in this process (the batched path's); a DataLoader worker always uses
one.
"""

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
import data_sets  # noqa: E402
import mae  # noqa: E402
from evaluation import loader_bench  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--batches", type=int, default=16)
parser.add_argument("--device", default="cpu")
parser.add_argument("--threads", type=int, default=0)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
cfg, _ = cli.resolve(mae, "cpu", None, {})
tcfg = common.TrainConfig(data="patterns", batch_size=128, num_workers=1)
train_set = data_sets.load_dataset("patterns", "train", "data", 8192, cfg.img_size)
inputs = functools.partial(mae.sample_inputs, cfg)
timed = (args.batches, 2, args.device)  # timed batches, untimed ones first, device
rates = {}
for path in ("workers", "batched"):
    tick = time.perf_counter()
    batched = path == "batched"
    row = loader_bench.loader_throughput(train_set, cfg, tcfg, inputs, *timed, batched=batched)
    rates[path] = row["images_per_s"]
    # with the set-up: the batched path renders the 8,192 images once
    total = time.perf_counter() - tick
    rate = f"{row['images_per_s']:.0f} images/s ({row['ms_per_batch']:.1f} ms/batch)"
    print(f"{path}: {rate}, {total:.1f} s in all")
print(f"batched / workers: {rates['batched'] / rates['workers']:.1f}x")
