"""PyTorch Lightning: ``DASSDPCallback`` runs DA-SSDP beside ``trainer.fit`` unchanged.

::

    import lightning.pytorch as pl
    from dassdp.integrations.lightning import DASSDPCallback

    trainer = pl.Trainer(max_epochs=200, callbacks=[DASSDPCallback(DASSDPConfig())])
    trainer.fit(lit_module, train_loader)

Which model: ``pl_module.model`` when the LightningModule has an ``nn.Module`` attribute
``model`` and declares no ``dassdp_sites`` itself; otherwise the LightningModule. Site names
(and the ``dassdp_sites`` preset, and ``T`` from a ``T`` attribute) are relative to it.

Where each call goes:

* ``setup`` (fit): build the :class:`~dassdp.DASSDP` learner (``callback.learner``);
  ``teardown``: close it (its hooks are removed, its state and metrics stay readable).
* ``on_train_start`` and ``on_train_epoch_start``: ``set_epoch(trainer.current_epoch)``.
* ``apply="post_step"``: ``step(loss)`` in ``on_train_batch_end`` of each batch on which the
  optimizer stepped: ``trainer.global_step`` moved between this batch's
  ``on_train_batch_start`` and its end (the trainer's own count, so gradient accumulation,
  a fit resumed mid-epoch and manual optimization all stay in phase: the accumulated
  forwards are the step's windows). The loss is the mean over those batches of
  ``outputs["loss"]`` (or ``outputs`` itself when ``training_step`` returns a tensor),
  multiplied back by ``accumulate_grad_batches`` under automatic optimization (Lightning
  divides it; the gate records the loss itself, see :func:`unscaled_loss`). A step whose
  site weights did not change since the forward (an AMP scaler skip) is passed as
  ``optimizer_stepped=False``.
* ``apply="grad"``: ``step(loss)`` in ``on_before_optimizer_step`` (after backward and
  Lightning's AMP unscale, before ``optimizer.step()``), with the losses seen by
  ``on_before_backward`` (unscaled the same way).
* after every training batch: :func:`dassdp.reset` of the neurons (records are kept until the
  next ``step``).
* the learner's state (gate sums, fitted gate, counters, generator) is the callback's
  ``state_dict`` and so travels in Lightning checkpoints; ``trainer.fit(ckpt_path=...)``
  restores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import dassdp
from dassdp.plasticity.learner import DASSDP, DASSDPConfig

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError(
            "dassdp.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from err


def learner_model(pl_module: nn.Module) -> nn.Module:
    """The module DA-SSDP attaches to (module docstring: ``.model`` or the module itself)."""
    inner = getattr(pl_module, "model", None)
    if isinstance(inner, nn.Module) and not hasattr(pl_module, "dassdp_sites"):
        return inner
    return pl_module


def unscaled_loss(trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> Tensor:
    """The batch's loss as ``training_step`` returned it (detached).

    Under automatic optimization Lightning divides the loss by ``accumulate_grad_batches``
    before the backward, and that divided loss is what ``on_before_backward`` and
    ``outputs["loss"]`` carry; the gate must record the loss itself, or its records would
    depend on the accumulation schedule. Multiplying back is exact for a power-of-two
    factor and within one rounding of the loss's dtype otherwise.
    """
    scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
    loss = loss.detach()
    return loss * scale if scale != 1 else loss


class DASSDPCallback(pl.Callback):
    """Attach DA-SSDP to a LightningModule during ``fit`` (module docstring).

    Args:
        config: the learner's hyper-parameters (default :class:`DASSDPConfig`).
        sites: as for :class:`~dassdp.DASSDP` (``None``: the model's own ``dassdp_sites``).
        T: time steps, for flattened ``[T*B, ...]`` sites (default: the model's ``T``).
    """

    def __init__(
        self,
        config: DASSDPConfig | None = None,
        sites: Mapping[str, Any] | str | None = None,
        T: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config or DASSDPConfig()
        self.sites, self.T = sites, T
        self.learner: DASSDP | None = None
        self._model: nn.Module | None = None
        self._losses: list[Tensor] = []
        self._backward_losses: list[Tensor] = []  # this batch's manual_backward losses
        self._step_at_batch_start: int | None = None
        self._pending_state: dict[str, Any] | None = None

    # ---------------------------------------------------------------- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or (self.learner is not None and not self.learner.recorder.closed):
            return
        previous = self.learner  # a finished fit's learner: a new fit continues from it
        self._model = learner_model(pl_module)
        self.learner = DASSDP(self._model, self.config, self.sites, T=self.T)
        if previous is not None:
            self.learner.load_state_dict(previous.state_dict())
        if self._pending_state is not None:
            self.learner.load_state_dict(self._pending_state)
            self._pending_state = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.learner is not None:
            self.learner.close()  # hooks removed; the state stays readable

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every fit, also one resumed mid-epoch (which gets no on_train_epoch_start): no
        # loss of an earlier fit's unfinished window may enter this fit's first step.
        self._losses.clear()
        self._require().set_epoch(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._losses.clear()
        self._require().set_epoch(trainer.current_epoch)

    # --------------------------------------------------------------------- step
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_batch_start = trainer.global_step
        self._backward_losses.clear()

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if self.config.apply == "grad":
            self._losses.append(unscaled_loss(trainer, pl_module, loss))
        elif not pl_module.automatic_optimization:  # post_step: if training_step returns none
            self._backward_losses.append(loss.detach())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.config.apply == "grad":
            self._require().step(self._pop_loss())

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        learner = self._require()
        if self.config.apply == "post_step":
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, Tensor):
                self._losses.append(unscaled_loss(trainer, pl_module, loss))
            elif self._backward_losses:  # manual optimization returning nothing
                self._losses.append(torch.stack(self._backward_losses).mean())
            # The trainer's own counter, read before and after this batch: the optimizer
            # stepped on it exactly when global_step moved (no count kept across batches,
            # so a fit resumed mid-epoch or mid-window cannot put step() out of phase).
            if trainer.global_step != self._step_at_batch_start:
                learner.step(self._pop_loss(), optimizer_stepped=self._weights_changed())
        dassdp.reset(self._model, records=False)  # neurons; records wait for the next step

    def _pop_loss(self) -> Tensor:
        if not self._losses:
            raise RuntimeError(
                "DASSDPCallback found no loss for this step: training_step must return the "
                "loss (a tensor or a dict with 'loss'), or call manual_backward(loss)"
            )
        loss = torch.stack(self._losses).mean() if len(self._losses) > 1 else self._losses[0]
        self._losses.clear()
        return loss

    def _weights_changed(self) -> bool:
        """Did the optimizer change a site weight since the last forward? (version counters,
        no device sync; True when the model's forward was never seen)."""
        rec = self._require().recorder
        return not rec.versions or any(
            layer.weight._version != rec.versions.get(name, -1)
            for name, layer in rec.layers.items()
        )

    def _require(self) -> DASSDP:
        if self.learner is None:
            raise RuntimeError("DASSDPCallback is used outside trainer.fit (no learner)")
        return self.learner

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {} if self.learner is None else {"learner": self.learner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("learner")
        if state is None:
            return
        if self.learner is None:  # restored before setup: applied when the learner exists
            self._pending_state = state
        else:
            self.learner.load_state_dict(state)
