"""DP-SGD throughput and memory against non-private training of the same model, per clipping mode.

Each mode trains its own copy of the model on the same fixed batches (batch 32 x 128 tokens of BBC News
text by default): non-private AdamW at its best (no hooks, one backward pass) and DP-SGD through the
project's own wrapping (``NodePrivacy.make_private``: Opacus "hooks" and "ghost", and book-keeping "bk",
privacy/bookkeeping.py). Throughput is timed round-robin in one process (every repeat times every mode
once, and the ratio DP / non-DP is taken inside each repeat, so a noisy machine slows both sides alike);
peak memory is measured in a fresh process per mode (on CPU the whole process's peak resident set
while training, and that peak less the resident set before training, i.e. what training adds; peak
allocated on CUDA). Prints one JSON line.

Length bucketing (``training.max_batch_tokens``, client/training.py): ``text=sst2`` trains on SST-2
sentences (``../shared/data/sst2/train.tsv``, a seeded random sample: realistic varied lengths), each batch
padded to its longest sentence as the training loop's collator does, and ``max_batch_tokens=0,1024`` times
every mode also with each batch cut into length-sorted micro-batches of at most that many padded tokens
(0: one pass, the default). Every step is the training loop's own ``train_step``.

    python benchmarks/dp_throughput.py                                   # MiniLM-L6, full and LoRA, every mode
    python benchmarks/dp_throughput.py finetuning=full modes=nondp,bk repeats=5
    python benchmarks/dp_throughput.py model=tiny steps=2 repeats=1 memory=0   # smoke setting
    python benchmarks/dp_throughput.py device=cuda batch=32 precision=bf16    # on a GPU
    python benchmarks/dp_throughput.py finetuning=lora modes=bk text=sst2 max_batch_tokens=0,512   # bucketing
"""

from __future__ import annotations

import copy
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from benchmark_settings import parse_settings

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
DEFAULTS = {
    "model": "minilm", "finetuning": "full,lora", "modes": "nondp,hooks,ghost,bk", "batch": 32, "seq": 128,
    "steps": 4, "repeats": 3, "threads": 0, "memory": 1, "device": "cpu", "precision": "fp32", "out": "",
    "text": "bbc", "sst2": str(SST2), "max_batch_tokens": "0",
}  # fmt: skip
DP_MODES = ("hooks", "ghost", "bk")


def parse(argv: list[str]) -> dict:
    child = next((item.split("=", 1)[1] for item in argv if item.startswith("_child=")), None)
    args = parse_settings([item for item in argv if not item.startswith("_child=")], DEFAULTS)
    unknown = set(args["modes"].split(",")) - {"nondp", *DP_MODES}
    if unknown:
        raise SystemExit(f"modes: unknown {', '.join(sorted(unknown))}; known: nondp, {', '.join(DP_MODES)}")
    if args["precision"] not in ("fp32", "bf16"):
        raise SystemExit("precision: fp32 or bf16")
    if args["text"] not in ("bbc", "sst2"):
        raise SystemExit("text: bbc or sst2")
    try:
        args["budgets"] = [int(item) for item in str(args["max_batch_tokens"]).split(",")]
    except ValueError:
        args["budgets"] = [-1]
    if any(budget != 0 and budget < args["seq"] for budget in args["budgets"]):
        raise SystemExit(f"max_batch_tokens: 0 (one pass) or integers >= seq ({args['seq']}), comma-separated")
    args["_child"] = child
    return args


def entry_name(mode: str, budget: int) -> str:
    return mode if budget == 0 else f"{mode}/max_batch_tokens={budget}"


