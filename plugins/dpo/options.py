"""Options of the ``dpo`` objective."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DPOOptions", "LOSS_TYPES"]

#: The losses on the implicit-reward margin: DPO's logistic loss and IPO's squared loss.
LOSS_TYPES = ("sigmoid", "ipo")
#: Largest beta: the margin is a sum of log-probability ratios over a response, so beta * margin already
#: saturates the sigmoid for beta ~ 10; far larger values only overflow.
MAX_BETA = 1000.0


@dataclass
class DPOOptions:
    """``objective.options`` for ``objective.name: dpo``.

    Attributes:
        beta: strength of the implicit KL constraint to the reference (DPO's beta, IPO's tau); > 0, <= MAX_BETA.
        label_smoothing: cDPO's assumed fraction of flipped preference labels, in [0, 0.5); 0 is plain DPO.
            Used by ``loss_type: sigmoid`` only.
        loss_type: ``sigmoid`` (DPO, Rafailov et al. 2023) or ``ipo`` (IPO, Azar et al. 2023; the log-ratios
            are averaged over each response's tokens, as TRL does).
        sft_adapter: the SFT adapter. When given, the policy starts as a trainable copy of it and the
            reference is a frozen copy of it on the same base (``method.name`` must then be its method).
            When null, the policy is a fresh adapter of ``method`` and the reference is the bare base
            (``disable_adapters()``).
        chat_template: render prompts with the tokenizer's chat template, as sft, reward and ppo do.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    sft_adapter: str | None = None
    chat_template: bool = True

    def validate(self) -> list[str]:
        problems = []
        if not 0 < self.beta <= MAX_BETA:
            problems.append(f"option 'beta' = {self.beta!r} must be in (0, {MAX_BETA:g}]; DPO's usual values are 0.1 to 0.5")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(
                f"option 'label_smoothing' = {self.label_smoothing!r} must be in [0, 0.5) (the assumed fraction of "
                "flipped labels; 0.5 would make the loss ignore the labels); e.g. 0.1, or 0 for plain DPO"
            )
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"option 'loss_type' = {self.loss_type!r} must be one of {', '.join(LOSS_TYPES)}")
        elif self.loss_type == "ipo" and self.label_smoothing:
            problems.append(f"option 'label_smoothing' = {self.label_smoothing!r} applies to loss_type 'sigmoid' only; set it to 0 for 'ipo'")
        if self.sft_adapter is not None and not str(self.sft_adapter).strip():
            problems.append("option 'sft_adapter' = '' names no directory; give the SFT adapter directory or null (bare-base reference)")
        return problems
