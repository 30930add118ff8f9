"""Lightning's ``ModelPruning`` with the pruning method named by a string only.

``ModelPruning(pruning_fn: Callable | str)``: jsonargparse cannot write a string given for that ``Callable | str``
back into a saved config ("Unable to serialize instance l1_unstructured"), so a run's config.yaml would not load.
"""

from typing import Any, Literal

from lightning.pytorch.callbacks import ModelPruning


class Pruning(ModelPruning):
    def __init__(
        self,
        pruning_fn: Literal["l1_unstructured", "random_unstructured", "ln_structured", "random_structured"],
        **kwargs: Any,
    ) -> None:
        super().__init__(pruning_fn, **kwargs)
