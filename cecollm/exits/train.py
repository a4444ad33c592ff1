"""Self-distillation of exit heads on a cache: each head learns the final layer's next-token
distribution (KL over the teacher's top-k tokens plus one bucket for the rest).

Deterministic for a seed (one thread): the heads' initialisation and every epoch's order
derive from it, so a run resumed from its checkpoint ends where an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from cecollm.edge.heads import ExitHead, build_head
from cecollm.errors import UserError
from cecollm.exits.collect import ExitCache
from cecollm.exits.config import TrainConfig

log = logging.getLogger(__name__)


def choose_vocab(cache: ExitCache, size: int, n_vocab: int) -> torch.Tensor:
    """The `size` tokens of a vocabulary of `n_vocab` that the teacher most often ranks first in
    the trained rows (ties, unseen tokens included: lower id)."""
    best = cache.top_idx[cache.train, 0]
    counts = torch.bincount(best, minlength=n_vocab)  # [n_vocab]: never an id the model lacks
    order = torch.argsort(-counts.double() + torch.arange(len(counts)) * 1e-9)  # stable by id
    return order[:size].clone()


def kl_loss(head: ExitHead, logits: torch.Tensor, top_idx: torch.Tensor, top_p: torch.Tensor,
            greedy_weight: float = 0.0) -> torch.Tensor:
    """Mean KL(teacher || head) on rows, with the teacher's tail beyond top-k as one bucket,
    mixed with `greedy_weight` x cross-entropy to the teacher's greedy (top-1) token.

    logits [B, classes]; top_idx, top_p [B, k]. A reduced-vocabulary head's classes are its
    tokens plus "other", which takes every teacher token it lacks and the tail. The greedy
    target makes the head's confidence estimate agreement with the full model's greedy choice
    (what the edge needs), which can be high where the teacher's own top-1 probability is not.
    """
    if greedy_weight:
        target = top_p.new_zeros(top_p.shape)
        target[:, 0] = 1.0  # one-hot on the teacher's top-1
        top_p = (1.0 - greedy_weight) * top_p + greedy_weight * target
    logits = logits.float()
    rest = (1.0 - top_p.sum(-1)).clamp_min(1e-6)  # [B]
    vocab = getattr(head, "vocab", 0)
    if vocab:
        n_vocab = int(max(top_idx.max().item() + 1, head.token_ids.max().item() + 1))
        cls_of = torch.full((n_vocab,), vocab, dtype=torch.int64)
        cls_of[head.token_ids] = torch.arange(vocab)
        target = torch.zeros_like(logits).scatter_add_(1, cls_of[top_idx], top_p)  # [B, vocab+1]
        target[:, -1] += rest
        logq = torch.log_softmax(logits, dim=-1)
        return (target * (target.clamp_min(1e-12).log() - logq)).sum(-1).mean()
    logq = torch.log_softmax(logits, dim=-1)
    picked = logq.gather(1, top_idx)  # [B, k]
    q_rest = (1.0 - picked.exp().sum(-1)).clamp_min(1e-6)
    kl = (top_p * (top_p.clamp_min(1e-12).log() - picked)).sum(-1) + rest * (rest.log() - q_rest.log())
    return kl.mean()


class ExitTrainer:
    """Trains one head per exit on a cache; checkpoint and resume."""

    def __init__(self, model, exits: tuple[int, ...], cache: ExitCache, config: TrainConfig,
                 checkpoint: Path | None = None) -> None:
        missing = [e for e in exits if e not in cache.hidden]
        assert not missing, f"cache lacks layers {missing}"
        self.model, self.exits, self.cache, self.config = model, tuple(exits), cache, config
        self.lm_head = model.lm_head
        self.checkpoint = checkpoint
        torch.manual_seed(config.seed)
        self.heads = {e: build_head(config.arch, model, dict(config.arch_options)) for e in exits}
        vocab = config.arch_options.get("vocab", 0)
        self.coverage = None
        if vocab:
            tokens = choose_vocab(cache, vocab, model.lm_head.weight.shape[0])
            best = cache.top_idx[cache.train, 0]
            self.coverage = float(torch.isin(best, tokens).float().mean())
            for head in self.heads.values():
                head.set_tokens(tokens)
        params = [p for h in self.heads.values() for p in h.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)  # the backbone is frozen; heads' copies are their own
        for p in params:
            p.requires_grad_(True)
        self.optim = torch.optim.AdamW(params, lr=config.peak_lr(), weight_decay=config.weight_decay)
        self.positionwise = all(h.positionwise for h in self.heads.values())
        self.units = self._units()
        self.steps_per_epoch = max(1, min(len(self.units), math.ceil(self._unit_rows() / config.batch_rows)))
        self.total_steps = max(1, int(config.epochs * self.steps_per_epoch))
        self.step = 0
        self.losses: list[float] = []

    def _units(self) -> torch.Tensor:
        """What an epoch shuffles: trained row indices, or sequence indices for sequence heads."""
        if self.positionwise:
            return torch.nonzero(self.cache.train).squeeze(1)  # [n, 1] -> [n] row indices
        return torch.arange(len(self.cache.offsets) - 1)

    def _unit_rows(self) -> int:
        return int(self.cache.train.sum())

    def _batches(self, epoch: int):
        """The batches of one epoch, in a seed-determined order: lists of units."""
        gen = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
        order = self.units[torch.randperm(len(self.units), generator=gen)]
        if self.positionwise:
            b = self.config.batch_rows
            return [order[i:i + b] for i in range(0, len(order), b)]
        # Sequences: exactly steps_per_epoch batches of about batch_rows rows each.
        return [chunk.tolist() for chunk in torch.tensor_split(order, self.steps_per_epoch)]

    def _loss(self, exit_: int, batch) -> torch.Tensor:
        head, cache = self.heads[exit_], self.cache
        if self.positionwise:
            h = cache.hidden[exit_][batch].float().unsqueeze(0)  # [1, B, hidden]
            logits = head.class_logits(h, self.lm_head)[0]  # [B, classes]
            return kl_loss(head, logits, cache.top_idx[batch], cache.top_p[batch], self.config.greedy_weight)
        total, rows = 0.0, 0
        for s in batch:
            a, b = int(cache.offsets[s]), int(cache.offsets[s + 1])
            mask = cache.train[a:b]
            logits = head.class_logits(cache.hidden[exit_][a:b].float().unsqueeze(0), self.lm_head)[0][mask]
            n = int(mask.sum())
            total = total + kl_loss(head, logits, cache.top_idx[a:b][mask], cache.top_p[a:b][mask],
                                    self.config.greedy_weight) * n
            rows += n
        return total / max(rows, 1)

    def _lr(self) -> float:
        """Linear warmup over 5% of the steps, then cosine decay to 10% of the peak."""
        peak, warm = self.config.peak_lr(), max(1, self.total_steps // 20)
        if self.step < warm:
            return peak * (self.step + 1) / warm
        t = (self.step - warm) / max(1, self.total_steps - warm)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    def train(self, progress: bool = True, stop_at: int | None = None) -> dict:
        """Run to the end (or the time budget, or step `stop_at`); returns a summary for the heads file."""
        start = time.monotonic()
        limit = self.config.max_minutes * 60 or float("inf")
        for h in self.heads.values():
            h.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training heads", unit="step", disable=not progress)
        stopped = False
        while self.step < self.total_steps and not stopped:
            epoch, index = divmod(self.step, self.steps_per_epoch)
            batches = self._batches(epoch)
            for batch in batches[index:]:
                if self.step >= self.total_steps:
                    break
                for g in self.optim.param_groups:
                    g["lr"] = self._lr()
                loss = sum(self._loss(e, batch) for e in self.exits) / len(self.exits)
                self.optim.zero_grad(set_to_none=True)
                loss.backward()
                self.optim.step()
                self.step += 1
                self.losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{sum(self.losses[-20:]) / len(self.losses[-20:]):.3f}")
                if self.checkpoint and self.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
                if stop_at is not None and self.step >= stop_at:
                    stopped = True
                    break
                if time.monotonic() - start > limit:
                    log.info("time budget of %.1f min reached at step %d of %d", self.config.max_minutes,
                             self.step, self.total_steps)
                    stopped = True
                    break
        bar.close()
        if self.checkpoint:
            self.save_checkpoint()
        for h in self.heads.values():
            h.eval()
        return {
            "steps": self.step, "total_steps": self.total_steps, "complete": self.step >= self.total_steps,
            "first_loss": self.losses[0] if self.losses else None,
            "final_loss": sum(self.losses[-20:]) / len(self.losses[-20:]) if self.losses else None,
            "train_rows": self._unit_rows(), "seconds": round(time.monotonic() - start, 1),
            "vocab_coverage": self.coverage,
        }

    def _state(self) -> dict:
        return {"config": asdict(self.config), "exits": list(self.exits), "step": self.step,
                "losses": self.losses, "heads": {e: h.state_dict() for e, h in self.heads.items()},
                "optim": self.optim.state_dict()}

    def save_checkpoint(self) -> None:
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save(self._state(), tmp)
        tmp.replace(self.checkpoint)

    def resume(self) -> bool:
        """Continue from the checkpoint if there is one for these settings."""
        if not self.checkpoint or not self.checkpoint.is_file():
            return False
        try:
            state = torch.load(self.checkpoint, weights_only=True)  # tensors and plain data only: no unpickling
        except Exception as exc:  # torch raises several types for a damaged or foreign file
            raise UserError(f"{self.checkpoint} is not a train-exits checkpoint ({exc}); remove it or pass --fresh") from None
        if state["config"] != asdict(self.config) or state["exits"] != list(self.exits):
            raise UserError(f"{self.checkpoint} is a checkpoint of other settings; remove it or pass --fresh")
        for e, h in self.heads.items():
            h.load_state_dict(state["heads"][e])
        self.optim.load_state_dict(state["optim"])
        self.step, self.losses = state["step"], state["losses"]
        log.info("resumed at step %d of %d", self.step, self.total_steps)
        return True
