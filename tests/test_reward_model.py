"""Reward models: the score head against transformers' *ForSequenceClassification (both ways,
padded rows of different lengths), Bradley-Terry against its formula and TRL's RewardTrainer,
and the recipe: it learns a learnable pair set, accumulation and resume change nothing, its
LoRA adapter loads in PEFT, bad configs fail in one line."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.faults import crash_at_step
from tests.hf_reference import make_hf_model
from tunewright.data.collate import collate_flat, collate_padded
from tunewright.models import load_pretrained, save_pretrained
from tunewright.models.score import ARCHITECTURES, require_score_head, sequence_scores
from tunewright.recipes.reward_model import bradley_terry
from tunewright.training.entry import run_recipe_file
from tunewright.training.tiny_assets import tiny_asset

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "reward_model.py"
FULL = REPO / "configs" / "llama" / "tiny_reward_full.yaml"
LORA = REPO / "configs" / "llama" / "tiny_reward_lora.yaml"
FAST = ["progress_bar=false", "num_threads=1", "eval_every_n_steps=null", "save_every_n_steps=null"]
TOLERANCE = 1e-4
LENGTHS = (17, 9, 4, 12)  # right-padded rows of different lengths


def rows_of_lengths(vocab: tuple[int, int], seed: int = 0) -> dict:
    """Rows of LENGTHS tokens drawn from [low, high): padding is the pad id, which no row holds,
    so transformers (which looks for the last non-pad token) and we (by length) agree."""
    gen = torch.Generator().manual_seed(seed)
    items = [{"tokens": torch.randint(*vocab, (n,), generator=gen).tolist(), "labels": [-100] * n} for n in LENGTHS]
    return items


def hf_scores(model, batch: dict) -> torch.Tensor:
    mask = (torch.arange(batch["tokens"].shape[1])[None] < torch.tensor(batch["seq_lens"])[:, None]).long()
    with torch.no_grad():
        return model(input_ids=batch["tokens"], attention_mask=mask).logits


# ---------------------------------------------------------------- the layout, both ways
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_saved_reward_model_loads_in_transformers(tmp_path, family):
    tiny = tiny_asset(family)
    torch.manual_seed(0)
    ours = load_pretrained(tiny, num_labels=1).eval()  # a fresh score head on a causal LM
    assert ours.output.weight.shape == (1, ours.args.dim)
    save_pretrained(ours, tmp_path / "rm", source_dir=tiny)

    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[family]] and config["num_labels"] == 1
    assert config["pad_token_id"] == 256  # the tiny tokenizer's <|endoftext|>
    from safetensors import safe_open

    with safe_open(str(tmp_path / "rm" / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "score.weight" in names and "lm_head.weight" not in names

    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32)
    assert type(theirs).__name__ == ARCHITECTURES[family]
    rows = rows_of_lengths((0, 256))
    batch = collate_padded(rows, pad_id=256)
    want = hf_scores(theirs.eval(), batch)  # [rows, 1]
    with torch.no_grad():
        for padding_free in (True, False):
            got = sequence_scores(ours, batch, padding_free=padding_free)
            assert (got - want).abs().max().item() <= TOLERANCE, padding_free
        flat = collate_flat(rows)  # laid end to end on the host: [1, T]
        assert (sequence_scores(ours, flat) - want).abs().max().item() <= TOLERANCE
        reloaded = load_pretrained(tmp_path / "rm").eval()  # ours again, head from score.weight
        assert (sequence_scores(reloaded, batch) - want).abs().max().item() <= TOLERANCE
    assert want.std() > 0.1  # the scores differ per row: a wrong last token would show


CLASSIFIERS = {
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", dict(num_labels=1)),
    "mistral_3_labels": ("MistralConfig", "MistralForSequenceClassification", dict(num_labels=3)),
    # transformers' classifier has no logit soft-cap: ours must drop Gemma-2's final one.
    "gemma2_final_softcap": ("Gemma2Config", "Gemma2ForSequenceClassification",
                             dict(num_labels=1, final_logit_softcapping=0.5, head_dim=16,
                                  attn_implementation="eager")),
}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_transformers_classifier_loads_into_ours(tmp_path, name):
    config_cls, model_cls, extra = CLASSIFIERS[name]
    theirs, path = make_hf_model(tmp_path, config_cls, model_cls, hidden_size=64, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 pad_token_id=0, **extra)
    with torch.no_grad():
        theirs.score.weight.normal_(0.0, 1.0)  # HF's std-0.02 init would make every score ~0
    theirs.save_pretrained(path)
    ours = load_pretrained(path).eval()
    assert ours.args.num_labels == extra["num_labels"]
    asked = load_pretrained(path, num_labels=extra["num_labels"])  # asking for the head it has: kept
    assert torch.equal(asked.output.weight, theirs.score.weight)
    batch = collate_padded(rows_of_lengths((1, 101)), pad_id=0)
    want = hf_scores(theirs.eval(), batch)
    with torch.no_grad():
        assert (sequence_scores(ours, batch) - want).abs().max().item() <= TOLERANCE
    assert want.std() > 0.1


def test_fresh_head_is_seeded_and_scaled(tmp_path):
    tiny = tiny_asset("llama")
    torch.manual_seed(3)
    a = load_pretrained(tiny, num_labels=1).output.weight
    torch.manual_seed(3)
    torch.rand(100)  # the global RNG's position does not matter, only the run's seed
    b = load_pretrained(tiny, num_labels=1).output.weight
    assert torch.equal(a, b)
    dim = a.shape[1]
    torch.manual_seed(4)
    big = load_pretrained(tiny, num_labels=64).output.weight  # enough draws to measure the std
    assert big.std().item() == pytest.approx(1 / math.sqrt(dim + 1), rel=0.1)


def test_bad_score_head_requests_fail_in_one_line(tmp_path, monkeypatch):
    tiny = str(tiny_asset("llama"))
    node = {"_component_": "tunewright.models.load_pretrained", "path": tiny}
    with pytest.raises(ValueError, match="no score head.*num_labels: 1") as e:
        require_score_head(node)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="num_labels") as e:
        require_score_head({**node, "num_labels": 2})
    assert "\n" not in str(e.value)
    monkeypatch.delitem(ARCHITECTURES, "llama")  # as a family transformers has no classifier for
    for call in (lambda: require_score_head({**node, "num_labels": 1}), lambda: load_pretrained(tiny, num_labels=1)):
        with pytest.raises(ValueError, match="'llama' has no sequence-classification layout") as e:
            call()
        assert "\n" not in str(e.value)


def test_every_classifier_name_is_transformers_class_for_its_model_type():
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as names

    from tunewright.models.registry import get_family

    for family, cls in ARCHITECTURES.items():
        assert hasattr(transformers, cls), cls
        assert cls in {names.get(t) for t in get_family(family).model_types}, (family, cls)


# ---------------------------------------------------------------- Bradley-Terry
def test_bradley_terry_is_ln2_at_equal_scores():
    r = torch.tensor([0.0, 1.5, -2.0])
    assert torch.allclose(bradley_terry(r, r), torch.full((3,), math.log(2.0)))
    centred = bradley_terry(r, r, center_coefficient=0.1)
    assert torch.allclose(centred, math.log(2.0) + 0.1 * (2 * r) ** 2)
    assert torch.allclose(bradley_terry(r + 1.0, r, margin=torch.ones(3)), torch.full((3,), math.log(2.0)))


def trl_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None,
             coefficient: float | None) -> torch.Tensor:
    """TRL 1.16's `RewardTrainer.compute_loss` (trl/trainer/reward_trainer.py), called as it is:
    a stand-in trainer and a model whose logits are the rewards, chosen rows then rejected."""
    from trl.trainer.reward_trainer import RewardTrainer

    identity = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=False), accelerator=identity,
                              args=SimpleNamespace(center_rewards_coefficient=coefficient),
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    logits = torch.cat([chosen, rejected])[:, None]
    model = lambda **inputs: SimpleNamespace(logits=logits)  # noqa: E731
    inputs = {} if margin is None else {"margin": margin}
    return RewardTrainer.compute_loss(trainer, model, inputs)


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("coefficient", [None, 0.01])
def test_bradley_terry_equals_trl_reward_trainer(margin, coefficient):
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 16, generator=gen, dtype=torch.float64) * 2
    m = torch.rand(16, generator=gen, dtype=torch.float64) if margin else None
    ours_in, trl_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    ours = bradley_terry(ours_in[0], ours_in[1], margin=m, center_coefficient=coefficient).mean()
    theirs = trl_loss(trl_in[0], trl_in[1], m, coefficient)
    ours.backward()
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert torch.allclose(ours_in.grad, trl_in.grad, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the recipe
def learnable_pairs(path: Path, num_pairs: int = 240, seed: int = 0) -> Path:
    """Pairs a tiny model can learn to rank: the word in capitals (chosen) over the word as given."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(num_pairs):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        rows.append({"prompt": f"Capitals: {word}", "chosen": word.upper(), "rejected": word})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def held_out_accuracy(model, pairs: Path, *, first: int) -> float:
    """Pairwise accuracy of `model` (ours or transformers') on the pairs from `first` on."""
    from tunewright.data.preference import collate_pairs, preference_dataset
    from tunewright.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_asset("llama"))
    data = preference_dataset(tok, source=str(pairs), split=f"train[{first}:]")
    batch = collate_pairs([data[i] for i in range(len(data))], pad_id=tok.pad_id)
    with torch.no_grad():
        scores = sequence_scores(model, batch) if hasattr(model, "args") else hf_scores(model, batch)
    chosen, rejected = scores[:, 0].chunk(2)
    return (chosen > rejected).float().mean().item()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return learnable_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def data_overrides(pairs: Path) -> list[str]:
    return [f"dataset.source={pairs}", f"val_dataset.source={pairs}", "dataset.split=train[:200]",
            "val_dataset.split=train[200:]"]


