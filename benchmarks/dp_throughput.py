"""DP-SGD throughput and memory against non-private training of the same model, per clipping mode.

Each mode trains its own copy of the model on the same fixed batches (batch 32 x 128 tokens of BBC News
text by default): non-private AdamW at its best (no hooks, one backward pass) and DP-SGD through the
project's own wrapping (``NodePrivacy.make_private``: Opacus "hooks" and "ghost", and book-keeping "bk",
privacy/bookkeeping.py). Throughput is timed round-robin in one process (every repeat times every mode
once, and the ratio DP / non-DP is taken inside each repeat, so a noisy machine slows both sides alike);
peak memory is measured in a fresh process per mode (on CPU the whole process's peak resident set
while training, and that peak less the resident set before training, i.e. what training adds; peak
allocated on CUDA). Prints one JSON line.

    python benchmarks/dp_throughput.py                                   # MiniLM-L6, full and LoRA, every mode
    python benchmarks/dp_throughput.py finetuning=full modes=nondp,bk repeats=5
    python benchmarks/dp_throughput.py model=tiny steps=2 repeats=1 memory=0   # smoke setting
    python benchmarks/dp_throughput.py device=cuda batch=32 precision=bf16    # on a GPU
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

DEFAULTS = {
    "model": "minilm", "finetuning": "full,lora", "modes": "nondp,hooks,ghost,bk", "batch": 32, "seq": 128,
    "steps": 4, "repeats": 3, "threads": 0, "memory": 1, "device": "cpu", "precision": "fp32", "out": "",
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
    args["_child"] = child
    return args


def batches(args: dict, count: int, num_labels: int = 5) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed full-length batches of real text (BBC News articles are longer than 128 tokens)."""
    from shared_models.builder import build_tokenizer
    from simulations.corpora import load_bbc_news

    texts, _ = load_bbc_news()
    tokenizer = build_tokenizer("minilm" if args["model"] in ("minilm", "tiny") else args["model"])
    size = args["batch"]
    encoded = tokenizer(
        texts[: size * count], truncation=True, max_length=args["seq"], padding="max_length", return_tensors="pt"
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if args["model"] == "tiny":
        ids = ids % 100  # the tiny test model's vocabulary
    labels = torch.arange(size * count) % num_labels
    return [(ids[i : i + size], mask[i : i + size], labels[i : i + size]) for i in range(0, size * count, size)]


def build(args: dict, finetuning: str) -> torch.nn.Module:
    from fedpriv.config import ModelConfig
    from shared_models.builder import build_model

    labels = ["business", "entertainment", "politics", "sport", "tech"]
    return build_model(ModelConfig(name=args["model"], finetuning=finetuning), labels)


class Trainer:
    """One mode's model, optimizer and loss, stepping on given batches."""

    def __init__(self, mode: str, model: torch.nn.Module, args: dict, device: torch.device):
        from torch.utils.data import DataLoader, TensorDataset

        from privacy.accountant_state import NodePrivacy, PrivacyPlan

        self.mode, self.device = mode, device
        self.autocast = args["precision"] == "bf16"
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
        ids, mask, labels = (t.to(self.device, non_blocking=True) for t in batch)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        loss = self.criterion(logits.float(), labels)
        loss.backward()
        self.optimizer.step()

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


def peak_memory(args: dict, finetuning: str, mode: str) -> dict:
    """Peak memory of one mode in a fresh process (so that no other mode's allocations count)."""
    command = [sys.executable, __file__, f"_child={finetuning}:{mode}"]
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
    finetuning, mode = args["_child"].split(":")
    device = torch.device(args["device"])
    data = batches(args, 2)
    model = build(args, finetuning)
    gc.collect()
    before = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler = RssSampler()
    sampler.start()
    trainer = Trainer(mode, model, args, device)
    trainer.run(data, 3)
    peak = sampler.stop()
    result = {"peak_rss_mb": round(peak, 1), "training_rss_mb": round(peak - before, 1)}
    if device.type == "cuda":
        result["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


def measure(args: dict, finetuning: str, modes: list[str], device: torch.device) -> dict:
    data = batches(args, 4)
    template = build(args, finetuning)
    trainers = {mode: Trainer(mode, copy.deepcopy(template), args, device) for mode in modes}
    trainable = sum(p.numel() for p in template.parameters() if p.requires_grad)
    for trainer in trainers.values():
        trainer.run(data, 1)  # warm-up
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args["repeats"]):
        for mode, trainer in trainers.items():
            seconds[mode].append(trainer.run(data, args["steps"]))
    samples = args["steps"] * args["batch"]
    result: dict = {"trainable_parameters": trainable, "modes": {}}
    for mode in modes:
        entry = {"samples_per_s": round(samples / statistics.median(seconds[mode]), 2)}
        if "nondp" in modes and mode != "nondp":
            ratios = [base / own for base, own in zip(seconds["nondp"], seconds[mode], strict=True)]
            entry["throughput_vs_nondp"] = round(statistics.median(ratios), 3)
        result["modes"][mode] = entry
    if args["memory"]:
        for mode in modes:
            result["modes"][mode]["memory"] = peak_memory(args, finetuning, mode)
        base = result["modes"].get("nondp", {}).get("memory", {})
        keys = ["peak_cuda_allocated_mb"] if device.type == "cuda" else ["peak_rss_mb", "training_rss_mb"]
        for mode in modes:
            own = result["modes"][mode]["memory"]
            for key in keys:
                if mode != "nondp" and key in own and base.get(key):
                    result["modes"][mode][f"{key.removesuffix('_mb')}_vs_nondp"] = round(own[key] / base[key], 3)
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
