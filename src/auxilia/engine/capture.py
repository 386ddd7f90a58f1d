"""Forward hooks capturing per-sample gradient factors: the machinery of ``ghost``/``sketch``.

Capture
    At start, every submodule that owns shared parameters becomes a *unit* with a forward hook
    (prepended, so it sees the layer's own output, before other hooks). While gradients are
    enabled the hook records each call: the inputs (detached, not copied) and the gradient edge
    of each output (so an in-place change of the output afterwards does not matter). Under
    ``torch.no_grad()`` or ``inference_mode`` it records nothing and costs nothing.

One backward
    ``collect`` runs one ``torch.autograd.grad`` of L = Σ_k mean_k = Σ_i ℓ_i / n_{k(i)} with
    respect to the recorded outputs and the non-shared parameters (which thereby receive their
    gradient Σ_k g_k): the output gradient of sample i already carries its 1/n_k. Parameter
    gradients of shared layers are not computed by autograd at all; the units turn inputs and
    output gradients into :mod:`~auxilia.engine.factors`:

    * ``Linear``, ``Conv1d``, ``Conv2d`` (stride, dilation, groups, any padding and padding
      mode): the weight gradient of sample i is Σ_t b_it a_itᵀ (a: the input, or unfolded
      patches; t: positions, e.g. tokens or pixels), the bias Σ_t b_it;
    * ``Embedding``: rows idx_it of the table receive b_it (``padding_idx`` and
      ``scale_grad_by_freq`` honoured; ``sparse=True`` is refused);
    * ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm`` (running statistics, or batch
      statistics of an input that needs no gradient): the affine gradients x̂ ⊙ b and b, summed
      over positions, with x̂ recomputed from the recorded input;
    * ``nn.MultiheadAttention`` called as self-attention on the samples (packed in-projection,
      no ``bias_k``/``bias_v``; attention masks [T, T] and padding masks, boolean or additive;
      per-head masks take the per-source path): the in-projection and ``out_proj`` as linear
      layers, on the recorded input and on the context from one replay of the attention core
      (:class:`AttentionUnit`), which redraws the forward's own dropout mask; other calls take
      the route below;
    * every other module owning shared parameters (a custom layer, a raw ``nn.Parameter`` used
      in a parent's forward): exact per-sample gradients of that module's own
      parameters with ``torch.func`` — ``functional_call`` replayed per sample under ``vmap``,
      ``vjp`` with the recorded output gradients; its submodules are not run again (their
      recorded outputs, and the gradients at their inputs, stand in: :class:`FunctionalUnit`).
      The replay must be deterministic (no dropout in that module's own operations) and
      vmappable; otherwise a clear :class:`~auxilia.errors.ModeUnavailableError` names the
      module, before the backward (the replay is tried first). Never silently skipped. It runs
      under the autocast state recorded at the call; where kernels refuse autocast inside
      ``vmap`` (seen on CUDA) it is replayed in the parameters' precision instead.

    A parameter shared by several layers (tied embeddings) gets each layer's contribution;
    they are summed per source before the Gram matrix. The graph is freed by the backward,
    as ``loss.backward()`` would.

Which rows are samples
    A call is *per sample* when its input and output have the step's N samples along the batch
    dimension (dim 0; dim 1 for a sequence-first ``MultiheadAttention``). Several such calls
    in a step (a layer reused) are summed as extra positions. A call with another number of
    rows (a head applied to a subset of rows, a flattened batch×time, a sequence-first layout)
    cannot be mapped to samples; it takes the *per-source* path instead: one extra backward
    from the losses to those outputs, batched over the present sources (``is_grads_batched``),
    gives each source's own output gradient, and the factors are formed per source. That is
    exact whatever the rows are, and costs one backward per source from the losses down to that
    layer (little for a head next to the loss).

Safeguards
    Samples must not interact: ``BatchNorm`` normalising a gradient-carrying input with batch
    statistics raises an error. A shared parameter that receives a gradient although its
    module was not called (read directly by another module) raises an error. An input
    modified in place after the call raises an error. With ``verify`` (the default) the first
    step of each new call pattern (up to three) is also measured with ``exact`` and any
    disagreement raises an error: this catches what the hooks cannot see (a tied weight used
    through ``F.linear``, samples reordered inside the model, samples mixed by custom code).

The hooks are removed by :meth:`Capture.close` (``Engine.close()``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from auxilia.engine.exact import accumulate, gradient_statistics, measure_exact
from auxilia.engine.factors import F64, Dense2D, EmbeddingRows, Factor, PerSample, gram_of
from auxilia.engine.mode import ModeContext
from auxilia.engine.source_losses import SourceLosses
from auxilia.errors import EngineError, ModeUnavailableError
from auxilia.statistics import Need, Statistics

_GRAM = frozenset({Need.GRAM})
# Channels-last patches only pay off from this many channels per group: below it, the extra
# copy of the input costs more than the longer runs save (measured on CPU, 1 to 64 channels).
CHANNELS_LAST_MIN = 4
_NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Factors are formed in float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class ChildCall:
    """An outermost submodule call inside a recorded call of a module replayed with
    ``torch.func``: its outputs, and the gradient edges of its inputs as the submodule saw
    them (each a view made for it, so the edge carries only the gradient through it)."""

    module: nn.Module
    outputs: list[torch.Tensor | Any]  # flattened outputs, tensors detached
    spec: Any  # their pytree structure
    positions: list[int]  # flattened (args, kwargs) positions of the viewed inputs
    edges: list[GradientEdge]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]


@dataclass
class Call:
    """One recorded call of a unit's module."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    edges: list[GradientEdge]  # gradient edges of the outputs that need a gradient
    leaves: list[int]  # their positions among the flattened outputs
    out_shapes: list[tuple[int, ...]]
    out_dtypes: list[torch.dtype]
    versions: list[tuple[torch.Tensor, int]]  # inputs and their version counters at the call
    autocast: tuple[str, bool, torch.dtype]
    batch_stats: bool = False  # BatchNorm normalised with the batch's own statistics
    self_attention: bool = False  # MultiheadAttention called with query is key is value
    # The random number generator's state when the call began (attention with dropout at work:
    # the replay of its core draws the same dropout mask from it).
    rng: torch.Tensor | None = None
    # The outermost submodule calls inside the call (a module replayed with torch.func): the
    # replay takes their recorded outputs instead of running them; ``child_grads`` (set by
    # ``Capture.collect``) are the gradients at their inputs, one per edge, per sample.
    children: list[ChildCall] | None = None
    child_grads: list[torch.Tensor] | None = None


@dataclass
class Unit:
    """A module whose shared parameters are measured through its calls."""

    name: str
    module: nn.Module
    params: dict[str, torch.Tensor]  # local name -> shared parameter
    calls: list[Call] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"'{self.name or '<root>'}' ({type(self.module).__name__})"

    def first_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args[0] if args else kwargs.get("input")

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Call | None:
        """What to keep of a call (None: nothing needs a gradient)."""
        x = self.first_input(args, kwargs)
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        if not isinstance(x, torch.Tensor):
            raise EngineError(f"module {self.label} was called without a tensor input")
        return Call(
            args=(x.detach(),),
            kwargs={},
            edges=[get_gradient_edge(output)],
            leaves=[0],
            out_shapes=[tuple(output.shape)],
            out_dtypes=[output.dtype],
            versions=[(x, x._version)],
            autocast=(x.device.type, torch.is_autocast_enabled(x.device.type), torch.float32),
        )

    def per_sample(self, call: Call, n: int) -> bool:
        """Whether the call's rows are the step's samples."""
        x = call.args[0]
        return bool(x.dim() >= 2 and x.shape[0] == n and call.out_shapes[0][:1] == (n,))

    def factors(
        self, items: list[tuple[Call, list[torch.Tensor]]], rows: int, per_sample: bool
    ) -> list[tuple[list[torch.Tensor], Factor]]:
        """Factors of this unit's parameters from calls on one axis (samples or sources)."""
        raise NotImplementedError

    def dtype(self) -> torch.dtype:
        return compute_dtype(next(iter(self.params.values())).dtype)

    def replay_draws(self, call: Call, n: int) -> str | None:
        """What draws random numbers in a replay this call would need (None: no replay, or a
        deterministic one). Factored layers are never replayed."""
        return None

    def advice(self) -> str:
        """How to keep this module out of a per-sample replay ("" where there is none)."""
        return ""