def test_full_recipe_learns_and_exports_a_transformers_classifier(tmp_path, pairs):
    out = tmp_path / "run"
    torch.manual_seed(0)  # the recipe's seed: the same fresh head it starts from
    before = held_out_accuracy(load_pretrained(tiny_asset("llama"), num_labels=1).eval(), pairs, first=200)
    history = run_recipe_file(RECIPE, FULL, [f"output_dir={out}", "max_steps=25", "batch_size=8",
                                             *data_overrides(pairs), *FAST, "eval_every_n_steps=25"])
    after_model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final", dtype=torch.float32)
    after = held_out_accuracy(after_model.eval(), pairs, first=200)
    logged = [r for r in history if "val_accuracy" in r][-1]["val_accuracy"]
    assert after == pytest.approx(logged, abs=1e-6)  # the recipe's held-out pass, recomputed by transformers
    print(f"held-out accuracy before {before:.3f} after {after:.3f}")
    assert before < 0.75 and after >= 0.9, (before, after)
    record = history[-1]
    for key in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "margin", "num_pairs"):
        assert key in record, key
    assert record["margin"] == pytest.approx(record["rewards/chosen"] - record["rewards/rejected"], abs=1e-5)


def test_lora_recipe_saves_adapter_with_score_head_that_peft_loads(tmp_path, pairs):
    peft = pytest.importorskip("peft")
    from tunewright.models.peft_adapter import load_peft_adapter

    out = tmp_path / "run"
    run_recipe_file(RECIPE, LORA, [f"output_dir={out}", "max_steps=4", *data_overrides(pairs), *FAST])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = Path(config["base_model_name_or_path"])
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    hf.config.pad_token_id = 256
    theirs = peft.PeftModel.from_pretrained(hf, out / "adapter").eval()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged", dtype=torch.float32)
    ours = load_peft_adapter(load_pretrained(base, num_labels=1), out / "adapter").eval()
    batch = collate_padded(rows_of_lengths((0, 256)), pad_id=256)
    want = hf_scores(theirs, batch)
    assert (hf_scores(merged.eval(), batch) - want).abs().max().item() <= TOLERANCE
    with torch.no_grad():
        assert (sequence_scores(ours, batch) - want).abs().max().item() <= TOLERANCE