def batches(args: dict, count: int, num_labels: int = 5) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed batches of real text: full-length BBC News articles (longer than 128 tokens), or SST-2 sentences
    of varied lengths, each batch padded to its longest as the training loop's collator does."""
    from fedpriv.data.corpora import load_bbc_news
    from fedpriv.shared_models.builder import build_tokenizer

    tokenizer = build_tokenizer("minilm" if args["model"] in ("minilm", "tiny") else args["model"])
    size = args["batch"]
    if args["text"] == "sst2":
        return sst2_batches(args, tokenizer, count)
    texts, _ = load_bbc_news()
    encoded = tokenizer(
        texts[: size * count], truncation=True, max_length=args["seq"], padding="max_length", return_tensors="pt"
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if args["model"] == "tiny":
        ids = ids % 100  # the tiny test model's vocabulary
    labels = torch.arange(size * count) % num_labels
    return [(ids[i : i + size], mask[i : i + size], labels[i : i + size]) for i in range(0, size * count, size)]


def sst2_batches(args: dict, tokenizer, count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    import random

    from fedpriv.client.tokenized import PadCollator, tokenize
    from fedpriv.data.data_files import read_records

    rows = random.Random(0).sample(read_records(args["sst2"], "tsv"), args["batch"] * count)
    data = tokenize([r["sentence"] for r in rows], [int(r["label"]) for r in rows], tokenizer, args["seq"])
    if args["model"] == "tiny":
        data = type(data)([ids % 100 for ids in data.input_ids], data.labels)
    collate = PadCollator(tokenizer.pad_token_id % 100 if args["model"] == "tiny" else tokenizer.pad_token_id)
    size = args["batch"]
    return [collate([data[i] for i in range(start, start + size)]) for start in range(0, size * count, size)]


def build(args: dict, finetuning: str) -> torch.nn.Module:
    from fedpriv.kernel.config import ModelConfig
    from fedpriv.shared_models.builder import build_model

    labels = ["business", "entertainment", "politics", "sport", "tech"]
    return build_model(ModelConfig(name=args["model"], finetuning=finetuning), labels)


class Trainer:
    """One mode's model, optimizer and loss, stepping on given batches."""

    def __init__(self, mode: str, model: torch.nn.Module, args: dict, device: torch.device, budget: int = 0):
        from torch.utils.data import DataLoader, TensorDataset

        from fedpriv.kernel.config import TrainingConfig
        from fedpriv.privacy.accountant_state import NodePrivacy, PrivacyPlan

        self.mode, self.device = mode, device
        self.autocast = args["precision"] == "bf16"
        self.cfg = TrainingConfig(max_batch_tokens=budget or None)
        self.padded_tokens = 0
        model.to(device).train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.model, self.optimizer = model, optimizer
        if mode == "nondp":
            return
        size = args["batch"]
        dataset = TensorDataset(torch.zeros(size * 10, 1))  # Opacus needs a loader: q = batch / 10 batches
        plan = PrivacyPlan(
            target_epsilon=8.0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1,
            steps_per_round=10, planned_rounds=1, planned_steps=10, accountant="rdp", num_examples=size * 10,
        )  # fmt: skip
        self.privacy = NodePrivacy.open(Path(tempfile.mkdtemp(prefix="fedpriv-bench-")), plan)
        loader = DataLoader(dataset, batch_size=size)
        kwargs = {"criterion": self.criterion} if mode == "ghost" else {}
        wrapped = self.privacy.make_private(model, optimizer, loader, grad_sample_mode=mode, **kwargs)
        if mode == "ghost":
            self.model, self.optimizer, self.criterion, _ = wrapped
        else:
            self.model, self.optimizer, _ = wrapped

    def step(self, batch) -> None:
        """The training loop's own step (client/training.py), micro-batched when a token budget is set."""
        from fedpriv.client.training import train_step

        stats = train_step(
            self.model, self.optimizer, self.criterion, batch, cfg=self.cfg, device=self.device,
            private=self.mode != "nondp", autocast=self.autocast,
        )  # fmt: skip
        self.padded_tokens += stats.padded_tokens

    def run(self, data, steps: int) -> float:
        """Seconds for ``steps`` steps (synchronised on CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for index in range(steps):
            self.step(data[index % len(data)])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def peak_memory(args: dict, finetuning: str, mode: str, budget: int = 0) -> dict:
    """Peak memory of one mode in a fresh process (so that no other mode's allocations count)."""
    command = [sys.executable, __file__, f"_child={finetuning}:{mode}:{budget}"]
    command += [f"{k}={v}" for k, v in args.items() if k in DEFAULTS and k != "out"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


class RssSampler(threading.Thread):
    """The highest resident set size seen while training (every 5 ms): what training itself needs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = _rss_mb(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.005)

    def stop(self) -> float:
        self.running = False
        self.join()
        return max(self.peak, _rss_mb())


def child(args: dict) -> dict:
    finetuning, mode, budget = args["_child"].split(":")
    device = torch.device(args["device"])
    data = batches(args, 2)
    model = build(args, finetuning)
    gc.collect()
    before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = RssSampler()
    sampler.start()
    trainer = Trainer(mode, model, args, device, int(budget))
    trainer.run(data, 3)
    peak = sampler.stop()
    result = {"peak_rss_mb": round(peak, 1), "training_rss_mb": round(peak - before, 1)}
    if device.type == "cuda":
        result["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def measure(args: dict, finetuning: str, modes: list[str], device: torch.device) -> dict:
    data = batches(args, max(4, args["steps"]))
    template = build(args, finetuning)
    runs = [(mode, budget) for mode in modes for budget in args["budgets"]]
    trainers = {run: Trainer(run[0], copy.deepcopy(template), args, device, run[1]) for run in runs}
    trainable = sum(p.numel() for p in template.parameters() if p.requires_grad)
    for trainer in trainers.values():
        trainer.run(data, 1)  # warm-up
    seconds: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    for _ in range(args["repeats"]):
        for run, trainer in trainers.items():
            trainer.padded_tokens = 0
            seconds[run].append(trainer.run(data, args["steps"]))
    samples = args["steps"] * args["batch"]
    result: dict = {"trainable_parameters": trainable, "modes": {}}

    def ratio(base: tuple[str, int], run: tuple[str, int]) -> float:
        return round(statistics.median(b / own for b, own in zip(seconds[base], seconds[run], strict=True)), 3)

    for mode, budget in runs:
        entry = {
            "samples_per_s": round(samples / statistics.median(seconds[mode, budget]), 2),
            "padded_tokens_per_step": round(trainers[mode, budget].padded_tokens / args["steps"], 1),
        }
        if ("nondp", 0) in trainers and mode != "nondp":
            entry["throughput_vs_nondp"] = ratio(("nondp", 0), (mode, budget))
        if budget and (mode, 0) in trainers:
            entry["throughput_vs_one_pass"] = ratio((mode, 0), (mode, budget))
        result["modes"][entry_name(mode, budget)] = entry
    if args["memory"]:
        for mode, budget in runs:
            result["modes"][entry_name(mode, budget)]["memory"] = peak_memory(args, finetuning, mode, budget)
        base = result["modes"].get("nondp", {}).get("memory", {})
        keys = ["peak_cuda_allocated_mb"] if device.type == "cuda" else ["peak_rss_mb", "training_rss_mb"]
        for mode, budget in runs:
            own = result["modes"][entry_name(mode, budget)]["memory"]
            for key in keys:
                if mode != "nondp" and key in own and base.get(key):
                    ratio_key = f"{key.removesuffix('_mb')}_vs_nondp"
                    result["modes"][entry_name(mode, budget)][ratio_key] = round(own[key] / base[key], 3)
    return result


def main(argv: list[str]) -> dict:
    warnings.filterwarnings("ignore")
    args = parse(argv)
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    if args["_child"]:
        result = child(args)
        print(json.dumps(result), flush=True)
        return result
    device = torch.device(args["device"])
    modes = args["modes"].split(",")
    result = {
        "settings": {k: v for k, v in args.items() if k in DEFAULTS},
        "machine": {
            "cpus": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    for finetuning in args["finetuning"].split(","):
        result[finetuning] = measure(args, finetuning, modes, device)
    print(json.dumps(result), flush=True)
    if args["out"]:
        Path(args["out"]).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
