"""Process reward models: TRL's PRMTrainer data layout (re-written here with transformers'
tokenizer), the head and loss against a hand computation, the saved model against transformers'
AutoModelForTokenClassification, the reward function against its definition and inside GRPO,
one-line bad inputs, and (slow) a tiny PRM that learns to find corrupted arithmetic steps."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tunewright.data.collate import collate_flat
from tunewright.data.formats import DataError
from tunewright.data.step_labels import StepLabelDataset
from tunewright.data.tokenizer import load_tokenizer
from tunewright.models import load_pretrained
from tunewright.training.entry import run_recipe_file
from tunewright.training.prm import step_losses, step_scores
from tunewright.training.tiny_assets import tiny_asset

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "process_reward_model.py"
TINY = REPO / "configs" / "llama" / "tiny_prm_full.yaml"
FAST = ["progress_bar=false", "num_threads=1", "save_every_n_steps=null"]
ROWS = [{"prompt": "Add: 4 + 5 - 2", "completions": ["4 + 5 = 9", "9 - 2 = 7"], "labels": [True, True]},
        {"prompt": "Add: 3 + 3", "completions": ["3 + 3 = 27"], "labels": [False]},
        {"prompt": "Sub: 8 - 1 - 1", "completions": ["8 - 1 = 7", "7 - 1 = 21", "21 - 1 = 20"],
         "labels": [True, False, True]}]


def trl_layout(hf_tokenizer, row: dict, separator: str = "\n") -> tuple[list[int], list[int]]:
    """TRL's PRMTrainer.tokenize_row (trl <= 0.19, no truncation), written out."""
    prompt_ids = hf_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    separator_ids = hf_tokenizer.encode(separator, add_special_tokens=False)
    steps = [hf_tokenizer(c, add_special_tokens=False)["input_ids"] + separator_ids for c in row["completions"]]
    labels = [[-100] * (len(s) - 1) + [int(v)] for s, v in zip(steps, row["labels"])]
    if hf_tokenizer.bos_token_id is not None:
        prompt_ids = [hf_tokenizer.bos_token_id] + prompt_ids
    ids = prompt_ids + [i for s in steps for i in s]
    return ids, [-100] * len(prompt_ids) + [v for s in labels for v in s]


def test_rows_take_trls_layout():
    path = tiny_asset("llama")
    data = StepLabelDataset(ROWS, load_tokenizer(path))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    for i, row in enumerate(ROWS):
        ids, labels = trl_layout(hf_tokenizer, row)
        assert data[i] == {"tokens": ids, "labels": labels}


def _tiny_prm() -> torch.nn.Module:
    model = load_pretrained(tiny_asset("llama"), num_labels=2)
    with torch.no_grad():
        model.output.weight.copy_(torch.randn(model.output.weight.shape, generator=torch.Generator().manual_seed(1)))
    return model


def test_head_and_loss_equal_a_hand_computation():
    model = _tiny_prm()
    data = StepLabelDataset(ROWS, load_tokenizer(tiny_asset("llama")))
    losses, values = step_losses(model, collate_flat([data[i] for i in range(len(data))]))
    # By hand: each row alone through the decoder, h at every position whose token is the
    # separator after a step, logits = h W^T, loss = logsumexp(logits) - logits[label].
    want_losses, want_right = [], []
    newline = load_tokenizer(tiny_asset("llama")).encode("\n")[0]
    with torch.no_grad():
        for i, row in enumerate(ROWS):
            tokens = torch.tensor(data[i]["tokens"])
            hidden = model(tokens[None], hidden_only=True)[0]  # [s, dim]
            for position, label in zip((tokens == newline).nonzero().flatten().tolist(), row["labels"]):
                logits = hidden[position] @ model.output.weight.T  # [2]
                want_losses.append(torch.logsumexp(logits, 0) - logits[int(label)])
                want_right.append(int(logits.argmax()) == int(label))
    torch.testing.assert_close(losses, torch.stack(want_losses), rtol=0, atol=1e-5)
    assert values["accuracy"].tolist() == [float(r) for r in want_right]
    # f1 of the wrong-step class from counts
    labels = [v for row in ROWS for v in row["labels"]]
    tp = sum(1 for right, v in zip(want_right, labels) if not v and right)
    fp = sum(1 for right, v in zip(want_right, labels) if v and not right)
    fn = sum(1 for right, v in zip(want_right, labels) if not v and not right)
    means = {k: v.mean() for k, v in values.items()}
    assert step_scores(means)["f1"].item() == pytest.approx(2 * tp / max(1e-12, 2 * tp + fp + fn))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prm") / "run"
    history = run_recipe_file(RECIPE, TINY, [f"output_dir={out}", "max_steps=3", "eval_every_n_steps=3", *FAST])
    assert {"val_accuracy", "val_f1", "val_loss"} <= set(history[-1]) | set(history[-2])
    return out / "final"


