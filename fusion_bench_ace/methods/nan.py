"""NAN, Norm-Aware mergiNg (arXiv 2505.16148): merging coefficients from inverse parameter norms.

Pure functions on tensors: per-model (or per-tensor) Frobenius norms in, coefficients ``α`` out.
No FusionBench import; the FusionBench algorithms (Task Arithmetic + NAN, TIES + NAN) live in
``fusion_bench_ace.algorithms.nan``. The paper's Eq. (10) is lost in the text we have; this
follows the reconstruction described in ``docs/nan.md``.

For ``M`` models with norms ``n_i`` and ``ε = 1e-12``:

- ``normalize="sum"`` (primary): ``α_i = (1 / (n_i + ε)) / Σ_j 1 / (n_j + ε)``, so ``Σ_i α_i = 1``
  and a larger norm gives a smaller coefficient;
- ``normalize="softmax"`` (the paper's "softmax-normalized", read literally):
  ``α = softmax_i(1 / (n_i + ε))``. Unlike the sum, it is not invariant to a common rescaling of
  the norms, and for norms >> 1 it is nearly uniform.

What the norm is taken of (all computed in float64; the per-tensor units below take it of the
task vectors ``τ_i`` as the engine hands them to the merge, in the compute dtype, so ``θ_i`` is
``θ_0 + τ_i`` up to float32 rounding of the difference: relative 1e-10 on the norms measured):

- ``norm_target="finetuned"`` (primary): the fine-tuned weights ``θ_i``;
  ``"task_vector"``: ``τ_i = θ_i - θ_0``.
- ``granularity="model"`` (primary): one ``n_i`` per model, the global Frobenius norm over every
  merged tensor (L2 norm of their concatenation); ``"layer"``: one ``n_i^l`` per tensor ``l``, and
  the coefficients are normalised over the models separately for each tensor.

The plug-ins (in the algorithm module) use ``θ = θ_0 + s Σ_i α_i τ_i`` (Task Arithmetic) and TIES
run on ``α_i τ_i`` followed by ``θ_0 + s τ_merged``; :func:`resolve_global_scale` gives ``s``.

Choices where the spec is silent, each tested:

- **Zero norms.** A model whose norm is exactly zero while another model's is not has no inverse
  norm; the spec's ``ε`` would give it weight ≈ 1 and every other model weight ≈ ``1e-12 · n``,
  erasing their updates (with ``norm_target="task_vector"``: an expert identical to the pretrained
  model, or, per tensor, an expert that froze that tensor). That is almost certainly not what the
  user wants, so it is a ``ValueError`` naming the model (and tensor). If *every* model's norm is
  zero (a tensor no expert changed, or a pool of copies of the pretrained model) the coefficients
  are uniform ``1/M``: exactly what the ``ε`` formula gives (for task vectors the update is zero
  then anyway).
  Tiny non-zero norms follow the formula as written.
- **ε** is added to every norm in both normalisations (equal norms give ``1/M``; ``eps=0`` is
  allowed and makes the sum normalisation exactly invariant to a common rescaling of the norms).
- **Input checks.** Fewer than two models, no tensors, mismatched shapes or key sets, non-float
  tensors, NaN/Inf values (naming model and tensor), negative or non-finite norms and unknown
  option names raise ``ValueError``. Integer buffers are the caller's to leave out (the adapters
  only pass floating-point tensors).
- **Global scale.** ``s`` is a number, ``"<x>M"`` (``x · M``; the default ``"0.3M"`` makes uniform
  coefficients reproduce TA/TIES with ``λ = 0.3``, and ``"0.1M"``…``"1.0M"`` is the spec's sweep
  of ``s/M``) or ``"m_half"`` (``M/2``, from a third-party re-implementation). It must be finite
  and ``>= 0`` (``s = 0`` returns the pretrained model).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from . import ties
from .base import KEEP, MERGE, TensorMergeMethod, register
from .tensors import check_finite

__all__ = [
    "DEFAULT_EPS",
    "GRANULARITIES",
    "NANCoefficients",
    "NORMALIZATIONS",
    "NORM_TARGETS",
    "check_nan_options",
    "compute_nan_coefficients",
    "model_norms",
    "nan_coefficients",
    "resolve_global_scale",
    "tensor_norms",
    "TaskArithmeticNAN",
    "TiesMergingNAN",
]

NORM_TARGETS = ("finetuned", "task_vector")
GRANULARITIES = ("model", "layer")
NORMALIZATIONS = ("sum", "softmax")
DEFAULT_EPS = 1e-12
"""The spec's ``ε`` [ours] added to every norm before taking its reciprocal."""

