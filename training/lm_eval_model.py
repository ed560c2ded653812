"""A tunewright model as an lm-evaluation-harness model (`lm_eval.api.model.LM`).

    lm = TunewrightLM(model, tokenizer, batch_size=8, max_length=2048, add_bos=False)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

Imported only by `recipes/eleuther_eval.py` (lm_eval is the optional `eval` extra). The three
request types are computed as lm-eval's own `HFLM` computes them, so a task scores the same
through either (tested against HFLM on the same weights):

- loglikelihood: context + continuation, left-truncated to `max_length + 1` tokens, requests
  sorted longest first (lm-eval's `Collator`, which also shares one forward between requests
  that differ only in a one-token continuation), right-padded into batches. Right padding
  changes nothing before it under causal attention, so no mask is needed; the head runs only
  on each row's continuation positions, never on [b, s, vocab] for the whole batch.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of at most `max_length` tokens,
  each token predicted once, scored as loglikelihood requests and summed per document.
- generate_until: `training/generation.generate` (KV cache, prompts of one length decoded
  together; sorted by length so a batch holds few lengths), cut at the first stop string.
  `enable_kv_cache=False` re-runs the whole sequence each step instead (less memory).

Text becomes ids as HF would: bos first when `add_bos` (HF's `add_special_tokens`, decided from
the tokenizer's files by `adds_bos`), unless the text already starts with it (a rendered chat).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from torch import nn

from tunewright.modules.precision import compute_autocast
from tunewright.training.generation import generate, sample, strip_stop

Request = tuple[Any, list[int], list[int]]  # (cache key, context ids, continuation ids)


def adds_bos(tokenizer_dir: str | Path) -> bool:
    """Whether the HF tokenizer in `tokenizer_dir` puts bos before encoded text by default:
    `add_bos_token` in tokenizer_config.json (SentencePiece families, Gemma), else a bos token
    leading tokenizer.json's post-processor template (Llama-3). SmolLM2, Qwen: no."""
    if not tokenizer_dir:
        return False
    directory = Path(tokenizer_dir)
    directory = directory if directory.is_dir() else directory.parent
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        flag = json.loads(config_file.read_text(encoding="utf-8")).get("add_bos_token")
        if flag is not None:
            return bool(flag)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        return False
    post = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            return "SpecialToken" in step["single"][0]
    return False


