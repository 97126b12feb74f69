"""The DP-sharded, seeded, resumable prompt sampler, and the loader that reads its batches.

The cursor (epoch, batch in epoch) is the same on every DP rank; a resume continues
exactly where the saved run would have. Order, sharding and cursor: docs/data.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # for hints only: prompts.py does not need this module
    from tip_megatron.data.prompts import PromptDataset
    from tip_megatron.data.sources import PromptRecord


class PromptSampler:
    """This DP rank's prompt indices, one batch of `prompts_per_rank` per `next()`.

    Epoch `e` is the permutation `default_rng([seed, e])` of all prompts (identity when
    `shuffle=False`), cut into `num_prompts // (prompts_per_rank * dp_size)` global
    batches; the remainder of each epoch is dropped so no global batch repeats a prompt.
    Rank `r` takes the `r`-th block of `prompts_per_rank` of each global batch. After the
    last batch of an epoch the next epoch starts. The cursor is (epoch, batch_in_epoch),
    the same on every rank.
    """

    def __init__(self, num_prompts: int, *, prompts_per_rank: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        if prompts_per_rank < 1:
            raise ValueError(f"prompts_per_rank={prompts_per_rank}: must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        self.num_prompts, self.prompts_per_rank = num_prompts, prompts_per_rank
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.global_batch = prompts_per_rank * dp_size
        self.batches_per_epoch = num_prompts // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_prompts} prompts cannot fill one global batch of "
                             f"prompts_per_rank * dp_size = {self.global_batch}")
        self.epoch = self.batch_in_epoch = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """[num_prompts] prompt order of `epoch` (cached for the current epoch)."""
        if self._perm is None or self._perm[0] != epoch:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)
            else:
                order = np.arange(self.num_prompts)
            self._perm = (epoch, order)
        return self._perm[1]

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[int]:
        start = self.batch_in_epoch * self.global_batch + self.dp_rank * self.prompts_per_rank
        batch = self.permutation(self.epoch)[start:start + self.prompts_per_rank].tolist()
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return batch

    @property
    def num_batches_done(self) -> int:
        return self.epoch * self.batches_per_epoch + self.batch_in_epoch

    def state_dict(self) -> dict[str, int]:
        """The cursor plus what it is only valid with (checked on load); plain ints."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "num_prompts": self.num_prompts, "global_batch": self.global_batch,
                "seed": self.seed, "shuffle": int(self.shuffle)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`'s cursor. dp_size may differ if the global batch is the same."""
        mine = self.state_dict()
        for key in ("num_prompts", "global_batch", "seed", "shuffle"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"prompt cursor was saved with {key}={state[key]}, this run "
                                 f"has {key}={mine[key]}; the batch order would differ")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"prompt cursor epoch={epoch}, batch_in_epoch={batch} is out of "
                             f"range (batches_per_epoch={self.batches_per_epoch})")
        self.epoch, self.batch_in_epoch = epoch, batch


class PromptLoader:
    """`PromptSampler` over a `PromptDataset`: each `next()` is this rank's PromptRecords."""

    def __init__(self, dataset: PromptDataset, *, prompts_per_rank: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.dataset = dataset
        self.sampler = PromptSampler(len(dataset), prompts_per_rank=prompts_per_rank,
                                     dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                                     shuffle=shuffle)

    def __iter__(self) -> PromptLoader:
        return self

    def __next__(self) -> list[PromptRecord]:
        return self.dataset.records(next(self.sampler))

    def state_dict(self) -> dict[str, Any]:
        """The sampler's cursor, the dataset's `content_crc32` and each file's fingerprint
        (name, size, sha256, number of prompts): ints, strings and lists of them."""
        return {**self.sampler.state_dict(), "data_crc32": self.dataset.content_crc32(),
                "files": self.dataset.file_fingerprints()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The same cursor over other prompts (file edited, tokenizer or limits changed)
        # would not continue the saved run: refuse it, naming what changed. File content
        # is compared by hash, so a `touch` (new mtime, same bytes) resumes normally.
        if int(state["data_crc32"]) != self.dataset.content_crc32():
            raise ValueError(_what_changed(state.get("files"), self.dataset.file_fingerprints()))
        self.sampler.load_state_dict(state)


def _what_changed(saved: list[dict] | None, now: list[dict]) -> str:
    """One line naming the first difference between the saved and the current prompt data."""
    advice = "start a fresh cursor to train on the new data"
    if saved is None:  # a cursor saved before files were fingerprinted
        return ("prompt cursor was saved over different prompt data (token ids differ: files, "
                f"tokenizer, template or max_prompt_len changed); {advice}")
    names = ([f["name"] for f in saved], [f["name"] for f in now])
    if names[0] != names[1]:
        return f"prompt cursor was saved over prompt files {names[0]}, this run reads {names[1]}; {advice}"
    for old, new in zip(saved, now):
        if (old["size"], old["sha256"]) != (new["size"], new["sha256"]):
            return (f"prompt file {new['name']} changed since the cursor was saved "
                    f"({old['num_prompts']} -> {new['num_prompts']} prompts, {old['size']} -> "
                    f"{new['size']} bytes, sha256 {old['sha256'][:12]} -> {new['sha256'][:12]}); {advice}")
    return ("prompt files are unchanged but tokenize differently than when the cursor was saved "
            f"(tokenizer, chat template or max_prompt_len changed); {advice}")
