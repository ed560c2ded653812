"""Run a ../shared/bench job JSON through tunewright (the harness's adapter contract).

    bash bench/peer_adapter.sh JOB_JSON OUT_DIR      (what run_matrix.sh --new-cmd calls)

Translates the job into a tunewright config (same model, tokenizer, data order, batches,
optimizer, schedule) and runs the shipped recipe; the recipe's own `OUT_DIR/metrics.jsonl`
already has the contract's form A (`time`, `num_tokens`, `num_tokens_total`) per step.
`num_tokens_total` counts the tokens tunewright actually computed (padding-free batches compute
only the real tokens), so the harness's MFU is against work really done.

Set TW_PADDING_FREE=0 to compute the padding too, TW_PACKED=1 for the out-of-the-box mode
(packed rows with document masking instead of the job's padded batches).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def config_for(job: dict, out: Path) -> dict:
    full = job["method"] == "full"
    packed = os.environ.get("TW_PACKED") == "1"
    cfg = {
        "recipe": "sft",
        "output_dir": str(out),
        "seed": job["seed"],
        "device": "cpu",
        "dtype": job["dtype"],
        "num_threads": job["threads"],
        "model": {"_component_": "tunewright.models.load_pretrained", "path": job["model_dir"]},
        "tokenizer": {"_component_": "tunewright.data.tokenizer.load_tokenizer",
                      "path": job["tokenizer_path"]},
        "dataset": {"_component_": "tunewright.data.sft_dataset", "source": job["data_file"],
                    "format": "instruct", "chat_template": False,
                    "train_on_input": job["train_on_input"], "max_seq_len": job["max_seq_len"],
                    "packed": packed},
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": job["lr"], "betas": [0.9, 0.999],
                      "eps": 1e-8, "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "tunewright.training.lr_schedule.cosine_with_warmup",
                         "num_warmup_steps": 0},
        "batch_size": job["batch_size"],
        "shuffle": False,
        "gradient_accumulation_steps": 1,
        "epochs": job.get("epochs", 1),
        "max_steps": job["steps"],
        "clip_grad_norm": job["clip_grad_norm"],
        "log_every_n_steps": 1,
        "save_final_model": False,
        "progress_bar": False,
        "padding_free": os.environ.get("TW_PADDING_FREE", "1") == "1",
        "enable_activation_checkpointing": bool(job.get("activation_checkpointing", False)),
    }
    if not full:
        cfg.update(lora_targets=job["lora_targets"], lora_rank=job["lora_rank"],
                   lora_alpha=job["lora_alpha"], lora_dropout=job["lora_dropout"], save_adapter=False)
    return cfg


def main() -> int:
    job_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    job = json.loads(job_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    from omegaconf import OmegaConf

    cfg_path = out / "tunewright_config.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(OmegaConf.create(config_for(job, out))))
    from tunewright.tune_cli.main import main as tune

    return tune(["run", config_for(job, out)["recipe"], "--config", str(cfg_path)])


if __name__ == "__main__":
    sys.exit(main())
