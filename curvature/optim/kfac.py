r"""K-FAC: natural-gradient descent preconditioned by the Kronecker-factored Fisher (Martens & Grosse 2015).

The optimizer is a drop-in for SGD: it reads the gradient from ``.grad`` (or differentiates a closure), and its
``step`` takes the batch that gradient was computed on, from which the factors are computed by
:class:`~curvature.KFACOperator`: the factors are that operator's, of that batch, and
nothing here computes a factor statistic. The running averages of the factors, the snapshot the current inverse
was computed from and the Monte-Carlo seed live in the optimizer's state (named by :class:`KFACState`), so
``state_dict`` round trips continue a run bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._checks import check_count, check_scalar
from .._closure import Closure, evaluate, no_grad_step
from .._flat import flatten, split
from ..operators import KFACOperator, LinearOperator
from ..operators.distributed import unwrap_model
from ..operators.kronecker import FACTORED_MODULES, FISHER_TYPES, KroneckerBlock
from ..operators.kronecker.layers import Layer, factored_layers
from ..sampling import resolve_generator
from ._base import StateRecord
from .functional import natural_gradient_step

__all__ = ["KFAC", "KFACState"]

#: What ``unfactored=`` accepts: refuse parameters no factored layer owns, or step them with plain SGD.
UNFACTORED = ("raise", "sgd")
#: The hyperparameters a parameter group may set for itself (the others hold for the whole optimizer).
GROUP_OPTIONS = ("lr", "damping", "momentum", "weight_decay")
_GLOBAL_OPTIONS = ("factor_decay", "factor_update_interval", "inverse_update_interval", "kl_clip", "fisher_type",
                   "mc_samples", "kfac_approx", "heuristic_damping", "unfactored", "generator")
_FACTOR_KEYS = ("row_factor", "col_factor", "inverse_row_factor", "inverse_col_factor")


@dataclass(frozen=True)
class KFACState(StateRecord):
    r"""What :class:`KFAC` keeps per factored layer, as entries of ``optimizer.state[p]``.

    ``p`` is the layer's first optimized parameter (its weight, or its bias when the weight is not optimized):
    ``KFACState.read(optimizer.state[model.fc.weight])``. The state itself stays torch's dict, so ``state_dict``
    round trips (also through ``torch.load(..., weights_only=True)``) are torch's. Each parameter also keeps
    SGD's ``momentum_buffer`` when ``momentum > 0``.

    A layer's block is :math:`R \otimes C` (:class:`~curvature.operators.kronecker.KroneckerBlock`): for
    ``Linear`` and convolution layers the row factor is :math:`G` (output gradients) and the column factor
    :math:`A` (inputs); for an ``Embedding`` the row factor is the diagonal of token frequencies and the column
    factor :math:`G`; for a normalization layer the row factor is the number 1 and the column factor the
    Hadamard-factored block (see :class:`~curvature.KFACOperator`).

    Attributes:
        step: Steps taken (the same in every layer's record).
        factor_updates: Factor updates averaged into the factors so far (the same in every record).
        seed: The Monte-Carlo seed: the :math:`k`-th factor update (from 0) draws its targets with
            ``KFACOperator(..., generator=torch.Generator().manual_seed(seed + k))`` (the same in every record).
        kl_scale: The KL-clipping factor :math:`\nu` of the last step (1 when not clipped; the same in every
            record).
        row_factor: The running average of the row factor.
        col_factor: The running average of the column factor.
        inverse_row_factor: The row factor the current inverse was computed from (the running average at the
            last inverse update; the same tensor as ``row_factor`` while no factor update came since).
        inverse_col_factor: Likewise for the column factor.
    """

    step: int = 0
    factor_updates: int = 0
    seed: Optional[int] = None
    kl_scale: Optional[float] = None
    row_factor: Optional[torch.Tensor] = None
    col_factor: Optional[torch.Tensor] = None
    inverse_row_factor: Optional[torch.Tensor] = None
    inverse_col_factor: Optional[torch.Tensor] = None


class _Preconditioner(LinearOperator):
    r"""The damped K-FAC inverse over the flat factored parameters: each layer's block solved with its group's damping.

    Each block is ``KroneckerBlock.solve`` (exact :math:`(R \otimes C + \lambda I)^{-1}` or the π-corrected
    factored damping) on the layer's parameters arranged by ``Layer.to_matrix``, as ``KFACOperator.inverse``
    does (tested equal).
    """

    def __init__(self, layers: list[Layer], blocks: list[KroneckerBlock], dampings: list[float], heuristic: bool,
                 params: list[torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__(sum(p.numel() for p in params), dtype, params[0].device, is_symmetric=True, is_psd=True)
        self.layers, self.blocks, self.dampings, self.heuristic = layers, blocks, dampings, heuristic
        self.params = params
        self._shapes = {i: p.shape for i, p in enumerate(params)}

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        k = V.shape[1]
        pieces = split(V.T, self.params)
        out: list[Optional[torch.Tensor]] = [None] * len(pieces)
        for layer, block, damping in zip(self.layers, self.blocks, self.dampings):
            X = layer.to_matrix({i: pieces[i] for i in layer.indices})
            for i, t in layer.from_matrix(block.solve(X, damping, self.heuristic), self._shapes).items():
                out[i] = t
        return flatten(out, batch_dims=1).reshape(k, -1).T.contiguous()


class KFAC(torch.optim.Optimizer):
    r"""K-FAC: SGD on the natural gradient of the Kronecker-factored Fisher (Martens & Grosse 2015).

    For each factored layer (``Linear``, ``Conv1d``/``Conv2d``, ``Embedding``, and the affine parameters of
    ``LayerNorm``/``GroupNorm``/eval-mode ``BatchNorm``) with gradient :math:`\nabla W` and averaged factors
    :math:`A` (inputs) and :math:`G` (output gradients), the step direction is the natural gradient

    .. math::
        \Delta = (G + \tfrac{\gamma}{\pi} I)^{-1}\, \nabla W\, (A + \pi\gamma I)^{-1}, \qquad \gamma = \sqrt{\lambda},
        \quad \pi^2 = \frac{\operatorname{tr} A / d_A}{\operatorname{tr} G / d_G}

    with the factored Tikhonov damping of Martens & Grosse (Sec. 6.3; ``heuristic_damping=True``), or
    :math:`\operatorname{vec}(\Delta) = (G \otimes A + \lambda I)^{-1} \operatorname{vec}(\nabla W)` with
    ``heuristic_damping=False`` (exact damping, through the factors' eigendecompositions). With ``kl_clip``
    :math:`\kappa`, the directions of all layers are scaled by

    .. math:: \nu = \min\Big(1, \sqrt{\kappa \big/ \textstyle\sum_{\text{layers}} \eta^2\, \Delta \cdot \nabla W}\Big)

    (Ba, Grosse & Martens 2017, Sec. 5), which bounds the step's quadratic KL estimate
    :math:`\eta^2 \nu^2 \sum \Delta \cdot \nabla W` by :math:`\kappa`
    (:func:`curvature.optim.functional.natural_gradient_step`). Then, as SGD does with the gradient:
    :math:`d = \nu \Delta + w\theta` (``weight_decay`` :math:`w`, not preconditioned), momentum
    :math:`b \leftarrow \mu b + d` (:math:`b = d` at the first step) and :math:`\theta \leftarrow \theta - \eta b`.

    **The factors** are :class:`~curvature.KFACOperator`'s of the batch given to :meth:`step`, computed every
    ``factor_update_interval`` steps (at steps 0, k, 2k, ...; by default every step): one more forward pass and a
    backward pass per Monte-Carlo sample (``fisher_type="mc"``, the paper's), per output column (``"ggn"``) or
    one (``"empirical"``), besides a validating forward pass. Each factor is averaged as in Martens & Grosse
    (Sec. 5): :math:`F \leftarrow \epsilon F + (1 - \epsilon) F_{\text{new}}` with
    :math:`\epsilon = \min(1 - 1/k, \epsilon_{\max})` (``factor_decay``) at the :math:`k`-th update, so the first
    update is the batch's factors, and ``factor_decay=0`` uses each batch's own. Every ``inverse_update_interval``
    steps (by default 10) the averaged factors are eigendecomposed again (one ``eigh`` per factor); the damping is
    applied at each step, so a changed damping takes effect at once. The model is left as it was by the factor
    computations (parameters, ``.grad``, buffers, modes, hooks, the global RNG).

    In a training loop::

        optimizer = curvature.optim.KFAC(model, loss_fn, lr=0.03, momentum=0.9)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step(batch=(x, y))

    The batch must be given at every step that updates the factors (always, with the default
    ``factor_update_interval=1``); steps in between ignore it. The optimizer takes it explicitly instead of
    recording the model's own forward and backward passes: the Monte-Carlo Fisher needs a backward pass from
    targets drawn from the model, which the training loss does not provide, and a recorded batch would silently
    be a later one when the model is called again (for a validation loss, say) before ``step``.

    **Parameters.** By default every trainable parameter of ``model``; each must belong to a factored layer, and
    any other is refused by name, unless ``unfactored="sgd"``: then those are stepped with the plain SGD step
    (:math:`d = \nabla\theta + w\theta`, momentum, not clipped). A model wrapped in ``DistributedDataParallel``
    has its factor statistics all-reduced over its process group, so every rank takes the same step.

    Args:
        model: The model (its factored modules are found in it).
        loss_fn: The training loss ``loss_fn(outputs, targets)``: ``torch.nn.CrossEntropyLoss``, ``MSELoss`` or
            ``BCEWithLogitsLoss`` (mean or sum) for ``"mc"`` and ``"ggn"``; any scalar loss for ``"empirical"``.
        lr: The step size :math:`\eta`.
        damping: The Tikhonov damping :math:`\lambda > 0` (per parameter group).
        momentum: SGD's momentum :math:`\mu \in [0, 1)` (per group).
        weight_decay: SGD's weight decay :math:`w \ge 0`, added to the direction (per group).
        factor_decay: :math:`\epsilon_{\max} \in [0, 1)` of the factors' running averages.
        factor_update_interval: Compute the factors every this many steps.
        inverse_update_interval: Eigendecompose the averaged factors every this many steps.
        kl_clip: :math:`\kappa > 0`, or None for no clipping.
        fisher_type: ``"mc"`` (the Monte-Carlo Fisher of the paper), ``"ggn"`` (the exact GGN's factorization)
            or ``"empirical"`` (the empirical Fisher), as in ``KFACOperator``.
        mc_samples: Targets drawn per sample for ``"mc"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers (Eschenhagen et al. 2023).
        heuristic_damping: The π-corrected factored damping (True) or the exact damping (False).
        params: None (every trainable parameter of ``model``), an iterable of its parameters, or parameter
            groups (dicts with ``"params"`` and any of ``lr``, ``damping``, ``momentum``, ``weight_decay``; the
            parameters of a layer must share a group).
        unfactored: ``"raise"`` (default) refuses parameters no factored layer owns; ``"sgd"`` steps them with
            plain SGD.
        generator: Seeds the Monte-Carlo draws (one draw from it, here); None uses a copy of the global
            generator, which is not advanced (reproducible under ``torch.manual_seed``).

    Raises:
        TypeError, ValueError: On a bad argument (named), a parameter no factored layer owns (named, with
            ``unfactored="raise"``), or a layer split over two parameter groups.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> loss_fn = torch.nn.CrossEntropyLoss()
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> optimizer = KFAC(model, loss_fn, lr=0.1)
        >>> first = loss_fn(model(x), y).item()
        >>> for _ in range(20):
        ...     optimizer.zero_grad()
        ...     loss_fn(model(x), y).backward()
        ...     optimizer.step(batch=(x, y))
        >>> loss_fn(model(x), y).item() < first
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        lr: float = 0.01,
        *,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        factor_decay: float = 0.95,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 10,
        kl_clip: Optional[float] = 1e-3,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        heuristic_damping: bool = True,
        params: Any = None,
        unfactored: str = "raise",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; KFAC(model, loss_fn, "
                            "lr=...) takes the model, not its parameters (pass those as params=).")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}.")
        self.model, self.loss_fn = model, loss_fn
        self._check_options(factor_decay, factor_update_interval, inverse_update_interval, kl_clip, fisher_type,
                            mc_samples, kfac_approx, heuristic_damping, unfactored)
        self.factor_decay = float(factor_decay)
        self.factor_update_interval, self.inverse_update_interval = factor_update_interval, inverse_update_interval
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.fisher_type, self.mc_samples, self.kfac_approx = fisher_type, mc_samples, kfac_approx
        self.heuristic_damping, self.unfactored = heuristic_damping, unfactored
        source = resolve_generator(generator)
        self._seed = int(torch.randint(0, 2**62, (1,), generator=source, device=source.device))
        inner, wrapper_group = unwrap_model(model)
        self._process_group = "auto" if wrapper_group is not None else None
        self._named = list(inner.named_parameters())
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        self._building = True
        super().__init__(self._groups(params), defaults)
        self._building = False
        self._find_layers(inner)
        self._inverse: Optional[list[KroneckerBlock]] = None

    # -- arguments --------------------------------------------------------------------------------------------
    @staticmethod
    def _check_options(factor_decay: Any, factor_update_interval: Any, inverse_update_interval: Any,
                       kl_clip: Any, fisher_type: Any, mc_samples: Any, kfac_approx: Any, heuristic_damping: Any,
                       unfactored: Any) -> None:
        if not 0 <= check_scalar(factor_decay, "factor_decay") < 1:
            raise ValueError(f"factor_decay must be in [0, 1), got {factor_decay}.")
        check_count(factor_update_interval, "factor_update_interval")
        check_count(inverse_update_interval, "inverse_update_interval")
        if kl_clip is not None and not check_scalar(kl_clip, "kl_clip") > 0:
            raise ValueError(f"kl_clip must be positive or None (no clipping), got {kl_clip}.")
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {tuple(FISHER_TYPES)}, got {fisher_type!r}.")
        check_count(mc_samples, "mc_samples")
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}.")
        if not isinstance(heuristic_damping, bool):
            raise TypeError(f"heuristic_damping must be True or False, got {heuristic_damping!r}.")
        if unfactored not in UNFACTORED:
            raise ValueError(f"unfactored must be 'raise' (refuse parameters no factored layer owns) or 'sgd' "
                             f"(step them with plain SGD), got {unfactored!r}.")

    def _groups(self, params: Any) -> list[dict[str, Any]]:
        """The parameter groups: every trainable parameter by default, a list of parameters, or of groups."""
        if params is None:
            trainable = [p for _, p in self._named if p.requires_grad]
            if not trainable:
                raise ValueError("the model has no trainable parameters (every requires_grad is False).")
            return [{"params": trainable}]
        if isinstance(params, (torch.Tensor, str, dict)):
            raise TypeError("params must be None, an iterable of the model's parameters, or a list of parameter "
                            f"groups (dicts), got {type(params).__name__}.")
        if isinstance(params, nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        return list(params)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group while the optimizer is built (its layers are fixed afterwards).

        Raises:
            TypeError, ValueError: On a hyperparameter out of range, an optimizer-wide option set in a group, a
                tensor that is not a trainable parameter of the model, or a group added after construction.
        """
        if not self._building:
            raise ValueError("KFAC's layers and factors are fixed when it is built: add_param_group after "
                             "construction is not supported; build a new optimizer over all the parameters.")
        set_globally = [k for k in param_group if k in _GLOBAL_OPTIONS]
        if set_globally:
            raise ValueError(f"{set_globally[0]} is an option of the whole optimizer, not of a parameter group; "
                             f"pass it to KFAC(...). A group may set {', '.join(GROUP_OPTIONS)}.")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        names = {id(p): n for n, p in self._named}
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("params holds a tensor that is not a parameter of the model.")
            if not p.requires_grad:
                raise ValueError(f"params holds {names[id(p)]!r}, which is frozen (requires_grad=False); leave it "
                                 "out, or unfreeze it first.")
        self._check_group(group)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        if not check_scalar(group["lr"], "lr") > 0:
            raise ValueError(f"lr must be positive, got {group['lr']}.")
        if not check_scalar(group["damping"], "damping") > 0:
            raise ValueError(f"damping must be positive (the factors are singular with fewer samples than "
                             f"inputs), got {group['damping']}.")
        if not 0 <= check_scalar(group["momentum"], "momentum") < 1:
            raise ValueError(f"momentum must be in [0, 1), got {group['momentum']}.")
        if not check_scalar(group["weight_decay"], "weight_decay") >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {group['weight_decay']}.")

    def _find_layers(self, model: nn.Module) -> None:
        """The factored layers owning the optimized parameters, the parameters stepped by SGD, each layer's group."""
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        order = [(n, p) for n, p in self._named if id(p) in group_of]  # the model's order, as KFACOperator's
        names, params = [n for n, _ in order], [p for _, p in order]
        layers, unowned = factored_layers(model, params, names)
        if unowned and self.unfactored == "raise":
            shown = [names[i] for i in unowned]
            raise ValueError(
                f"K-FAC has no factorization for parameter(s) {shown[:5]}{' ...' if len(shown) > 5 else ''}: they "
                f"belong to no {', '.join(t.__name__ for t in FACTORED_MODULES)}. Pass unfactored='sgd' to step "
                "them with plain SGD, or leave them out with params=."
            )
        if not layers:
            raise ValueError("no optimized parameter belongs to a factored layer, so K-FAC has nothing to "
                             "precondition; use torch.optim.SGD.")
        for layer in layers:
            groups = {group_of[id(params[i])] for i in layer.indices}
            if len(groups) > 1:
                raise ValueError(f"the parameters of layer {layer.name!r} are in different parameter groups; K-FAC "
                                 "preconditions a layer as one block, so they must share a group.")
        owned = {i for layer in layers for i in layer.indices}
        kfac = sorted(owned)
        index = {old: new for new, old in enumerate(kfac)}  # the layers' indices into the factored parameters
        self._layers = [Layer(layer.name, layer.module, None if layer.weight is None else index[layer.weight],
                              None if layer.bias is None else index[layer.bias], layer.kind, layer.groups)
                        for layer in layers]
        self._kfac_params = [params[i] for i in kfac]
        self._kfac_names = [names[i] for i in kfac]
        self._sgd_params = [params[i] for i in unowned]
        # Group indices, not the group dicts: load_state_dict replaces the dicts.
        self._layer_groups = [group_of[id(self._kfac_params[layer.indices[0]])] for layer in self._layers]
        self._group_of = group_of

    # -- state ------------------------------------------------------------------------------------------------
    def _layer_state(self, layer: Layer) -> dict[str, Any]:
        """The layer's record lives with its first optimized parameter (so ``state_dict`` carries it)."""
        return self.state[self._kfac_params[layer.indices[0]]]

    def _record(self, layer: Layer, **initial: Any) -> KFACState:
        """The layer's record as the last step wrote it (without creating a state entry)."""
        return KFACState.read(self.state.get(self._kfac_params[layer.indices[0]], {}), **initial)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict()``; the factors keep their dtype (float32 at least).

        torch casts floating-point state to each parameter's dtype; the factors are accumulated in
        ``torch.promote_types(dtype, torch.float32)`` and are put back in it. The inverse is recomputed from the
        saved snapshot (``inverse_row_factor``, ``inverse_col_factor``) at the next step, giving the same step.
        """
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        for saved_id, p in zip(saved, params):
            entries = state_dict["state"].get(saved_id, {})
            for key in _FACTOR_KEYS:
                if isinstance(entries.get(key), torch.Tensor):
                    self.state[p][key] = entries[key].to(device=p.device)
        for layer in self._layers:  # a snapshot equal to the running average shares its tensor, as after a step
            state = self.state.get(self._kfac_params[layer.indices[0]], {})
            for key, source in (("inverse_row_factor", "row_factor"), ("inverse_col_factor", "col_factor")):
                if key in state and source in state and torch.equal(state[key], state[source]):
                    state[key] = state[source]
        self._inverse = None

    # -- the step ---------------------------------------------------------------------------------------------
    @no_grad_step
    def step(self, closure: Optional[Closure] = None, *, batch: Any = None) -> Optional[torch.Tensor]:  # type: ignore[override]
        """Take one K-FAC step.

        Args:
            closure: None to use the gradients in ``.grad`` (as SGD). Or a closure that runs the forward pass and
                returns the loss with its graph, without calling ``backward`` (the contract of
                :mod:`curvature.optim`): the optimizer differentiates it, and ``.grad`` is neither read nor written.
            batch: The ``(inputs, targets)`` the gradient was computed on (or any ``data`` that
                ``KFACOperator`` takes); needed at the steps that update the factors.

        Returns:
            The closure's loss (detached), or None without a closure.

        Raises:
            TypeError: If ``closure`` is not callable (a batch passed positionally, say).
            ValueError: If the factors are due and ``batch`` is None; if the gradient or the natural gradient is
                not finite; if a factored parameter was frozen after the optimizer was built; or as
                ``KFACOperator`` refuses the batch, the loss or a layer. The parameters and the state are then
                unchanged.
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}; pass the batch as a keyword: "
                            "optimizer.step(batch=(inputs, targets)).")
        frozen = [n for n, p in zip(self._kfac_names, self._kfac_params) if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameter(s) {frozen[:5]} were frozen after KFAC was built; its layers are fixed: "
                             "build a new optimizer without them.")
        trainable = self._kfac_params + [p for p in self._sgd_params if p.requires_grad]
        loss = None
        if closure is not None:
            point = evaluate(closure, trainable, order=1)
            if point.grads is None:
                raise ValueError(f"the closure returned a non-finite loss ({point.value}); the step was not taken "
                                 "and the parameters are unchanged.")
            grads = {p: (None if unused else g) for p, g, unused in zip(trainable, point.grads, point.unused)}
            loss = point.loss
        else:
            grads = {p: p.grad for p in trainable}
        sparse = [p for p, g in grads.items() if g is not None and g.is_sparse]
        if sparse:
            raise TypeError("KFAC does not support sparse gradients (nn.Embedding(sparse=True)).")
        first = self._record(self._layers[0], seed=self._seed)
        factors = self._factors(first, batch)
        inverse = self._blocks(factors)
        directions, scale = self._directions(grads, inverse)
        self._move(directions)
        for layer, (row, col), blocks_from in zip(self._layers, factors["running"], factors["inverse"]):
            KFACState(step=first.step + 1, factor_updates=factors["updates"], seed=first.seed, kl_scale=scale,
                      row_factor=row, col_factor=col, inverse_row_factor=blocks_from[0],
                      inverse_col_factor=blocks_from[1]).write(self._layer_state(layer))
        self._inverse = inverse
        return loss

    def _factors(self, first: KFACState, batch: Any) -> dict[str, Any]:
        """The running averages after this step's factor update (if due), and the factors of the inverse."""
        records = [self._record(layer) for layer in self._layers]
        running = [(r.row_factor, r.col_factor) for r in records]
        updates = first.factor_updates
        if first.step % self.factor_update_interval == 0:
            if batch is None:
                raise ValueError(
                    f"step {first.step} updates the K-FAC factors (every factor_update_interval="
                    f"{self.factor_update_interval} steps), so it needs the batch the gradient was computed on: "
                    "optimizer.step(batch=(inputs, targets)). The parameters are unchanged."
                )
            fresh = self._batch_factors(batch, int(first.seed) + updates)
            updates += 1
            decay = min(1.0 - 1.0 / updates, self.factor_decay)  # Martens & Grosse (2015), Sec. 5
            running = [new if old[0] is None else (decay * old[0] + (1 - decay) * new[0],
                                                   decay * old[1] + (1 - decay) * new[1])
                       for old, new in zip(running, fresh)]
        if first.step % self.inverse_update_interval == 0 or any(r.inverse_row_factor is None for r in records):
            inverse = running
        else:
            inverse = [(r.inverse_row_factor, r.inverse_col_factor) for r in records]
        return {"running": running, "inverse": inverse, "updates": updates}

    def _batch_factors(self, batch: Any, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch's factors, each layer's ``(row, col)``, computed by ``KFACOperator``."""
        op = KFACOperator(self.model, self.loss_fn, batch, params=self._kfac_params, fisher_type=self.fisher_type,
                          kfac_approx=self.kfac_approx, mc_samples=self.mc_samples,
                          generator=torch.Generator().manual_seed(seed), process_group=self._process_group)
        blocks = op.state_dict()["blocks"]
        if list(blocks) != [layer.name for layer in self._layers]:  # the same selection: the same layers
            raise RuntimeError(f"KFACOperator factored the layers {list(blocks)}, the optimizer expects "
                               f"{[layer.name for layer in self._layers]}.")
        return [(blocks[layer.name]["row"], blocks[layer.name]["col"]) for layer in self._layers]

    def _blocks(self, factors: dict[str, Any]) -> list[KroneckerBlock]:
        """The blocks of the inverse: the kept ones, or new ones (eigendecomposed at first use) from the factors."""
        kept = self._inverse
        if kept is not None and all(b.row is f[0] and b.col is f[1] for b, f in zip(kept, factors["inverse"])):
            return kept
        # A normalization layer's block has no Kronecker structure to damp by factors: exact damping, as
        # KFACOperator's blocks.
        return [KroneckerBlock(row, col, heuristic=layer.kind != "norm")
                for layer, (row, col) in zip(self._layers, factors["inverse"])]

    def _directions(self, grads: dict[torch.Tensor, Optional[torch.Tensor]], blocks: list[KroneckerBlock]
                    ) -> tuple[dict[torch.Tensor, torch.Tensor], float]:
        """Every parameter's direction before weight decay and momentum: ν Δ (factored) or the gradient (SGD).

        A factored parameter without a gradient counts as a zero gradient in its layer's block; a layer none of
        whose parameters has a gradient is not stepped (as SGD skips a parameter whose ``.grad`` is None).
        """
        params, dtype = self._kfac_params, blocks[0].row.dtype
        g = flatten((torch.zeros_like(p) if grads[p] is None else grads[p]) for p in params).to(dtype)
        if not bool(torch.isfinite(g).all()):
            raise ValueError("the gradient holds NaN or Inf; the step was not taken and the parameters and the "
                             "optimizer's state are unchanged.")
        dampings, rates = [], []
        for group in (self.param_groups[i] for i in self._layer_groups):
            if not check_scalar(group["damping"], "damping") > 0:
                raise ValueError(f"damping must be positive, got {group['damping']}.")
            dampings.append(float(group["damping"]))
            rates.append(float(check_scalar(group["lr"], "lr")))
        lr: Any = rates[0]
        if len(set(rates)) > 1:  # groups with their own step sizes: the KL estimate weighs each entry by its own
            rate_of = {i: rate for layer, rate in zip(self._layers, rates) for i in layer.indices}
            lr = flatten(torch.full((p.numel(),), rate_of[i], dtype=dtype, device=g.device)
                         for i, p in enumerate(params))
        preconditioner = _Preconditioner(self._layers, blocks, dampings, self.heuristic_damping, params, dtype)
        step = natural_gradient_step(preconditioner, g, lr=lr, kl_clip=self.kl_clip)
        directions: dict[torch.Tensor, torch.Tensor] = {}
        pieces = split(-step.direction, params)
        for layer in self._layers:
            if any(grads[params[i]] is not None for i in layer.indices):
                for i in layer.indices:
                    directions[params[i]] = pieces[i].to(params[i].dtype)
        for p in self._sgd_params:
            if grads.get(p) is not None:
                directions[p] = grads[p]
        return directions, step.scale

    def _move(self, directions: dict[torch.Tensor, torch.Tensor]) -> None:
        """SGD's weight decay, momentum and step on each direction (state tensors are replaced, never mutated)."""
        for p, d in directions.items():
            group = self.param_groups[self._group_of[id(p)]]
            if group["weight_decay"]:
                d = d + group["weight_decay"] * p.detach()
            if group["momentum"]:
                state = self.state[p]
                buffer = state.get("momentum_buffer")
                d = d.clone() if buffer is None else group["momentum"] * buffer + d
                state["momentum_buffer"] = d
            p.add_(d, alpha=-group["lr"])
