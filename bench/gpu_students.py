"""GPU check of real-size students: a 1.24B-parameter Llama on one GPU, bfloat16 autocast, tokenprio's training step;
full fine-tuning, LoRA r = 16, each with and without activation checkpointing: tokens/s, peak GPU memory, MFU.

    python bench/gpu_students.py [--out runs/gpu_students.json] [--steps 12] [--seq 2048] [--rows 4] [--wheels DIR]
    python bench/gpu_students.py --tiny        # a tiny model, CPU allowed: checks that the script runs (numbers mean nothing)

Needs only torch ≥ 2.11 and transformers ≥ 5.17, plus peft for the LoRA cases: `--wheels DIR` puts every
*.whl in DIR on sys.path (peft and accelerate are pure Python, so their wheels import as they are; e.g.
`pip download peft==0.21.2 accelerate --no-deps -d wheels/`). Nothing is downloaded: the model is built from a
config (Llama-3.2-1B's shape: hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocabulary 128,256, tied head)
with random weights, the data are random token ids. It imports from this repository only what runs the step
(training.lora, training.head, training.loss, scoring.stats), not the shard reader, so pyarrow is not needed.

The step is the trainer's gradient pass with Φ = 1 on every position (plain SFT): float32 master weights,
the body under bfloat16 autocast (as `tokenprio train --dtype auto` on a GPU), the final hidden states into
the fused float32 output layer (training/head.py; frozen under LoRA, so its weight gradient is skipped),
backward, gradient clipping, AdamW over the trainable parameters. Each case runs in its own process; the
first two steps are warm-up.

Model FLOPs per token (MFU = model FLOPs / s / the GPU's dense bfloat16 peak; --peak-tflops, else a table):
  full fine-tuning   6·N_mm + 12·L·s·h      N_mm: weights in matmuls (body linears + head), s sequence, h hidden
  LoRA               4·N_mm + 6·N_lora + 12·L·s·h   frozen weights need no weight gradient
Activation checkpointing recomputes the body's forward; that work is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("full", "full_ckpt", "lora", "lora_ckpt")
SHAPE = {"vocab_size": 128_256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "tie_word_embeddings": True}
TINY = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "tie_word_embeddings": False}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}  # dense bf16, no sparsity
LORA_R = 16


def add_wheels(folder: Path | None) -> None:
    """Pure-Python wheels (peft, accelerate) importable straight from their zip files."""
    if folder is not None:
        for wheel in sorted(Path(folder).glob("*.whl")):
            sys.path.insert(0, str(wheel))


def peak_tflops(device_name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((value for key, value in PEAK_TFLOPS.items() if key in device_name), None)


def run_case(case: str, args) -> dict:
    """One case in this process: build the model, train `args.steps` steps, measure."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scoring.stats import final_hidden
    from training.head import fused_weighted_head
    from training.loss import LossWeights, TokenLoss

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("no CUDA GPU: run with --tiny to check the script on a CPU")
    device = torch.device("cuda" if cuda else "cpu")
    autocast = torch.bfloat16 if cuda else None
    shape = TINY if args.tiny else SHAPE
    seq, rows = (64, 2) if args.tiny else (args.seq, args.rows)

    # ---- the student: float32 master weights, LoRA adapters, activation checkpointing
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=seq))
    n_params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    n_mm = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    n_lora = 0
    if case.startswith("lora"):
        from training.lora import LoraSettings, apply_lora

        _, model = apply_lora(model, LoraSettings(r=LORA_R, alpha=2.0 * LORA_R, dropout=0.0, targets=("all-linear",)), ROOT / "none", seed=0)
        head = model.get_output_embeddings()
        n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if case.endswith("ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95))
    generator = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (args.steps, rows, seq), generator=generator)
    mask = torch.ones(rows, seq, dtype=torch.long, device=device)
    positions = torch.arange(rows * seq, device=device).view(rows, seq)[:, :-1].flatten()  # hidden index of every prediction
    chunk_rows = max(1, 256 * 2**20 // (4 * shape["vocab_size"]))  # the trainer's 256 MiB logits budget

    # ---- the steps (the first two are warm-up)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        started = time.perf_counter()
        batch = ids[step].to(device)
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            hidden = final_hidden(model, batch, mask)  # (rows, seq, h)
        picked = hidden.flatten(0, 1)[positions]
        targets = batch[:, 1:].flatten()
        loss, _, _ = fused_weighted_head(head, picked, targets, LossWeights(torch.ones(targets.numel(), device=device), None),
                                         loss=TokenLoss(neg_loss="clip", clip_nats=float("inf")), chunk_rows=chunk_rows)
        (loss / targets.numel()).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)

    # ---- numbers
    timed = times[2:] or times
    tokens_per_s = rows * seq / (sum(timed) / len(timed))
    layers, h = shape["num_hidden_layers"], shape["hidden_size"]
    attention = 12 * layers * seq * h
    flops_per_token = (4 * n_mm + 6 * n_lora if n_lora else 6 * n_mm) + attention
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops(name, args.peak_tflops) if cuda else None
    return {
        "case": case, "device": name, "parameters": n_params, "trainable": sum(p.numel() for p in trainable), "seq": seq, "rows": rows,
        "steps": args.steps, "step_seconds": timed, "tokens_per_s": tokens_per_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "model_tflops_per_s": flops_per_token * tokens_per_s / 1e12, "peak_tflops": peak,
        "mfu": flops_per_token * tokens_per_s / (peak * 1e12) if peak else None, "final_loss": float(loss) / targets.numel(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_students.json")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=4, help="sequences per step")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--wheels", type=Path, help="folder of pure-Python wheels to import (peft, accelerate)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bfloat16 peak, for MFU (default: by device name)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, CPU allowed: checks that the script runs")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--timeout", type=int, default=150, help="seconds per case")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    add_wheels(args.wheels)
    if args.steps < 3:
        parser.error("--steps must be ≥ 3 (two warm-up steps)")
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args)))
        return

    # ---- versions, then one process per case
    import torch
    import transformers

    results = {"torch": torch.__version__, "transformers": transformers.__version__, "cases": {}}
    try:
        import peft

        results["peft"] = peft.__version__
    except ImportError as error:
        results["peft"] = f"not importable ({error}); LoRA cases skipped (pass --wheels with peft and accelerate)"
    print(json.dumps({k: v for k, v in results.items() if k != "cases"}))
    started = time.perf_counter()
    for case in [c for c in args.cases.split(",") if c]:
        if case.startswith("lora") and results["peft"].startswith("not importable"):
            results["cases"][case] = {"skipped": results["peft"]}
            continue
        command = [sys.executable, __file__, "--case", case, "--steps", str(args.steps), "--seq", str(args.seq), "--rows", str(args.rows)]
        command += (["--tiny"] if args.tiny else []) + (["--wheels", str(args.wheels)] if args.wheels else [])
        command += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        try:
            done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                  timeout=args.timeout, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            results["cases"][case] = json.loads(lines[-1][7:]) if done.returncode == 0 and lines else {"error": done.stderr[-3000:]}
        except subprocess.TimeoutExpired:
            results["cases"][case] = {"error": f"timed out after {args.timeout} s"}
        row = results["cases"][case]
        if "tokens_per_s" in row:
            memory = f"{row['peak_memory_gib']:.1f} GiB" if row["peak_memory_gib"] is not None else "n/a (CPU)"
            mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "n/a"
            print(f"{case:10s} {row['tokens_per_s']:10.0f} tokens/s  peak memory {memory}  MFU {mfu}  "
                  f"({row['trainable'] / 1e6:.2f}M of {row['parameters'] / 1e6:.1f}M parameters trained)")
        else:
            print(f"{case:10s} {row}")
    results["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
