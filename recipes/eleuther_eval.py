"""Evaluate a model on EleutherAI's lm-evaluation-harness tasks, offline or from the Hub.

    tune run eleuther_eval --config llama/tiny_eleuther_eval
    tune run eleuther_eval --config smollm2/135M_eleuther_eval_single_device model.path=out/run/merged

The model is loaded as every other recipe loads it (`model._component_`: a Hugging Face
directory, or `tunewright.training.quantize.load_quantized` for `quantize`'s output; `adapter`:
a LoRA adapter in PEFT format, merged in) and handed to lm-eval as our own `LM`
(`training/lm_eval_model.py`): nothing is downloaded, no transformers model is built. `tasks`
are names lm-eval knows (Hub tasks need the network for their data), task files (.yaml or
.json), or the local tasks shipped in `configs/eval_tasks/` and any `.json` task in
`include_path`, which run offline:

- `tunewright_rg_arithmetic`: reasoning-gym arithmetic, generated answers scored by exact match
  (the quickstart's held-out questions);
- `tunewright_text_ppl`: held-out prose, word/byte perplexity and bits per byte.

Writes `<output_dir>/results.json` (lm-eval's results: metrics per task, n-samples, configs)
and, with `log_samples`, each task's prompts and replies as `samples_<task>.jsonl`.
Needs the `eval` extra: `pip install 'tunewright[eval]'`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from tunewright.training.entry import recipe_main
from tunewright.training.schema import PositiveInt, Range, component
from tunewright.training.train_config import Device, Seed


@dataclass(kw_only=True)
class Config:
    recipe: str
    output_dir: str
    model: dict[str, Any] = component(required=True)  # e.g. tunewright.models.load_pretrained
    tokenizer: dict[str, Any] = component(required=True)
    adapter: str | None = None  # a PEFT-format LoRA directory, merged into the weights
    tasks: list[str]
    include_path: list[str] = field(default_factory=list)  # more folders of .yaml/.json tasks
    limit: PositiveInt | None = None  # the first N documents of each task (null: all)
    num_fewshot: Annotated[int, Range(ge=0)] | None = None  # null: each task's own
    batch_size: PositiveInt = 8
    max_seq_length: PositiveInt | None = None  # null: the model's context length
    max_gen_toks: PositiveInt = 256  # for tasks whose generation_kwargs do not say
    enable_kv_cache: bool = True  # false: generation re-runs the sequence each step (less memory)
    apply_chat_template: bool = False  # prompts in the tokenizer's chat format
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False  # with apply_chat_template: each example a chat turn
    add_bos_token: bool | None = None  # null: as the tokenizer's files say (HF's default)
    log_samples: bool = False
    bootstrap_iters: Annotated[int, Range(ge=0)] = 100000  # lm-eval's: stderr by resampling (0: none)
    seed: Seed = 0
    device: Device = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    num_threads: PositiveInt | None = None


def main(cfg: Config) -> dict[str, Any]:
    import json
    import time
    from pathlib import Path

    import tunewright.configs
    from tunewright.models.pretrained import as_dtype
    from tunewright.training.atomic import atomic_write_text
    from tunewright.training.generation import merge_adapter
    from tunewright.training.instantiate import instantiate
    from tunewright.training.setup import seed_everything, setup_device

    try:
        from lm_eval import simple_evaluate
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError:
        raise ValueError("eleuther_eval needs lm-evaluation-harness: pip install 'tunewright[eval]'") from None
    from tunewright.training.lm_eval_model import TunewrightLM, adds_bos, resolve_tasks

    # ------------------------------------------------------------------ set-up
    start = time.perf_counter()
    seed_everything(cfg.seed)
    device = setup_device(cfg.device, cfg.num_threads)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out}: exists and is not a directory")
    shipped = Path(tunewright.configs.__file__).parent / "eval_tasks"
    tasks, task_manager = resolve_tasks(cfg.tasks, [shipped, *map(Path, cfg.include_path)])

    # ------------------------------------------------------------------ model (+ adapter)
    model = instantiate(cfg.model, dtype=as_dtype(cfg.dtype), device=device)
    if cfg.adapter is not None:
        merge_adapter(model, cfg.adapter)
    tokenizer = instantiate(cfg.tokenizer)
    max_length = cfg.max_seq_length or model.args.max_seq_len
    tokenizer_path = cfg.tokenizer.get("path") or cfg.model.get("path") or ""
    add_bos = cfg.add_bos_token if cfg.add_bos_token is not None else adds_bos(tokenizer_path)
    lm = TunewrightLM(model, tokenizer, batch_size=cfg.batch_size, max_length=max_length,
                      max_gen_toks=cfg.max_gen_toks, add_bos=add_bos, enable_kv_cache=cfg.enable_kv_cache,
                      name=str(tokenizer_path), seed=cfg.seed)

    # ------------------------------------------------------------------ evaluate
    print(f"lm-eval: {', '.join(cfg.tasks)} (max_length {max_length}, batch_size {cfg.batch_size}, "
          f"bos {'added' if add_bos else 'not added'})", flush=True)
    results = simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
        apply_chat_template=cfg.apply_chat_template, system_instruction=cfg.system_instruction,
        fewshot_as_multiturn=cfg.fewshot_as_multiturn, log_samples=cfg.log_samples,
        bootstrap_iters=cfg.bootstrap_iters, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
    )
    samples = results.pop("samples", None) or {}
    results["tunewright"] = {"model": cfg.model.get("path"), "adapter": cfg.adapter, "tasks": cfg.tasks,
                             "max_length": max_length, "add_bos": add_bos,
                             "time_s": round(time.perf_counter() - start, 1)}

    # ------------------------------------------------------------------ report
    out.mkdir(parents=True, exist_ok=True)
    for task, rows in samples.items():
        atomic_write_text(out / f"samples_{task}.jsonl",
                          "".join(json.dumps(r, default=handle_non_serializable) + "\n" for r in rows))
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    print(make_table(results), flush=True)
    print(f"wrote {out / 'results.json'}", flush=True)
    return results


if __name__ == "__main__":
    recipe_main(__file__)
