"""Regenerate ``tests/golden/compare/``: a fabricated, tiny ``dassdp compare`` folder.

Three variants (baseline, dassdp, shuffled-latency) x seeds 0-2, 3 epochs, a 1-epoch
DA-SSDP warm-up, one site; an unfinished ``baseline/seed3`` (no ``done.json``); a
``robustness.json`` per finished run. The final accuracies are chosen so the report's
numbers are known by hand: dassdp - baseline = (0.5, 0.7, 0.3) -> mean +0.50, sd 0.2,
t = 4.33 (df 2), p = 0.0494; Wilcoxon (all 3 positive) p = 0.25.

Run: ``python tests/golden/make_compare_golden.py`` (from the repository root).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

ROOT = Path(__file__).parent / "compare"
FINAL = {
    "baseline": [80.0, 81.0, 82.0],
    "dassdp": [80.5, 81.7, 82.3],
    "shuffled-latency": [79.9, 81.2, 81.8],
}
K = {"dassdp": [0.1, 0.2, 0.3], "shuffled-latency": [0.1, 0.2, 0.3]}
EPOCHS = 3


def config(variant: str, seed: int) -> dict:
    plast = {"enabled": variant != "baseline", "warmup_epochs": 1, "gate": "fitted"}
    if variant == "shuffled-latency":
        plast["control"] = "shuffled_latency"
    return {
        "name": "golden",
        "seed": seed,
        "epochs": EPOCHS,
        "T": 4,
        "model": "spiking_cnn",
        "dataset": "synthetic",
        "plasticity": plast,
    }


def site(variant: str, seed: int, epoch: int) -> dict:
    active = epoch >= 1
    k = K[variant][seed]
    return {
        "synchrony": 0.30 + 0.01 * epoch + 0.001 * seed,
        "gate_mean": 1.0 + (0.02 * epoch if active else 0.0),
        "dw_abs_mean": (1e-4 * epoch) if active else 0.0,
        "dw_abs_max": (3e-4 * epoch) if active else 0.0,
        "pre_fired": 0.2,
        "post_fired": 0.4,
        "gate_k": k if active else 0.0,
        "gate_mu": 0.30 if active else 0.0,
        "gate_sd": 0.05 if active else 1.0,
        "gate_valid": active,
        "gate_reason": "fitted" if active else "not fitted",
        "records": 512,
    }


def row(variant: str, seed: int, epoch: int, final: float) -> dict:
    acc = final - 2.0 * (EPOCHS - 1 - epoch)
    out = {
        "epoch": epoch,
        "lr": 1e-3,
        "train": {
            "loss": 1.0 - 0.1 * epoch + 0.01 * seed,
            "acc1": acc - 1,
            "acc5": 99.0,
            "samples": 512,
        },
        "nonfinite_steps": 0,
        "firing_rate": {"lif1": 0.10 + 0.01 * seed, "lif3": 0.05},
        "test": {"loss": 0.5 - 0.05 * epoch, "acc1": acc, "acc5": 99.5, "samples": 128},
        "epoch_time_s": 1.0,
    }
    if variant == "baseline":
        out["plasticity"] = {"phase": "off", "counters": {}, "sites": {}}
    else:
        phase = "warmup" if epoch == 0 else "active"
        out["plasticity"] = {
            "phase": phase,
            "counters": {},
            "sites": {"classifier": site(variant, seed, epoch)},
        }
    return out


def write_run(variant: str, seed: int, final: float, epochs: int, done: bool) -> None:
    folder = ROOT / variant / f"seed{seed}"
    folder.mkdir(parents=True)
    header = "# dassdp train (revision golden0): resolved config\n"
    (folder / "config.yaml").write_text(header + yaml.safe_dump(config(variant, seed)))
    (folder / "run.json").write_text(json.dumps({"revision": "golden0"}) + "\n")
    rows = [row(variant, seed, e, final) for e in range(epochs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not done:
        return
    marker = {
        "variant": variant,
        "seed": seed,
        "revision": "golden0",
        "epochs": epochs,
        "final_test_acc1": final,
    }
    (folder / "done.json").write_text(json.dumps(marker) + "\n")
    conds = [
        {"name": "clean", "kind": "clean", "value": 0.0, "acc1": final},
        {
            "name": "drop=0.1",
            "kind": "drop",
            "value": 0.1,
            "acc1": final - (5.0 if variant == "baseline" else 4.0),
        },
    ]
    for c in conds:
        c.update(loss=0.5, acc5=99.0, samples=128)
    robust = {"checkpoint": "last.pt", "epoch": epochs, "seed": seed, "conditions": conds}
    (folder / "robustness.json").write_text(json.dumps(robust) + "\n")


def main() -> None:
    shutil.rmtree(ROOT, ignore_errors=True)
    for variant, finals in FINAL.items():
        for seed, final in enumerate(finals):
            write_run(variant, seed, final, EPOCHS, done=True)
    write_run("baseline", 3, 70.0, 1, done=False)  # interrupted: left out of the statistics
    manifest = {
        "variants": list(FINAL),
        "seeds": [0, 1, 2, 3],
        "config": "configs/golden.yaml",
        "invocations": [
            {
                "argv": ["dassdp", "compare", "--config", "configs/golden.yaml"],
                "config": "configs/golden.yaml",
                "revision": "golden0",
            }
        ],
    }
    (ROOT / "compare.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
