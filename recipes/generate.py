"""Generate a completion for one prompt with a model (and optionally a LoRA adapter).

    tune run generate --config llama/tiny_generate prompt="Reverse: abc"

Reads top to bottom: set-up, model (+ adapter merged into the weights), prompt (the model's own
chat template unless `chat: false`), generation streamed to stdout, then tokens/s. Decoding
itself (KV cache, greedy / temperature / top-k / top-p, stop ids) is
`tunewright.training.generation`; `tune chat` is the interactive form of this recipe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from tunewright.training.entry import recipe_main
from tunewright.training.schema import PositiveInt, Range, component
from tunewright.training.train_config import Device, Seed


@dataclass(kw_only=True)
class Config:
    recipe: str
    model: dict[str, Any] = component(required=True)  # e.g. tunewright.models.load_pretrained
    tokenizer: dict[str, Any] = component(required=True)
    adapter: str | None = None  # a PEFT-format LoRA directory (e.g. <output_dir>/adapter)
    prompt: str
    system_prompt: str | None = None
    chat: bool = True  # false: the prompt is raw text to continue, after bos
    max_new_tokens: PositiveInt = 128
    temperature: Annotated[float, Range(ge=0, hint="0: greedy")] = 0.0
    top_k: Annotated[int, Range(ge=1, hint="null: no top-k cut")] | None = None
    top_p: Annotated[float, Range(gt=0, le=1, hint="null: no top-p cut")] | None = None
    seed: Seed | None = None
    device: Device = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_threads: PositiveInt | None = None
    # torch.compile each block: the prefill and the one-token decode step compile once each
    # (positions do not recompile), which pays off for long generations.
    compile: bool = False


def main(cfg: Config) -> dict[str, Any]:
    from tunewright.models.pretrained import as_dtype
    from tunewright.training.generation import (
        TokenStream, check_sampling, generate, merge_adapter, strip_stop,
    )
    from tunewright.training.instantiate import instantiate
    from tunewright.training.setup import setup_device
    from tunewright.training.transforms import compile_blocks

    # ------------------------------------------------------------------ set-up
    check_sampling(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    device = setup_device(cfg.device, cfg.num_threads)

    # ------------------------------------------------------------------ model + tokenizer
    model = instantiate(cfg.model, dtype=as_dtype(cfg.dtype), device=device)
    if cfg.adapter:
        merge_adapter(model, cfg.adapter)
    if cfg.compile:
        compile_blocks(model)
    tokenizer = instantiate(cfg.tokenizer)

    # ------------------------------------------------------------------ prompt
    if cfg.chat:
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": cfg.prompt})
        prompt_ids, _ = tokenizer.tokenize_messages(messages, add_generation_prompt=True)
    else:
        if cfg.system_prompt:
            raise ValueError("system_prompt needs chat: true (a raw completion has no system turn)")
        prompt_ids = tokenizer.encode(cfg.prompt, add_bos=True)
    cut = getattr(tokenizer, "max_seq_len", None)
    if cut is not None and len(prompt_ids) >= cut:
        raise ValueError(f"the prompt fills tokenizer.max_seq_len ({cut}) and was probably cut; "
                         "remove max_seq_len from the tokenizer config")

    # ------------------------------------------------------------------ generate
    stream = TokenStream(tokenizer)
    start = time.perf_counter()
    [ids] = generate(
        model, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, stop_ids=tokenizer.stop_ids, seed=cfg.seed,
        pad_id=tokenizer.pad_id, vocab_size=tokenizer.vocab_size, on_token=stream,
    )
    seconds = time.perf_counter() - start
    stream.finish()
    text = tokenizer.decode(strip_stop(ids, tokenizer.stop_ids))
    tokens_per_s = len(ids) / max(seconds, 1e-9)
    print()
    print(f"{len(ids)} tokens in {seconds:.2f} s ({tokens_per_s:.1f} tokens/s, "
          f"prompt {len(prompt_ids)} tokens)")
    return {"text": text, "ids": ids, "prompt_ids": prompt_ids, "tokens_per_s": tokens_per_s}


if __name__ == "__main__":
    recipe_main(__file__)
