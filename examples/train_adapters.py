"""Train the demo LoRA adapters for the embedded model (SmolLM2-135M-Instruct) on the CPU.

    python examples/train_adapters.py [--adapter sql|json-extract|all] [--out examples/adapters/SmolLM2-135M-Instruct]
                                      [--steps N] [--seed S] [--threads T]

The defaults reproduce the adapters committed under examples/adapters/SmolLM2-135M-Instruct/.
The data is generated here (examples/demo_tasks.py, training vocabularies only), seeded; the
loss covers the answer tokens alone (the prompt is context, not something to learn to write).
Each adapter is saved with PEFT's save_pretrained, its weights stored in bfloat16 (half the bytes;
the rates measured by examples/demo_eval.py are those of the stored adapters).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a machine busy with other work, a spinning
# thread burns the core that the thread it waits for needs (steps several times slower). Read
# when torch loads OpenMP, so set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from demo_tasks import TASKS, task_items  # noqa: E402

ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters" / "SmolLM2-135M-Instruct"
#: Written into adapter_config.json: loraplex matches a base model by the name's last component.
BASE_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 10
    rank: int = 8
    alpha: int = 16


DEFAULTS = {
    "sql": TrainConfig(steps=100),
    "json-extract": TrainConfig(steps=100),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the demo LoRA adapters (sql, json-extract) for the embedded model.")
    parser.add_argument("--adapter", choices=[*TASKS, "all"], default="all", help="which adapter to train (default: all)")
    parser.add_argument("--out", type=Path, default=ADAPTERS_DIR, help="directory that receives <adapter>/ (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per adapter, see DEFAULTS)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the LoRA initialisation (default: 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be a positive integer; got {args.steps}")
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer; got {args.threads}")
    torch.set_num_threads(args.threads)
    for task in TASKS if args.adapter == "all" else [args.adapter]:
        config = DEFAULTS[task] if args.steps is None else replace(DEFAULTS[task], steps=args.steps)
        train_adapter(task, args.out / task, config, args.seed)
    return 0


def train_adapter(task: str, out_dir: Path, config: TrainConfig, seed: int) -> float:
    """Train the `task` adapter, save it into `out_dir`, and return its final (smoothed) loss."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise SystemExit(f"training the demo adapters needs peft ({exc}); install it with: pip install peft") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraplex.model_loader.embedded import embedded_model_dir

    torch.manual_seed(seed)  # the LoRA A matrices' initialisation
    base_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=TARGET_MODULES,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    causal_lm = model.base_model.model  # the LlamaForCausalLM, LoRA layers injected
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))

    items = task_items(task, config.steps * config.batch_size, "train", seed)
    examples = [_encode(tokenizer, item.prompt, item.answer) for item in items]
    model.train()
    start, cpu_start, smoothed = time.monotonic(), time.process_time(), math.nan
    bar = tqdm(_batches(examples, config.batch_size, tokenizer.pad_token_id), total=config.steps, desc=f"training {task}", unit="step")
    for step, (input_ids, answer_mask) in enumerate(bar, start=1):
        loss = _answer_loss(causal_lm, input_ids, answer_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        smoothed = loss.item() if math.isnan(smoothed) else 0.9 * smoothed + 0.1 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}")
        if step % 25 == 0 or step == config.steps:
            tqdm.write(f"{task} step {step}/{config.steps} loss {smoothed:.4f}")
    bar.close()
    minutes, cpu_minutes = (time.monotonic() - start) / 60, (time.process_time() - cpu_start) / 60
    _save(model, out_dir)
    print(f"{task}: {config.steps} steps in {minutes:.1f} min ({cpu_minutes:.1f} CPU-min), final loss {smoothed:.4f}, saved to {out_dir}")
    return smoothed


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then linear decay to zero."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))


def _encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer + EOS, and the prompt's length. The prompt is encoded alone,
    exactly as the engine will encode it, so training sees the token boundary inference sees."""
    prompt_ids = tokenizer.encode(prompt)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, len(prompt_ids)


def _batches(examples: list[tuple[list[int], int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded batches of input ids and answer masks, each [B, T].

    No attention mask: under causal attention, padding after a sequence never reaches its tokens.
    (A mask also sends torch's CPU attention down a path several times slower.) T is rounded up
    to a multiple of 16, so that the CPU kernels meet few distinct shapes, each set up once."""
    for first in range(0, len(examples), batch_size):
        chunk = examples[first:first + batch_size]
        width = -(-max(len(ids) for ids, _ in chunk) // 16) * 16
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, T]
        answer_mask = torch.zeros((len(chunk), width), dtype=torch.bool)  # [B, T]
        for row, (ids, prompt_len) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            answer_mask[row, prompt_len:len(ids)] = True
        yield input_ids, answer_mask


def _answer_loss(causal_lm, input_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens. The LM head (a fifth of the model's weights) runs
    only on the positions that predict an answer token, not on the whole prompt."""
    hidden = causal_lm.model(input_ids=input_ids).last_hidden_state  # [B, T, H]
    predicts = answer_mask[:, 1:]  # [B, T-1]: position t predicts token t+1
    logits = causal_lm.lm_head(hidden[:, :-1][predicts])  # [N, V]
    return F.cross_entropy(logits.float(), input_ids[:, 1:][predicts])


def _save(model, out_dir: Path) -> None:
    """PEFT's save_pretrained with bfloat16 weights and the embedded model's published name."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), save_embedding_layers=False)  # no Hub look-up: embeddings are untouched
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template; examples/README.md describes them
    sort_target_modules(out_dir / "adapter_config.json")


def sort_target_modules(config_file: Path) -> None:
    """PEFT writes target_modules in a set's order, which changes from run to run: sort it, so
    that retraining rewrites identical files."""
    config = json.loads(config_file.read_text())
    config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
