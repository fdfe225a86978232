"""Preference tuning: the preference format, DPO and ORPO losses against independent formulas (and
TRL's where installed), first-step values, a learnable preference set, resume, eval and recipe rules."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llmos_cli.core.data import IGNORE_INDEX
from llmos_cli.core.data.formats import _bos
from llmos_cli.core.data.preference import fit_pair, preference_encoder
from llmos_cli.core.data.read import Row
from llmos_cli.core.models import load_tokenizer
from llmos_cli.core.train.preference import (
    dpo_losses,
    orpo_losses,
    preference_collate,
    preference_objective,
)
from llmos_cli.errors import UserError
from llmos_cli.recipe import DataSection, FinetuneSection, validate_recipe
from llmos_cli.stages import evaluate, finetune
from tests.finetune_fixtures import ANIMALS, tiny_llama, write_jsonl


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("bases") / "llama")


def preference_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """The right animal sound is chosen, a wrong one rejected: learnable from the prompt alone."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        animal = rng.choice(list(ANIMALS))
        wrong = rng.choice([a for a in ANIMALS if a != animal])
        rows.append(
            {
                "prompt": f"What does the {animal} say?",
                "chosen": f"The {animal} says {ANIMALS[animal]}.",
                "rejected": f"The {animal} says {ANIMALS[wrong]}.",
            }
        )
    return rows


def dpo_recipe(tmp_path: Path, base: Path, rows: list[dict], name: str = "run", **sections) -> object:
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    body = {
        "run": {"name": name, "output_dir": str(tmp_path / name), "seed": 0},
        "model": {"name_or_path": str(base)},
        "data": {
            "train": str(data),
            "format": "preference",
            "validation_split": 0.1,
            "max_seq_len": 64,
            "output": str(tmp_path / "data"),
            "clean": {"dedup": False, "decontaminate": False},  # 20 distinct pairs, sampled over and over
        },
        "finetune": {"method": "lora", "objective": "dpo", "lora": {"r": 8, "alpha": 64, "dropout": 0.0}},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-2, "log_every": 1, **sections.pop("train", {})},
        **sections,
    }
    return validate_recipe(body, str(tmp_path / "recipe.yaml"))


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the format


def test_pairs_carry_loss_on_responses_through_eos_only(llama: Path) -> None:
    tok = load_tokenizer(llama)
    d = DataSection(format="preference", max_seq_len=64)
    row = Row({"prompt": "What does the cat say?", "chosen": "meow", "rejected": "woof"}, "x.jsonl", 1)
    ex = preference_encoder(tok, d)(row)
    prompt = [*_bos(tok), *tok("What does the cat say?", add_special_tokens=False)["input_ids"]]
    assert ex["input_ids"][: len(prompt)] == prompt == ex["rejected_input_ids"][: len(prompt)]
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex["labels"][len(prompt) :] == [
        *tok("meow", add_special_tokens=False)["input_ids"],
        tok.eos_token_id,
    ]
    assert ex["rejected_labels"][-1] == tok.eos_token_id

    same = Row({"prompt": "p", "chosen": "meow", "rejected": "meow"}, "x.jsonl", 2)
    assert preference_encoder(tok, d)(same) == "identical_responses"


def test_chat_pairs_render_with_the_template_and_answer_after_the_generation_prompt(llama: Path) -> None:
    tok = load_tokenizer(llama)
    d = DataSection(format="preference", max_seq_len=64)
    messages = [{"role": "user", "content": "What does the cat say?"}]
    row = Row(
        {"messages": messages, "chosen": "meow", "rejected": [{"role": "assistant", "content": "woof"}]},
        "x",
        1,
    )
    ex = preference_encoder(tok, d)(row)
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex["labels"][:n] == [IGNORE_INDEX] * n and all(t != IGNORE_INDEX for t in ex["labels"][n:])
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": "meow"}], tokenize=False)
    assert tok.decode(ex["labels"][n:]) == full[len(prompt) :]  # the reply through its end of turn
    assert tok.decode(ex["labels"][n:]).startswith("meow") and "<|im_end|>" in full[len(prompt) :]
    assert tok.decode(ex["rejected_labels"][n:]).startswith("woof")


def test_a_long_pair_loses_prompt_tokens_from_the_left_first() -> None:
    prompt, chosen, rejected = [1, *range(10, 30)], [7, 8, 9], [6, 2]
    p, c, r, cut = fit_pair(prompt, chosen, rejected, max_len=12, keep_head=1)
    assert cut and p == [1, *range(22, 30)] and c == chosen and r == rejected  # BOS kept, the tail kept
    p, c, r, cut = fit_pair([1, 5], list(range(20)), [3], max_len=10, keep_head=1)
    assert cut and p == [1, 5] and c == list(range(8)) and r == [3]  # responses alone too long: cut too
    assert fit_pair([1], [2], [3], max_len=8) == ([1], [2], [3], False)


