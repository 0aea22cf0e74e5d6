"""Validator cost: check time per tensor against the stage's forward+backward time for the same micro-batch.

For each preset, one stage of an 8-stage split runs forward and backward on one micro-batch, and a warmed-up validator
checks its output (forward check, with the stage input as reference) and its input gradient (backward check). Both
are timed in the same process, alternating, so machine noise hits both alike. Prints a markdown table.

    python benchmarks/overhead.py                  # tiny, small, base (base takes a minute on 2 CPU cores)
    python benchmarks/overhead.py --presets small --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sentinel.config import SentinelConfig  # noqa: E402
from sentinel.validator import Validator  # noqa: E402
from swarm.model import build_pipeline, resolve_config  # noqa: E402


def measure(preset: str, stages: int, batch_size: int, repeats: int, device: torch.device) -> dict:
    cfg = resolve_config(preset, stages)
    emb, stage_list, _ = build_pipeline(cfg, stages, seed=0)
    emb, stage = emb.to(device), stage_list[stages // 2].to(device)
    tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), device=device)
    with torch.no_grad():
        h_in = emb(tokens)
    grad_out = torch.randn_like(h_in) * 1e-3
    validator = Validator(SentinelConfig())

    def stage_step():
        inp = h_in.detach().requires_grad_(True)
        out = stage(inp)
        torch.autograd.backward(out, grad_out)
        return inp.detach(), out.detach(), inp.grad

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    inp, out, g_in = stage_step()
    for _ in range(40):  # warm the monitors up
        validator.check(out, boundary=1, direction="forward", sender="w", step=0, reference=inp, warmup=True)
        validator.check(g_in, boundary=0, direction="backward", sender="w", step=0, reference=grad_out, warmup=True)
    stage_t, check_t = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        inp, out, g_in = stage_step()
        sync()
        t1 = time.perf_counter()
        validator.check(out, boundary=1, direction="forward", sender="w", step=1, reference=inp)
        validator.check(g_in, boundary=0, direction="backward", sender="w", step=1, reference=grad_out)
        sync()
        t2 = time.perf_counter()
        stage_t.append(t1 - t0)
        check_t.append((t2 - t1) / 2)
    s, c = statistics.median(stage_t), statistics.median(check_t)
    mib = out.numel() * out.element_size() / 2**20
    return {"preset": preset, "blocks": stage.end - stage.start, "tokens": batch_size * cfg.seq_len,
            "d_model": cfg.d_model, "stage_ms": 1e3 * s, "check_ms": 1e3 * c, "ratio": c / s,
            "check_cpu_s_per_mib": c / mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small,base")
    p.add_argument("--stages", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(pr, args.stages, args.batch_size, args.repeats, device) for pr in args.presets.split(",")]
    print(f"device={device} threads={args.threads} stages={args.stages} batch={args.batch_size}\n")
    print("| preset | d_model | blocks/stage | tokens | stage fwd+bwd ms | check ms per tensor | ratio | s per MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['d_model']} | {r['blocks']} | {r['tokens']} | {r['stage_ms']:.2f} "
              f"| {r['check_ms']:.3f} | {100 * r['ratio']:.1f}% | {r['check_cpu_s_per_mib']:.4f} |")


if __name__ == "__main__":
    main()
