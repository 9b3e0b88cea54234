"""Time SafeRL's GSPO optimisation step against TRL's GRPOTrainer on the same model, batch and completions.

One batch is sampled once (HF `generate`, seeded) from the tiny toy-world policy: `--prompts` training prompts
x `--group` completions each, up to `--max-new-tokens` tokens, with group-normalised random rewards as
advantages. Both sides then run full optimisation steps on exactly that batch, from the same weights:

  SafeRL  `PolicyTrainer(loss="gspo", minibatches=1, micro_batch_size=B).train_step(TrainBatch)`: whatever
          it computes (forward(s), GSPO loss, entropy and health metrics), backward, clip, AdamW step.
  TRL     `GRPOTrainer(importance_sampling_level="sequence", loss_type="grpo", beta=0)`: `training_step` with
          `_prepare_inputs` bypassed so the pre-made completions go straight in (no generation, no reward
          call, old log-probs = the detached current ones as TRL itself does here), then what the HF Trainer
          loop does after it: `accelerator.clip_grad_norm_`, `optimizer.step()` (TRL's default optimizer).

The same work on both sides: the same sequences, one micro-batch of all B rows, float32, one forward with the
LM head on the completion positions only, the same metrics (per-token entropy, clip fractions; no KL, no
reference model), backward, gradient clipping at 1.0 and one AdamW step, giving the same gradients. The layouts
differ: TRL pads prompts left and completions right; SafeRL packs the batch into one unpadded row, each prompt
once with its group's completions behind it (per-segment attention: the same positions and attention per
completion; `batching.pack_batch`, `trainer.packed_attention`), and its LM head runs in chunks from the hidden
states (`trainer.logprobs`). TRL's fused LM head scores only the completion positions where
Triton is available (GPUs) but every position, prompt included, elsewhere; on CPU that would be extra work
for TRL alone, so the benchmark puts TRL in its GPU mode (`trl.trainer.utils._use_triton` -> True: the same
torch tiles, on the completion positions only). TRL passes no position ids (its RoPE positions start at the
first pad of a left-padded row, ours at the first real token), which RoPE's relative form makes equal up to
rounding.

Physical limit: the model FLOPs of the update (3 x the forward of every sequence's real tokens, prompt and
completion, as if run alone: the linear layers, causal attention scores and the LM head on the completion
positions; the convention of MFU, whatever an implementation skips or recomputes) over each side's median time,
against a one-thread matmul rate measured in the same run (`calibrate_matmul`: the best of a large square
matmul and the model's own MLP shape).

Warm-up steps, then timed steps interleaved (ours, TRL, ours, TRL, ...) so machine drift hits both. The
first step of each side starts from identical weights, so its losses and clipped gradients (caught by an
optimizer step pre-hook) are compared: the two implement the same maths, so the script exits 1 unless
|loss difference| <= LOSS_ATOL and max |gradient difference| <= GRAD_RTOL x max |gradient| (float32
rounding of different summation orders; printed with the measured values). The loss itself is ~0 (the ratio
is exactly 1 and group-normalised advantages average to 0), so the gradients are the real check. One torch
thread everywhere.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trainer_vs_trl.py [--steps 10] [--random-qwen3-vocab]
        [--out benchmarks/results/trainer_vs_trl.md]
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

for _k, _v in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402
from record import recorded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QWEN3_VOCAB = 151_936
LOSS_ATOL = 1e-6  # the loss is a mean of O(1) advantages times a ratio of exactly 1
GRAD_RTOL = 1e-4  # of the largest gradient entry: float32 rounding, not a different formula


def toyworld_part(name: str) -> str:
    """A part (policy, train, ...) of the default toy world, built when missing (as `train.resolve`)."""
    from saferl.config import SafeRLConfig
    from saferl.toyworld.build import ensure_built

    cfg = SafeRLConfig().toyworld
    cfg = dataclasses.replace(cfg, cache_dir=str(ROOT / cfg.cache_dir))  # whatever the working directory
    return str(ensure_built(cfg).part(name))


def random_qwen3(src: str, out: str) -> str:
    """A randomly initialised copy of `src`'s architecture with Qwen3's real 151,936-token vocabulary."""
    from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

    config = AutoConfig.from_pretrained(src)
    config.vocab_size = QWEN3_VOCAB
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)  # toy token ids are valid in the larger vocab
    return out


def make_batch(model_path: str, prompts_path: str, n_prompts: int, group: int, max_new: int, seed: int
               ) -> tuple[list[list[int]], list[list[int]], list[float]]:
    """Prompt ids (one per sequence), completion ids (ending at EOS when sampled) and advantages."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    lines = Path(prompts_path).read_text().splitlines()
    rows = [json.loads(line) for line in lines[:: max(1, len(lines) // n_prompts)][:n_prompts]]  # spread out
    prompts, completions = [], []
    torch.manual_seed(seed)
    for row in rows:
        text = tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new, num_return_sequences=group,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for seq in out[:, len(ids):].tolist():
            end = seq.index(tok.eos_token_id) + 1 if tok.eos_token_id in seq else len(seq)
            prompts.append(ids)
            completions.append(seq[:end])
    rewards = torch.rand(len(rows), group, generator=torch.Generator().manual_seed(seed))
    adv = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    return prompts, completions, adv.flatten().tolist()


def trl_inputs(prompts: list[list[int]], completions: list[list[int]], advantages: list[float], pad: int
               ) -> dict[str, torch.Tensor]:
    """What `GRPOTrainer._generate_and_score_completions` returns: prompts left-, completions right-padded."""
    p_len, c_len = max(map(len, prompts)), max(map(len, completions))
    p_ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts])
    p_mask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in prompts])
    c_ids = torch.tensor([c + [pad] * (c_len - len(c)) for c in completions])
    c_mask = torch.tensor([[1] * len(c) + [0] * (c_len - len(c)) for c in completions])
    return {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "completion_mask": c_mask,
            "advantages": torch.tensor(advantages), "num_items_in_batch": c_mask.sum()}