# ---------------------------------------------------------------- losses against independent formulas


def _pair_logps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(8, generator=g, dtype=torch.float64) * 20
    ref = -torch.rand(8, generator=g, dtype=torch.float64) * 20
    lengths = torch.randint(1, 12, (8,), generator=g)
    return logps.requires_grad_(), ref, lengths


@pytest.mark.parametrize(("loss", "smoothing"), [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_and_gradient_match_the_published_formulas(loss: str, smoothing: float) -> None:
    logps, ref, lengths = _pair_logps()
    beta = 0.3
    ours, chosen_reward, rejected_reward = dpo_losses(logps, ref, lengths, beta, loss, smoothing)
    (grad,) = torch.autograd.grad(ours.sum(), logps)

    pc, pr = logps.chunk(2)
    rc, rr = ref.chunk(2)
    lc, lr = lengths.chunk(2)
    if loss == "ipo":  # Azar et al. eq. 17, log-ratios per token as TRL (confirmed with the authors)
        want = ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2
    else:  # Rafailov et al. eq. 7; cDPO's label smoothing
        h = beta * ((pc - rc) - (pr - rr))
        want = -(1 - smoothing) * torch.log(torch.sigmoid(h)) - smoothing * torch.log(torch.sigmoid(-h))
    (want_grad,) = torch.autograd.grad(want.sum(), logps)
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(chosen_reward, beta * (pc - rc).detach())
    torch.testing.assert_close(rejected_reward, beta * (pr - rr).detach())


def test_orpo_loss_and_gradient_match_the_paper() -> None:
    logps, _, lengths = _pair_logps(1)
    beta = 0.25
    ours, chosen_reward, _ = orpo_losses(logps, lengths, beta)
    (grad,) = torch.autograd.grad(ours.sum(), logps)
    mean = logps / lengths
    pc, pr = mean.chunk(2)
    odds = lambda p: p.exp() / (1 - p.exp())  # noqa: E731  Hong et al. eq. 4: P / (1 - P)
    want = -pc - beta * torch.log(torch.sigmoid(torch.log(odds(pc) / odds(pr))))
    (want_grad,) = torch.autograd.grad(want.sum(), logps)
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(chosen_reward, beta * pc.detach())


@pytest.mark.slow  # importing trl takes ~20 s
def test_one_batch_on_a_model_matches_trl_loss_functions_and_gradients(llama: Path) -> None:
    """Log-probs from TRL's get_batch_logps and its ORPO odds-ratio term give our losses and the same
    gradients on every parameter of a real (tiny) model."""
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(llama)
    model = AutoModelForCausalLM.from_pretrained(str(llama))  # fp32, as training computes log-probs
    encode = preference_encoder(tok, DataSection(format="preference", max_seq_len=64))
    rows = [encode(Row(r, "x", i)) for i, r in enumerate(preference_rows(4))]
    batch = preference_collate(tok.pad_token_id)(rows)

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad(
            loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True
        )

    def trl_logps(m: torch.nn.Module, average: bool) -> torch.Tensor:
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return orpo_trainer.ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=average)

    beta = 0.2
    reference = AutoModelForCausalLM.from_pretrained(str(llama)).requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy
        for p in reference.parameters():
            p.mul_(0.9)
    dpo = preference_objective(FinetuneSection(objective="dpo", dpo={"beta": beta}), reference)
    ours_dpo, rewards = dpo.loss_sum(model, batch)
    tc, tr = trl_logps(model, False).chunk(2)
    with torch.no_grad():
        rc, rr = trl_logps(reference, False).chunk(2)
    theirs_dpo = -F.logsigmoid(beta * ((tc - rc) - (tr - rr))).sum()
    torch.testing.assert_close(ours_dpo, theirs_dpo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        rewards["reward_margin"], beta * ((tc - rc) - (tr - rr)).sum().detach(), rtol=1e-5, atol=1e-5
    )
    for a, b in zip(grads(ours_dpo), grads(theirs_dpo), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 sums in another order

    fake = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ours_orpo = preference_objective(FinetuneSection(objective="orpo", orpo={"beta": beta})).loss_sum(
        model, batch
    )[0]
    avg = trl_logps(model, True)
    ratio_losses = orpo_trainer.ORPOTrainer.odds_ratio_loss(fake, *avg.chunk(2))[0]
    theirs_orpo = (-avg.chunk(2)[0] - ratio_losses).sum()
    torch.testing.assert_close(ours_orpo, theirs_orpo, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(ours_orpo), grads(theirs_orpo), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 sums in another order


# ---------------------------------------------------------------- training


def test_first_dpo_step_is_ln2_with_zero_margin_and_identical_pairs_are_dropped(
    tmp_path: Path, llama
) -> None:
    rows = preference_rows(60)
    rows.append({"prompt": "What?", "chosen": "same", "rejected": "same"})
    summary = finetune.run(dpo_recipe(tmp_path, llama, rows, train={"max_steps": 1}))
    first = metric_rows(tmp_path / "run")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-4
    assert first["reward_margin"] == 0 and first["reward_chosen"] == 0
    dropped = summary["data"]["train"]["dropped"].get("identical_responses", 0)
    dropped += summary["data"]["validation"]["dropped"].get("identical_responses", 0)
    assert dropped == 1 and summary["data"]["train"]["pairs"] + summary["data"]["validation"]["pairs"] == 60


@pytest.mark.slow
def test_dpo_learns_the_preferences_and_eval_reports_the_same(tmp_path: Path, llama) -> None:
    recipe = dpo_recipe(
        tmp_path, llama, preference_rows(300), train={"max_steps": 60, "log_every": 10, "eval_every": 30}
    )
    summary = finetune.run(recipe)
    assert summary["validation"]["reward_accuracy"] > 0.9 and summary["validation"]["reward_margin"] > 0
    rows = metric_rows(tmp_path / "run")
    assert all("reward_accuracy" in r for r in rows)
    assert [r["loss"] for r in rows if "split" not in r][-1] < 0.5 * math.log(2)

    scored = evaluate.run(recipe)  # against the adapter's base: the reference training used
    for key in ("loss", "reward_accuracy", "reward_margin"):
        assert scored["metrics"][key] == pytest.approx(summary["validation"][key], rel=1e-4)
    assert "adapter's base" in scored["reference"]


@pytest.mark.slow
def test_full_dpo_resumed_after_an_interruption_equals_the_uninterrupted_run(tmp_path: Path, llama) -> None:
    rows = preference_rows(120)
    train = {"max_steps": 12, "save_every": 6, "eval_every": 6, "log_every": 2}
    ft = {"method": "full", "objective": "dpo", "dpo": {"beta": 0.2, "loss": "ipo"}}
    full = finetune.run(dpo_recipe(tmp_path, llama, rows, "full", train=train, finetune=ft))
    part_recipe = dpo_recipe(tmp_path, llama, rows, "part", train=train, finetune=ft)
    finetune.run(part_recipe)
    # a crash after step 6: the last checkpoint and everything logged after step 6 are lost
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-12")
    shutil.rmtree(tmp_path / "part" / "final")
    kept = [
        line
        for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= 6
    ]
    (tmp_path / "part" / "metrics.jsonl").write_text("".join(k + "\n" for k in kept))
    resumed = finetune.run(part_recipe)

    def curve(run: str) -> list[tuple]:
        return [
            (r["step"], r.get("split"), r["loss"], r["reward_margin"]) for r in metric_rows(tmp_path / run)
        ]

    assert curve("part") == curve("full")
    assert resumed["validation"] == full["validation"]


# ---------------------------------------------------------------- recipe rules


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": {"format": "instruction"}}, "finetune.objective: 'dpo' trains on data.format preference"),
        (
            {"finetune": {"objective": "sft"}},
            "data.format: preference pairs train with finetune.objective dpo",
        ),
        ({"task": "classification", "data": {"format": "classification"}}, "'dpo' trains causal LMs"),
        ({"finetune": {"objective": "dpo", "dpo": {"loss": "hinge"}}}, "finetune.dpo.loss"),
        ({"train": {"early_stopping": {"metric": "perplexity"}}}, "reward_accuracy"),
    ],
)
def test_recipe_validate_refuses_preference_rules(tmp_path: Path, run_cli, changes, message) -> None:
    from llmos_cli.recipe import deep_merge
    from tests.conftest import write_recipe

    body = {
        "model": {"name_or_path": "base"},
        "data": {"train": "prefs.jsonl", "format": "preference"},
        "finetune": {"objective": "dpo"},
    }
    path = write_recipe(tmp_path / "recipe.yaml", deep_merge(body, changes))
    res = run_cli("recipe", "validate", str(path))
    assert res.code == 2 and message in res.stderr and "Traceback" not in res.stderr


def test_api_finetune_takes_an_objective(tmp_path: Path, llama) -> None:
    from llmos_cli import LLMOS

    model = LLMOS().load_model(str(llama))
    data = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))
    with pytest.raises(UserError, match="'orpo' trains on data.format preference"):
        model.finetune(objective="orpo", train_data=data, format="instruction", max_steps=1)
    tuned = model.finetune(
        objective="orpo",
        train_data=data,
        max_steps=2,
        batch_size=8,
        output_dir=tmp_path / "orpo",
        method="lora",
    )
    assert (tuned.path / "adapter_config.json").exists()
    assert "reward_accuracy" in metric_rows(tmp_path / "orpo")[0]
