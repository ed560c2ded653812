"""The generate recipe on the tiny config and `tune chat` on the tiny model directory: they run,
print text, give the tokens of `generate` itself, apply adapters, and fail in one line."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
import torch

from tunewright.training.entry import run_recipe_file
from tunewright.training.tiny_assets import tiny_asset
from tunewright.tune_cli import chat

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "generate.py"
CONFIG = REPO / "configs" / "llama" / "tiny_generate.yaml"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.delenv("TUNEWRIGHT_DEBUG", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A random (non-zero) LoRA adapter for the tiny model, in PEFT format."""
    from tunewright.models import load_pretrained
    from tunewright.models.peft_adapter import save_peft_adapter
    from tunewright.modules.peft.apply import adapter_state_dict, apply_lora

    model = load_pretrained(tiny_asset("llama"))
    apply_lora(model, targets="all-linear", rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in adapter_state_dict(model).values():
            t.add_(torch.randn(t.shape, generator=g) * 0.5)
    return save_peft_adapter(model, tmp_path_factory.mktemp("gen") / "adapter")


@pytest.fixture(scope="module")
def wrong_adapter(tmp_path_factory) -> Path:
    """An adapter for a model of another width: it cannot load onto the tiny model."""
    from tunewright.models import ModelArgs, build_model
    from tunewright.models.builder import init_weights
    from tunewright.models.peft_adapter import save_peft_adapter
    from tunewright.modules.peft.apply import apply_lora

    model = build_model(ModelArgs(family="llama", vocab_size=288, dim=64, num_layers=2,
                                  num_heads=4, num_kv_heads=2, intermediate_dim=96), device="cpu")
    init_weights(model, seed=0)
    apply_lora(model, targets=["q", "v"], rank=2, alpha=4)
    return save_peft_adapter(model, tmp_path_factory.mktemp("gen") / "wrong_adapter")


def reference(prompt_ids, *, adapter_dir=None, n=12):
    """Greedy tokens of the tiny model (adapter applied, not merged) by `generate` itself."""
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.models import load_pretrained
    from tunewright.models.peft_adapter import load_peft_adapter
    from tunewright.training.generation import generate

    tok = load_tokenizer(tiny_asset("llama"))
    model = load_pretrained(tiny_asset("llama"))
    if adapter_dir is not None:
        load_peft_adapter(model, adapter_dir)
    [ids] = generate(model, prompt_ids, max_new_tokens=n, stop_ids=tok.stop_ids,
                     vocab_size=tok.vocab_size)
    return ids


def test_recipe_runs_on_the_tiny_config_and_prints_text(capsys):
    result = run_recipe_file(RECIPE, CONFIG, ["max_new_tokens=12", "num_threads=1"])
    out = capsys.readouterr().out
    assert result["text"] and result["text"] in out
    assert "tokens/s" in out
    assert result["ids"] == reference(result["prompt_ids"])
    assert result["prompt_ids"][:1] == [257]  # <|im_start|>: the chat template was applied


def test_recipe_raw_prompt_sampling_and_adapter(capsys, adapter):
    raw = run_recipe_file(RECIPE, CONFIG, ["max_new_tokens=12", "chat=false", "prompt=Hello"])
    assert raw["prompt_ids"] == list(b"Hello")  # no template, no bos in this vocabulary
    sampled = [run_recipe_file(RECIPE, CONFIG, ["max_new_tokens=12", "temperature=1.5",
                                                "top_k=20", "top_p=0.9", "seed=3"])
               for _ in range(2)]
    assert sampled[0]["ids"] == sampled[1]["ids"]
    with_adapter = run_recipe_file(RECIPE, CONFIG, ["max_new_tokens=12", f"adapter={adapter}"])
    assert with_adapter["ids"] == reference(with_adapter["prompt_ids"], adapter_dir=adapter)
    assert with_adapter["ids"] != run_recipe_file(RECIPE, CONFIG, ["max_new_tokens=12"])["ids"]
    capsys.readouterr()


def test_recipe_bad_values_fail(tmp_path):
    from tunewright.training.config import ConfigError

    with pytest.raises(ValueError, match="temperature"):
        run_recipe_file(RECIPE, CONFIG, ["temperature=-1"])
    with pytest.raises(ConfigError, match="missing required key 'prompt'"):
        run_recipe_file(RECIPE, CONFIG, ["~prompt"])
    with pytest.raises(ValueError, match="system_prompt needs chat"):
        run_recipe_file(RECIPE, CONFIG, ["chat=false", "system_prompt=hi"])
    with pytest.raises(ValueError, match="max_seq_len"):
        run_recipe_file(RECIPE, CONFIG, ["tokenizer.max_seq_len=8"])


def tune_chat(*argv: str) -> int:
    """`tune chat ...` through the real entry point (its error handling included)."""
    from tunewright.tune_cli.main import main

    return main(["chat", *argv])


def test_tune_chat_one_prompt(capsys, adapter):
    model_dir = str(tiny_asset("llama"))
    assert tune_chat(model_dir, "--prompt", "hi", "--max-new-tokens", "12") == 0
    out = capsys.readouterr().out
    assert out.strip()
    from tunewright.data.tokenizer import load_tokenizer
    from tunewright.training.generation import strip_stop

    tok = load_tokenizer(model_dir)
    prompt, _ = tok.tokenize_messages([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert out == tok.decode(strip_stop(reference(prompt), tok.stop_ids)) + "\n"

    assert tune_chat(model_dir, "--adapter", str(adapter), "--prompt", "hi", "--system", "be brief",
                     "--max-new-tokens", "8", "--temperature", "0.7", "--top-k", "5",
                     "--top-p", "0.9", "--seed", "1") == 0
    assert capsys.readouterr().out.strip()


def test_tune_chat_loop_keeps_history(capsys, monkeypatch):
    answers = []
    real_answer = chat._Session.answer

    def answer(self, text):
        answers.append((text, list(self.history)))
        return real_answer(self, text)

    monkeypatch.setattr(chat._Session, "answer", answer)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n  second  \nexit\nnever read\n"))
    assert tune_chat(str(tiny_asset("llama")), "--max-new-tokens", "6") == 0
    assert [text for text, _ in answers] == ["hello", "second"]
    history = answers[1][1]
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "hello"
    assert len(capsys.readouterr().out.splitlines()) == 2  # one streamed answer a line

    monkeypatch.setattr("sys.stdin", io.StringIO("just one, then end of input"))
    assert tune_chat(str(tiny_asset("llama")), "--max-new-tokens", "4") == 0


@pytest.mark.parametrize("argv, message", [
    (["/no/such/model", "--prompt", "hi"], "model directory not found"),
    (["{tiny}", "--adapter", "/no/such/adapter", "--prompt", "hi"], "adapter directory not found"),
    (["{tiny}", "--adapter", "{wrong}", "--prompt", "hi"], "adapter does not match the base model"),
    (["{tiny}", "--top-p", "0", "--prompt", "hi"], "top_p"),
    (["{tiny}", "--max-new-tokens", "0", "--prompt", "hi"], "--max-new-tokens"),
])
def test_tune_chat_errors_are_one_line(capsys, wrong_adapter, argv, message):
    argv = [a.format(tiny=tiny_asset("llama"), wrong=wrong_adapter) for a in argv]
    assert tune_chat(*argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_chat_parser_is_self_contained():
    parser = argparse.ArgumentParser(prog="tune")
    chat.add_parser(parser.add_subparsers())
    args = parser.parse_args(["chat", "DIR", "--top-k", "3", "--temperature", "0.5"])
    assert (args.model_dir, args.top_k, args.temperature, args.prompt) == ("DIR", 3, 0.5, None)
    assert args.handler is chat.run
