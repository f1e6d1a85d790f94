"""LoRA students (peft), activation checkpointing, the frozen output head and `tokenprio export`.

The LoRA loss and gradients against float64 references are in tests/test_train_loss.py (parametrized over
full, LoRA and FSDP students); the two-process FSDP runs in tests/test_train_fsdp.py.
Run: pytest tests/test_train_lora.py
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file
from train_shards import write_shards
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.export import ExportConfig, export
from scoring.priority import parse_priority
from scoring.shards import open_shards
from training.batching import Layout
from training.data import iter_epoch, row_groups
from training.distributed import Dist
from training.head import fused_weighted_head
from training.lora import LoraSettings
from training.loss import LossWeights, TokenLoss, normalizer
from training.step import StepSettings, accumulate_step
from training.strategy import Strategy, build_student
from training.train import TrainConfig, TrainConfigError, apply_update, train

ONE = Dist(rank=0, world_size=1, local_rank=0)
LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0, targets=("all-linear",))


def save_student(path: Path, tokenizer, tie: bool = False) -> Path:
    model = build_model(len(tokenizer), seed=1, hidden_size=64, layers=2)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    return save_student(tmp_path_factory.mktemp("lora_student"), tokenizer)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tokenizer):
    return write_shards(tmp_path_factory.mktemp("lora_shards"), tokenizer, n_rows=48, n_shards=2, seed=6)


def config(shards, student, out, **overrides) -> TrainConfig:
    return replace(TrainConfig(shards=shards, model=student, out=out, batch_tokens=160, steps=3, lr=3e-2), **overrides)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, shards, student):
    """One short LoRA run (r = 4, all-linear); its final checkpoint."""
    return train(config(shards, student, tmp_path_factory.mktemp("lora_run") / "run", lora_r=4, weight_decay=0.1))


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["The quick brown fox jumps", "To be, or not to be"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**ids).logits.float()


# ---- the run's checkpoint ---------------------------------------------------------------------------


def test_lora_checkpoint_is_a_peft_adapter_that_loads(lora_run, student, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = {p.name for p in lora_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "trainer_state.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # the base is not copied into every checkpoint
    adapter_config = json.loads((lora_run / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(student.resolve())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8  # α defaults to 2r
    assert {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    weights = load_file(lora_run / "adapter_model.safetensors")
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert all(weights[k].abs().max() > 0 for k in weights if "lora_B" in k)  # B starts at 0: it was trained

    base = AutoModelForCausalLM.from_pretrained(student)
    base_logits = logits_of(base, tokenizer)
    adapted = PeftModel.from_pretrained(base, lora_run)
    adapted_logits = logits_of(adapted, tokenizer)
    assert (adapted_logits - base_logits).abs().max() > 1e-3
    # transformers' own peft integration reads the same folder as base + adapter
    direct = AutoModelForCausalLM.from_pretrained(lora_run)
    torch.testing.assert_close(logits_of(direct, tokenizer), adapted_logits, rtol=0, atol=1e-5)


def micro_batches(shards, count: int):
    groups = row_groups(open_shards(shards))
    it = iter_epoch(groups, seed=0, epoch=0, window_groups=1, layout=Layout("sorted", 160), columns=["weight"], label_names=[], rank=0, world_size=1)
    return [next(it) for _ in range(count)]


def built(tokenizer, strategy: Strategy, seed: int = 1, tie: bool = False):
    model = build_model(len(tokenizer), seed=seed, hidden_size=64, layers=2)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    loss_args = {"chunk_rows": 16, "autocast_dtype": None, "loss": TokenLoss(neg_loss="clip", clip_nats=6.0)}
    return build_student(model.train(), strategy, base_path=Path("base"), seed=0, resume_from=None, ctx=ONE, device=torch.device("cpu"),
                         compute_dtype=torch.float32, loss_args=loss_args)


def settings(spec: str = "stored") -> StepSettings:
    return StepSettings(priority=parse_priority(spec), normalize="per_sign", neg_ramp_steps=0, prepass=False, with_entropy=False,
                        label_names=[], device=torch.device("cpu"))


def train_steps(student, shards, steps: int = 3, weight_decay: float = 0.1) -> None:
    """The trainer's own step (accumulate_step, apply_update) with AdamW weight decay, which would move any parameter it held."""
    optimizer = torch.optim.AdamW(student.trainable, lr=1e-2, weight_decay=weight_decay)
    for step, mb in enumerate(micro_batches(shards, steps)):
        result = accumulate_step(student.wrapped, student.core, [mb], settings(), step, ONE)
        apply_update(student.model, optimizer, result, normalizer(result.counts, "per_sign"), 1.0, ONE, print, step, "none")
        optimizer.zero_grad(set_to_none=True)