def test_saved_prm_loads_in_transformers_with_equal_scores(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["architectures"] == ["LlamaForTokenClassification"] and config["num_labels"] == 2
    hf = transformers.AutoModelForTokenClassification.from_pretrained(trained, dtype=torch.float32).eval()
    ours = load_pretrained(trained)
    assert ours.args.score_per_token and ours.args.num_labels == 2
    tokens = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits  # [2, 19, 2]
        got = ours.head(ours(tokens, hidden_only=True))
    assert (got - want).abs().max().item() <= 1e-4


def test_reward_function_is_the_min_step_probability(trained):
    from tunewright.models.score import token_scores
    from tunewright.training.rewards import process_reward_model

    reward = process_reward_model(str(trained), aggregate="min")
    completions = ["4 + 5 = 9\n9 - 2 = 7\n", "3 + 3 = 27", ""]
    got = reward(["Add: 4 + 5 - 2", "Add: 3 + 3", "x"], completions)
    assert got[2] is None  # no step: does not apply
    model = load_pretrained(trained).eval()
    data = StepLabelDataset([ROWS[0], ROWS[1]], load_tokenizer(trained))
    with torch.no_grad():
        for i in range(2):
            logits, _ = token_scores(model, collate_flat([data[i]]))
            assert got[i] == pytest.approx(logits.softmax(-1)[:, 1].min().item(), abs=1e-6)
    last = process_reward_model(str(trained), aggregate="last")(["Add: 4 + 5 - 2"], completions[:1])
    with torch.no_grad():
        logits, _ = token_scores(model, collate_flat([data[0]]))
    assert last[0] == pytest.approx(logits.softmax(-1)[-1, 1].item(), abs=1e-6)


def test_grpo_takes_the_prm_as_a_reward_function(tmp_path, trained):
    functions = json.dumps([{"_component_": "tunewright.training.rewards.process_reward_model",
                             "path": str(trained)}])
    history = run_recipe_file(REPO / "recipes" / "grpo.py", REPO / "configs" / "llama" / "tiny_grpo.yaml",
                              [f"output_dir={tmp_path}", "max_steps=1", "batch_size=8", "num_generations=4",
                               "max_new_tokens=6", "ppo_epochs=1", "num_minibatches=1", "save_final_model=false",
                               "eval_every_n_steps=null", f"rewards.functions={functions}", "~rewards.weights",
                               *FAST])
    value = history[0]["rewards/process_reward_model/mean"]
    assert 0.0 <= value <= 1.0 and math.isfinite(value)


# ---------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "completions": ["a", "b"]}, "dataset row 1: no labels"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, "dataset row 1: 2 steps in completions but 1 labels"),
    ({"prompt": "p", "completions": ["a"], "labels": ["yes"]}, "dataset row 1: labels must be a list of true/false"),
])
def test_bad_rows_are_one_line_naming_the_row(row, message):
    with pytest.raises(DataError, match=message) as e:
        StepLabelDataset([ROWS[0], row], load_tokenizer(tiny_asset("llama")))
    assert "\n" not in str(e.value)


def test_recipe_refuses_other_data_in_one_line(tmp_path):
    from tunewright.training.entry import recipe_main  # noqa: F401  (the CLI path prints the same line)

    with pytest.raises(ValueError, match="step_label_dataset"):
        run_recipe_file(RECIPE, TINY, [f"output_dir={tmp_path}", "max_steps=1", "~val_dataset", *FAST,
                                       "dataset._component_=tunewright.data.sft.sft_dataset", "~dataset.step_separator",
                                       "dataset.source=${tiny:sft}"])


# ---------------------------------------------------------------- it learns
@pytest.mark.slow
def test_tiny_prm_learns_to_find_corrupted_arithmetic_steps(tmp_path):
    """reasoning-gym chain_sum questions (held-out ones never in train), each solved right and
    with one step corrupted (`data/step_labels.py`); a 2-layer dim-128 Llama trained from random
    weights, 300 steps of 32 rows (about 2 CPU-minutes): held-out F1 of finding the wrong steps
    >= 0.8 (a model calling every step right scores 0; measured 0.92)."""
    pytest.importorskip("reasoning_gym")
    from tunewright.data.step_labels import write_arithmetic_steps
    from tunewright.models.args import ModelArgs
    from tunewright.models.builder import init_weights
    from tunewright.models.pretrained import build_model, save_pretrained

    files = write_arithmetic_steps(tmp_path / "data", num_train=800, num_eval=100, task_config={"max_terms": 3})
    model_dir = tmp_path / "model"
    model = build_model(ModelArgs(family="llama", vocab_size=288, dim=128, num_layers=2, num_heads=4,
                                  num_kv_heads=4, intermediate_dim=512), device="cpu")
    init_weights(model, seed=0)
    save_pretrained(model, model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tiny_asset("llama") / name, model_dir / name)
    history = run_recipe_file(RECIPE, TINY, [
        f"output_dir={tmp_path / 'run'}", f"model.path={model_dir}", f"dataset.source={files['train']}",
        "dataset.split=train", f"val_dataset.source={files['eval']}", "val_dataset.split=train",
        "epochs=10", "max_steps=300", "batch_size=32", "optimizer.lr=1e-3", "lr_scheduler.num_warmup_steps=20",
        "eval_every_n_steps=300", "log_every_n_steps=100", "padding_free=false", "save_final_model=false", *FAST])
    final = history[-1]
    print({k: final[k] for k in ("val_accuracy", "val_f1", "val_loss")})
    assert final["val_f1"] >= 0.8, final
