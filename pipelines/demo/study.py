"""`tokenprio demo`: a whole token-priority study on one CPU, on embedded data (no downloads).

The study (docs/design.md "The study"), in-process, each stage skipped when its output is already in the run folder:

1. Data: 3-digit addition worked column by column, as chat (pipelines/demo/data.py): a clean set,
   a noisy corpus with labelled defects (a dropped-carry rule, noise bursts, a toxic phrase), and
   clean held-out valid and test problems.
2. A reference model trained on the clean set (uniform Φ on unscored shards), and the students' shared
   warm start: brief uniform SFT on the noisy corpus.
3. The noisy corpus scored by the reference (`ref_*`) and by the warm start (`base_*`); Token
   Cleaning's global top-k resolved into a literal threshold by `reweight`.
4. One student per policy and seed, all from the warm start on the same shards, budget and seed.
5. Evaluation on held-out problems (`tokenprio eval`, pipelines/demo/metrics.py) and a report: a Markdown table (mean ± sd
   over seeds), training curves and Φ histograms (PNG), token heatmaps of training documents (HTML).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm import tqdm

from pipelines.demo.data import DemoDataConfig, build_tokenizer, generate
from pipelines.demo.metrics import study_metrics
from pipelines.evaluate import EvalConfig, evaluate
from scoring.shards import atomic_write, write_text_atomic

# The study's policies: name → Φ spec (docs/priority.md). Hyperparameters are the papers' defaults
# unless docs/demo.md says they were chosen on the validation split.
POLICIES = {
    "uniform": "uniform",
    "highpass": "highpass(min_nll=0.3)",
    "token_cleaning": "topk(k=0.6)",  # resolved by reweight into topk(k=0.6, threshold=…)
    "rho1": "rho1(k=0.6)",
    "entropy": "student_entropy(alpha=1)",
    "dft": "dft",
    "signed": "labels(toxic=-1)",
    "rho1_signed": "rho1(k=0.6) * labels(toxic=-1)",
}
# The normaliser Z where a policy does not use the trainer's default (per_sign for signed Φ): the signed
# policies' negative part, divided by its own small count, outweighed learning (checked on the validation
# split, docs/demo.md), so they divide by the same Z as their positive part.
NORMALIZE = {"signed": "tokens", "rho1_signed": "selected"}


@dataclass(frozen=True)
class StudySize:
    n_clean: int  # clean problems: the reference's training set
    n_train: int  # noisy corpus: the students' training set
    n_eval: int  # problems in each held-out split (valid, test)
    hidden: int  # model width; heads of 64
    layers: int
    ref_steps: int  # optimizer steps of the reference on the clean set
    warm_steps: int  # optimizer steps of the shared warm start on the noisy corpus
    student_steps: int  # optimizer steps of every student
    batch_tokens: int  # padded tokens per optimizer step
    lr: float  # peak learning rate of every run (AdamW, warm-up then cosine)


DEFAULT_SIZE = StudySize(
    n_clean=3000, n_train=4500, n_eval=300, hidden=128, layers=4,
    ref_steps=500, warm_steps=200, student_steps=400, batch_tokens=2048, lr=3e-3,
)
QUICK_SIZE = StudySize(
    n_clean=48, n_train=96, n_eval=8, hidden=64, layers=1,
    ref_steps=3, warm_steps=2, student_steps=2, batch_tokens=1536, lr=3e-3,
)


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")  # run folder (stages already there are reused)
    seeds: int = 1  # students per policy, seeds 0..seeds-1 (data order)
    quick: bool = False  # tiny sizes for a test (< 1 min); the numbers mean nothing
    student_steps: int = 0  # override the preset's student budget (0: preset)
    eval_split: str = "test"  # test | valid (valid: choosing hyperparameters)
    policies: tuple[str, ...] = tuple(POLICIES)  # which students to train


def validate(cfg: DemoConfig) -> list[str]:
    problems = []
    unknown = [p for p in cfg.policies if p not in POLICIES]
    if unknown or not cfg.policies:
        problems.append(f"--policies {','.join(cfg.policies)}: choose among {', '.join(POLICIES)}")
    if cfg.seeds < 1:
        problems.append(f"--seeds {cfg.seeds}: must be at least 1")
    if cfg.eval_split not in ("test", "valid"):
        problems.append(f"--eval-split {cfg.eval_split!r}: choose test or valid")
    if cfg.student_steps < 0:
        problems.append(f"--student-steps {cfg.student_steps}: must be ≥ 0 (0: the preset)")
    return problems


def study_size(cfg: DemoConfig) -> StudySize:
    size = QUICK_SIZE if cfg.quick else DEFAULT_SIZE
    return replace(size, student_steps=cfg.student_steps) if cfg.student_steps else size


# ----------------------------------------------------------------------------------------------
# Stages (each returns its output and does nothing when the output is already there)


def init_model(folder: Path, size: StudySize) -> Path:
    """A Llama config (random init by the trainer from its seed) and the demo tokenizer, saved in `folder`."""
    from transformers import LlamaConfig

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=2 * size.hidden, num_hidden_layers=size.layers,
        num_attention_heads=size.hidden // 64, num_key_value_heads=size.hidden // 64, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def score_once(out: Path, inputs: Path, *, model: Path | None = None, tokenizer: Path | None = None) -> Path:
    """Shards of `inputs` scored by `model` as `ref` (unscored, Φ = loss mask, with `tokenizer` alone)."""
    from pipelines.score import ScoreConfig, score
    from scoring.backends import ScorerConfig

    if not (out / "_manifest.json").exists():
        scorer = ScorerConfig(model=str(model)) if model is not None else None
        score(ScoreConfig(inputs=(str(inputs),), out=str(out), scorer=scorer, tokenizer=str(tokenizer) if tokenizer else None))
    return out


def add_model_once(out: Path, shards: Path, model: Path, prefix: str) -> Path:
    """`shards` with `model`'s statistics added under `prefix`, as a new folder."""
    from pipelines.add_model import AddModelConfig, add_model
    from scoring.backends import ScorerConfig

    if not (out / "_manifest.json").exists():
        add_model(AddModelConfig(shards=str(shards), scorer=ScorerConfig(model=str(model)), prefix=prefix, out=str(out)))
    return out