def test_accumulation_2x2_equals_1x4(tmp_path, pairs):
    common = [*data_overrides(pairs), *FAST, "max_steps=3", "save_final_model=false"]
    run_recipe_file(RECIPE, FULL, [f"output_dir={tmp_path / 'one'}", "batch_size=4", *common])
    run_recipe_file(RECIPE, FULL, [f"output_dir={tmp_path / 'two'}", "batch_size=2",
                                   "gradient_accumulation_steps=2", *common])
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("loss", "accuracy", "margin", "grad_norm"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-7), key


def test_padded_batches_give_the_padding_free_losses(tmp_path, pairs):
    common = [*data_overrides(pairs), *FAST, "max_steps=3", "batch_size=4", "save_final_model=false"]
    run_recipe_file(RECIPE, FULL, [f"output_dir={tmp_path / 'free'}", *common])
    run_recipe_file(RECIPE, FULL, [f"output_dir={tmp_path / 'padded'}", "padding_free=false", *common])
    assert losses(tmp_path / "padded") == pytest.approx(losses(tmp_path / "free"), rel=1e-5)


def test_resume_gives_the_uninterrupted_losses(tmp_path, pairs, monkeypatch):
    common = [*data_overrides(pairs), *FAST, "max_steps=6", "batch_size=4", "save_every_n_steps=3"]
    run_recipe_file(RECIPE, LORA, [f"output_dir={tmp_path / 'straight'}", *common])
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            run_recipe_file(RECIPE, LORA, [f"output_dir={resumed}", *common])
    run_recipe_file(RECIPE, LORA, [f"output_dir={resumed}", *common, "resume_from_checkpoint=auto"])
    assert losses(resumed) == losses(tmp_path / "straight")
    assert sorted(losses(resumed)) == list(range(1, 7))