def test_lora_training_changes_only_adapter_parameters(tokenizer, shards):
    student = built(tokenizer, Strategy(lora=LORA, fsdp=False, gradient_checkpointing=False))
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(student.trainable) == len(trainable)
    train_steps(student, shards)
    after = dict(student.model.named_parameters())
    for name, value in before.items():
        if name in trainable:
            assert not torch.equal(after[name], value), f"{name} did not train"
        else:
            assert torch.equal(after[name], value), f"base weight {name} changed"  # bit-identical, weight decay included


def test_head_in_targets_trains_the_head_in_full(tokenizer, shards):
    student = built(tokenizer, Strategy(lora=replace(LORA, targets=("all-linear", "lm_head")), fsdp=False, gradient_checkpointing=False))
    head = student.model.get_output_embeddings()
    original = head.original_module.weight.detach().clone()
    copy_before = head.weight.detach().clone()  # the trainable copy (peft modules_to_save) the fused head reads
    train_steps(student, shards)
    assert not torch.equal(head.weight, copy_before)
    assert torch.equal(head.original_module.weight, original)
    with pytest.raises(ValueError, match="ties lm_head to its input embeddings"):
        built(tokenizer, Strategy(lora=replace(LORA, targets=("all-linear", "lm_head")), fsdp=False, gradient_checkpointing=False), tie=True)


def test_unknown_lora_target_is_refused_with_the_layer_names(tokenizer):
    with pytest.raises(ValueError, match=r"--lora-targets qq_proj: .*linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj"):
        built(tokenizer, Strategy(lora=replace(LORA, targets=("qq_proj",)), fsdp=False, gradient_checkpointing=False))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"lora_alpha": 8.0}, "--lora-alpha: only used with --lora-r"),
        ({"lora_r": -1}, "lora_r=-1"),
        ({"lora_r": 4, "lora_dropout": 1.0}, r"lora_dropout=1.0: must be in \[0, 1\)"),
        ({"lora_r": 4, "lora_targets": "q_proj;v_proj"}, "comma-separated module names"),
    ],
)
def test_bad_lora_options_are_refused(shards, student, tmp_path, overrides, match):
    with pytest.raises(TrainConfigError, match=match):
        train(config(shards, student, tmp_path / "run", **overrides))


def test_lora_on_a_config_only_student_and_fsdp_on_one_process_are_refused(shards, student, tokenizer, tmp_path):
    folder = tmp_path / "config_only"
    build_model(len(tokenizer), hidden_size=64, layers=1).config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(TrainConfigError, match="LoRA adapts saved weights"):
        train(config(shards, folder, tmp_path / "run", lora_r=4))
    with pytest.raises(TrainConfigError, match="--fsdp shards the student over several processes; start it with torchrun"):
        train(config(shards, student, tmp_path / "run", fsdp=True))


# ---- activation checkpointing and the frozen head ---------------------------------------------------


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, shards, lora):
    mbs = micro_batches(shards, 2)
    grads, forwards = [], []
    for checkpointing in (False, True):
        student = built(tokenizer, Strategy(lora=lora, fsdp=False, gradient_checkpointing=checkpointing))
        calls = []
        student.model.base_model.layers[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))  # the recompute stops early: no post-hook
        accumulate_step(student.core, student.core, mbs, settings(), 0, ONE)
        grads.append({n: p.grad for n, p in student.model.named_parameters() if p.requires_grad})
        forwards.append(len(calls))
    assert forwards == [2, 4]  # with checkpointing each layer runs again in backward: it really recomputes
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-7, msg=name)


