"""`HarmonTrainer` and `HarmonTrainingArguments`: transformers' Trainer with Harmon's two tasks.

What differs from the stock Trainer:

- the training dataloader uses `MixedTaskBatchSampler` when the dataset is a `MixedTaskDataset` (single-task
  batches at `task_ratio`, aligned across ranks);
- `compute_loss` stashes the per-task losses (`loss_i2t`, `loss_t2i`) and the count of skipped broken images, and
  `log` adds their means since the previous log (averaged over all processes) to the logs;
- the text-to-image randomness (order, mask ratio, timesteps, noise) is drawn from a generator seeded by
  `(seed, step, micro-batch, rank)`, so an interrupted run resumes with exactly the same draws;
- the VAE is always frozen;
- weight decay follows upstream: none on biases, 1-D parameters and the diffusion head
  (`get_decay_parameter_names`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import seed_worker

from .data import IMAGE_TO_TEXT, TASKS, MixedTaskDataset
from .sampler import TASK_ALIASES, MixedTaskBatchSampler, parse_task_ratio

logger = logging.getLogger(__name__)

_TASK_LOSSES = ("loss_i2t", "loss_t2i")


@dataclass
class HarmonTrainingArguments(TrainingArguments):
    """`TrainingArguments` with upstream Harmon's optimisation defaults and the task-mixing options.

    Changed defaults: `learning_rate` 1e-4, `adam_beta2` 0.95, `weight_decay` 0.02, `lr_scheduler_type` "cosine",
    `warmup_steps` 0.01 (a ratio), `max_grad_norm` 1.0, `remove_unused_columns` False (the collator's keys are
    exactly `forward`'s), `ddp_find_unused_parameters` True (each task leaves some parameters unused).
    """

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (upstream 1e-4)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (upstream 0.95)."})
    weight_decay: float = field(
        default=0.02, metadata={"help": "AdamW weight decay (upstream 0.02; never on biases, 1-D params, the head)."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warmup."})
    warmup_steps: float = field(default=0.01, metadata={"help": "Warmup steps, or a ratio of all steps if < 1."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the Harmon collator already yields forward's arguments."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=True, metadata={"help": "DDP: each task leaves parameters unused, so this must stay True."}
    )
    task_ratio: str = field(
        default="image2text:1,text2image:4",
        metadata={"help": "Batches per cycle of each task, e.g. 'image2text:1,text2image:4' (upstream 1:4)."},
    )
    task_order: str = field(
        default="sequential",
        metadata={
            "help": "Order of the tasks within a cycle: 'sequential' or 'random'.",
            "choices": ["sequential", "random"],
        },
    )
    steps_per_epoch: int | None = field(
        default=None, metadata={"help": "Batches per rank in an epoch (default: until every task saw its data)."}
    )
    group_by_length_tasks: str = field(
        default="image2text",
        metadata={
            "help": "With train_sampling_strategy='group_by_length': the tasks whose batches are grouped by text "
            "length (comma-separated). Understanding conversations vary in length; generation prompts are short, "
            "so by default their batches stay as drawn."
        },
    )
    t2i_seed_per_step: bool = field(
        default=True,
        metadata={
            "help": "Draw the text-to-image randomness from a generator seeded by (seed, step, micro-batch, rank)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_task_ratio(self.task_ratio)  # fail early on a malformed ratio
        unknown = [t for t in self.grouped_tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"group_by_length_tasks names unknown tasks {unknown}; use {TASKS}.")

    @property
    def grouped_tasks(self) -> list[str]:
        """`group_by_length_tasks` as a list of task names (the short names of `task_ratio` accepted)."""
        names = [part.strip() for part in (self.group_by_length_tasks or "").split(",") if part.strip()]
        return [TASK_ALIASES.get(name, name) for name in names]


class HarmonTrainer(Trainer):
    """Trainer for `HarmonForConditionalGeneration` on `MixedTaskDataset` + `HarmonDataCollator` batches.

    Extra log keys: `loss_i2t` and `loss_t2i` (mean per-batch task losses since the previous log over all processes;
    absent when no batch of that task ran) and `skipped_images` (broken examples replaced so far, all processes).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The VAE is frozen in every Harmon stage (its encoder only provides targets and understanding inputs).
        unfrozen = [p for name, p in self.model.named_parameters() if ".vae." in f".{name}" and p.requires_grad]
        for param in unfrozen:
            param.requires_grad_(False)
        if unfrozen:
            logger.info(f"Froze the {len(unfrozen)} VAE parameter tensors (the VAE never trains).")
        self._task_sums = torch.zeros(len(_TASK_LOSSES), dtype=torch.float64)
        self._task_counts = torch.zeros(len(_TASK_LOSSES), dtype=torch.float64)
        self._skipped_pending = 0
        self.skipped_images = 0
        self._micro_step = (-1, 0)
        self.train_batch_sampler: MixedTaskBatchSampler | None = None

    # ----- data ----------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        """A `MixedTaskBatchSampler` dataloader for a `MixedTaskDataset` (other datasets: the stock dataloader)."""
        dataset = self.train_dataset
        if not isinstance(dataset, MixedTaskDataset):
            return super().get_train_dataloader()
        args = self.args
        seed = args.data_seed if args.data_seed is not None else args.seed
        strategy = getattr(args, "train_sampling_strategy", "random")
        if strategy not in ("random", "sequential", "group_by_length"):
            raise ValueError(
                f"train_sampling_strategy={strategy!r} is not supported with mixed-task data; use 'random', "
                "'sequential' or 'group_by_length'."
            )
        lengths = None
        if strategy == "group_by_length":
            grouped = getattr(args, "grouped_tasks", [IMAGE_TO_TEXT])
            lengths = {t: ds.text_lengths() for t, ds in dataset.datasets.items() if t in grouped}
        sampler = MixedTaskBatchSampler(
            dataset.task_sizes(),
            batch_size=self._train_batch_size,
            ratio=getattr(args, "task_ratio", None),
            num_replicas=args.world_size,
            seed=seed,
            shuffle=strategy != "sequential",
            order=getattr(args, "task_order", "sequential"),
            steps_per_epoch=getattr(args, "steps_per_epoch", None),
            lengths=lengths,
        )
        dataset.register_sampler(sampler)
        self.train_batch_sampler = sampler
        if args.gradient_accumulation_steps % sampler.cycle_length:
            logger.info(
                f"Task cycle: {sampler.ratio} ({sampler.cycle_length} steps); gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps} is not a multiple, so optimizer steps see varying task mixes."
            )
        params: dict[str, Any] = {
            "batch_sampler": sampler,
            "collate_fn": self.data_collator,
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            "worker_init_fn": partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
        }
        if args.dataloader_num_workers > 0 and args.dataloader_prefetch_factor is not None:
            params["prefetch_factor"] = args.dataloader_prefetch_factor
        return self.accelerator.prepare(DataLoader(dataset, **params))

    # ----- loss ----------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """`model(**inputs).loss` (sum of the task losses); stashes the detached task losses for `log`."""
        inputs = dict(inputs)
        skipped = inputs.pop("num_skipped_images", 0)
        training = model.training
        if training:
            self._skipped_pending += int(skipped)
            if getattr(self.args, "t2i_seed_per_step", False) and "generator" not in inputs:
                if inputs.get("generation_input_ids") is not None:
                    inputs["generator"] = self._step_generator()
        outputs = model(**inputs)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if loss is None:
            raise ValueError(f"The model returned no loss for a batch with keys {sorted(inputs)}.")
        if training:
            for i, key in enumerate(_TASK_LOSSES):
                value = outputs.get(key) if isinstance(outputs, dict) else getattr(outputs, key, None)
                if value is not None:
                    self._task_sums[i] += float(value.detach().float())
                    self._task_counts[i] += 1
        return (loss, outputs) if return_outputs else loss

    def _step_generator(self) -> torch.Generator:
        # One generator per micro-batch, seeded by (seed, optimizer step, micro-batch within the step, rank): the same
        # draws in a resumed run, different draws on each rank.
        step = self.state.global_step
        micro = self._micro_step[1] + 1 if self._micro_step[0] == step else 0
        self._micro_step = (step, micro)
        seed = hash((self.args.seed, step, micro, self.args.process_index)) % (2**63)
        return torch.Generator().manual_seed(seed)

    # ----- logging -------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add `loss_i2t`, `loss_t2i` (means since the last log, over all processes) and `skipped_images`."""
        if "loss" in logs:
            stats = torch.cat([self._task_sums, self._task_counts, torch.tensor([float(self._skipped_pending)])])
            stats = stats.to(self.args.device, torch.float32 if self.args.device.type == "mps" else torch.float64)
            if self.args.world_size > 1:
                stats = self.accelerator.reduce(stats, reduction="sum")
            stats = stats.cpu()
            n = len(_TASK_LOSSES)
            for i, key in enumerate(_TASK_LOSSES):
                if stats[n + i] > 0:
                    logs[key] = round(float(stats[i] / stats[n + i]), 6)
            self.skipped_images += int(stats[2 * n])
            logs["skipped_images"] = self.skipped_images
            self._task_sums.zero_()
            self._task_counts.zero_()
            self._skipped_pending = 0
        super().log(logs, start_time)

    # ----- optimizer -----------------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Parameters with weight decay: every parameter of 2 or more dimensions except biases and the diffusion
        head (upstream MAR/Harmon rule); 1-D parameters (norms, biases) get none."""
        return [
            name
            for name, param in model.named_parameters()
            if param.ndim >= 2 and not name.endswith(".bias") and "diffusion_head." not in name
        ]

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """6 x (non-embedding parameters) x (text tokens of both tasks); image rows are not counted."""
        tokens = sum(
            int(inputs[key].numel())
            for key in ("input_ids", "generation_input_ids")
            if isinstance(inputs.get(key), torch.Tensor)
        )
        if not tokens or not hasattr(self.model, "num_parameters"):
            return 0
        if not hasattr(self, "_num_params_no_embeddings"):
            self._num_params_no_embeddings = self.model.num_parameters(exclude_embeddings=True)
        return 6 * tokens * self._num_params_no_embeddings


__all__ = ["HarmonTrainer", "HarmonTrainingArguments"]