class TunewrightLM(TemplateLM):
    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 8, max_length: int,
                 max_gen_toks: int = 256, add_bos: bool = False, enable_kv_cache: bool = True,
                 name: str = "tunewright", seed: int | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_gen_toks = max_gen_toks
        self.add_bos = add_bos
        self.enable_kv_cache = enable_kv_cache
        self.name = name
        self.seed = seed
        self._device = next(model.parameters()).device
        bos = tokenizer.bos_id
        self._bos_text = tokenizer.decode([bos]) if bos is not None else None

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context (and each rolling window's first prediction) is conditioned on.
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:  # text that starts with bos (a rendered chat) gets no second one
            add_special_tokens = self.add_bos and not (self._bos_text and string.startswith(self._bos_text))
        ids = self.tokenizer.encode(string, add_bos=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special=True)

    # ------------------------------------------------------------------ log-likelihoods
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        def longest_first(req: Request) -> tuple[int, tuple[int, ...]]:
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        order = Collator(requests, sort_fn=longest_first, group_by="contexts",
                         group_fn=lambda req: req[-2] + req[-1][:-1])
        results = []
        for chunk in order.get_batched(n=self.batch_size):
            for _, _, cont in chunk:
                if len(cont) > self.max_length:
                    raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_seq_length "
                                     f"{self.max_length}; raise max_seq_length")
            # inp drops the last token: position i predicts token i + 1.
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(len(i) for i in inputs)
            tokens = torch.full((len(inputs), width), self.tokenizer.pad_id, dtype=torch.long)
            for row, ids in enumerate(inputs):
                tokens[row, :len(ids)] = torch.tensor(ids)
            hidden = self.model(tokens.to(self._device), hidden_only=True)  # [b, s, dim]
            for row, ((key, ctx, cont), ids) in enumerate(zip(chunk, inputs)):
                with compute_autocast(self.model, self._device):
                    logits = self.model.head(hidden[row, len(ids) - len(cont):len(ids)])
                logprobs = torch.log_softmax(logits.float(), dim=-1)[None]  # [1, len(cont), vocab]
                greedy = logprobs.argmax(dim=-1)
                # Requests that share this forward (one-token continuations of one context).
                for key, cont_ids, lp in order.get_cache(req_str=key, cxt_toks=ctx, cont_toks=cont,
                                                         logits=logprobs):
                    target = torch.tensor(cont_ids, device=lp.device)[None]  # [1, n]
                    n = target.shape[1]
                    # A sharer may hold fewer continuation tokens (its context took the rest):
                    # its log-probs are the last n positions. (HFLM gathers the first n, which
                    # is wrong when two requests in one batch split one text differently.)
                    is_greedy = bool((greedy[:, -n:] == target).all())
                    answer = (float(lp[:, -n:].gather(2, target[..., None]).sum()), is_greedy)
                    results.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[Request] = []
        owners: list[int] = []
        for index, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        order = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tokenizer.decode([self.eot_token_id])
        replies = []
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)  # one group: same kwargs
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in max_seq_length "
                                 f"{self.max_length}")
            prompts = [self.tok_encode(c, left_truncate_len=self.max_length - max_new) for c in contexts]
            sampling = {"temperature": float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                        "top_k": kwargs.get("top_k"), "top_p": kwargs.get("top_p")}
            for context, ids in zip(contexts, self._generate(prompts, max_new, sampling)):
                text = postprocess_generated_text(self.tok_decode(strip_stop(ids, self.tokenizer.stop_ids)),
                                                  stop=until, think_end_token=None)
                replies.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        return order.get_original(replies)

    def _generate(self, prompts: list[list[int]], max_new: int, sampling: dict[str, Any]) -> list[list[int]]:
        stop_ids = self.tokenizer.stop_ids
        if self.enable_kv_cache:
            return generate(self.model, prompts, max_new_tokens=max_new, stop_ids=stop_ids,
                            pad_id=self.tokenizer.pad_id, vocab_size=self.tokenizer.vocab_size,
                            seed=self.seed, **sampling)
        # No cache: every step re-runs the whole sequence, one prompt at a time (memory: one row).
        generator = torch.Generator(self._device).manual_seed(self.seed) if self.seed is not None else None
        out = []
        for prompt in prompts:
            seq, new = list(prompt), []
            with torch.no_grad():
                while len(new) < max_new and not (new and new[-1] in stop_ids):
                    logits = self.model(torch.tensor([seq], device=self._device))[:, -1].float()
                    token = int(sample(logits[:, :self.tokenizer.vocab_size], generator=generator, **sampling))
                    seq.append(token)
                    new.append(token)
            out.append(new)
        return out

    # ------------------------------------------------------------------ chat
    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        chat = self.tokenizer.chat_format
        return chat.template if chat_template and chat is not None else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation in the model's chat format, as a string; without a generation
        prompt, it ends inside the last (assistant) message, which the model continues (as
        transformers' `continue_final_message`)."""
        if self.tokenizer.chat_format is None:
            raise ValueError("apply_chat_template: the tokenizer has no chat template; set "
                             "tokenizer.chat_template or apply_chat_template: false")
        text = self.tokenizer.chat_format.render(chat_history, add_generation_prompt=add_generation_prompt)
        if add_generation_prompt:
            return text
        final = chat_history[-1]["content"].strip()
        return text[:text.rindex(final) + len(final)]


# ---------------------------------------------------------------------- tasks
def load_task_file(path: Path) -> dict[str, Any]:
    """A task written as JSON (lm-eval's task keys): relative `dataset_kwargs.data_files` are
    taken from the file's own folder, so a task and its data can be copied anywhere together."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the task file: {e}") from None
    if not isinstance(spec, dict) or "task" not in spec:
        raise ValueError(f"{path}: a task file is a JSON object with a 'task' name")

    def local(value: Any) -> Any:
        if isinstance(value, list):
            return [local(v) for v in value]
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        if isinstance(value, str) and not Path(value).is_absolute() and "://" not in value:
            found = path.parent / value
            if not found.is_file():
                raise ValueError(f"{path}: data file {value} not found beside it ({found})")
            return str(found)
        return value

    kwargs = dict(spec.get("dataset_kwargs") or {})
    if "data_files" in kwargs:
        kwargs["data_files"] = local(kwargs["data_files"])
        spec["dataset_kwargs"] = kwargs
    return spec


def resolve_tasks(names: Sequence[str], task_dirs: Sequence[Path]) -> tuple[list[str | dict], Any]:
    """What `simple_evaluate` gets for each name, and the TaskManager that knows them. A name is
    a `.json` task file, the `task` name of one in `task_dirs`, a `.yaml` task file, or a task
    lm-eval knows: from YAML in `task_dirs`, else its own catalogue (indexing it takes tens of
    seconds, so it happens only when a name is found nowhere else)."""
    from lm_eval.tasks import TaskManager

    json_tasks = {}
    for folder in task_dirs:
        for path in sorted(Path(folder).glob("*.json")):
            json_tasks.setdefault(load_task_file(path)["task"], path)
    specs: list[str | dict] = []
    for name in names:
        if name.endswith(".json"):
            specs.append(load_task_file(Path(name)))
        elif name in json_tasks:
            specs.append(load_task_file(json_tasks[name]))
        else:
            specs.append(name)
    by_name = [s for s in specs if isinstance(s, str) and not s.endswith((".yaml", ".yml"))]
    dirs = [str(d) for d in task_dirs]
    manager = TaskManager(include_path=dirs or None, include_defaults=False)
    missing = [s for s in by_name if s not in manager.all_tasks]
    if missing and all(_in_catalogue(s) for s in missing):
        print("indexing lm-eval's own tasks (tens of seconds)", flush=True)
        manager = TaskManager(include_path=dirs or None)
        missing = [s for s in by_name if s not in manager.all_tasks]
    if missing:
        local = sorted(json_tasks)
        raise ValueError(f"tasks: unknown task {missing[0]!r}; shipped local tasks: {', '.join(local)}; "
                         "or give a task's .json/.yaml file, or a task lm-eval lists (lm_eval ls tasks)")
    return specs, manager


def _in_catalogue(name: str) -> bool:
    """Whether lm-eval's own task files mention `name` at all: a few seconds of reading that
    spares a misspelt name the full index."""
    from lm_eval import tasks

    needle = name.encode()
    files = Path(tasks.__file__).parent.rglob("*")
    return any(p.suffix in (".yaml", ".py") and needle in p.read_bytes() for p in files)
