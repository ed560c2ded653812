"""The training recipes' `export_gguf` option: the final model also as one GGUF file.

Checked when the run starts (the output type, and whether llama.cpp can represent the model,
from its config.json), so a model that cannot be exported fails before training, not after.
At the end the GGUF is made from the Hugging Face directory the run wrote (`final/`, or
`merged/` with LoRA, which the option writes even when `save_final_model` is unset; with QAT,
`dequantized/`, the weights it deploys), next to it: `<run>/merged-q8_0.gguf`. Nothing heavy is
imported at the top: the recipe's `Config` imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal

GGUFOutType = Literal["f32", "f16", "bf16", "q8_0"]  # models/gguf_export.py's OUT_TYPES


def gguf_export_step(cfg: Any) -> Callable[[Any, Any, Any], Path | None]:
    """`export(place, model, run)` for the end of the run, once `cfg.export_gguf` is checked
    against the model in `cfg.model.path`; it does nothing when `export_gguf` is null."""
    out_type = getattr(cfg, "export_gguf", None)
    if out_type is None:
        return lambda place, model, run: None
    from tunewright.models.gguf_export import check_exportable

    try:
        check_exportable(cfg.model.get("path"), out_type)
    except ValueError as e:
        raise ValueError(f"export_gguf: {e}") from None
    lora = getattr(cfg, "lora_rank", None) is not None
    qat = getattr(cfg, "quantization", None) is not None  # the model QAT deploys: dequantized/
    # Whether the run has written the directory (save_results' rule); decided from the config
    # alone, so every process agrees on whether to join one more gather.
    saved = qat or (cfg.save_final_model if cfg.save_final_model is not None else not lora)

    def export(place: Any, model: Any, run: Any) -> Path | None:
        from tunewright.models.gguf_export import export_gguf
        from tunewright.training import distributed as dist

        directory = run.output_dir / ("dequantized" if qat else "merged" if lora else "final")
        if not saved:  # e.g. LoRA without save_final_model
            directory = place.save_model(model, directory, merge=lora)
        if directory is None or not dist.is_main():
            return None
        out = export_gguf(directory, out_type, overwrite=True)
        print(f"saved the model as GGUF ({out_type}) to {out}", flush=True)
        return out

    return export