StateDict = Mapping[str, Tensor]
GlobalScale = Union[int, float, str]

_SCALE_TIMES_M = re.compile(
    r"^\s*((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)?\s*\*?\s*[mM]\s*$"
)


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}")


def check_nan_options(
    norm_target: str = "finetuned",
    granularity: str = "model",
    normalize: str = "sum",
    eps: float = DEFAULT_EPS,
) -> None:
    """Reject unknown option names and an ``eps`` that is not a finite number ``>= 0``."""
    _check_choice("norm_target", norm_target, NORM_TARGETS)
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_choice("normalize", normalize, NORMALIZATIONS)
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not math.isfinite(eps)
        or eps < 0
    ):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")


def resolve_global_scale(global_scale: GlobalScale, num_models: int) -> float:
    """The global scale ``s`` for ``num_models`` models.

    ``global_scale`` is a number (used as is), a string ``"<x>M"`` / ``"<x>*M"`` (``x ·
    num_models``; ``"M"`` alone is ``num_models``), ``"m_half"`` (``num_models / 2``) or a
    string holding a number. The result must be finite and ``>= 0``.
    """
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
        raise ValueError(f"num_models must be a positive integer; got {num_models!r}")
    if isinstance(global_scale, bool):
        raise ValueError(
            f"global_scale must be a number or a string like '0.3M'; got {global_scale!r}"
        )
    if isinstance(global_scale, (int, float)):
        scale = float(global_scale)
    elif isinstance(global_scale, str):
        text = global_scale.strip()
        match = _SCALE_TIMES_M.match(text)
        if text.lower() == "m_half":
            scale = num_models / 2.0
        elif match is not None:
            factor = float(match.group(1)) if match.group(1) is not None else 1.0
            scale = factor * num_models
        else:
            try:
                scale = float(text)
            except ValueError:
                raise ValueError(
                    "global_scale must be a number, '<x>M' (x times the number of models, "
                    f"e.g. '0.3M') or 'm_half'; got {global_scale!r}"
                ) from None
    else:
        raise ValueError(
            "global_scale must be a number or a string like '0.3M'; "
            f"got {type(global_scale).__name__}"
        )
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"global_scale must resolve to a finite number >= 0; got {scale!r}")
    return scale


def tensor_norms(
    models: Sequence[StateDict],
    keys: Sequence[str],
    *,
    pretrained: Optional[StateDict] = None,
    names: Optional[Sequence[str]] = None,
) -> Tensor:
    """Frobenius norms, in float64, of every model's tensors: shape ``(M, len(keys))``.

    With ``pretrained`` given, the norms are of the task vectors ``θ_i^l - θ_0^l`` (the
    difference is taken in float64); without it, of the weights ``θ_i^l`` themselves.
    ``names`` label the models in error messages.
    """
    models = list(models)
    keys = list(keys)
    labels = list(names) if names is not None else [str(i) for i in range(len(models))]
    if len(labels) != len(models):
        raise ValueError(f"got {len(labels)} names for {len(models)} models")
    if not keys:
        raise ValueError("no tensors to take the norms of: keys is empty")
    norms = torch.empty(len(models), len(keys), dtype=torch.float64)
    for j, key in enumerate(keys):
        base = None
        if pretrained is not None:
            if key not in pretrained:
                raise ValueError(f"tensor '{key}' is missing from the pretrained model")
            base = _as_float64(pretrained[key], key, "the pretrained model")
        for i, (model, label) in enumerate(zip(models, labels)):
            if key not in model:
                raise ValueError(f"tensor '{key}' is missing from model '{label}'")
            value = _as_float64(model[key], key, f"model '{label}'")
            if base is not None:
                if value.shape != base.shape:
                    raise ValueError(
                        f"tensor '{key}': model '{label}' has shape {tuple(value.shape)}, "
                        f"the pretrained model {tuple(base.shape)}"
                    )
                value = value - base
            norm = float(torch.linalg.vector_norm(value))
            if not math.isfinite(norm):
                where = "the pretrained model or " if base is not None else ""
                raise ValueError(
                    f"tensor '{key}' of {where}model '{label}' has a non-finite norm ({norm}): "
                    "the weights contain NaN/Inf or overflow float64"
                )
            norms[i, j] = norm
    return norms


