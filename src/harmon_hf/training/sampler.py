"""`MixedTaskBatchSampler`: single-task batches of understanding and generation data mixed at a fixed ratio."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from .data import TASKS

Key = tuple[str, int, int]


# Short task names accepted wherever a task is named (task_ratio, group_by_length_tasks).
TASK_ALIASES = {"i2t": "image2text", "t2i": "text2image", "und": "image2text", "gen": "text2image"}


def parse_task_ratio(ratio: str | Mapping[str, int | float] | None) -> dict[str, int]:
    """`"image2text:1,text2image:4"` (or a dict) -> `{"image2text": 1, "text2image": 4}`; zero entries are dropped.

    The short names `i2t` / `t2i` are accepted too.
    """
    if ratio is None or ratio == "":
        return {task: 1 for task in TASKS}
    if isinstance(ratio, str):
        items = {}
        for part in ratio.replace(";", ",").split(","):
            if not part.strip():
                continue
            name, sep, value = part.replace("=", ":").partition(":")
            if not sep:
                raise ValueError(f"task_ratio entries look like 'image2text:1', got {part!r} in {ratio!r}.")
            items[name.strip()] = value.strip()
        ratio = items
    parsed: dict[str, int] = {}
    for name, value in ratio.items():
        task = TASK_ALIASES.get(name, name)
        if task not in TASKS:
            raise ValueError(f"Unknown task {name!r} in task_ratio; use {TASKS}.")
        number = float(value)
        if number != int(number) or number < 0:
            raise ValueError(f"task_ratio values must be non-negative integers (batches per cycle), got {value!r}.")
        if int(number) > 0:
            parsed[task] = int(number)
    if not parsed:
        raise ValueError(f"task_ratio {ratio!r} gives no task a positive share.")
    return parsed


class MixedTaskBatchSampler:
    """Batches of `(task, index, seed)` keys for `MixedTaskDataset`, every batch from one task.

    Batches come in cycles of `sum(ratio)` steps, e.g. with `{"image2text": 1, "text2image": 4}` one understanding
    step and four generation steps (in this order, or shuffled per cycle with `order="random"`); set
    `gradient_accumulation_steps` to the cycle length to give every optimizer step the exact upstream mix.

    Distributed training: the sampler emits `num_replicas` consecutive batches of the same task for every step, and
    accelerate's `BatchSamplerShard` hands batch `r` of each group to rank `r`. So all ranks run the same task at the
    same step and see disjoint examples. The order depends only on `seed` and the epoch, so every rank (and a
    resumed run) computes the same sequence.

    Each task draws from its own shuffled stream of its dataset (reshuffled when used up). An epoch lasts until the
    task that needs the most cycles has seen all its examples once (`steps_per_epoch` overrides this); the other
    tasks wrap around. Each key carries a fresh 63-bit seed for the example's random choices.

    Args:
        task_sizes: examples per task, e.g. `MixedTaskDataset.task_sizes()`.
        batch_size: examples per batch per rank.
        ratio: batches per cycle for each task (tasks missing from `task_sizes` are dropped).
        num_replicas: data-parallel processes.
        seed: base seed of the shuffles and example seeds.
        shuffle: shuffle each task's examples (otherwise in order).
        order: `"sequential"` (tasks in the order of `ratio` within a cycle) or `"random"` (shuffled per cycle).
        steps_per_epoch: batches per rank in an epoch, rounded up to whole cycles.
        lengths: per task, a length for every example (e.g. `ImageTextDataset.text_lengths()`): the task's batches
            are then grouped by length like transformers' `LengthGroupedSampler` (`train_sampling_strategy=
            "group_by_length"`): each run of `group_size` batches from the shuffled stream is sorted by length,
            cut into batches, and those batches are shuffled: a batch pads to a similar length, and the task reads
            the same stream of examples, reordered within each run.
        group_size: batches per sorted run (transformers uses 50).
    """

    drop_last = False

    def __init__(
        self,
        task_sizes: Mapping[str, int],
        batch_size: int,
        ratio: str | Mapping[str, int] | None = None,
        num_replicas: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        order: str = "sequential",
        steps_per_epoch: int | None = None,
        lengths: Mapping[str, Sequence[int]] | None = None,
        group_size: int = 50,
    ):
        if batch_size < 1 or num_replicas < 1:
            raise ValueError(f"batch_size and num_replicas must be >= 1, got {batch_size} and {num_replicas}.")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}.")
        if order not in ("sequential", "random"):
            raise ValueError(f"order must be 'sequential' or 'random', got {order!r}.")
        ratio = parse_task_ratio(ratio)
        self.ratio = {task: n for task, n in ratio.items() if task_sizes.get(task, 0) > 0}
        if not self.ratio:
            raise ValueError(f"None of the tasks in the ratio {ratio} has data (sizes {dict(task_sizes)}).")
        self.task_sizes = {task: int(task_sizes[task]) for task in self.ratio}
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.seed = seed
        self.shuffle = shuffle
        self.order = order
        self.epoch = 0
        self.group_size = group_size
        self.lengths: dict[str, list[int]] = {}
        for task, values in (lengths or {}).items():
            if task not in self.task_sizes:
                continue
            if len(values) != self.task_sizes[task]:
                raise ValueError(f"lengths[{task!r}] has {len(values)} entries for {self.task_sizes[task]} examples.")
            self.lengths[task] = [int(v) for v in values]
        cycle = sum(self.ratio.values())
        if steps_per_epoch is None:
            per_step = batch_size * num_replicas
            self.num_cycles = max(math.ceil(size / (per_step * self.ratio[t])) for t, size in self.task_sizes.items())
        else:
            self.num_cycles = max(1, math.ceil(steps_per_epoch / cycle))

    @property
    def cycle_length(self) -> int:
        """Steps per cycle (`sum(ratio)`)."""
        return sum(self.ratio.values())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches over all ranks (each rank gets `len(self) // num_replicas`)."""
        return self.num_cycles * self.cycle_length * self.num_replicas

    def task_schedule(self) -> list[str]:
        """The task of every step (per rank) of the current epoch."""
        generator = torch.Generator().manual_seed(self._seed(0, 0))
        pattern = [task for task, n in self.ratio.items() for _ in range(n)]
        schedule: list[str] = []
        for _ in range(self.num_cycles):
            if self.order == "random":
                schedule += [pattern[i] for i in torch.randperm(len(pattern), generator=generator).tolist()]
            else:
                schedule += pattern
        return schedule

    def __iter__(self) -> Iterator[list[Key]]:
        batches = {task: self._batches(task) for task in self.ratio}
        seeds = torch.Generator().manual_seed(self._seed(1, 0))
        for task in self.task_schedule():
            for _ in range(self.num_replicas):
                indices = next(batches[task])
                example_seeds = torch.randint(0, 2**63 - 1, (self.batch_size,), generator=seeds).tolist()
                yield [(task, index, s) for index, s in zip(indices, example_seeds)]

    def _batches(self, task: str) -> Iterator[list[int]]:
        stream = self._stream(task)
        lengths = self.lengths.get(task)
        if lengths is None:
            while True:
                yield [next(stream) for _ in range(self.batch_size)]
        task_id = 2 + len(self.ratio) + list(self.ratio).index(task)
        run = 0
        while True:
            group = [next(stream) for _ in range(self.batch_size * self.group_size)]
            group.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order
            cut = [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
            generator = torch.Generator().manual_seed(self._seed(task_id, run))
            yield from (cut[i] for i in torch.randperm(len(cut), generator=generator).tolist())
            run += 1

    def _stream(self, task: str) -> Iterator[int]:
        size = self.task_sizes[task]
        task_id = 2 + list(self.ratio).index(task)
        rounds = 0
        while True:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self._seed(task_id, rounds))
                yield from torch.randperm(size, generator=generator).tolist()
            else:
                yield from range(size)
            rounds += 1

    def _seed(self, stream: int, rounds: int) -> int:
        # A distinct, reproducible seed per (base seed, epoch, stream, pass over the data).
        return hash((self.seed, self.epoch, stream, rounds)) % (2**63)


__all__ = ["MixedTaskBatchSampler", "TASK_ALIASES", "parse_task_ratio"]