def build_trl(model_path: str, batch: int, group: int, max_new: int, out_dir: str):  # -> trl.GRPOTrainer
    """A GRPOTrainer set up for GSPO, its optimizer created, with generation bypassed."""
    import trl.trainer.utils
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    # Project only the completion positions through the LM head, as TRL does on GPUs (see the docstring).
    trl.trainer.utils._use_triton = lambda device: True

    def zero_reward(completions: list, **_: object) -> list[float]:
        return [0.0] * len(completions)

    args = GRPOConfig(output_dir=out_dir, importance_sampling_level="sequence", loss_type="grpo", beta=0.0,
                      epsilon=3e-4, epsilon_high=4e-4, num_generations=group,
                      per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                      steps_per_generation=1, num_iterations=1, learning_rate=1e-6, weight_decay=0.0,
                      max_grad_norm=1.0, temperature=1.0, max_completion_length=max_new, use_cpu=True,
                      bf16=False, report_to=[], logging_steps=10**9, save_strategy="no", seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}] * batch)
    trainer = GRPOTrainer(model=model, reward_funcs=zero_reward, args=args, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(model_path))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop, which we do not run
    trainer._prepare_inputs = lambda inputs: inputs  # the batch is already "generated and scored"
    torch.set_num_threads(1)
    return trainer


def trl_step(trainer, inputs: dict[str, torch.Tensor]) -> float:
    """`training_step` (loss + backward) and the HF loop's clip / optimizer step; returns the loss."""
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.training_step(trainer.model, inputs, inputs["num_items_in_batch"])
    trainer.accelerator.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    return float(loss)


def build_ours(model_path: str, batch: int, seed: int):  # -> PolicyTrainer
    """SafeRL's trainer for one GSPO step per batch, the whole batch in one micro-batch (as TRL's side)."""
    from saferl.trainer.policy import PolicyTrainer

    return PolicyTrainer(model=model_path, lr=1e-6, minibatches=1, micro_batch_size=batch, loss="gspo",
                         clip_low=3e-4, clip_high=4e-4, aggregation="seq-mean-token-mean", temperature=1.0,
                         dtype="float32", seed=seed)


def ours_parts(trainer) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The trained module and its optimizer (a single rank's plain-torch engine)."""
    return trainer.engine.module, trainer.engine.optimizer


def capture_grads(opt: torch.optim.Optimizer) -> tuple[dict[int, torch.Tensor], object]:
    """Record each parameter's (clipped) gradient when `opt.step` starts; returns (grads, hook)."""
    grads: dict[int, torch.Tensor] = {}

    def hook(optimizer: torch.optim.Optimizer, *_: object) -> None:
        grads.update({id(p): p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]
                      if p.grad is not None})
    return grads, opt.register_step_pre_hook(hook)