def _as_float64(tensor: Tensor, key: str, owner: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise ValueError(
            f"tensor '{key}' of {owner} is a {type(tensor).__name__}, not a torch.Tensor"
        )
    if not tensor.is_floating_point():
        raise ValueError(
            f"tensor '{key}' of {owner} has dtype {tensor.dtype}; NAN norms are taken over "
            "floating-point tensors only (leave integer buffers out of keys)"
        )
    value = tensor.detach().to(torch.float64)
    check_finite(value.reshape(1, -1), what=f"tensor '{key}' of", names=[owner])
    return value


def model_norms(per_tensor_norms: Tensor) -> Tensor:
    """Global Frobenius norm per model from its per-tensor norms ``(M, L)``: ``(M,)``."""
    if per_tensor_norms.dim() != 2:
        raise ValueError(
            f"expected per-tensor norms of shape (M, L); got {tuple(per_tensor_norms.shape)}"
        )
    return per_tensor_norms.to(torch.float64).square().sum(dim=1).sqrt()


def nan_coefficients(
    norms: Union[Tensor, Sequence[float]],
    normalize: str = "sum",
    eps: float = DEFAULT_EPS,
    *,
    names: Optional[Sequence[str]] = None,
    units: Optional[Sequence[str]] = None,
) -> Tensor:
    """NAN coefficients from norms, normalised over the models (dim 0), in float64.

    Args:
        norms: ``(M,)`` one norm per model, or ``(M, L)`` one per model and tensor (each column
            is normalised on its own).
        normalize: ``"sum"`` of the reciprocals (primary) or ``"softmax"`` over the reciprocals.
        eps: added to every norm before the reciprocal (the spec's ``1e-12``).
        names, units: labels of the models (rows) and tensors (columns) for error messages.

    Returns:
        ``α`` with the shape of ``norms``; each column sums to 1.

    Raises:
        ValueError: fewer than two models, negative/NaN/Inf norms, a zero norm in a column whose
            other norms are not all zero, or unknown options.
    """
    _check_choice("normalize", normalize, NORMALIZATIONS)
    check_nan_options(eps=eps)
    norms = torch.as_tensor(norms, dtype=torch.float64)
    if norms.dim() not in (1, 2):
        raise ValueError(f"norms must have shape (M,) or (M, L); got {tuple(norms.shape)}")
    num_models = norms.shape[0]
    if num_models < 2:
        raise ValueError(
            f"NAN needs at least two models to weigh against each other; got {num_models}"
        )
    if norms.dim() == 2 and norms.shape[1] == 0:
        raise ValueError("norms has no tensors (shape (M, 0))")
    if not bool(torch.isfinite(norms).all()):
        raise ValueError(f"norms must be finite; got {norms.tolist()}")
    if bool((norms < 0).any()):
        raise ValueError(f"norms must be >= 0; got {norms.tolist()}")

    column = norms if norms.dim() == 2 else norms.unsqueeze(1)
    zero = column == 0
    all_zero = zero.all(dim=0)
    mixed = zero.any(dim=0) & ~all_zero
    if bool(mixed.any()):
        j = int(torch.nonzero(mixed)[0])
        rows = torch.nonzero(zero[:, j]).flatten().tolist()
        model_labels = [names[i] if names is not None else str(i) for i in rows]
        if norms.dim() == 2:
            where = f" for tensor '{units[j] if units is not None else j}'"
            hint = (
                "with norm_target=task_vector this is an expert that did not change this tensor; "
                "use granularity=model, or leave the tensor out of the merge (remove_keys)"
            )
        else:
            where = ""
            hint = (
                "with norm_target=task_vector this is an expert identical to the pretrained "
                "model; drop it from the pool"
            )
        raise ValueError(
            f"model(s) {model_labels} have a zero norm{where} while other models do not: the "
            "inverse norm is undefined (1/(0+eps) would give them all the weight and erase the "
            f"others' updates); {hint}"
        )

    reciprocals = 1.0 / (column + eps)
    if normalize == "sum":
        # eps = 0 and a column of zero norms: 1/0 = inf; uniform is the limit and what eps > 0 gives
        reciprocals = torch.where(all_zero.unsqueeze(0), torch.ones_like(reciprocals), reciprocals)
        alpha = reciprocals / reciprocals.sum(dim=0, keepdim=True)
    else:
        reciprocals = torch.where(all_zero.unsqueeze(0), torch.zeros_like(reciprocals), reciprocals)
        alpha = torch.softmax(reciprocals, dim=0)
    return alpha if norms.dim() == 2 else alpha.squeeze(1)


@dataclass(frozen=True)
class NANCoefficients:
    """NAN coefficients of a pool, with what they were computed from (for logs and JSON)."""

    names: List[str]
    """The models, in the order of the rows of ``norms`` and ``alpha``."""
    keys: List[str]
    """The tensors the norms were taken over (the columns at ``granularity="layer"``)."""
    norm_target: str
    granularity: str
    normalize: str
    eps: float
    norms: Tensor
    """``(M,)`` at ``granularity="model"``, ``(M, L)`` at ``"layer"``; float64."""
    alpha: Tensor
    """Same shape as ``norms``; sums to 1 over the models."""

    def coefficient(self, model_index: int, key_index: int) -> float:
        """``α_i`` (model granularity) or ``α_i^l`` (layer granularity)."""
        if self.alpha.dim() == 1:
            return float(self.alpha[model_index])
        return float(self.alpha[model_index, key_index])

    def max_min_ratio(self) -> float:
        """Largest ``max_i α_i / min_i α_i`` (over tensors at layer granularity); 1 = uniform."""
        alpha = self.alpha if self.alpha.dim() == 2 else self.alpha.unsqueeze(1)
        return float((alpha.max(dim=0).values / alpha.min(dim=0).values).max())

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready: ``alpha``/``norms`` by model, or by tensor then model at layer level."""
        data: Dict[str, object] = {
            "norm_target": self.norm_target,
            "granularity": self.granularity,
            "normalize": self.normalize,
            "eps": self.eps,
            "models": list(self.names),
            "num_tensors": len(self.keys),
            "alpha_max_min_ratio": self.max_min_ratio(),
        }
        if self.alpha.dim() == 1:
            data["norms"] = dict(zip(self.names, self.norms.tolist()))
            data["alpha"] = dict(zip(self.names, self.alpha.tolist()))
        else:
            data["norms"] = {
                key: dict(zip(self.names, self.norms[:, j].tolist()))
                for j, key in enumerate(self.keys)
            }
            data["alpha"] = {
                key: dict(zip(self.names, self.alpha[:, j].tolist()))
                for j, key in enumerate(self.keys)
            }
        return data


def compute_nan_coefficients(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    keys: Sequence[str],
    *,
    norm_target: str = "finetuned",
    granularity: str = "model",
    normalize: str = "sum",
    eps: float = DEFAULT_EPS,
) -> NANCoefficients:
    """NAN coefficients of the ``experts`` over the tensors ``keys`` (one pass over the weights).

    ``pretrained`` is needed for ``norm_target="task_vector"`` (and ignored otherwise).
    """
    check_nan_options(norm_target, granularity, normalize, eps)
    names = list(experts)
    if len(names) < 2:
        raise ValueError(f"NAN needs at least two models to weigh against each other; got {names}")
    per_tensor = tensor_norms(
        [experts[name] for name in names],
        keys,
        pretrained=pretrained if norm_target == "task_vector" else None,
        names=names,
    )
    norms = model_norms(per_tensor) if granularity == "model" else per_tensor
    alpha = nan_coefficients(norms, normalize, eps, names=names, units=list(keys))
    return NANCoefficients(
        names=names,
        keys=list(keys),
        norm_target=norm_target,
        granularity=granularity,
        normalize=normalize,
        eps=float(eps),
        norms=norms,
        alpha=alpha,
    )


# --- the per-tensor units the engine runs -----------------------------------------------------


class _NANWeights:
    """NAN's coefficients from one parameter at a time: at ``granularity="model"`` one statistics
    pass sums every merged parameter's squared norms (float64) before merging; at ``"layer"``
    each parameter's own norms give its coefficients when it is merged."""

    def _init_nan(self, names: Sequence[str], norm_target: str, granularity: str,
                  normalize: str, eps: float, scale: float, remove) -> None:
        check_nan_options(norm_target, granularity, normalize, eps)
        if len(names) < 2:
            raise ValueError(f"NAN needs at least two models to weigh against each other; got "
                             f"{list(names)}")
        self.names = list(names)
        self.norm_target, self.granularity = norm_target, granularity
        self.normalize, self.eps, self.scale = normalize, float(eps), float(scale)
        self._remove = remove
        self.alpha: Optional[Tensor] = None  # (M,) at model granularity, after its pass
        self.model_norms: Optional[Tensor] = None
        self.layer_rows: List[dict] = []  # layer granularity: each parameter's norms and α

    def treatment(self, name, shape, dtype) -> str:
        if not dtype.is_floating_point or (self._remove is not None and self._remove.matches(name)):
            return KEEP
        return MERGE

    def _norms(self, name: str, task_vectors: Tensor, base: Tensor) -> Tensor:
        """``(M,)`` float64 norms of this parameter's ``θ_0 + τ_i`` or ``τ_i``."""
        values = task_vectors.reshape(task_vectors.shape[0], -1).to(torch.float64)
        if self.norm_target == "finetuned":
            values = values + base.reshape(1, -1).to(torch.float64)
        norms = torch.linalg.vector_norm(values, dim=1)
        if not bool(torch.isfinite(norms).all()):
            raise ValueError(f"tensor '{name}' has a non-finite norm: the weights contain NaN/Inf "
                             "or overflow float64")
        return norms

    def _absorb_norms(self, totals: Mapping[str, Tensor]) -> None:
        self.model_norms = totals["norm_sq"].sqrt()
        self.alpha = nan_coefficients(self.model_norms, self.normalize, self.eps,
                                      names=self.names)

    def _alpha(self, name: str, task_vectors: Tensor, base: Tensor, record: bool) -> Tensor:
        """``α`` for this parameter; ``record``: keep it for the diagnostics (once per
        parameter, when it is merged)."""
        if self.granularity == "model":
            return self.alpha
        norms = self._norms(name, task_vectors, base)
        alpha = nan_coefficients(norms, self.normalize, self.eps, names=self.names,
                                 units=[name])
        if record:
            self.layer_rows.append({"name": name, "norms": norms.tolist(),
                                    "alpha": alpha.tolist()})
        return alpha

    def _nan_diagnostics(self) -> dict:
        data = {"norm_target": self.norm_target, "granularity": self.granularity,
                "normalize": self.normalize, "eps": self.eps, "models": self.names,
                "scale": self.scale}
        if self.granularity == "model":
            data["norms"] = dict(zip(self.names, self.model_norms.tolist()))
            data["alpha"] = dict(zip(self.names, self.alpha.tolist()))
            data["effective_weights"] = {name: self.scale * a
                                         for name, a in zip(self.names, self.alpha.tolist())}
        else:
            data["layers"] = self.layer_rows
        return data


@register
class TaskArithmeticNAN(_NANWeights, TensorMergeMethod):
    """Task Arithmetic with NAN coefficients, per parameter: ``θ = θ_0 + s Σ_i α_i τ_i``."""

    name = "task_arithmetic_nan"

    def __init__(self, names: Sequence[str], *, norm_target: str = "finetuned",
                 granularity: str = "model", normalize: str = "sum", eps: float = DEFAULT_EPS,
                 scale: float = 1.0, remove=None):
        self._init_nan(names, norm_target, granularity, normalize, eps, scale, remove)
        self.statistics_passes = 1 if granularity == "model" else 0

    def statistics(self, pass_index, name, task_vectors, base):
        return {"norm_sq": self._norms(name, task_vectors, base).square()}

    def absorb(self, pass_index, totals):
        self._absorb_norms(totals)

    def merge(self, name, task_vectors, base):
        alpha = self._alpha(name, task_vectors, base, record=True)
        update = None
        for i in range(task_vectors.shape[0]):  # in order: FusionBench's state_dict_add chain
            scaled = task_vectors[i] * (self.scale * float(alpha[i]))
            update = scaled if update is None else update + scaled
        return update

    def diagnostics(self):
        return {"method": self.name, **self._nan_diagnostics()}


@register
class TiesMergingNAN(_NANWeights, TensorMergeMethod):
    """TIES-Merging on ``α_i τ_i`` with NAN coefficients, then ``θ_0 + s τ_merged``, one
    parameter at a time (:mod:`fusion_bench_ace.methods.ties`: the threshold and the majority
    sign over the whole model come from statistics passes)."""

    name = "ties_merging_nan"

    def __init__(self, names: Sequence[str], *, norm_target: str = "finetuned",
                 granularity: str = "model", normalize: str = "sum", eps: float = DEFAULT_EPS,
                 scale: float = 1.0, remove=None, threshold: float = 20,
                 merge_func: str = "sum"):
        self._init_nan(names, norm_target, granularity, normalize, eps, scale, remove)
        self.threshold, self.merge_func = threshold, merge_func
        self.scaling_factor = self.scale  # TIES merges α τ; s multiplies the merged vector
        # passes: the norms (model granularity), the magnitude threshold's 16-bit digits (two in
        # float32, four in float64: set once the plan is known), the majority sign
        self._passes: List[str] = []
        self._entries = 0
        self._shifts: List[int] = []
        self._prefix = self._ranks = self.thresholds = None
        self.majority: Optional[float] = None

    @property
    def statistics_passes(self) -> int:
        return len(self._passes)

    def planned(self, merged) -> None:
        dtypes = {dtype for _, dtype in merged.values()}
        if len(dtypes) > 1:
            raise ValueError("TIES selects one magnitude threshold over the whole model; its "
                             "parameters are computed in several dtypes: "
                             f"{sorted(map(str, dtypes))}")
        self._dtype = dtypes.pop() if dtypes else torch.float32
        self._shifts = ties.digit_shifts(self._dtype)
        self._entries = sum(_numel(shape) for shape, _ in merged.values())
        self._ranks = [ties.kth_rank(self._entries, self.threshold)] * len(self.names)
        self._prefix = None
        self._passes = ((["norms"] if self.granularity == "model" else [])
                        + ["digit"] * len(self._shifts) + ["sign"])

    def _weighted(self, name, task_vectors, base, record: bool = False) -> Tensor:
        alpha = self._alpha(name, task_vectors, base, record)
        shape = (-1,) + (1,) * (task_vectors.dim() - 1)
        return task_vectors * alpha.to(task_vectors.dtype).reshape(shape)

    def statistics(self, pass_index, name, task_vectors, base):
        kind = self._passes[pass_index]
        if kind == "norms":
            return {"norm_sq": self._norms(name, task_vectors, base).square()}
        weighted = self._weighted(name, task_vectors, base)
        if kind == "digit":
            digit = self._passes[:pass_index + 1].count("digit") - 1
            return {"histogram": ties.digit_histogram(weighted, self._shifts[digit],
                                                      self._prefix)}
        signs = ties.elected_signs(ties.trimmed(weighted, self.thresholds))
        return {"sign_balance": (signs > 0).sum().reshape(1) - (signs < 0).sum().reshape(1)}

    def absorb(self, pass_index, totals):
        kind = self._passes[pass_index]
        if kind == "norms":
            self._absorb_norms(totals)
        elif kind == "digit":
            digit = self._passes[:pass_index + 1].count("digit") - 1
            bucket, ranks = ties.bucket_of_rank(totals["histogram"], self._ranks)
            self._ranks = ranks.tolist()
            self._prefix = bucket if self._prefix is None else (self._prefix << 16) | bucket
            if digit == len(self._shifts) - 1:
                self.thresholds = ties.threshold_values(self._prefix, self._dtype)
        else:
            self.majority = float(torch.sign(totals["sign_balance"].to(torch.float64)))

    def merge(self, name, task_vectors, base):
        kept = ties.trimmed(self._weighted(name, task_vectors, base, record=True),
                            self.thresholds)
        signs = ties.elected_signs(kept)
        return ties.disjoint_merge(kept, signs, self.majority, self.merge_func)

    def diagnostics(self):
        return {"method": self.name, "threshold": self.threshold, "merge_func": self.merge_func,
                "entries": self._entries, "magnitude_thresholds": self.thresholds.tolist(),
                "majority_sign": self.majority, **self._nan_diagnostics()}


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