def test_frozen_head_skips_its_weight_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(23, 16, requires_grad=True)
    targets, phi = torch.randint(0, 50, (23,)), torch.randn(23)
    run = lambda: fused_weighted_head(head, hidden, targets, LossWeights(phi, None), loss=TokenLoss(neg_loss="clip", clip_nats=3.0), chunk_rows=5)[0]
    trainable_grad = torch.autograd.grad(run(), hidden)[0]
    head.weight.requires_grad_(False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss = run()
    frozen_grad = torch.autograd.grad(loss, hidden)[0]
    torch.testing.assert_close(frozen_grad, trainable_grad, rtol=0, atol=0)
    assert head.weight.grad is None
    ops = [event.key for event in profile.key_averages()]
    assert "aten::addmm_" not in ops  # the weight-gradient matmul (grad_logitsᵀ h) is not run for a frozen head


# ---- export -----------------------------------------------------------------------------------------


def test_export_merge_writes_a_model_equal_to_base_plus_adapter(lora_run, student, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export(ExportConfig(checkpoint=lora_run, out=tmp_path / "merged", merge=True))
    merged = AutoModelForCausalLM.from_pretrained(out)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), lora_run)
    torch.testing.assert_close(logits_of(merged, tokenizer), logits_of(adapted, tokenizer), rtol=0, atol=1e-5)
    # What vLLM needs to load the folder: an architecture in config.json, safetensors weights, the tokenizer.
    names = {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "export_config.json"} <= names
    assert not names & {"adapter_config.json", "trainer_state.json", "trainer_state.safetensors"}
    assert json.loads((out / "export_config.json").read_text())["kind"] == "merged"
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_without_merge_copies_the_model_without_trainer_state(lora_run, shards, student, tmp_path):
    adapter = export(ExportConfig(checkpoint=lora_run, out=tmp_path / "adapter"))
    assert (adapter / "adapter_model.safetensors").read_bytes() == (lora_run / "adapter_model.safetensors").read_bytes()
    assert not (adapter / "trainer_state.json").exists()
    full_run = train(config(shards, student, tmp_path / "full", steps=1))
    full = export(ExportConfig(checkpoint=full_run, out=tmp_path / "full_export"))
    assert (full / "model.safetensors").read_bytes() == (full_run / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="full fine-tuning checkpoint .no adapter to merge.; drop --merge"):
        export(ExportConfig(checkpoint=full_run, out=tmp_path / "x", merge=True))
    with pytest.raises(ValueError, match="already exists"):
        export(ExportConfig(checkpoint=lora_run, out=adapter))
    with pytest.raises(ValueError, match="--base .* needs --merge"):
        export(ExportConfig(checkpoint=lora_run, out=tmp_path / "y", base=student))
    with pytest.raises(FileNotFoundError, match="pass the student the run started from with --base"):
        export(ExportConfig(checkpoint=lora_run, out=tmp_path / "z", merge=True, base=tmp_path / "nowhere"))


def test_eval_reads_a_lora_checkpoint_as_base_plus_adapter(lora_run, student, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.evaluate import EvalConfig, evaluate

    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    metrics = evaluate(EvalConfig(checkpoint=lora_run, records=records))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64), lora_run).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logp = torch.log_softmax(adapted(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    nll = -logp.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert metrics["n_targets"] == len(ids) - 1
    assert metrics["nll"] == pytest.approx(nll, rel=1e-5)  # the adapter is applied, not the bare base


def test_export_command(lora_run, tmp_path):
    result = CliRunner().invoke(app, ["export", str(lora_run), "--merge", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m" / "model.safetensors").exists()
    result = CliRunner().invoke(app, ["export", str(lora_run), "--merge", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "already exists" in result.output


@pytest.mark.vllm
@pytest.mark.slow  # starts a vLLM engine (about a minute on 2 CPU cores)
def test_vllm_loads_the_merged_folder_and_scores_like_base_plus_adapter(lora_run, student, tokenizer, tmp_path):
    from peft import PeftModel
    from test_vllm_backend import TOLERANCE, start_engine
    from transformers import AutoModelForCausalLM

    from scoring.vllm_backend import close_vllm_engine, score_windows_vllm

    out = export(ExportConfig(checkpoint=lora_run, out=tmp_path / "merged", merge=True))
    engine = start_engine(out, "exact")  # skips without vllm (fails under TOKENPRIO_REQUIRE_VLLM=1)
    try:
        ids = tokenizer("The quick brown fox jumps over the lazy dog. To be, or not to be")["input_ids"]
        ((logprob, _entropy),) = score_windows_vllm(engine, [ids])
    finally:
        close_vllm_engine(engine)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64), lora_run).eval()
    with torch.no_grad():
        reference = torch.log_softmax(adapted(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    reference = reference.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()
    assert np.isnan(logprob[0]) and np.abs(logprob[1:] - reference).max() < TOLERANCE