def differences(ours: torch.nn.Module, theirs: torch.nn.Module, g_ours: dict[int, torch.Tensor],
                g_theirs: dict[int, torch.Tensor]) -> tuple[float, float, float]:
    """Max |grad difference|, max |grad| and max |weight difference|, parameters matched by name."""
    theirs_by_name = dict(theirs.named_parameters())
    dg = g = dw = 0.0
    for name, a in ours.named_parameters():
        b = theirs_by_name[name]
        dw = max(dw, float((a.detach() - b.detach()).abs().max()))
        if id(a) in g_ours and id(b) in g_theirs:
            dg = max(dg, float((g_ours[id(a)] - g_theirs[id(b)]).abs().max()))
            g = max(g, float(g_ours[id(a)].abs().max()))
    return dg, g, dw


def calibrate_matmul(hidden: int, intermediate: int, repeats: int = 5) -> float:
    """This thread's float32 matmul rate (FLOP/s): the best of `repeats` runs of a 1024^3 matmul and of the
    model's MLP shape ([2048, hidden] x [hidden, intermediate]), the ceiling its update can reach."""
    best = 0.0
    gen = torch.Generator().manual_seed(0)
    for m, k, n in ((1024, 1024, 1024), (2048, hidden, intermediate)):
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def update_flops(config, prompts: list[list[int]], completions: list[list[int]], shared_prompts: bool = False
                 ) -> float:
    """Model FLOPs of one update over these sequences: 3 x the forward (forward + backward = 2 x forward) of
    each sequence's real tokens: per layer the q/k/v/o and MLP matmuls and the causal attention scores, plus the
    LM head on each completion token. With `shared_prompts` a prompt repeated in consecutive sequences (a group)
    counts once, as SafeRL runs it."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = config.head_dim or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    linear = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * 3 * h * inter  # per token per layer

    def tokens(first: int, n: int) -> float:  # positions first .. first + n - 1: matmuls and attention scores
        keys = n * first + n * (n + 1) / 2  # each position attends to itself and all before it
        return layers * (linear * n + 2 * 2 * q * keys)

    forward, previous = 0.0, None
    for p, c in zip(prompts, completions):
        if not (shared_prompts and p == previous):
            forward += tokens(0, len(p))
        forward += tokens(len(p), len(c)) + 2 * config.vocab_size * h * len(c)
        previous = p
    return 3 * forward


def same_maths(loss_ours: float, loss_trl: float, dg: float, g: float, ent_ours: float, ent_trl: float
               ) -> list[str]:
    """The checks of the first step (identical weights) that failed, each with its measured value."""
    failed = []
    if not abs(loss_ours - loss_trl) <= LOSS_ATOL:  # `not <=` also catches NaN
        failed.append(f"loss differs by {abs(loss_ours - loss_trl):.3e} > {LOSS_ATOL:.0e}")
    if not dg <= GRAD_RTOL * g:
        failed.append(f"gradients differ by {dg:.3e} > {GRAD_RTOL:.0e} x max |grad| {g:.3e}")
    if not abs(ent_ours - ent_trl) <= GRAD_RTOL * abs(ent_trl):
        failed.append(f"entropy metric {ent_ours:.6f} against TRL's {ent_trl:.6f}")
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF causal LM dir (default: the toy-world policy, built if missing)")
    ap.add_argument("--prompts-file", help="jsonl with `messages` (default: the toy-world train split)")
    ap.add_argument("--random-qwen3-vocab", action="store_true",
                    help="time a random init of the model's architecture with Qwen3's 151,936-token vocab "
                         "(same sampled token ids); shows the cost of a realistic LM head")
    ap.add_argument("--prompts", type=int, default=4, help="prompts in the batch")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (TRL num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side (incl. the checked first)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the output, command and date to this Markdown file")
    a = ap.parse_args()
    with recorded(a.out):
        failed = run(a)
    return 1 if failed else 0


def run(a: argparse.Namespace) -> list[str]:
    """Check the first step, time the rest, print both; returns the failed checks."""
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from saferl.types import TrainBatch

    tmp = tempfile.mkdtemp(prefix="trainer-vs-trl-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    sample_path = a.model or toyworld_part("policy")
    model_path = random_qwen3(sample_path, f"{tmp}/model") if a.random_qwen3_vocab else sample_path
    prompts, completions, adv = make_batch(sample_path, a.prompts_file or toyworld_part("train"), a.prompts,
                                           a.group, a.max_new_tokens, a.seed)
    n = len(prompts)
    batch = TrainBatch(input_ids=[p + c for p, c in zip(prompts, completions)],
                       prompt_lens=list(map(len, prompts)),
                       old_logprobs=[[0.0] * len(c) for c in completions], advantages=adv)
    ours = build_ours(model_path, n, a.seed)
    trl = build_trl(model_path, n, a.group, a.max_new_tokens, f"{tmp}/trl")
    inputs = trl_inputs(prompts, completions, adv, ours.tokenizer.pad_token_id)
    torch.set_num_threads(1)

    # Step 1 of each side, from identical weights: the correctness check (and the first warm-up step).
    our_model, our_opt = ours_parts(ours)
    (g_ours, h_ours), (g_trl, h_trl) = capture_grads(our_opt), capture_grads(trl.optimizer)
    metrics = ours.train_step(batch)
    loss_ours = metrics.get("pg_loss", float("nan"))
    loss_trl = trl_step(trl, inputs)
    ent_ours, ent_trl = metrics.get("entropy", float("nan")), trl._metrics["train"]["entropy"][-1]
    h_ours.remove()
    h_trl.remove()
    dg, g, dw = differences(our_model, trl.model, g_ours, g_trl)
    sides = {"SafeRL": lambda: ours.train_step(batch), "TRL GRPOTrainer": lambda: trl_step(trl, inputs)}
    for _ in range(a.warmup - 1):
        for step in sides.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(a.steps):  # interleaved: ours, TRL, ours, TRL, ...
        for name, step in sides.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    matmul = calibrate_matmul(our_model.config.hidden_size, our_model.config.intermediate_size)
    tokens = sum(map(len, completions))
    params = sum(p.numel() for p in our_model.parameters())
    opt = trl.optimizer
    label = "random Qwen3-vocab model" if a.random_qwen3_vocab else "toy policy"
    vocab, longest = our_model.config.vocab_size, max(map(len, completions))
    print(f"\nGSPO optimisation step, {label} ({params / 1e6:.2f}M params, vocab {vocab}), B={n} "
          f"({a.prompts}x{a.group}), mean completion {tokens / n:.1f} tokens (max {longest}), "
          f"mean prompt {sum(map(len, prompts)) / n:.1f}, {a.steps} timed steps")
    print(f"optimizers: TRL {type(opt).__name__} (optim={trl.args.optim}, fused={opt.defaults.get('fused')}),"
          f" SafeRL {type(our_opt).__name__} (fused={our_opt.defaults.get('fused')}); "
          f"torch threads {torch.get_num_threads()}; tokens/s = response tokens / median s")
    print("LM head on completion positions only, both sides (TRL in the mode it uses on GPUs)")
    flops = update_flops(our_model.config, prompts, completions)
    print(f"{'':17}{'median s':>10}{'mean s':>10}{'tokens/s':>10}{'model GFLOP/s':>15}{'of matmul':>11}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:17}{med:10.4f}{statistics.mean(ts):10.4f}{tokens / med:10.0f}{flops / med / 1e9:15.2f}"
              f"{flops / med / matmul:11.0%}")
    ratio = statistics.median(times["SafeRL"]) / statistics.median(times["TRL GRPOTrainer"])
    print(f"ratio SafeRL/TRL (median): {ratio:.2f}x (goal <= 0.5)")
    shared = update_flops(our_model.config, prompts, completions, shared_prompts=True)
    print(f"model FLOPs per update {flops / 1e9:.2f} G (3 x forward of every sequence's real tokens); one-thread "
          f"matmul calibration {matmul / 1e9:.2f} GFLOP/s (this run). SafeRL runs each prompt once per group: "
          f"{shared / 1e9:.2f} G of them, {shared / flops:.0%}")
    print(f"first step, identical weights and batch (tolerances: loss {LOSS_ATOL:.0e} absolute; gradients and "
          f"the entropy metric {GRAD_RTOL:.0e} relative):")
    print(f"  loss              SafeRL {loss_ours:.3e}  TRL {loss_trl:.3e}  "
          f"|diff| {abs(loss_ours - loss_trl):.3e}")
    print(f"  clipped gradients max |diff| {dg:.3e}  max |grad| {g:.3e}  relative {dg / max(g, 1e-30):.3e}")
    print(f"  entropy (metric)  SafeRL {ent_ours:.6f}  TRL {ent_trl:.6f}")
    print(f"  max |dW| after the step {dw:.3e} (not checked: AdamW's first update is ~lr = 1e-6 per weight, "
          "whatever the gradient's size)")
    failed = same_maths(loss_ours, loss_trl, dg, g, ent_ours, ent_trl)
    print("same maths: " + ("yes" if not failed else "NO: " + "; ".join(failed)))
    return failed


if __name__ == "__main__":
    sys.exit(main())