def train_once(out: Path, shards: Path, model: Path, priority: str, steps: int, seed: int, size: StudySize, normalize: str | None = None) -> Path:
    """Train unless `out` holds the final checkpoint of the same config; an interrupted run starts over."""
    from training.checkpoint import checkpoint_dir
    from training.train import TrainConfig, train

    cfg = TrainConfig(
        shards=shards, model=model, out=out, priority=priority, normalize=normalize, steps=steps, seed=seed, lr=size.lr, batch_tokens=size.batch_tokens
    )
    final = checkpoint_dir(out, steps)
    saved = out / "config.json"
    same = saved.exists() and json.loads(saved.read_text())["config"] == {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    if same and final.is_dir():
        return final
    shutil.rmtree(out, ignore_errors=True)
    return train(cfg)


def evaluate_once(checkpoint: Path, problems: Path, out: Path, quick: bool) -> dict:
    """The study's metrics of one checkpoint (pipelines/demo/metrics.py); `tokenprio eval` runs once per folder."""
    if not (out / "eval.json").exists():
        evaluate(EvalConfig(checkpoint=checkpoint, records=problems, out_dir=out, max_new_tokens=24 if quick else 160))
    return study_metrics(out, problems)


def resolved_spec(shards: Path, spec: str, out: Path) -> str:
    """The spec with its global terms resolved over the corpus (reweight writes `out` once)."""
    from pipelines.reweight import ReweightConfig, reweight

    if not (out / "_manifest.json").exists():
        reweight(ReweightConfig(shards=str(shards), priority=spec, out=str(out)))
    return json.loads((out / "_manifest.json").read_text())["config"]["priority"]


# ----------------------------------------------------------------------------------------------
# Analysis of offline Φ: which tokens each policy keeps


def kept_shares(shards: Path, spec: str) -> dict[str, float] | None:
    """Share of target tokens with Φ > 0 per label (`clean` = unlabelled), and of toxic tokens with Φ < 0.

    None for specs with online terms (Φ depends on the student during training).
    """
    from scoring.priority import evaluate_priority, parse_priority
    from scoring.shards import flat_token_columns, open_shards, read_table

    source = open_shards(shards)
    columns = sorted(source.spec_columns)
    priority = parse_priority(spec, source.spec_columns)
    if priority.online:
        return None
    kept, total, negative, label_names = {}, {}, 0, []
    for path in source.paths:
        tokens, label_names = flat_token_columns(read_table(path, columns=["input_ids", "loss_mask", *columns]), columns, label_names)
        phi = evaluate_priority(priority, tokens, label_names=label_names)  # (N,) float32
        names = ["clean"] + list(label_names)
        for code, name in enumerate(names, start=-1):
            where = tokens["loss_mask"] & (tokens["label"] == code)
            kept[name] = kept.get(name, 0) + int((phi[where] > 0).sum())
            total[name] = total.get(name, 0) + int(where.sum())
            if name == "toxic":
                negative += int((phi[where] < 0).sum())
    shares = {name: kept[name] / total[name] for name in total if total[name]}
    if total.get("toxic"):
        shares["toxic_negative"] = negative / total["toxic"]
    return shares


def phi_values(shards: Path, spec: str, limit: int = 200_000):
    """Φ over the first `limit` target tokens of the corpus (float32 numpy), for histograms; None when online."""
    from scoring.priority import evaluate_priority, parse_priority
    from scoring.shards import flat_token_columns, open_shards, read_table

    source = open_shards(shards)
    columns = sorted(source.spec_columns)
    priority = parse_priority(spec, source.spec_columns)
    if priority.online:
        return None
    tokens, label_names = flat_token_columns(read_table(source.paths[0], columns=["input_ids", "loss_mask", *columns]), columns)
    phi = evaluate_priority(priority, tokens, label_names=label_names)
    return phi[tokens["loss_mask"]][:limit].numpy()


# ----------------------------------------------------------------------------------------------
# Report


def mean_sd(values: list[float], scale: float, digits: int) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def dropped_cell(runs: list[dict]) -> str:
    """carry_dropped as mean ± sd over the seeds where it could be read, with their count when some could not."""
    values = [m["carry_dropped"] for m in runs if m.get("carry_dropped") is not None]
    if not values:
        return "n/a"
    return mean_sd(values, 100, 0) + (f" ({len(values)} of {len(runs)})" if len(values) < len(runs) else "")


def kept_cells(row: dict) -> list[str]:
    """The four `kept` cells: – for models outside the study's policies, `online` for online specs, else %."""
    if "kept" not in row:
        return ["–"] * 4
    kept = row["kept"]
    if kept is None:
        return ["online"] * 4
    return [
        f"{100 * kept.get('clean', 0):.1f}", f"{100 * kept.get('wrong_carry', 0):.1f}", f"{100 * kept.get('noise', 0):.1f}",
        f"{100 * kept.get('toxic', 0):.1f} ({100 * kept.get('toxic_negative', 0):.0f})",
    ]


def results_table(rows: list[dict]) -> str:
    """Markdown: one line per model, metrics as mean ± sd over seeds, offline kept shares in %."""
    header = (
        "| model | Φ spec | seeds | accuracy % | toxic rate % | well-formed % | ppl (clean) | carry dropped % | kept: clean % | kept: wrong carry % | kept: noise % | kept: toxic % (Φ<0 %) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = []
    for row in rows:
        runs = row["metrics"]
        normalize = f" (Z: {row['normalize']})" if row.get("normalize") else ""
        lines.append(
            f"| {row['name']} | `{row['spec']}`{normalize} | {len(runs)} | {mean_sd([m['accuracy'] for m in runs], 100, 1)} | "
            f"{mean_sd([m['toxic_rate'] for m in runs], 100, 1)} | {mean_sd([m['well_formed'] for m in runs], 100, 1)} | "
            f"{mean_sd([m['ppl_clean'] for m in runs], 1, 3)} | {dropped_cell(runs)} | " + " | ".join(kept_cells(row)) + " |"
        )
    return header + "\n".join(lines) + "\n"


SMOOTH_STEPS = 20  # steps averaged in the training curves: micro-batches are length-bucketed, so they differ


def moving_average(values: list[float], window: int = SMOOTH_STEPS) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    sums, out = 0.0, []
    for i, value in enumerate(values):
        sums += value - (values[i - window] if i >= window else 0.0)
        out.append(sums / min(i + 1, window))
    return out


def write_figure(path: Path, curves: dict[str, Path], histograms: dict[str, object]) -> None:
    """Training curves (NLL of Φ > 0 tokens, selected share; seed 0) and Φ histograms of the offline policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_nll, ax_sel, ax_phi) = plt.subplots(1, 3, figsize=(17, 4.8))
    for name, metrics_path in curves.items():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        steps = [r["step"] for r in rows]
        ax_nll.plot(steps, moving_average([r["nll_positive"] for r in rows]), label=name)
        ax_sel.plot(steps, moving_average([r["selected_share"] for r in rows]), label=name)
    ax_nll.set(xlabel="optimizer step", ylabel="mean NLL of Φ > 0 tokens (nats)", yscale="log", title=f"students, seed 0 (mean of {SMOOTH_STEPS} steps)")
    ax_sel.set(xlabel="optimizer step", ylabel="share of targets with Φ ≠ 0", title="selected share")
    ax_nll.legend(fontsize=7)
    for name, values in histograms.items():
        ax_phi.hist(values, bins=60, histtype="step", label=name, log=True)
    ax_phi.set(xlabel="Φ over target tokens (offline policies)", ylabel="tokens", title="Φ histograms (first shard)")
    ax_phi.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Entry point


def run_demo(cfg: DemoConfig) -> Path:
    """Run the study into cfg.out and return the path of its Markdown report (report-{eval_split}/report.md)."""
    # ---- configuration: one run folder per study size
    problems = validate(cfg)
    if problems:
        raise ValueError("demo: " + "; ".join(problems))
    size, run, started = study_size(cfg), Path(cfg.out), time.perf_counter()
    identity = {"quick": cfg.quick, "size": asdict(size)}
    saved = run / "demo_config.json"
    if saved.exists() and json.loads(saved.read_text()) != identity:
        raise ValueError(f"{run} holds a study of another size ({saved}); pass a new --out or delete that folder.")
    run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, json.dumps(identity, indent=2) + "\n")

    # ---- data and the initial model
    data = generate(DemoDataConfig(out_dir=run / "data", n_clean=size.n_clean, n_train=size.n_train, n_valid=size.n_eval, n_test=size.n_eval))
    init = init_model(run / "init", size)

    # ---- reference on the clean set, warm start on the noisy corpus (unscored shards, uniform Φ)
    clean_shards = score_once(run / "shards" / "clean", data["clean"], tokenizer=data["tokenizer"])
    noisy_shards = score_once(run / "shards" / "noisy", data["train"], tokenizer=data["tokenizer"])
    reference = train_once(run / "reference", clean_shards, init, "uniform", size.ref_steps, 0, size)
    warm = train_once(run / "warm_start", noisy_shards, init, "uniform", size.warm_steps, 0, size)

    # ---- score the corpus with both; resolve Token Cleaning's global top-k
    ref_shards = score_once(run / "shards" / "train_ref", data["train"], model=reference)
    shards = add_model_once(run / "shards" / "train", ref_shards, warm, prefix="base")
    specs = {name: POLICIES[name] for name in cfg.policies}
    if "token_cleaning" in specs:
        specs["token_cleaning"] = resolved_spec(shards, specs["token_cleaning"], run / "shards" / "phi_token_cleaning")

    # ---- students: every policy × seed from the warm start, same shards and budget
    students = {}
    jobs = [(name, seed) for seed in range(cfg.seeds) for name in specs]
    for name, seed in tqdm(jobs, desc="students", unit="run"):
        out = run / "students" / name / f"seed{seed}"
        students[name, seed] = train_once(out, shards, warm, specs[name], size.student_steps, seed, size, NORMALIZE.get(name))

    # ---- evaluation on held-out problems
    problems_path = data[cfg.eval_split]
    rows = []
    for name, checkpoint in (("reference (clean data)", reference), ("warm start", warm)):
        rows.append({"name": name, "spec": "uniform", "metrics": [evaluate_once(checkpoint, problems_path, checkpoint.parent / f"eval-{cfg.eval_split}", cfg.quick)]})
    for name, spec in specs.items():
        metrics = [evaluate_once(students[name, s], problems_path, students[name, s].parent / f"eval-{cfg.eval_split}", cfg.quick) for s in range(cfg.seeds)]
        rows.append({"name": name, "spec": spec, "normalize": NORMALIZE.get(name), "metrics": metrics, "kept": kept_shares(shards, spec)})

    # ---- report: table, figure, heatmaps
    minutes = (time.perf_counter() - started) / 60
    title = f"tokenprio demo: {cfg.seeds} seed(s), evaluated on {cfg.eval_split} ({size.n_eval} problems), this call {minutes:.1f} min"
    return write_report(run / f"report-{cfg.eval_split}", run, shards, specs, rows, title)


def write_report(report: Path, run: Path, shards: Path, specs: dict[str, str], rows: list[dict], title: str) -> Path:
    """report.md (the table), results.json, curves_and_phi.png and heatmap_*.html in `report`; returns report.md."""
    from pipelines.inspect_shards import InspectConfig, inspect_shards

    report.mkdir(exist_ok=True)
    write_text_atomic(report / "results.json", json.dumps({"title": title, "rows": rows}, indent=2) + "\n")
    histograms = {name: values for name, spec in specs.items() if (values := phi_values(shards, spec)) is not None}
    write_figure(report / "curves_and_phi.png", {name: run / "students" / name / "seed0" / "metrics.jsonl" for name in specs}, histograms)
    for name in ("highpass", "token_cleaning", "signed"):
        if name in specs:
            phi_shards = run / "shards" / f"phi_{name}"
            resolved_spec(shards, specs[name], phi_shards)  # writes the policy's Φ into `weight` for the heatmap
            inspect_shards(InspectConfig(shards=phi_shards, html=report / f"heatmap_{name}.html", samples=12))
    text = (
        f"# {title}\n\n"
        + results_table(rows)
        + "\nkept: share of target tokens with Φ > 0 in the noisy corpus, by defect label (offline specs; "
        "`online` specs select during training). Figure: curves_and_phi.png; token heatmaps: heatmap_*.html.\n"
    )
    write_text_atomic(report / "report.md", text)
    print(text)
    return report / "report.md"
