"""The engine contract: what every compute back end provides, on numpy batches and plain files.

An engine is a module with these functions (`Model` is the engine's own handle):

  load(model_dir, device, dtype, log, training) -> Model
                                                      HF folder -> model + tokenizer on a device; with
                                                      training (the lora command), dtype auto may pick
                                                      a faster training dtype
  attach_lora(model, spec, seed)                      fresh adapters (A random, B zero); for a full
                                                      fine-tune (spec.full), spec's blocks made trainable
  set_adapter(model, spec, tensors)                   adapters from numpy tensors (adapters.load)
  adapter_tensors(model) -> {module: (A, B)}          numpy copies, for adapters.save ({weight name: array}
                                                      for a full fine-tune)
  savings(model, rows, tokens, common) -> [str]       what the training step saves, and its memory cost
                                                      (common: tokens every training row begins with)
  fill_prefix(model, batches)                         when model.prefix (the frozen-prefix cache) is not
                                                      None: compute the cached rows of these batches now,
                                                      many rows at a time, until the cache is full
  make_optimizer(model, learning_rate, name, **settings) -> Optimizer
                                                      one of optimizers.NAMES with its settings (MLX's
                                                      updates and defaults on every engine)
  sizes(model) -> (weight bytes, trained values, trained bytes)
  grad_checkpoint(model)                              from now on, trained blocks keep only their input
                                                      for the backward pass and run again in it
  training_state(model, optimizer) -> {name: array}   optimizer state and random generator states, for a
                                                      checkpoint (with the adapter, all a resumed run needs)
  load_training_state(model, optimizer, arrays)       put them back
  train_step(model, optimizer, batches, learning_rate, max_grad_norm) -> StepResult
                                                      one optimizer step on a batching.Batch, or on a list of
                                                      micro-batches (gradient accumulation): the loss is the
                                                      mean over all their supervised tokens, exactly as one
                                                      batch holding every row would give; a non-finite loss
                                                      or gradient skips the update (StepResult.finite False);
                                                      at learning_rate (the schedule's), the gradients' global
                                                      norm scaled to max_grad_norm where it is larger
  eval_loss(model, batch) -> (loss_sums, counts)     per row [B]: summed cross-entropy over its
                                                      supervised tokens, and their number
  generate(model, prompt_ids, max_tokens, temp, top_p, seed, stop_ids)
                                                      yields token ids one at a time
  generate_batch(model, prompts, max_tokens, temp, top_p, seed, stop_ids) -> [[token ids]]
                                                      several prompts at once; each answer equals
                                                      what `generate` gives for that prompt alone
  generate_steps(model, prompts, rows, top_logprobs, cancelled)
                                                      a step at a time, each prompt with its own settings:
                                                      yields {row: (token, logprob, top tokens)}
  remove_adapter(model)                               the base model again, as loaded
  fuse(model, save_dir)                               merged HF folder (safetensors)
  peak_memory() -> int                                bytes (device memory, or resident set on CPU)
  clear_cache(threshold)                              free the allocator's cached memory past threshold bytes
                                                      (None: the engine's default)

Everything above this line (data, the training loop, reports, files) is engine-neutral.
"""

import resource
import sys
from dataclasses import dataclass


@dataclass
class StepResult:
    loss: float              # mean cross-entropy over the batch's supervised tokens
    supervised_tokens: int
    finite: bool = True      # False: the loss or a gradient was NaN or infinite, and the step was not applied
    grad_norm: float = None  # global norm of the gradients, before any clipping


def resident_peak():
    """Peak resident memory of this process in bytes (ru_maxrss is bytes on macOS, KiB elsewhere)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
