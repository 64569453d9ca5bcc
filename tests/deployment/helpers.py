"""What the deployment tests share: small labelled CSVs for each organisation, and a process check."""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

from fedpriv.commands.local_federation import processes_under

WORDS = {
    "sports": "match goal team win league coach player score",
    "politics": "vote election party minister law parliament policy campaign",
    "tech": "software chip computer phone internet data code app",
}
FILLER = "the a of today new report said people week year more".split()


def write_csv(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            label = rng.choice(sorted(WORDS))
            tokens = rng.sample(WORDS[label].split(), 4) + rng.sample(FILLER, 4)
            rng.shuffle(tokens)
            writer.writerow([" ".join(tokens), label])


def processes_after(root: Path, wait_s: float = 15.0) -> list[str]:
    """Live processes working inside ``root`` (SuperLink, SuperNodes, SuperExecs, Server/ClientApps), after a grace."""
    deadline = time.monotonic() + wait_s
    while processes_under(root) and time.monotonic() < deadline:
        time.sleep(0.5)
    return processes_under(root)