class LinearUnit(Unit):
    """``nn.Linear``: weight Σ_t b_t a_tᵀ, bias Σ_t b_t."""

    def per_sample(self, call: Call, n: int) -> bool:
        x = call.args[0]
        return bool(x.dim() >= 1 and (x.shape[0] if x.dim() >= 2 else 1) == n)

    def factors(
        self, items: list[tuple[Call, list[torch.Tensor]]], rows: int, per_sample: bool
    ) -> list[tuple[list[torch.Tensor], Factor]]:
        dt = self.dtype()
        module = self.module
        assert isinstance(module, nn.Linear)
        ra = rows if per_sample else 1
        if per_sample and len(items) == 1:
            x, g = items[0][0].args[0], items[0][1][0]
            if x.dim() == 2 and g.dim() == 2:  # one call on [N, d] rows: the flat form
                return [_dense(self, x.to(dt), g.to(dt))]
        a = _cat([c.args[0].reshape(ra, -1, 1, module.in_features) for c, _ in items])
        b = _cat([g[0].reshape(rows, -1, 1, module.out_features) for _, g in items])
        return [_dense(self, a.to(dt), b.to(dt))]


class ConvUnit(Unit):
    """``nn.Conv1d``/``nn.Conv2d`` as a linear layer on unfolded patches, per group."""

    _order: tuple[tuple[int, int, int], torch.Tensor] | None = None

    @property
    def spatial(self) -> int:
        return 1 if isinstance(self.module, nn.Conv1d) else 2

    def per_sample(self, call: Call, n: int) -> bool:
        x = call.args[0]
        return bool(x.dim() == self.spatial + 2 and x.shape[0] == n)

    def patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unfolded patches [images, L, G, din] (L: output positions), and the weight column
        each of the din entries stands for (None: the weight's own order, cin-major).

        One strided copy of the (padded) input, in whichever layout copies longer contiguous
        runs: channels-first runs along the output width (stride 1), channels-last runs of cin
        channels (the column order is then kernel-major; :class:`Dense2D` maps it back).
        """
        m = self.module
        assert isinstance(m, nn.Conv1d | nn.Conv2d)
        pad = [int(p) for p in m._reversed_padding_repeated_twice]
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            pad = [pad[0], pad[1], 0, 0]
            kernel, dilation, stride = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
        else:
            kernel, dilation, stride = m.kernel_size, m.dilation, m.stride  # type: ignore[assignment]
        (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
        images, channels = x.shape[:2]
        height, width = x.shape[2] + pad[2] + pad[3], x.shape[3] + pad[0] + pad[1]
        groups = m.groups
        cin = channels // groups
        ho = (height - dh * (kh - 1) - 1) // sh + 1
        wo = (width - dw * (kw - 1) - 1) // sw + 1
        first_run = wo if sw == 1 else 1
        channels_last = cin >= CHANNELS_LAST_MIN and cin > first_run
        if any(pad) and (m.padding_mode != "zeros" or not channels_last):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
            pad = [0, 0, 0, 0]
        if channels_last:
            # [images, H, W, C], zero padding written around one permuting copy
            xl = x.new_zeros(images, height, width, channels)
            xl[:, pad[2] : height - pad[3], pad[0] : width - pad[1]] = x.permute(0, 2, 3, 1)
            s0, s1, s2, s3 = xl.stride()
            view = xl.as_strided(
                (images, ho, wo, groups, kh, kw, cin),
                (s0, sh * s1, sw * s2, cin * s3, dh * s1, dw * s2, s3),
            )
            return view.reshape(images, ho * wo, groups, -1), self.column_order(kh, kw, cin)
        s0, s1, s2, s3 = x.stride()
        view = x.as_strided(
            (images, groups, cin, kh, kw, ho, wo),
            (s0, cin * s1, s1, dh * s2, dw * s3, sh * s2, sw * s3),
        )
        cols = view.reshape(images, groups, cin * kh * kw, ho * wo)  # position-minor
        return cols.permute(0, 3, 1, 2), None

    def column_order(self, kh: int, kw: int, cin: int) -> torch.Tensor:
        """For channels-last patches (kernel row, kernel column, channel): the weight column
        (channel, kernel row, kernel column) of each."""
        key = (kh, kw, cin)
        if self._order is None or self._order[0] != key:
            natural = torch.arange(cin * kh * kw).view(cin, kh, kw)
            order = natural.permute(1, 2, 0).reshape(-1)
            self._order = (key, order.to(next(iter(self.params.values())).device))
        return self._order[1]

    def factors(
        self, items: list[tuple[Call, list[torch.Tensor]]], rows: int, per_sample: bool
    ) -> list[tuple[list[torch.Tensor], Factor]]:
        dt = self.dtype()
        m = self.module
        assert isinstance(m, nn.Conv1d | nn.Conv2d)
        groups, dout = m.groups, m.out_channels // m.groups
        a_parts, b_parts, orders = [], [], []
        for call, grads in items:
            x, g = call.args[0], grads[0]
            if x.dim() == self.spatial + 1:  # an unbatched input: one image
                x, g = x.unsqueeze(0), g.unsqueeze(0 if per_sample else 1)
            a, order = self.patches(x.to(dt))  # [images, L, G, din]
            images, size = a.shape[:2]
            orders.append(order)
            if per_sample:  # output gradients as views in their channel-major layout
                a_parts.append(a)
                b = g.to(dt).reshape(rows, groups, dout, size)
                b_parts.append(b.permute(0, 3, 1, 2))
            else:  # every source's gradient against the same images, as positions
                a_parts.append(a.reshape(1, images * size, groups, -1))
                b = g.to(dt).reshape(rows, images, groups, dout, size).permute(0, 1, 4, 2, 3)
                b_parts.append(b.reshape(rows, images * size, groups, dout))
        if any(o is not orders[0] for o in orders):  # calls of different shapes: one order
            pairs = zip(a_parts, orders, strict=True)
            a_parts = [p if o is None else p[..., torch.argsort(o)] for p, o in pairs]
            orders = [None]
        return [_dense(self, _cat(a_parts), _cat(b_parts), orders[0])]


class EmbeddingUnit(Unit):
    """``nn.Embedding``: rows idx_t receive b_t."""

    def per_sample(self, call: Call, n: int) -> bool:
        x = call.args[0]
        return bool(x.dim() >= 1 and x.shape[0] == n)

    def factors(
        self, items: list[tuple[Call, list[torch.Tensor]]], rows: int, per_sample: bool
    ) -> list[tuple[list[torch.Tensor], Factor]]:
        dt = self.dtype()
        m = self.module
        assert isinstance(m, nn.Embedding)
        ra = rows if per_sample else 1
        idx_parts, b_parts = [], []
        for call, grads in items:
            idx = call.args[0].reshape(ra, -1)
            b = grads[0].reshape(rows, -1, m.embedding_dim).to(dt)
            if m.padding_idx is not None:
                b = b * (idx != m.padding_idx).unsqueeze(-1).to(dt)
            if m.scale_grad_by_freq:
                counts = torch.bincount(idx.reshape(-1), minlength=m.num_embeddings)
                b = b / counts[idx].unsqueeze(-1).to(dt)
            idx_parts.append(idx)
            b_parts.append(b)
        factor = EmbeddingRows(_cat(idx_parts), _cat(b_parts), m.weight.shape)
        return [([m.weight], factor)]


class NormUnit(Unit):
    """Affine parameters of LayerNorm, RMSNorm, GroupNorm and BatchNorm: x̂ ⊙ b and b."""

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Call | None:
        call = super().record(args, kwargs, output)
        m = self.module
        if call is not None and isinstance(m, nn.modules.batchnorm._BatchNorm):
            call.batch_stats = m.training or (m.running_mean is None and m.running_var is None)
        return call

    @property
    def channel_first(self) -> bool:
        return not isinstance(self.module, nn.LayerNorm | _rms_type())

    def per_sample(self, call: Call, n: int) -> bool:
        x = call.args[0]
        if self.channel_first:
            return bool(x.dim() >= 2 and x.shape[0] == n)
        shape = tuple(getattr(self.module, "normalized_shape", ()))
        return bool(x.dim() > len(shape) and x.shape[0] == n)

    def normalised(self, call: Call, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if call.batch_stats:
                return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
            return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        assert isinstance(m, _rms_type())
        rms: Any = m
        return F.rms_norm(x, list(rms.normalized_shape), None, rms.eps)

    def factors(
        self, items: list[tuple[Call, list[torch.Tensor]]], rows: int, per_sample: bool
    ) -> list[tuple[list[torch.Tensor], Factor]]:
        dt = self.dtype()
        ra = rows if per_sample else 1
        gw: torch.Tensor | None = None
        gb: torch.Tensor | None = None
        for call, outgrads in items:
            x, g = call.args[0].to(dt), outgrads[0].to(dt)
            xhat = self.normalised(call, x)
            if self.channel_first:
                channels, size = x.shape[1], _spatial(x)
                xhat = xhat.reshape(ra, -1, channels, size)
                g = g.reshape(rows, -1, channels, size)
                w, b = (xhat * g).sum((1, 3)), g.sum((1, 3))
            else:
                shape = tuple(getattr(self.module, "normalized_shape", ()))
                xhat = xhat.reshape(ra, -1, *shape)
                g = g.reshape(rows, -1, *shape)
                w, b = (xhat * g).sum(1), g.sum(1)
            gw = w if gw is None else gw + w
            gb = b if gb is None else gb + b
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for name, value in (("weight", gw), ("bias", gb)):
            if name in self.params and value is not None:
                params.append(self.params[name])
                grads.append(value)
        return [(params, PerSample(grads, [p.shape for p in params]))] if params else []


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Calls of one layer side by side as positions (dim 1)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _dense(
    unit: Unit, a: torch.Tensor, b: torch.Tensor, order: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], Factor]:
    """The weight-and-bias factor of a linear or convolution unit."""
    weight, bias = unit.params.get("weight"), unit.params.get("bias")
    params = [p for p in (weight, bias) if p is not None]
    shapes = (None if weight is None else weight.shape, None if bias is None else bias.shape)
    return params, Dense2D(a, b, *shapes, order=order)


def _spatial(t: torch.Tensor) -> int:
    return math.prod(t.shape[2:]) if t.dim() > 2 else 1


def _rms_type() -> type[nn.Module]:
    return nn.RMSNorm if hasattr(nn, "RMSNorm") else type(None)  # type: ignore[return-value]


class FunctionalUnit(Unit):
    """Any other module: exact per-sample gradients of its parameters with ``torch.func``.

    A module with submodules (its own parameters beside them: a raw positional embedding, a
    class token, a layer scale) is replayed without running them: each outermost submodule
    call is recorded with its outputs and, through a view of each input made for it, the
    gradient that reaches the submodule's inputs; the replay returns the recorded outputs, and
    its vector-Jacobian product takes the module's own output gradients and those input
    gradients (by the chain rule, the whole gradient of its own parameters). Submodules then
    cost nothing in the replay and may draw dropout masks.
    """

    replay: Callable[[bool], None] = staticmethod(lambda on: None)  # set by the Capture
    pending_children: list[ChildCall] | None = None  # the current call's submodule calls
    child_depth: int = 0  # submodule calls open inside the current call
    # The step's true gradient of this module's parameters (from the one backward), against
    # which the per-sample gradients of a replay that took recorded submodule calls are
    # checked, within ``tolerance`` (the Capture's precision); ``stubbing`` turns that replay
    # off once a check has failed.
    true_grads: dict[str, torch.Tensor] | None = None
    tolerance: float = 1e-3
    stubbing: bool = True

    def begin_call(self) -> None:
        """Before the module's forward: start recording its submodules' calls."""
        self.pending_children = []
        self.child_depth = 0

    def child_input(self, child: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Before a submodule's forward: for an outermost call, its tensor inputs that need a
        gradient as views of their own (the same view for the same tensor); returns the new
        (args, kwargs), or None (unchanged)."""
        self.child_depth += 1
        if self.pending_children is None or self.child_depth > 1:
            return None
        leaves, spec = tree_flatten((args, kwargs))
        views: dict[int, torch.Tensor] = {}
        positions: list[int] = []
        for j, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                if id(leaf) not in views:  # one view, one edge, one position per tensor
                    views[id(leaf)] = leaf.view_as(leaf)
                    positions.append(j)
                leaves[j] = views[id(leaf)]
        self.pending_children.append(
            ChildCall(
                module=child,
                outputs=[],
                spec=None,
                positions=positions,
                edges=[get_gradient_edge(leaves[j]) for j in positions],
                shapes=[tuple(leaves[j].shape) for j in positions],
                dtypes=[leaves[j].dtype for j in positions],
            )
        )
        return tree_unflatten(leaves, spec)

    def child_output(self, child: nn.Module, output: Any) -> None:
        """After a submodule's forward: for an outermost call, keep its outputs (detached)."""
        self.child_depth -= 1
        if self.pending_children is None or self.child_depth > 0:
            return
        calls = [c for c in self.pending_children if c.module is child and c.spec is None]
        if not calls:
            self.pending_children = None  # out of step (a failed call): replay whole
            return
        leaves, spec = tree_flatten(output)
        calls[-1].outputs = [_detach(t) if isinstance(t, torch.Tensor) else t for t in leaves]
        calls[-1].spec = spec

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Call | None:
        leaves, _ = tree_flatten(output)
        edges, where, shapes, dtypes = [], [], [], []
        for j, leaf in enumerate(leaves):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                edges.append(get_gradient_edge(leaf))
                where.append(j)
                shapes.append(tuple(leaf.shape))
                dtypes.append(leaf.dtype)
        if not edges:
            return None
        inputs, _ = tree_flatten((args, kwargs))
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        device = tensors[0].device.type if tensors else self.device_type()
        children, self.pending_children = self.pending_children, None
        if children is not None and any(c.spec is None for c in children):
            children = None
        return Call(
            args=tuple(_detached(a) for a in args),
            kwargs={k: _detached(v) for k, v in kwargs.items()},
            edges=edges,
            leaves=where,
            out_shapes=shapes,
            out_dtypes=dtypes,
            versions=[(t, t._version) for t in tensors],
            autocast=_autocast_state(device),
            children=children or None,
        )

    def device_type(self) -> str:
        return next(iter(self.params.values())).device.type

    def batch_dims(self, call: Call, n: int) -> tuple[list[int | None], list[int | None]] | None:
        """Batch dimension of every flattened input and of every recorded output (None: not
        per sample); None when the call cannot be mapped to samples."""
        leaves, _ = tree_flatten((call.args, call.kwargs))
        if isinstance(self.module, nn.MultiheadAttention):
            return _mha_dims(self.module, call, n)
        ins: list[int | None] = [
            0 if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n else None
            for t in leaves
        ]
        if all(d is None for d in ins) or any(s[:1] != (n,) for s in call.out_shapes):
            return None
        return ins, [0] * len(call.out_shapes)

    def per_sample(self, call: Call, n: int) -> bool:
        return self.batch_dims(call, n) is not None

    def replay_draws(self, call: Call, n: int) -> str | None:
        """Dropout at work inside the module: its per-sample replay cannot redraw the mask
        (none when its submodules, where dropout lives, are not run by the replay)."""
        return None if self.children_ok(call, n) else _drawing(self.name, self.module)

    def children_ok(self, call: Call, n: int) -> bool:
        """Whether the replay can take this call's submodule calls as recorded: every one's
        viewed inputs and tensor outputs have the step's n samples along dim 0, and a tensor of
        three or more dims not along dim 1 too (a sequence-first [T, N, ·] whose T happens to
        be n is not taken for samples: such calls are replayed whole). The per-sample
        gradients are then checked against the step's true gradient (:meth:`factors`)."""
        if not self.stubbing or not call.children or self.batch_dims(call, n) is None:
            return False
        shapes = [shape for child in call.children for shape in child.shapes] + [
            tuple(out.shape)
            for child in call.children
            for out in child.outputs
            if isinstance(out, torch.Tensor)
        ]
        return all(shape[:1] == (n,) and (len(shape) < 3 or shape[1] != n) for shape in shapes)

    def advice(self) -> str:
        """For a module with submodules that owns parameters itself (a raw positional
        embedding, a class token, a layer scale): how to keep its submodules out of the replay."""
        if not any(True for _ in self.module.children()) or isinstance(
            self.module, nn.MultiheadAttention
        ):
            return ""
        names = ", ".join(f"'{n}'" for n in self.params)
        return (
            f". It is replayed whole because it uses its own parameters ({names}) in its "
            "forward: in a small submodule of their own (an nn.Embedding for positions, say) "
            "they are replayed alone and its other layers are measured from their factors"
        )

    def grads(
        self,
        call: Call,
        cotangents: list[torch.Tensor],
        rows: int,
        per_sample: bool,
        child_cotangents: list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-row gradients [rows, *shape] of this module's parameters for one call;
        ``child_cotangents``: the gradients at its submodules' inputs (per sample), when the
        replay takes their recorded outputs instead of running them."""
        module = self.module
        n = rows
        leaves, spec = tree_flatten((call.args, call.kwargs))
        dims = self.batch_dims(call, n) if per_sample else None
        in_dims: list[int | None] = dims[0] if dims is not None else [None] * len(leaves)
        out_dims: list[int | None] = dims[1] if dims is not None else [None] * len(call.leaves)
        tensor_pos = [j for j, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
        children = call.children if per_sample and child_cotangents is not None else None
        recorded = (
            []
            if children is None
            else [t for child in children for t in child.outputs if isinstance(t, torch.Tensor)]
        )
        batched = [*(leaves[j] for j in tensor_pos), *recorded]
        batched_dims = [*(in_dims[j] for j in tensor_pos), *(0 for _ in recorded)]
        params = {name: p.detach() for name, p in self.params.items()}
        device, enabled, dtype = call.autocast
        wanted = call.leaves
        cot_dims = out_dims if per_sample else [0] * len(cotangents)
        if children is not None:
            assert child_cotangents is not None
            cotangents = [*cotangents, *child_cotangents]
            cot_dims = [*cot_dims, *(0 for _ in child_cotangents)]

        def replay(autocast: bool) -> dict[str, torch.Tensor]:
            """vmap over rows of vjp(functional_call); without autocast, floating inputs and
            cotangents in the parameters' precision."""
            precision = next(iter(params.values())).dtype
            inputs = batched if autocast else [_floating(t, precision) for t in batched]
            cots = cotangents if autocast else [_floating(t, precision) for t in cotangents]

            def one(
                tensors: list[torch.Tensor], row: list[torch.Tensor]
            ) -> dict[str, torch.Tensor]:
                full = list(leaves)
                mine = len(tensor_pos)  # then this row's recorded submodule outputs
                for j, t, d in zip(tensor_pos, tensors[:mine], batched_dims[:mine], strict=True):
                    full[j] = t if d is None else t.unsqueeze(d)
                args, kwargs = tree_unflatten(full, spec)
                own = tensors[mine:]

                def forward(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
                    fed: list[torch.Tensor] = []
                    with (
                        torch.autocast(device, dtype=dtype, enabled=enabled and autocast),
                        _recorded_submodules(children, own, fed),
                    ):
                        out = torch.func.functional_call(module, p, tuple(args), dict(kwargs))
                    flat, _ = tree_flatten(out)
                    picked = []
                    for j, d in zip(wanted, out_dims, strict=True):
                        picked.append(
                            flat[j] if d is None or not per_sample else flat[j].squeeze(d)
                        )
                    return (*picked, *(t.squeeze(0) for t in fed))

                outputs, pullback = torch.func.vjp(forward, params)[:2]
                matched = tuple(c.to(o.dtype) for c, o in zip(row, outputs, strict=True))
                (grads,) = pullback(matched)
                return grads  # type: ignore[no-any-return]

            # no_grad: the outer autograd must not record the replay (torch.func's own
            # transforms still differentiate inside); the batching-rule fallback warning of
            # some kernels (e.g. CPU attention) only says the replay is slower.
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="There is a performance drop")
                result = torch.func.vmap(one, in_dims=(batched_dims, cot_dims))(inputs, cots)
            return dict(result)

        self.replay(True)
        try:
            try:
                return replay(autocast=True)
            except Exception:
                if not enabled:
                    raise
                # Some kernels do not combine autocast with vmap (seen on CUDA): replay in the
                # parameters' precision, within the low-precision tolerance of the step itself.
                return replay(autocast=False)
        except Exception as error:  # vmap/functional_call failures of arbitrary user code
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise EngineError(
                f"cannot compute per-sample gradients of module {self.label} with torch.func "
                f"(its forward is replayed per sample, so it must be deterministic — no dropout "
                f"in training mode — and vmappable): {first}. Use mode='exact'"
            ) from error
        finally:
            self.replay(False)

    def factors(
        self, items: list[tuple[Call, list[torch.Tensor]]], rows: int, per_sample: bool
    ) -> list[tuple[list[torch.Tensor], Factor]]:
        total = self._per_row(items, rows, per_sample, stubbed=True)
        stubbed = any(call.child_grads is not None for call, _ in items)
        if stubbed and not self._sums_match(total):
            # The recorded submodule calls were not per sample as their shapes suggested (a
            # sequence-first tensor whose length is the batch's size): replay whole instead.
            self.stubbing = False
            total = self._per_row(items, rows, per_sample, stubbed=False)
        params = [self.params[k] for k in total]
        return [(params, PerSample(list(total.values()), [p.shape for p in params]))]

    def _per_row(
        self,
        items: list[tuple[Call, list[torch.Tensor]]],
        rows: int,
        per_sample: bool,
        stubbed: bool,
    ) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for call, cots in items:
            at_inputs = call.child_grads if stubbed else None
            for name, g in self.grads(call, cots, rows, per_sample, at_inputs).items():
                g = g.to(compute_dtype(g.dtype))
                total[name] = g if name not in total else total[name] + g
        return total

    def _sums_match(self, total: dict[str, torch.Tensor]) -> bool:
        """Whether the per-row gradients sum to the step's true gradient of each parameter."""
        true = self.true_grads or {}
        for name, per_row in total.items():
            want = true.get(name)
            if want is None:
                return False
            got = per_row.sum(0).to(want.dtype)
            scale = float(want.abs().max())
            if float((got - want).abs().max()) > self.tolerance * scale + 1e-30:
                return False
        return True


class AttentionUnit(FunctionalUnit):
    """``nn.MultiheadAttention`` used as self-attention: its projections as linear factors.

    The packed in-projection is a linear layer on the input x (b: the gradient of the
    projected q, k, v) and ``out_proj`` one on the attention's context (b: the output's
    gradient). The context and the projections' gradient come from one replay of the
    attention core (q kᵀ/√d, masks, softmax, ·v) on the recorded input, with no ``vmap``.
    Dropout at work (training mode, ``dropout`` > 0) is replayed exactly: the generator's
    state is kept when the call begins (``begin``, a forward pre-hook) and the replay draws
    the same mask from it, in the order the module's forward draws it (its ``need_weights``
    path), then puts the generator back, so the user's random stream is not disturbed.
    Calls this does not cover (cross-attention, separate q/k/v weights, ``bias_k``/``bias_v``,
    ``add_zero_attn``, attention weights that receive a gradient, rows that are not the
    samples) take the exact ``torch.func`` route of the parent class.
    """

    pending_rng: torch.Tensor | None = None  # the generator's state at the current call's start

    def dropping(self) -> bool:
        """Whether the module's calls draw a dropout mask."""
        m = self.module
        assert isinstance(m, nn.MultiheadAttention)
        return m.training and m.dropout > 0.0

    def begin(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before the module's forward: keep the generator's state if dropout will draw."""
        self.pending_rng = None
        if self.dropping():
            x = _mha_arguments(args, kwargs).get("query")
            if isinstance(x, torch.Tensor):
                self.pending_rng = _rng_state(x.device)

    def record(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Call | None:
        call = super().record(args, kwargs, output)
        if call is not None:
            bound = _mha_arguments(args, kwargs)
            q = bound.get("query")
            call.self_attention = (
                isinstance(q, torch.Tensor) and q is bound.get("key") and q is bound.get("value")
            )
            call.rng = self.pending_rng if self.dropping() else None
        self.pending_rng = None
        return call

    def projects(self, call: Call, n: int) -> bool:
        """Whether the call takes the projection route, as far as is known before the backward
        (:meth:`covered` adds the attention weights' gradient)."""
        m = self.module
        assert isinstance(m, nn.MultiheadAttention)
        if not (call.self_attention and m._qkv_same_embed_dim and m.in_proj_weight is not None):
            return False
        if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
            return False
        if self.dropping() and call.rng is None:
            return False
        return self.batch_dims(call, n) is not None

    def covered(self, call: Call, cotangents: list[torch.Tensor], n: int) -> bool:
        """Whether the replay covers this call exactly."""
        if not self.projects(call, n):
            return False
        # The attention weights' gradient, when they were returned and used, is not covered.
        used = [bool(c.any()) for j, c in zip(call.leaves, cotangents, strict=True) if j != 0]
        return not any(used)

    def replay_draws(self, call: Call, n: int) -> str | None:
        return None if self.projects(call, n) else super().replay_draws(call, n)

    def factors(
        self, items: list[tuple[Call, list[torch.Tensor]]], rows: int, per_sample: bool
    ) -> list[tuple[list[torch.Tensor], Factor]]:
        fast: list[tuple[Call, list[torch.Tensor]]] = []
        rest: list[tuple[Call, list[torch.Tensor]]] = []
        for call, grads in items:
            (fast if per_sample and self.covered(call, grads, rows) else rest).append((call, grads))
        out = super().factors(rest, rows, per_sample) if rest else []
        if not fast:
            return out
        dt = self.dtype()
        replays = [self.replay_call(call, grads[call.leaves.index(0)]) for call, grads in fast]
        layers = (("in_proj_weight", "in_proj_bias", 0), ("out_proj.weight", "out_proj.bias", 2))
        for weight, bias, first in layers:  # (input, its b) at first, first + 1 of each replay
            w, b = self.params.get(weight), self.params.get(bias)
            params = [t for t in (w, b) if t is not None]
            if params:
                a = _cat([r[first].to(dt).unsqueeze(2) for r in replays])
                g = _cat([r[first + 1].to(dt).unsqueeze(2) for r in replays])
                shapes = (None if w is None else w.shape, None if b is None else b.shape)
                out.append((params, Dense2D(a, g, *shapes)))
        return out

    def replay_call(
        self, call: Call, cotangent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, ∂L/∂qkv, context, ∂L/∂output), each [N, T, ·], from one replay of the core."""
        m = self.module
        assert isinstance(m, nn.MultiheadAttention)
        bound = _mha_arguments(call.args, call.kwargs)
        x, grad_out = bound["query"], cotangent  # batched (``covered``): [N, T, E] or [T, N, E]
        if not m.batch_first:
            x, grad_out = x.transpose(0, 1), grad_out.transpose(0, 1)
        n, length, width = x.shape
        heads, dim = m.num_heads, width // m.num_heads
        mask = _attention_mask(bound, n, length, x)
        device, enabled, dtype = call.autocast
        dropout = m.dropout if call.rng is not None else 0.0
        self.replay(True)
        try:
            with (
                torch.enable_grad(),
                torch.autocast(device, dtype=dtype, enabled=enabled),
                _generator_at(call.rng, x.device),
            ):
                projected = F.linear(x, m.in_proj_weight.detach(), _detach(m.in_proj_bias))
                projected = projected.detach().requires_grad_(True)
                q, k, v = (
                    t.reshape(n, length, heads, dim).transpose(1, 2)
                    for t in projected.chunk(3, dim=-1)
                )
                if dropout and bound.get("need_weights", True):
                    # The module's own path when it returns the weights: softmax, then dropout
                    # on the weights (the same draws as its forward made).
                    scores = (q * dim**-0.5) @ k.transpose(-2, -1)
                    weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
                    context = F.dropout(weights, p=dropout) @ v
                else:
                    context = F.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, dropout_p=dropout
                    )
                context = context.transpose(1, 2).reshape(n, length, width)
                grad_context = grad_out.to(context.dtype) @ m.out_proj.weight.detach().to(
                    context.dtype
                )
                (grad_projected,) = torch.autograd.grad(context, projected, grad_context)
        finally:
            self.replay(False)
        return x, grad_projected, context.detach(), grad_out


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@contextlib.contextmanager
def _recorded_submodules(
    children: list[ChildCall] | None, outputs: Sequence[torch.Tensor], fed: list[torch.Tensor]
) -> Iterator[None]:
    """While a module is replayed for one row: its submodules return their recorded outputs
    (``outputs``: that row's tensors, in the order of ``children``) instead of running, and
    the inputs they are given (the positions that were viewed) are appended to ``fed``."""
    if children is None:
        yield
        return
    it = iter(outputs)
    queues: dict[int, list[tuple[ChildCall, list[Any]]]] = {}
    for child in children:
        leaves = [
            next(it).unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in child.outputs
        ]
        queues.setdefault(id(child.module), []).append((child, leaves))

    def stub_for(key: int) -> Callable[..., Any]:
        def stub(*args: Any, **kwargs: Any) -> Any:
            child, leaves = queues[key].pop(0)
            flat, _ = tree_flatten((args, kwargs))
            fed.extend(flat[j] for j in child.positions)
            return tree_unflatten(leaves, child.spec)

        return stub

    modules = {id(c.module): c.module for c in children}
    own = {key: m.__dict__.get("forward") for key, m in modules.items()}  # set on the instance
    try:
        for key, module in modules.items():
            module.forward = stub_for(key)
        yield
    finally:
        for key, module in modules.items():
            if own[key] is None:
                del module.forward
            else:
                setattr(module, "forward", own[key])  # noqa: B010 (restores the instance's)


def _drawing(name: str, module: nn.Module) -> str | None:
    """The first submodule of ``module`` that draws a dropout mask in its forward, named."""
    for sub_name, sub in module.named_modules():
        if not sub.training:
            continue
        p = (
            sub.p
            if isinstance(sub, nn.modules.dropout._DropoutNd)
            else sub.dropout
            if isinstance(sub, nn.MultiheadAttention)
            or (isinstance(sub, nn.RNNBase) and sub.num_layers > 1)
            else 0.0
        )
        if p > 0.0:
            full = ".".join(part for part in (name, sub_name) if part) or "<root>"
            return f"'{full}' ({type(sub).__name__}, p={p:g})"
    return None


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of the default generator that random kernels on ``device`` draw from."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


@contextlib.contextmanager
def _generator_at(state: torch.Tensor | None, device: torch.device) -> Iterator[None]:
    """Run with the default generator of ``device`` set to ``state`` (None: untouched), and
    put it back afterwards as it was."""
    if state is None:
        yield
        return
    now = _rng_state(device)
    cuda = device.type == "cuda"
    (torch.cuda.set_rng_state(state, device) if cuda else torch.set_rng_state(state))
    try:
        yield
    finally:
        (torch.cuda.set_rng_state(now, device) if cuda else torch.set_rng_state(now))


_MHA_ARGUMENTS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def _mha_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A ``MultiheadAttention`` call's arguments by name."""
    bound = dict(zip(_MHA_ARGUMENTS, args, strict=False))
    bound.update(kwargs)
    return bound


def _attention_mask(
    bound: dict[str, Any], n: int, length: int, like: torch.Tensor
) -> torch.Tensor | None:
    """``attn_mask`` [T, T] and ``key_padding_mask`` [N, T] as one additive mask [N, 1, T, T]
    (boolean True: not attended, as in ``nn.MultiheadAttention``), or None. Per-head masks
    take the per-source path (:func:`_mha_dims`), never this one."""

    def additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(
                mask, float("-inf")
            )
        return mask.to(like.dtype)

    total: torch.Tensor | None = None
    attn = bound.get("attn_mask")
    if isinstance(attn, torch.Tensor):
        total = additive(attn).view(1, 1, length, length)
    padding = bound.get("key_padding_mask")
    if isinstance(padding, torch.Tensor):
        p = additive(padding).view(n, 1, 1, length)
        total = p if total is None else total + p
    return total


def _floating(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    leaves, spec = tree_flatten(value)
    if any(isinstance(t, torch.Tensor) for t in leaves):
        return tree_unflatten([_detached(t) for t in leaves], spec)
    return value


def _mha_dims(
    module: nn.MultiheadAttention, call: Call, n: int
) -> tuple[list[int | None], list[int | None]] | None:
    names = _MHA_ARGUMENTS
    bound = _mha_arguments(call.args, call.kwargs)
    seq = 0 if module.batch_first else 1
    dims: dict[str, int | None] = {}
    for name in ("query", "key", "value"):
        t = bound.get(name)
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[seq] != n:
            return None
        dims[name] = seq
    mask = bound.get("key_padding_mask")
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2 or mask.shape[0] != n:
            return None
        dims["key_padding_mask"] = 0
    attn_mask = bound.get("attn_mask")
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() != 2:
        return None  # a per-(sample, head) mask: take the per-source path
    # Rebuild the flattened order of (args, kwargs) with these dims.
    arg_dims: list[int | None] = []
    for pos, value in enumerate(call.args):
        name = names[pos] if pos < len(names) else ""
        arg_dims.extend(_leaf_dims(value, dims.get(name)))
    kw_dims: list[int | None] = []
    for name, value in call.kwargs.items():
        kw_dims.extend(_leaf_dims(value, dims.get(name)))
    leaves, _ = tree_flatten((call.args, call.kwargs))
    ins = arg_dims + kw_dims
    if len(ins) != len(leaves):
        return None
    outs: list[int | None] = [seq if j == 0 else 0 for j in call.leaves]
    for d, shape in zip(outs, call.out_shapes, strict=True):
        if d is None or len(shape) <= d or shape[d] != n:
            return None
    return ins, outs


def _leaf_dims(value: Any, dim: int | None) -> list[int | None]:
    leaves, _ = tree_flatten(value)
    return [dim if isinstance(leaf, torch.Tensor) else None for leaf in leaves]


def _autocast_state(device: str) -> tuple[str, bool, torch.dtype]:
    try:
        return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except RuntimeError:  # a device type autocast does not know
        return device, False, torch.float32


def _unit_for(name: str, module: nn.Module, params: dict[str, torch.Tensor]) -> Unit:
    """The factored unit for standard layers (their own forward, weight/bias), else the fallback."""
    plain = set(params) <= {"weight", "bias"} and all(
        getattr(module, k, None) is p for k, p in params.items()
    )
    kinds: list[tuple[type[nn.Module], type[Unit]]] = [
        (nn.Linear, LinearUnit),
        (nn.Conv1d, ConvUnit),
        (nn.Conv2d, ConvUnit),
        (nn.Embedding, EmbeddingUnit),
        *((norm, NormUnit) for norm in _NORMS),
    ]
    if plain and not isinstance(module, nn.MultiheadAttention):
        for base, kind in kinds:
            if isinstance(module, base) and type(module).forward is base.forward:
                if isinstance(module, nn.Embedding) and module.sparse:
                    raise EngineError(
                        f"module '{name}' is an Embedding with sparse=True: per-sample modes "
                        "write dense gradients; use mode='exact'"
                    )
                return kind(name, module, params)
    if isinstance(module, nn.MultiheadAttention) and (
        type(module).forward is nn.MultiheadAttention.forward
    ):
        return AttentionUnit(name, module, params)
    return FunctionalUnit(name, module, params)


Entry = tuple[list[torch.Tensor], bool, Factor]  # parameters, per sample?, their factor


@dataclass
class Step:
    """Everything measured in one step: factors of the shared layers, the other gradients."""

    n: int
    num_sources: int
    present: torch.Tensor  # int64 [K'] present sources, in column order (CPU)
    ids: torch.Tensor  # [N] source of each sample (on the losses' device)
    counts: torch.Tensor  # [N] n_k of each sample's source (losses' dtype and device)
    entries: list[Entry]
    shared: list[torch.Tensor]  # shared parameters, in the engine's parameter order
    others: list[tuple[torch.Tensor, torch.Tensor]]  # non-shared parameter, its gradient
    device: torch.device
    per_source_units: list[str]  # modules whose calls took the per-source path
    tied: set[int] = field(default_factory=set)  # parameters in several entries
    _coefficients: dict[tuple[torch.dtype, bool], torch.Tensor] = field(default_factory=dict)

    _column: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return int(self.present.numel())

    @property
    def column(self) -> torch.Tensor:
        """[N]: the column (index among the present sources) of each sample."""
        if self._column is None:
            if self.width == self.num_sources:
                self._column = self.ids
            else:
                column_of = torch.full((self.num_sources,), -1, dtype=torch.int64)
                column_of[self.present] = torch.arange(self.width)
                self._column = column_of.to(self.device)[self.ids]
        return self._column

    def gram(self, full: bool = True) -> torch.Tensor:
        """Gram matrix of the present sources (float64, CPU) from the factors, exactly.

        Per layer the cheaper exact route: the N×N kernel, accumulated over layers and reduced
        once as Sᵀ M S (S the N×K' source indicator), or per-source sums of materialised
        gradients. A parameter reached through several layers (tied) is summed per source.
        ``full=False``: exact in the first row and column and on the diagonal only (the target
        row and the norms), the rest 0 or partial: per-source sums then cost 2·K' products per
        coordinate instead of K'².
        """
        width = self.width
        by_sample: torch.Tensor | None = None
        by_source: torch.Tensor | None = None
        tied: dict[int, torch.Tensor] = {}
        for params, per_sample, f in self.entries:
            column = self.column if per_sample else torch.arange(width, device=self.device)
            if self.tied and any(id(p) in self.tied for p in params):
                flat = f.per_source(column, width).to(F64)
                split = torch.split(flat, [p.numel() for p in params], 1)
                for p, part in zip(params, split, strict=True):
                    tied[id(p)] = part if id(p) not in tied else tied[id(p)] + part
                continue
            if f.kernel_cost() > f.source_cost(width, full):
                value = f.source_gram(column, width, full).to(F64)
                by_source = value if by_source is None else by_source + value
            elif per_sample:
                if by_sample is None:
                    by_sample = torch.zeros(self.n, self.n, dtype=f.dtype, device=self.device)
                f.add_kernel(by_sample)
            else:
                if by_source is None:
                    by_source = torch.zeros(width, width, dtype=F64, device=self.device)
                f.add_kernel(by_source)
        parts = []
        if tied:
            parts.append(gram_of(list(tied.values()), full))
        if by_sample is not None:
            indicator = self.indicator(by_sample.dtype)
            parts.append((indicator.T @ by_sample @ indicator).to(F64))
        if by_source is not None:
            parts.append(by_source)
        if not parts:
            return torch.zeros(width, width, dtype=F64)
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total.cpu()

    def indicator(self, dtype: torch.dtype) -> torch.Tensor:
        """S: [N, K'], S[i, c] = 1 where sample i belongs to the c-th present source."""
        out = torch.zeros(self.n, self.width, dtype=dtype, device=self.device)
        return out.scatter_(1, self.column.view(-1, 1), 1.0)  # no range check: no sync

    def coefficients(
        self, alpha: torch.Tensor, dtype: torch.dtype, per_sample: bool
    ) -> torch.Tensor:
        """α per sample ([N]) or per present source ([K']) in ``dtype`` on the device."""
        key = (dtype, per_sample)
        if key not in self._coefficients:
            if per_sample:
                value = alpha.to(device=self.device, dtype=dtype)[self.ids]
            else:
                value = alpha[self.present].to(device=self.device, dtype=dtype)
            self._coefficients[key] = value
        return self._coefficients[key]

    def assemble(self, coefficients: torch.Tensor) -> dict[int, torch.Tensor]:
        """Σ_k α_k g_k per shared parameter reached this step, by id."""
        self._coefficients = {}
        out: dict[int, torch.Tensor] = {}
        for params, per_sample, f in self.entries:
            values = f.combine(self.coefficients(coefficients, f.dtype, per_sample))
            for p, v in zip(params, values, strict=True):
                key = id(p)
                out[key] = v if key not in out else out[key] + v
        return out

    def combine(self, coefficients: torch.Tensor) -> None:
        """Accumulate Σ_k α_k g_k into shared ``.grad``, Σ_k g_k into the others'."""
        values = self.assemble(coefficients)
        for param in self.shared:
            value = values.get(id(param))
            if value is not None:
                _add_grad(param, value.to(param.dtype))
        for param, grad in self.others:
            accumulate(param, grad)

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """<g_k, v> for every source (float64 [K+1] on CPU); ``vectors`` follow ``shared``."""
        by_id = {id(p): v.to(self.device) for p, v in zip(self.shared, vectors, strict=True)}
        total = torch.zeros(self.width, dtype=F64, device=self.device)
        for params, per_sample, f in self.entries:
            d = f.dots([by_id[id(p)] for p in params]).to(F64)
            if per_sample:
                total.index_add_(0, self.column, d)
            else:
                total += d
        out = torch.zeros(self.num_sources, dtype=F64)
        out[self.present] = total.cpu()
        return out

    def source_gradient(self, k: int) -> list[torch.Tensor]:
        """Source k's gradient on each shared parameter (zeros where it does not reach), summed
        over its own rows: its samples, or its column on the per-source path."""
        samples: torch.Tensor | None = None
        columns: torch.Tensor | None = None
        values: dict[int, torch.Tensor] = {}
        for params, per_sample, f in self.entries:
            if per_sample:
                if samples is None:
                    samples = (self.ids == k).nonzero().squeeze(1)
                parts = f.sum_rows(samples)
            else:
                if columns is None:
                    columns = (self.present == k).nonzero().squeeze(1).to(self.device)
                parts = f.sum_rows(columns)
            for p, v in zip(params, parts, strict=True):
                values[id(p)] = v if id(p) not in values else values[id(p)] + v
        out = []
        for p in self.shared:
            got = values.get(id(p))
            if got is None:
                out.append(torch.zeros_like(p))
            else:
                out.append(got if got.dtype == p.dtype else got.to(p.dtype))
        return out


def _add_grad(param: torch.Tensor, value: torch.Tensor) -> None:
    """Accumulate a freshly computed tensor into ``.grad`` (no copy when it is the first)."""
    if param.grad is None:
        param.grad = value  # computed from detached factors: needs no detach
    else:
        param.grad.add_(value)


def statistics(
    present: torch.Tensor, gram: torch.Tensor, losses: torch.Tensor | None, needs: frozenset[Need]
) -> Statistics:
    """:func:`~auxilia.engine.exact.gradient_statistics` from the present sources' Gram matrix
    (``gram`` may also be the full (K+1)×(K+1) one, absent rows and columns 0)."""
    if gram.shape[0] == present.shape[0] and not bool(present.all()):
        idx = present.nonzero().squeeze(1)
        gram = gram[idx.unsqueeze(1), idx.unsqueeze(0)]
    return gradient_statistics(present, gram, losses, needs)


def losses_statistic(batch: SourceLosses) -> torch.Tensor:
    """Detached float64 mean loss per source (0 where absent), as ``exact`` reports them."""
    return batch.values()


class Capture:
    """Hooks on a model's layers and the one backward pass that turns them into factors."""

    def __init__(self, context: ModeContext, mode: str) -> None:
        if context.module is None:
            raise EngineError(
                f"engine mode '{mode}' hooks the model's layers: pass the nn.Module itself"
            )
        if context.layout != "partitioned":
            raise EngineError(f"engine mode '{mode}' works on the partitioned layout only")
        self.mode = mode
        self.module = context.module
        params = list(context.params)
        param_ids = {id(p) for p in params}
        shared_ids = (
            param_ids if context.shared is None else {id(p) for p in context.shared} & param_ids
        )
        self.shared = [p for p in params if id(p) in shared_ids]
        self.others = [p for p in params if id(p) not in shared_ids]
        self.names = {id(p): n for n, p in self.module.named_parameters(remove_duplicate=False)}
        self.units: list[Unit] = []
        inside_opaque: list[str] = []
        for name, module in self.module.named_modules():
            if any(name.startswith(prefix + ".") for prefix in inside_opaque):
                continue
            if isinstance(module, nn.MultiheadAttention):
                inside_opaque.append(name)
                owned = dict(module.named_parameters())
            else:
                owned = dict(module.named_parameters(recurse=False))
            mine: dict[str, torch.Tensor] = {k: p for k, p in owned.items() if id(p) in shared_ids}
            if mine:
                unit = _unit_for(name, module, mine)
                if isinstance(unit, FunctionalUnit):  # AttentionUnit included
                    unit.replay = self._set_replay
                self.units.append(unit)
        covered = {id(p) for u in self.units for p in u.params.values()}
        for p in self.shared:
            if id(p) not in covered:
                raise EngineError(
                    f"engine mode '{mode}': a shared parameter of shape {tuple(p.shape)} does "
                    "not belong to the module given to the Engine"
                )
        self.replaying = False
        self.tried: set[tuple[Any, ...]] = set()  # call patterns whose replays were tried
        self.coupled: set[str] = set()
        self.autocast_seen = False
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for unit in self.units:
            self.handles.append(
                unit.module.register_forward_hook(self._hook(unit), with_kwargs=True, prepend=True)
            )
            if type(unit) is FunctionalUnit and any(True for _ in unit.module.children()):
                self._watch_children(unit)
            if isinstance(unit, AttentionUnit):
                self.handles.append(
                    # Appended: it runs last before the forward, after any earlier pre-hook.
                    unit.module.register_forward_pre_hook(self._begin(unit), with_kwargs=True)
                )
        for name, module in self.module.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self.handles.append(module.register_forward_hook(self._guard(name)))

    # ---- hooks --------------------------------------------------------------------------

    def _set_replay(self, on: bool) -> None:
        self.replaying = on

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Record no calls while the engine's own backward passes run: a forward recomputed
        inside them (``torch.utils.checkpoint``) is not a call of the next step."""
        before = self.replaying
        self.replaying = True
        try:
            yield
        finally:
            self.replaying = before

    def _hook(self, unit: Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if self.replaying or not torch.is_grad_enabled():
                return
            call = unit.record(tuple(args), dict(kwargs), output)
            if call is not None:
                unit.calls.append(call)
                if call.autocast[1]:
                    self.autocast_seen = True

        return hook

    def _watch_children(self, unit: FunctionalUnit) -> None:
        """Record the outermost submodule calls inside a module replayed with torch.func (the
        blocks of a ``ModuleList`` it loops over, not the layers inside those blocks)."""

        def begin(module: nn.Module, args: Any) -> None:
            if not self.replaying and torch.is_grad_enabled():
                unit.begin_call()

        self.handles.append(unit.module.register_forward_pre_hook(begin))
        for name, child in unit.module.named_modules():
            if not name:
                continue

            def enter(module: nn.Module, args: Any, kwargs: Any) -> Any:
                if self.replaying or not torch.is_grad_enabled():
                    return None
                return unit.child_input(module, tuple(args), dict(kwargs))

            def leave(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
                if not self.replaying and torch.is_grad_enabled():
                    unit.child_output(module, output)

            self.handles.append(child.register_forward_pre_hook(enter, with_kwargs=True))
            self.handles.append(
                child.register_forward_hook(leave, with_kwargs=True, always_call=True)
            )

    def _begin(self, unit: AttentionUnit) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            if self.replaying or not torch.is_grad_enabled():
                return
            unit.begin(tuple(args), dict(kwargs))

        return pre_hook

    def _guard(self, name: str) -> Callable[..., None]:
        def guard(module: nn.Module, args: Any, output: Any) -> None:
            if self.replaying or not torch.is_grad_enabled():
                return
            assert isinstance(module, nn.modules.batchnorm._BatchNorm)
            batch_stats = module.training or (
                module.running_mean is None and module.running_var is None
            )
            x = args[0] if args else None
            if batch_stats and isinstance(x, torch.Tensor) and x.requires_grad:
                self.coupled.add(f"'{name}' ({type(module).__name__})")

        return guard

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.clear()

    def clear(self) -> None:
        for unit in self.units:
            unit.calls = []
        self.coupled = set()

    @property
    def pending(self) -> int:
        """Calls recorded since the last step (0 after evaluation under no_grad)."""
        return sum(len(u.calls) for u in self.units)

    def signature(self, n: int) -> tuple[Any, ...]:
        """The step's call pattern: which units were called, on what shapes, how mapped."""
        pattern = []
        for unit in self.units:
            for call in unit.calls:
                first = call.args[0] if call.args else None
                shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ()
                pattern.append((unit.name, shape, unit.per_sample(call, n)))
        return tuple(pattern)

    def precision(self) -> float:
        """Relative tolerance of the check against ``exact`` for this model's precision."""
        if self.autocast_seen:
            return 5e-2
        dtypes = {p.dtype for p in self.shared}
        if dtypes == {torch.float64}:
            return 1e-6
        if not dtypes <= {torch.float32, torch.float64}:
            return 5e-2
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
        if tf32 and any(p.is_cuda for p in self.shared):
            return 1e-2  # exact's convolutions may run in TF32 (cuDNN's default)
        return 1e-3

    # ---- one step -----------------------------------------------------------------------

    def check(self, n: int, width: int) -> None:
        """Raise (dropping the recorded calls) if this step's calls cannot be measured, before
        anything is computed: an input changed in place since its call (:class:`EngineError`),
        or (:class:`ModeUnavailableError`, another mode can take the step) samples coupled by
        batch statistics, a module to be replayed per sample that draws dropout masks, or one
        whose replay fails (tried once per call pattern, with zero output gradients).
        ``n``: the step's samples; ``width``: its present sources."""
        coupled = self.coupled
        if coupled:
            self.clear()
            names = ", ".join(sorted(coupled))
            raise ModeUnavailableError(
                f"engine mode '{self.mode}': {names} normalises with batch "
                "statistics, which couples the samples of a batch, so per-source gradients "
                "cannot be separated per sample. Put it in eval mode, use GroupNorm/LayerNorm, "
                "or use mode='auto' or 'exact'",
                f"{names} normalises with batch statistics",
            )
        for unit in self.units:
            for call in unit.calls:
                for tensor, version in call.versions:
                    if tensor._version != version:
                        self.clear()
                        raise EngineError(
                            f"the input of module {unit.label} was modified in place after the "
                            f"call; engine mode '{self.mode}' needs it as it was"
                        )
        for unit in self.units:
            for call in unit.calls:
                drawing = unit.replay_draws(call, n)
                if drawing is not None:
                    self.clear()
                    raise ModeUnavailableError(
                        f"engine mode '{self.mode}' replays module {unit.label} per sample "
                        f"with torch.func, and {drawing} draws a dropout mask there in "
                        "training mode, which a replay cannot redraw; use mode='auto' or "
                        f"'exact', or put that module in eval mode{unit.advice()}",
                        f"{drawing} draws a dropout mask inside {unit.label}, replayed per "
                        f"sample{unit.advice()}",
                    )
        self._try_replays(n, width)

    def _try_replays(self, n: int, width: int) -> None:
        """Replay, with zero output gradients, each call that will need ``torch.func`` on the
        first steps of a new call pattern (as many as the check against ``exact``), so that a
        module the replay cannot run (an ``nn.LSTM``, say) is found while the graph is whole."""
        pending = [
            (unit, call)
            for unit in self.units
            if isinstance(unit, FunctionalUnit)
            for call in unit.calls
            if not (isinstance(unit, AttentionUnit) and unit.projects(call, n))
        ]
        if not pending or len(self.tried) >= Verifier.LIMIT:
            return
        pattern = self.signature(n)
        if pattern in self.tried:
            return
        for unit, call in pending:
            per_sample = unit.per_sample(call, n)
            lead = () if per_sample else (width,)
            device = next(iter(unit.params.values())).device
            zeros = [
                torch.zeros((*lead, *shape), dtype=dtype, device=device)
                for shape, dtype in zip(call.out_shapes, call.out_dtypes, strict=True)
            ]
            child_zeros = None
            if unit.children_ok(call, n):
                child_zeros = [
                    torch.zeros(shape, dtype=dtype, device=device)
                    for child in call.children or []
                    for shape, dtype in zip(child.shapes, child.dtypes, strict=True)
                ]
            try:
                with _generator_at(_rng_state(device), device):
                    try:
                        unit.grads(call, zeros, n if per_sample else width, per_sample, child_zeros)
                    except EngineError:
                        if child_zeros is None:
                            raise
                        # The recorded submodule calls do not fit the replay (a submodule
                        # given a tensor that is not per sample): replay this module whole.
                        unit.stubbing = False
                        unit.grads(call, zeros, n if per_sample else width, per_sample)
            except EngineError as error:
                self.clear()
                raise ModeUnavailableError(
                    str(error).replace("Use mode='exact'", "Use mode='auto' or 'exact'"),
                    f"torch.func cannot replay module {unit.label} per sample",
                ) from error
        self.tried.add(pattern)

    def collect(self, batch: SourceLosses) -> Step:
        """Take the recorded calls and run the backward pass(es); the graph is freed.

        Call :meth:`check` first.
        """
        calls = [(u, u.calls) for u in self.units]
        self.clear()
        losses = batch.losses
        if not losses.requires_grad:
            raise EngineError("the losses do not require grad: compute them with grad enabled")
        n, device = int(losses.shape[0]), losses.device
        counts = batch.counts
        present = counts.nonzero().squeeze(1)
        width = int(present.numel())
        ids = batch.ids.to(device)
        sample_counts = counts.to(device=device, dtype=losses.dtype)[ids]
        weights = sample_counts.reciprocal()

        sample_calls: list[tuple[Unit, Call]] = []
        source_calls: list[tuple[Unit, Call]] = []
        for unit, unit_calls in calls:
            for call in unit_calls:
                (sample_calls if unit.per_sample(call, n) else source_calls).append((unit, call))
        # Shared parameters of modules not called this step must not receive a gradient.
        reached = {id(p) for u, c in calls if c for p in u.params.values()}
        silent = list({id(p): p for u, c in calls if not c for p in u.params.values()}.values())
        silent = [p for p in silent if id(p) not in reached]

        # Per-source path: each present source's gradient of the outputs, one batched backward.
        per_source: list[list[torch.Tensor | None]] = []
        if source_calls:
            edges = [e for _, c in source_calls for e in c.edges]
            rows = torch.zeros(batch.num_sources, n, dtype=losses.dtype, device=device)
            rows[ids, torch.arange(n, device=device)] = weights
            rows = rows[present.to(device)]
            with self.quiet():
                grads = _batched_grad(losses, edges, rows)
            it = iter(grads)
            per_source = [[next(it) for _ in c.edges] for _, c in source_calls]

        # The one backward: per-sample output gradients, the others' parameter gradients, and
        # the gradients at the submodule inputs of modules replayed with torch.func.
        edges = [e for _, c in sample_calls for e in c.edges]
        with_children = []
        checked: dict[int, FunctionalUnit] = {}
        for unit, call in sample_calls:
            if isinstance(unit, FunctionalUnit) and unit.children_ok(call, n):
                with_children.append(call)
                checked.setdefault(id(unit), unit)
            else:
                call.children = None
        child_edges = [e for c in with_children for ch in c.children or [] for e in ch.edges]
        own = [(u, name, p) for u in checked.values() for name, p in u.params.items()]
        inputs: list[torch.Tensor | GradientEdge] = [
            *edges,
            *silent,
            *self.others,
            *child_edges,
            *(p for _, _, p in own),
        ]
        results: Sequence[torch.Tensor | None] = []
        if inputs:
            with self.quiet():
                results = torch.autograd.grad(
                    losses,
                    cast(Any, inputs),
                    grad_outputs=weights,
                    allow_unused=True,
                    retain_graph=False,
                )
        it_results = iter(results)
        per_sample = [[next(it_results) for _ in c.edges] for _, c in sample_calls]
        for p in silent:
            if next(it_results) is not None:
                owner = self.names.get(id(p), "?")
                raise EngineError(
                    f"shared parameter '{owner}' received a gradient although its module was "
                    f"not called with gradients enabled since the last step: either the forward "
                    f"ran before the Engine was created, or the parameter is used outside its "
                    f"module's forward, which engine mode '{self.mode}' cannot see (then use "
                    f"mode='exact')"
                )
        others = [(p, g) for p in self.others if (g := next(it_results)) is not None]
        for call in with_children:
            at_inputs: list[torch.Tensor] = []
            for child in call.children or []:
                for shape, dtype in zip(child.shapes, child.dtypes, strict=True):
                    g = next(it_results)
                    at_inputs.append(
                        torch.zeros(shape, dtype=dtype, device=device) if g is None else g
                    )
            call.child_grads = at_inputs
        for unit in checked.values():
            unit.true_grads, unit.tolerance = {}, self.precision()
        for unit, name, p in own:
            g = next(it_results)
            assert unit.true_grads is not None
            unit.true_grads[name] = torch.zeros_like(p) if g is None else g.detach()

        entries: list[Entry] = []
        per_source_units: list[str] = []
        for is_sample, group, grads_of in (
            (True, sample_calls, per_sample),
            (False, source_calls, per_source),
        ):
            by_unit: dict[int, tuple[Unit, list[tuple[Call, list[torch.Tensor]]]]] = {}
            for (unit, call), grads in zip(group, grads_of, strict=True):
                if all(g is None for g in grads):
                    continue  # the output does not reach the losses
                lead = () if is_sample else (width,)
                filled = [
                    torch.zeros((*lead, *shape), dtype=dtype, device=device) if g is None else g
                    for g, shape, dtype in zip(grads, call.out_shapes, call.out_dtypes, strict=True)
                ]
                by_unit.setdefault(id(unit), (unit, []))[1].append((call, filled))
            if not is_sample:
                per_source_units = [unit.label for unit, _ in by_unit.values()]
            for unit, items in by_unit.values():
                rows_count = n if is_sample else width
                for params, factor in unit.factors(items, rows_count, is_sample):
                    entries.append((params, is_sample, factor))
        seen: set[int] = set()
        tied: set[int] = set()
        for params, _, _ in entries:
            for param in params:
                (tied if id(param) in seen else seen).add(id(param))
        return Step(
            n=n,
            num_sources=batch.num_sources,
            present=present,
            ids=ids,
            counts=sample_counts,
            entries=entries,
            shared=self.shared,
            others=others,
            device=device,
            per_source_units=per_source_units,
            tied=tied,
        )


def _batched_grad(
    losses: torch.Tensor, edges: list[GradientEdge], rows: torch.Tensor
) -> list[torch.Tensor | None]:
    """d(rows[c] · losses)/d(edge) for every row c, batched; a loop if batching fails."""
    try:
        out = torch.autograd.grad(
            losses,
            edges,
            grad_outputs=rows,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        return list(out)
    except RuntimeError:
        per_row = [
            torch.autograd.grad(losses, edges, grad_outputs=r, retain_graph=True, allow_unused=True)
            for r in rows
        ]
        stacked: list[torch.Tensor | None] = []
        for j in range(len(edges)):
            parts = [g[j] for g in per_row]
            if all(p is None for p in parts):
                stacked.append(None)
                continue
            ref = next(p for p in parts if p is not None)
            stacked.append(torch.stack([torch.zeros_like(ref) if p is None else p for p in parts]))
        return stacked


class Verifier:
    """Checks the factored Gram matrix against ``exact`` on the first steps of new call patterns."""

    LIMIT = 3  # call patterns checked at most (variable shapes would otherwise check forever)

    def __init__(self, capture: Capture, context: ModeContext, enabled: bool) -> None:
        self.capture = capture
        self.context = context
        self.enabled = enabled
        self.seen: set[tuple[Any, ...]] = set()

    def reference(self, batch: SourceLosses) -> torch.Tensor | None:
        """The exact Gram matrix of the present sources when this step is to be checked.

        Must run before :meth:`Capture.collect`, which frees the graph.
        """
        if not self.enabled or len(self.seen) >= self.LIMIT or not batch.losses.requires_grad:
            return None
        pattern = self.capture.signature(int(batch.losses.shape[0]))
        if pattern in self.seen:
            return None
        self.seen.add(pattern)
        with self.capture.quiet():
            exact = measure_exact(batch, self.context.params, self.context.shared, _GRAM)
        gram = exact.statistics.require(Need.GRAM)
        idx = batch.present.nonzero().squeeze(1)
        return gram[idx.unsqueeze(1), idx.unsqueeze(0)]

    def check(self, gram: torch.Tensor, reference: torch.Tensor) -> None:
        scale = float(reference.diagonal().abs().max()) if reference.numel() else 0.0
        error = float((gram - reference).abs().max()) if reference.numel() else 0.0
        tolerance = self.capture.precision()
        if error > tolerance * scale + 1e-30:
            raise EngineError(
                f"engine mode '{self.capture.mode}' disagrees with 'exact' on this model (largest "
                f"Gram difference {error / max(scale, 1e-300):.2e} of its scale, tolerance "
                f"{tolerance:.0e}). Samples interact inside the model, a layer sees the samples "
                "in another order than the losses, or a shared parameter is used outside its "
                "module (e.g. a tied weight read through F.linear). Use mode='exact'"
            )