def test_recipe_refuses_a_model_without_score_head_in_one_line(tmp_path, pairs):
    with pytest.raises(ValueError, match="no score head") as e:
        run_recipe_file(RECIPE, FULL, [f"output_dir={tmp_path / 'run'}", "~model.num_labels", *data_overrides(pairs)])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before the run started
    with pytest.raises(ValueError, match="'output' is the score head") as e:
        run_recipe_file(RECIPE, LORA, [f"output_dir={tmp_path / 'run'}", "lora_targets=[q,output]"])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- FSDP2
def exported_scores(directory: Path) -> torch.Tensor:
    batch = collate_padded(rows_of_lengths((0, 256)), pad_id=256)
    with torch.no_grad():
        return sequence_scores(load_pretrained(directory).eval(), batch)


@pytest.mark.parametrize("config,export", [(FULL, "final"), (LORA, "merged")], ids=["full", "lora"])
def test_fsdp2_in_one_process_equals_one_device(tmp_path, pairs, config, export):
    common = [*data_overrides(pairs), *FAST, "max_steps=3", "batch_size=4", "save_final_model=true"]
    run_recipe_file(RECIPE, config, [f"output_dir={tmp_path / 'one'}", *common])
    run_recipe_file(RECIPE, config, [f"output_dir={tmp_path / 'fsdp'}", "distributed=true", *common])
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    assert (exported_scores(tmp_path / "fsdp" / export) - exported_scores(tmp_path / "one" / export)).abs().max() <= 1e-5
    if config == LORA:  # the adapter, score head included, gathered from the shards
        from tunewright.models.pretrained import read_safetensors

        one, fsdp = (read_safetensors(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "fsdp"))
        assert one.keys() == fsdp.keys() and "base_model.model.score.weight" in one
        assert all(torch.allclose(one[k], fsdp[k], atol=1e-6) for k in one)


@pytest.mark.slow
def test_torchrun_2_processes_equal_one_device(tmp_path, pairs):
    from tests.test_distributed_recipes import torchrun

    common = [*data_overrides(pairs), *FAST, "max_steps=4", "save_final_model=true"]
    run_recipe_file(RECIPE, LORA, [f"output_dir={tmp_path / 'one'}", "batch_size=4", *common])
    torchrun("reward_model", "tiny_reward_lora", [f"output_dir={tmp_path / 'two'}", "batch_size=2", *common])
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert (exported_scores(tmp_path / "two" / "merged") - exported_scores(tmp_path / "one" / "merged")).abs().max() <= 1e-5
