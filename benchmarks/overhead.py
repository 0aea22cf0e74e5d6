"""Validator cost: check time per tensor against the stage's forward+backward time for the same micro-batch.

For each preset, one stage of an 8-stage split runs forward and backward, and a warmed-up validator checks its output
(forward check, with the stage input as reference) and its input gradient (backward check). Two timings of the
check, both in the same process as the stage, alternating with it so that machine noise hits both alike:

* **stream** (the ratio column): the stage runs ``--stream`` different micro-batches, then the validator checks their
  ``2 * stream`` tensors back to back, as a validator process does with the traffic of the boundaries it serves;
* **interleaved**: one stage step, then its two checks, on the same core. The stage's ~5 ms of torch code evicts the
  validator's code and data from the CPU caches, and the first check after it pays ~140 us more on ``small`` (the
  same ~25 numpy operations on other data run at half the cost right after). A validator that shares a core with a
  stage pays this; one on its own CPU, as the architecture has it, does not.

Prints a markdown table.

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


def measure(preset: str, stages: int, batch_size: int, repeats: int, stream: int, device: torch.device,
            check_device: torch.device | None = None, profile: int = 0) -> dict:
    cfg = resolve_config(preset, stages)
    emb, stage_list, _ = build_pipeline(cfg, stages, seed=0)
    emb, stage = emb.to(device), stage_list[stages // 2].to(device)
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(stream):
        tokens = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len), generator=gen).to(device)
        with torch.no_grad():
            inputs.append(emb(tokens))
    grad_outs = [torch.randn(h.shape, generator=gen).to(device) * 1e-3 for h in inputs]
    validator = Validator(SentinelConfig())

    def stage_step(i: int):
        inp = inputs[i].detach().requires_grad_(True)
        out = stage(inp)
        torch.autograd.backward(out, grad_outs[i])
        return inp.detach(), out.detach(), inp.grad

    on = check_device or device

    def check(i: int, inp, out, g_in, step: int, warmup: bool = False):
        # on another device (a CPU validator beside a GPU stage) the copies count as part of the check
        inp, out, g_in, g_out = (t.to(on) for t in (inp, out, g_in, grad_outs[i]))
        validator.check(out, boundary=1, direction="forward", sender="w", step=step, reference=inp, warmup=warmup)
        validator.check(g_in, boundary=0, direction="backward", sender="w", step=step, reference=g_out,
                        warmup=warmup)  # fmt: skip

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for w in range(40):  # warm the monitors up
        check(w % stream, *stage_step(w % stream), step=0, warmup=True)
    stage_t, stream_t, cold_t = [], [], []
    for r in range(repeats):
        sync()
        t0 = time.perf_counter()
        results = [stage_step(i) for i in range(stream)]
        sync()
        t1 = time.perf_counter()
        for i, res in enumerate(results):
            check(i, *res, step=1 + r)
        sync()
        t2 = time.perf_counter()
        i = r % stream
        res = stage_step(i)
        sync()
        t3 = time.perf_counter()
        check(i, *res, step=1 + r)
        sync()
        t4 = time.perf_counter()
        stage_t.append((t1 - t0) / stream)
        stream_t.append((t2 - t1) / (2 * stream))
        cold_t.append((t4 - t3) / 2)
    s, c, cold = statistics.median(stage_t), statistics.median(stream_t), statistics.median(cold_t)
    if profile:  # where a check's time goes: torch's profiler over ``profile`` streams of checks
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        results = [stage_step(i) for i in range(stream)]
        sync()
        with torch_profile(activities=activities) as prof:
            for r in range(profile):
                for i, res in enumerate(results):
                    check(i, *res, step=1000 + r)
            sync()
        n = 2 * stream * profile
        print(f"\n{preset}: profile of {n} checks (times are totals over them)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=48))
    out = results[0][1]
    mib = out.numel() * out.element_size() / 2**20
    return {"preset": preset, "blocks": stage.end - stage.start, "tokens": batch_size * cfg.seq_len,
            "d_model": cfg.d_model, "stage_ms": 1e3 * s, "check_ms": 1e3 * c, "ratio": c / s,
            "cold_ms": 1e3 * cold, "cold_ratio": cold / s, "check_cpu_s_per_mib": c / mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="tiny,small,base")
    p.add_argument("--stages", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--stream", type=int, default=8, help="micro-batches per block of back-to-back checks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--check-device", default=None,
                   help="where the validator checks (default: --device); cpu with --device cuda times a CPU validator "
                        "beside a GPU stage, the copies included")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print torch's profile of N streams of checks per preset")  # fmt: skip
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    presets = args.presets.split(",")
    check_device = torch.device(args.check_device) if args.check_device else device
    rows = [measure(pr, args.stages, args.batch_size, args.repeats, args.stream, device, check_device, args.profile)
            for pr in presets]  # fmt: skip
    print(f"device={device} check_device={check_device} threads={args.threads} stages={args.stages} "
          f"batch={args.batch_size}\n")
    print("| preset | d_model | blocks/stage | tokens | stage fwd+bwd ms | check ms per tensor (stream) | ratio "
          "| check ms interleaved | ratio interleaved | s per MiB (stream) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['d_model']} | {r['blocks']} | {r['tokens']} | {r['stage_ms']:.2f} "
              f"| {r['check_ms']:.3f} | {100 * r['ratio']:.1f}% | {r['cold_ms']:.3f} | {100 * r['cold_ratio']:.1f}% "
              f"| {r['check_cpu_s_per_mib']:.4f} |")


if __name__ == "__main__":
    main()
