"""Post-training quantization: a trained model's weights rounded with torchao, saved so that
`generate` and `evaluate` load it.

    tune run quantize --config llama/tiny_quantize
    tune run quantize --config llama3_2/1B_quantize model.path=out/run/final

The same schemes as `qat` (`training/quantize.py`); the model is quantized in `dtype`, the
dtype it will compute in. Writes `<output_dir>/quantized/` (torchao's tensors in safetensors,
loaded by `model: {_component_: tunewright.training.quantize.load_quantized, path: ...}`) and
`<output_dir>/dequantized/` (Hugging Face format), and prints the weights' size before and
after. With `dataset` (and `tokenizer`), it also prints the held-out loss before and after:
the damage that `qat` is there to recover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tunewright.training.entry import recipe_main
from tunewright.training.schema import PositiveInt, component
from tunewright.training.train_config import Device, Seed


@dataclass(kw_only=True)
class Config:
    recipe: str
    output_dir: str
    model: dict[str, Any] = component(required=True)  # e.g. tunewright.models.load_pretrained
    quantization: dict[str, Any]  # {scheme, group_size, embeddings}: training/quantize.py
    tokenizer: dict[str, Any] | None = component()
    dataset: dict[str, Any] | None = component(supplied=("tokenizer",))  # held-out rows, optional
    batch_size: PositiveInt = 8
    loss_chunk_size: PositiveInt = 1024
    device: Device = "cpu"
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    num_threads: PositiveInt | None = None
    seed: Seed = 0


def main(cfg: Config) -> dict[str, Any]:
    import functools

    from tunewright.models.pretrained import as_dtype
    from tunewright.training.data_setup import make_batches
    from tunewright.training.instantiate import instantiate
    from tunewright.training.objectives import causal_lm_loss, evaluate_loss
    from tunewright.training.quantize import Quantization, check_model, quantize_for_export, save_quantized_outputs
    from tunewright.training.setup import seed_everything, setup_device

    # ------------------------------------------------------------------ set-up
    quantization = Quantization.from_node(cfg.quantization)
    if (cfg.dataset is None) != (cfg.tokenizer is None):
        raise ValueError("dataset: the held-out loss needs both dataset and tokenizer (or neither)")
    seed_everything(cfg.seed)
    device = setup_device(cfg.device, cfg.num_threads)
    quantization.check_device(device)

    # ------------------------------------------------------------------ model (+ held-out rows)
    dtype = as_dtype(cfg.dtype)
    model = instantiate(cfg.model, dtype=dtype, device=device).eval()
    check_model(model, quantization)  # before minutes of evaluation
    held_out = None
    if cfg.dataset is not None:
        tokenizer = instantiate(cfg.tokenizer)
        batches = make_batches(instantiate(cfg.dataset, tokenizer=tokenizer), pad_id=tokenizer.pad_id,
                               batch_size=cfg.batch_size, shuffle=False)
        loss_fn = functools.partial(causal_lm_loss, chunk_size=cfg.loss_chunk_size)
        held_out = functools.partial(evaluate_loss, model, batches, loss_fn, device=device)

    # ------------------------------------------------------------------ quantize, measure, save
    result: dict[str, Any] = {}
    if held_out is not None:
        result["loss_before"] = float(held_out().loss)
    result.update(quantize_for_export(model, quantization, dtype=dtype, convert=False))
    if held_out is not None:
        result["loss_after"] = float(held_out().loss)
        print(f"held-out loss {result['loss_before']:.4f} -> {result['loss_after']:.4f} "
              f"(+{result['loss_after'] - result['loss_before']:.4f})", flush=True)
    save_quantized_outputs(model, quantization, cfg.output_dir, source_dir=cfg.model.get("path"), dtype=dtype,
                           sizes=result)
    return result


if __name__ == "__main__":
    recipe_main(__file__)
