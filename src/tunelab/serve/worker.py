"""The generation worker: one thread owns the engine and the model; jobs wait in a bounded queue and
the ones for the same model that wait together run as one batch.

A job's events go to its own asyncio queue on the server's loop: ("delta", text, [logprob entries]) as
text becomes final, then ("done", finish_reason, usage), or ("error", message).
"""

import collections
import threading
import time
from dataclasses import dataclass, field

from tunelab import adapters, engines
from tunelab.errors import UserError


@dataclass
class Job:
    model: str                   # the name the request asked for: the base, or an adapter's name
    prompt: list                 # token ids
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list = field(default_factory=list)   # strings that end the answer (not included)
    stop_ids: frozenset = frozenset()          # token ids that end it (end of turn, end of text)
    top_logprobs: int = None                   # None: no log-probabilities
    deliver: object = None       # callable(event), thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFull(Exception):
    pass


class Worker(threading.Thread):
    """Loads the model (in this thread: MLX's default device is per thread) and runs batches."""

    def __init__(self, opts, adapter_paths, log):
        super().__init__(daemon=True, name="tunelab-generate")
        self.opts, self.adapter_paths, self.log = opts, adapter_paths, log
        self.pending = collections.deque()
        self.lock = threading.Condition()
        self.held = 0                 # jobs waiting or running: the queue's bound counts both
        self.ready = threading.Event()
        self.failure = None
        self.names = []               # the model names the server answers to, base first
        self.context = None           # the model's context length in tokens
        self.stopping = False
        self.largest_batch = 0        # the most jobs one batch has held (for tests and the bench)

    # ---- loading ----------------------------------------------------------------------------------------

    def run(self):
        try:
            self._load()
        except BaseException as e:   # reported to the thread that waits for `ready`
            self.failure = e
            self.ready.set()
            return
        self.ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as e:   # one batch's failure is its jobs' error; the server keeps serving
                self.log(f"error: generation failed: {type(e).__name__}: {e}")
                for job in batch:
                    job.deliver(("error", f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self._release(len(batch))

    def _load(self):
        from tunelab import models

        opts = self.opts
        self.adapters = {}
        for name, path in self.adapter_paths.items():
            spec, tensors = adapters.load(path)
            if spec.full:
                raise UserError(f"--adapter {name}={path}: a full fine-tune: serve its whole model "
                                f"({path}/model) as --model instead")
            if spec.quantization:
                raise UserError(f"--adapter {name}={path}: trained on a quantized base (QLoRA); serve the fused "
                                "model instead")
            self.adapters[name] = (spec, tensors)
        self.engine, self.model, model_dir = engines.load(opts.model, None, opts.device, opts.dtype, log=self.log,
                                                          engine=opts.engine)
        models.check_finite_weights(model_dir)
        config = models.read_config(model_dir)
        self.context = int(config.get("max_position_embeddings") or 2048)
        self.base = opts.name or _base_name(opts.model)
        self.names = [self.base, *self.adapters]
        self.attached = None          # the adapter now on the model (None: the base alone)

    def wait_ready(self):
        self.ready.wait()
        if self.failure is not None:
            raise self.failure

    # ---- the queue ----------------------------------------------------------------------------------------

    def submit(self, job):
        with self.lock:
            if self.held >= self.opts.max_queue:
                raise QueueFull()
            self.held += 1
            self.pending.append(job)
            self.lock.notify()

    def _release(self, count):
        with self.lock:
            self.held -= count

    def free_slot(self, job):
        """A client went away: its job is dropped now if it still waits (its row is dropped at the next step
        when it runs)."""
        job.cancelled.set()
        with self.lock:
            if job in self.pending:
                self.pending.remove(job)
                self.held -= 1

    def queued(self):
        with self.lock:
            return self.held

    def stop(self):
        with self.lock:
            self.stopping = True
            self.lock.notify()

    def _next_batch(self):
        """The oldest waiting job and the others for the same model that wait with it (up to --max-batch),
        after a moment's wait for more to arrive together."""
        while True:
            with self.lock:
                while not self.pending and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    return None
            time.sleep(self.opts.batch_wait)
            with self.lock:
                if not self.pending:      # its clients went away meanwhile
                    continue
                first = self.pending[0]
                batch = [job for job in self.pending if job.model == first.model][:self.opts.max_batch]
                for job in batch:
                    self.pending.remove(job)
            return batch

    # ---- generation ----------------------------------------------------------------------------------------

    def _use(self, name):
        """Put adapter `name` on the model (None or the base's name: no adapter), swapping out the one there."""
        name = None if name == self.base else name
        if name == self.attached:
            return
        if self.attached is not None:
            self.engine.remove_adapter(self.model)
        if name is not None:
            self.engine.set_adapter(self.model, *self.adapters[name])
        self.attached = name

    def _generate(self, batch):
        self.largest_batch = max(self.largest_batch, len(batch))
        self._use(batch[0].model)
        tokenizer = self.model.tokenizer
        texts = [_Text(tokenizer, job.stop) for job in batch]
        counts = [0] * len(batch)
        rows = [dict(max_tokens=j.max_tokens, temp=j.temperature, top_p=j.top_p, seed=j.seed, stop_ids=j.stop_ids)
                for j in batch]
        cancelled = set()
        want = max((j.top_logprobs or 0) for j in batch)
        wants_logprobs = any(j.top_logprobs is not None for j in batch)
        for step in self.engine.generate_steps(self.model, [j.prompt for j in batch], rows,
                                               top_logprobs=want if wants_logprobs else None, cancelled=cancelled):
            for row, (token, logprob, top) in step.items():
                job = batch[row]
                if job.cancelled.is_set():
                    cancelled.add(row)
                    continue
                counts[row] += 1
                entry = None
                if job.top_logprobs is not None:
                    entry = (token, logprob, top[:job.top_logprobs])
                delta, entries, stopped = texts[row].add(token, entry)
                if delta or entries:
                    job.deliver(("delta", delta, entries))
                if stopped:
                    cancelled.add(row)
                    job.deliver(("done", "stop", _usage(job, counts[row])))
        for row, job in enumerate(batch):
            if row in cancelled:
                continue
            delta, entries = texts[row].flush()
            if delta or entries:
                job.deliver(("delta", delta, entries))
            reason = "length" if counts[row] >= job.max_tokens else "stop"
            job.deliver(("done", reason, _usage(job, counts[row])))


def _usage(job, completion):
    return {"prompt_tokens": len(job.prompt), "completion_tokens": completion,
            "total_tokens": len(job.prompt) + completion}


def _base_name(reference):
    from pathlib import Path

    name = Path(str(reference)).name
    return name.removesuffix(".gguf") or str(reference)


class _Text:
    """One answer's text as tokens arrive: what can be sent now (complete characters, and never the start of
    a stop string that may still complete), and where a stop string ends it."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens, self.sent, self.entries = [], 0, []
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token, entry):
        self.tokens.append(token)
        if entry is not None:
            self.entries.append(entry)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):      # the rest of a multi-byte character is still to come
            return "", [], False
        for stop in self.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                delta, self.sent = text[self.sent:at], at
                return delta, self._take(), True
        ready = len(text) - self.hold
        if ready <= self.sent:
            return "", [], False
        delta, self.sent = text[self.sent:ready], ready
        return delta, self._take(), False

    def flush(self):
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        delta, self.sent = text[self.sent:], len(text)
        return delta, self._take()

    def _take(self):
        entries, self.entries = self.entries, []
        return entries
