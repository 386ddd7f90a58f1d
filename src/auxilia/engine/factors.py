"""Per-row gradients of a layer's parameters in factored form: what ``ghost`` and ``sketch`` use.

A *factor* holds the gradients G_r of one layer's parameters (weight and bias together) for R
rows without forming them. Rows are the step's samples (each gradient already carries 1/n_k of
its source's mean, so the rows of a source sum to g_k) or, on the per-source path, the present
sources themselves. Each factor can

* ``add_kernel(out)``: add the R×R matrix <G_r, G_s> (the "ghost" kernel) to ``out``;
* ``per_source(column, width)``: Σ_{r: column[r] = c} G_r for every column c, materialised;
* ``combine(c)``: Σ_r c_r G_r, the weighted gradient (``Bᵀ diag(c) A`` for a linear layer);
* ``sum_rows(rows)``: Σ_{r ∈ rows} G_r, one source's gradient (from its rows alone, where the
  factor can);
* ``dots(v)``: <G_r, v> for every row;
* ``project(p)``: every row's gradient through per-parameter (Kronecker) projections.

Three kinds cover every layer: :class:`Dense2D` (weight Σ_t b_t a_tᵀ and bias Σ_t b_t: linear
and convolution layers, with groups), :class:`EmbeddingRows` (rows idx_t of a table receive b_t)
and :class:`PerSample` (gradients materialised per row: norm affines, the ``torch.func``
fallback). A bias shares its layer's kernel: (a_r·a_s + 1)(b_r·b_s) covers weight and bias.
Costs are estimated in multiply-adds so callers can pick the cheaper exact route per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

F64 = torch.float64
BLOCK = 1 << 24  # elements: the largest intermediate a factor forms in one piece
# Cost model, in multiply-adds: writing an element of a large intermediate costs about as much
# as this many multiply-adds (memory-bound), and every route has a fixed launch overhead.
MEMORY = 20.0
OVERHEAD = 5e4
# A product over a few rows (one source's, in per-source sums) runs at about a quarter of the
# rate of a large one (measured on CPU, 4 to 64 rows against the N×N kernel's products).
THIN = 4.0


@dataclass(frozen=True)
class Projection:
    """A seeded projection of one parameter's gradient to ``dim`` coordinates.

    ``identity``: the gradient itself. ``dense``: a plain projection of the flattened gradient
    (1-D parameters). Otherwise a Kronecker projection of the parameter seen as a matrix
    [shape[0], rest], ``rows`` ⊗ ``cols`` (None: identity on that side), of which the first
    ``dim`` coordinates are kept, times ``scale``.
    """

    dim: int
    identity: bool = False
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    scale: float = 1.0

    def to(self, dtype: torch.dtype, device: torch.device) -> Projection:
        """This projection with its matrices in ``dtype`` on ``device``."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return Projection(
            dim=self.dim,
            identity=self.identity,
            rows=move(self.rows),
            cols=move(self.cols),
            dense=move(self.dense),
            scale=self.scale,
        )

    def keep(self, per_row: torch.Tensor) -> torch.Tensor:
        """Keep ``dim`` coordinates of [R, u, v] Kronecker outputs and scale them."""
        flat = per_row.reshape(per_row.shape[0], -1)
        if flat.shape[1] != self.dim:
            flat = flat[:, : self.dim]
        return flat * self.scale if self.scale != 1.0 else flat

    def vector(self, g: torch.Tensor) -> torch.Tensor:
        """Project materialised gradients [R, *shape] of one parameter."""
        rows = g.shape[0]
        if self.identity:
            return g.reshape(rows, -1)
        if self.dense is not None:
            return g.reshape(rows, -1) @ self.dense.T
        matrix = g.reshape(rows, g.shape[1] if g.dim() > 1 else 1, -1)
        if self.rows is not None:
            matrix = torch.einsum("ur,nrc->nuc", self.rows, matrix)
        if self.cols is not None:
            matrix = matrix @ self.cols.T
        return self.keep(matrix)


def gram_of(parts: Sequence[torch.Tensor], full: bool = True) -> torch.Tensor:
    """Σ_p p pᵀ over [width, ·] per-source gradient blocks; with ``full=False`` only the first
    row and column and the diagonal (what the target row and the norms read; the rest 0), at
    2·width instead of width² products per coordinate."""
    if full:
        total = parts[0] @ parts[0].T
        for part in parts[1:]:
            total = total.addmm_(part, part.T)
        return total
    row = parts[0] @ parts[0][0]
    diagonal = (parts[0] * parts[0]).sum(1)
    for part in parts[1:]:
        row = row + part @ part[0]
        diagonal = diagonal + (part * part).sum(1)
    out = torch.zeros(row.shape[0], row.shape[0], dtype=row.dtype, device=row.device)
    out[0] = row
    out[:, 0] = row
    out.diagonal().copy_(diagonal)
    return out


def add_into(out: torch.Tensor, value: torch.Tensor) -> None:
    """out += value, converting the (small) value when the dtypes differ."""
    out += value if value.dtype == out.dtype else value.to(out.dtype)


def _products(width: int, full: bool) -> int:
    """Inner products per coordinate of a Gram of ``width`` sums (or its row and diagonal)."""
    return width * width if full else 2 * width


class Factor:
    """Per-row gradients of one layer's parameters (``shapes``, in order); kept factored."""

    rows: int
    shapes: list[torch.Size]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def add_kernel(self, out: torch.Tensor) -> None:
        """out[r, s] += <G_r, G_s>."""
        raise NotImplementedError

    def kernel_cost(self) -> float:
        raise NotImplementedError

    def per_source(self, column: torch.Tensor, width: int) -> torch.Tensor:
        """[width, numel] (parameters concatenated, flattened): rows summed per column."""
        raise NotImplementedError

    def source_cost(self, width: int, full: bool = True) -> float:
        return OVERHEAD + 2 * MEMORY * self.rows * self.numel + _products(width, full) * self.numel

    def source_gram(self, column: torch.Tensor, width: int, full: bool = True) -> torch.Tensor:
        """[width, width] Gram of the per-column sums (``full=False``: see :func:`gram_of`)."""
        return gram_of([self.per_source(column, width)], full)

    def combine(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Σ_r c_r G_r per parameter (``c`` in this factor's dtype)."""
        raise NotImplementedError

    def sum_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Σ_{r ∈ rows} G_r per parameter (``rows``: int64 indices on the factor's device)."""
        c = torch.zeros(self.rows, dtype=self.dtype, device=rows.device)
        return self.combine(c.index_fill_(0, rows, 1.0))

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        """[R]: <G_r, v>, v given per parameter."""
        raise NotImplementedError

    def project(self, projections: Sequence[Projection]) -> list[torch.Tensor]:
        """[R, p.dim] per parameter: every row's gradient projected."""
        raise NotImplementedError


class Dense2D(Factor):
    """Weight G_r = Σ_t B[r,t,g] A[r,t,g]ᵀ per group g, bias Σ_t B[r,t]: linear and conv layers.

    A: [Ra, T, G, din] (Ra = R, or 1 when every row shares the inputs: the per-source path);
    B: [R, T, G, dout]. The weight, seen as a matrix, is [G·dout, din]. ``order``: the weight
    column each of A's din entries stands for (channels-last convolution patches), None when
    they are in the weight's order; statistics do not depend on it, and every gradient or
    vector crossing the factor's boundary is mapped.
    """

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        weight: torch.Size | None,
        bias: torch.Size | None,
        order: torch.Tensor | None = None,
    ) -> None:
        # A linear layer called once on [R, d] rows may pass A and B as [R, din] and
        # [R, dout]: the kernel and combine read those; the 4-D views are made if asked for.
        flat = a.dim() == 2
        self._a = None if flat else a
        self._b = None if flat else b
        self.order = order
        self._inverse = None if order is None else torch.argsort(order)
        self.weight, self.bias = weight, bias
        self.shapes = [s for s in (weight, bias) if s is not None]
        if flat:
            (self.rows, self.dout), self.positions, self.groups = b.shape, 1, 1
            self.din = a.shape[1]
        else:
            self.rows, self.positions, self.groups, self.dout = b.shape
            self.din = a.shape[3]
        self.dtype = b.dtype
        self.shared = a.shape[0] == 1 and self.rows > 1
        single = self.positions == 1 and self.groups == 1 and not self.shared
        self.simple = single and order is None
        if flat:
            self.a2, self.b2 = a, b
        elif self.simple:  # one position, one group: the 2-D views the kernel and combine read
            self.a2, self.b2 = a.reshape(self.rows, self.din), b.reshape(self.rows, self.dout)
        self._weight_cache: torch.Tensor | None = None  # per-row weight gradients, if formed
        self._bias_cache: torch.Tensor | None = None

    @property
    def a(self) -> torch.Tensor:
        """A: [Ra, T, G, din]."""
        if self._a is None:
            self._a = self.a2.view(self.a2.shape[0], 1, 1, self.din)
        return self._a

    @property
    def b(self) -> torch.Tensor:
        """B: [R, T, G, dout]."""
        if self._b is None:
            self._b = self.b2.view(self.rows, 1, 1, self.dout)
        return self._b

    def _natural(self, g: torch.Tensor) -> torch.Tensor:
        """Weight gradients [..., G·dout·din] with columns in A's order → the weight's order."""
        if self._inverse is None:
            return g
        lead = g.shape[:-1]
        return g.reshape(*lead, -1, self.din)[..., self._inverse].reshape(*lead, -1)

    def _in_a_order(self, w: torch.Tensor) -> torch.Tensor:
        """A weight-shaped [G·dout, din] tensor with its columns in A's order."""
        return w if self.order is None else w[..., self.order]

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        """[G, rows·T, d] (rows-major, then positions)."""
        return t.permute(2, 0, 1, 3).reshape(t.shape[2], -1, t.shape[3])

    def _input_kernel(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """<a_r, a_s> (+ 1 for the bias; 0 without a weight)."""
        other = a if b is None else b
        if self.weight is None:
            return torch.ones(a.shape[:-1] + other.shape[-2:-1], dtype=a.dtype, device=a.device)
        k = a @ other.mT
        return k.add_(1) if self.bias is not None else k

    def add_kernel(self, out: torch.Tensor) -> None:
        if self.simple:
            a, b = self.a2, self.b2
            ka, kb = self._input_kernel(a), b @ b.T
            if out.dtype == ka.dtype:
                out.addcmul_(ka, kb)
            else:
                add_into(out, ka * kb)
            return
        rows, positions, groups = self.rows, self.positions, self.groups
        b2, a2 = self._flat(self.b), self._flat(self.a)  # [G, R·T, dout], [G, Ra·T, din]
        shape = (groups, -1, positions, rows, positions)
        ka_all = (
            self._input_kernel(a2).view(groups, 1, positions, 1, positions) if self.shared else None
        )
        step = max(1, BLOCK // max(1, groups * positions * positions * rows))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            part = slice(start * positions, stop * positions)
            kb = (b2[:, part] @ b2.mT).view(shape)
            ka = ka_all if ka_all is not None else self._input_kernel(a2[:, part], a2).view(shape)
            add_into(out[start:stop], (kb * ka).sum((0, 2, 4)))

    def kernel_cost(self) -> float:
        n = float(self.rows * self.positions)
        return self.groups * n * n * (self.din + self.dout + 1 + 2 * MEMORY)

    def _weight_rows(self, start: int, stop: int) -> torch.Tensor:
        if self._weight_cache is not None:
            return self._weight_cache[start:stop]
        b = self.b[start:stop].permute(0, 2, 3, 1)  # [r, G, dout, T]
        a = self.a[0:1] if self.a.shape[0] == 1 else self.a[start:stop]
        g = torch.matmul(b, a.permute(0, 2, 1, 3)).reshape(stop - start, -1)  # [r, G·dout·din]
        if start == 0 and stop == self.rows:
            self._weight_cache = g  # formed whole: combine reuses it
        return g

    def _bias_rows(self, start: int, stop: int) -> torch.Tensor:
        if self._bias_cache is not None:
            return self._bias_cache[start:stop]
        g = self.b[start:stop].sum(1).reshape(stop - start, -1)
        if start == 0 and stop == self.rows:
            self._bias_cache = g
        return g

    def _sums(self, column: torch.Tensor, width: int) -> list[torch.Tensor]:
        """Per-column sums [width, ·] of the weight rows (in A's column order) and bias rows."""
        if self.simple:
            return self._segment_sums(column, width)
        out = []
        for size, rows in (
            (0 if self.weight is None else math.prod(self.weight), self._weight_rows),
            (0 if self.bias is None else math.prod(self.bias), self._bias_rows),
        ):
            if not size:
                continue
            total = torch.zeros(width, size, dtype=self.dtype, device=self.b.device)
            step = max(1, BLOCK // size)
            for start in range(0, self.rows, step):
                stop = min(self.rows, start + step)
                total.index_add_(0, column[start:stop], rows(start, stop))
            out.append(total)
        return out

    def _segment_sums(self, column: torch.Tensor, width: int) -> list[torch.Tensor]:
        """``_sums`` of a once-called layer on [R, d] rows without per-row gradients: the rows
        sorted by column, one product B_cᵀ A_c per column (R·din·dout multiply-adds in all,
        where per-row gradients write R·din·dout elements first)."""
        a, b = self.a2, self.b2
        counts = torch.bincount(column, minlength=width)
        if column.numel() > 1 and not bool((column[1:] >= column[:-1]).all()):
            order = torch.argsort(column, stable=True)
            a, b = a[order], b[order]
        out = []
        if self.weight is not None:
            total = torch.zeros(width, self.dout, self.din, dtype=self.dtype, device=b.device)
            start = 0
            for c, n in enumerate(counts.tolist()):
                if n:
                    torch.mm(b[start : start + n].T, a[start : start + n], out=total[c])
                    start += n
            out.append(total.view(width, -1))
        if self.bias is not None:
            bias = torch.zeros(width, self.dout, dtype=self.dtype, device=b.device)
            out.append(bias.index_add_(0, column, self.b2))
        return out

    def per_source(self, column: torch.Tensor, width: int) -> torch.Tensor:
        parts = self._sums(column, width)
        if self.weight is not None:
            parts[0] = self._natural(parts[0])
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def source_gram(self, column: torch.Tensor, width: int, full: bool = True) -> torch.Tensor:
        """[width, width] Gram of the per-column sums (weight and bias parts, any order)."""
        return gram_of(self._sums(column, width), full)

    def source_cost(self, width: int, full: bool = True) -> float:
        products = _products(width, full) * self.numel
        if self.simple:  # one product per column, no per-row gradients (``_segment_sums``)
            return (
                (1 + width) * OVERHEAD
                + THIN * self.rows * self.numel
                + MEMORY * width * self.numel
                + products
            )
        return (
            OVERHEAD
            + self.rows * self.positions * self.groups * self.din * self.dout
            + 2 * MEMORY * self.rows * self.numel
            + products
        )

    def combine(self, c: torch.Tensor) -> list[torch.Tensor]:
        out = []
        if self.simple:
            scaled = self.b2.T * c  # [dout, R]: formed once, read twice
            if self.weight is not None:
                g = scaled @ self.a2
                out.append(g if g.shape == self.weight else g.view(self.weight))
            if self.bias is not None:
                g = scaled.sum(1)
                out.append(g if g.shape == self.bias else g.view(self.bias))
            return out
        # Per-row gradients formed for the Gram matrix are reused; otherwise B is weighted once.
        weighted: list[torch.Tensor] = []

        def bc() -> torch.Tensor:
            if not weighted:
                weighted.append(self.b * c.view(-1, 1, 1, 1))
            return weighted[0]

        if self.weight is not None:
            if self._weight_cache is not None:
                g = c @ self._weight_cache
            elif self.shared:
                g = torch.einsum("tgo,tgi->goi", bc().sum(0), self.a[0])
            elif self.groups == 1 and self.b.is_contiguous() and self.a.is_contiguous():
                g = bc().reshape(-1, self.dout).T @ self.a.reshape(-1, self.din)
            else:
                g = torch.einsum("rtgo,rtgi->goi", bc(), self.a)
            out.append(self._natural(g.reshape(-1)).reshape(self.weight))
        if self.bias is not None:
            biases = self._bias_cache
            out.append((c @ biases if biases is not None else bc().sum((0, 1))).reshape(self.bias))
        return out

    def sum_rows(self, rows: torch.Tensor) -> list[torch.Tensor]:
        if not self.simple:
            return super().sum_rows(rows)
        b = self.b2.index_select(0, rows)  # [n, dout]: the rows' own products only
        out = []
        if self.weight is not None:
            g = b.T @ self.a2.index_select(0, rows)
            out.append(g if g.shape == self.weight else g.view(self.weight))
        if self.bias is not None:
            g = b.sum(0)
            out.append(g if g.shape == self.bias else g.view(self.bias))
        return out

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(self.rows, dtype=self.dtype, device=self.b.device)
        it = iter(vectors)
        if self.weight is not None:
            w = self._in_a_order(next(it).to(self.dtype).reshape(self.groups, self.dout, self.din))
            av = torch.einsum("rtgi,goi->rtgo", self.a, w)
            total = total + (av * self.b).sum((1, 2, 3))
        if self.bias is not None:
            v = next(it).to(self.dtype).reshape(-1)
            total = total + self._bias_rows(0, self.rows) @ v
        return total

    def project(self, projections: Sequence[Projection]) -> list[torch.Tensor]:
        out = []
        it = iter(projections)
        if self.weight is not None:
            out.append(self._project_weight(next(it)))
        if self.bias is not None:
            out.append(next(it).vector(self._bias_rows(0, self.rows)))
        return out

    def _project_weight(self, p: Projection) -> torch.Tensor:
        if p.identity:
            return self._natural(self._weight_rows(0, self.rows))
        if p.cols is None and self._inverse is not None:  # columns kept: in the weight's order
            return p.keep(self._project_unmapped(p)[..., self._inverse])
        return p.keep(self._project_unmapped(p))

    def _project_unmapped(self, p: Projection) -> torch.Tensor:
        """[R, u, v] (or [R, G, dout, v]); v in A's column order when not projected."""
        if self.groups == 1:  # the common case as 2-D matmuls and one bmm (no 4-D einsum)
            return self._project_ungrouped(p)
        a = self.a.expand(self.rows, -1, -1, -1) if self.shared else self.a
        pa = a if p.cols is None else a @ self._in_a_order(p.cols).T  # [R, T, G, v]
        if p.rows is None:  # u runs over (g, o)
            return torch.einsum("rtgo,rtgv->rgov", self.b, pa)
        pr = p.rows.view(-1, self.groups, self.dout)
        pb = torch.einsum("rtgo,ugo->rtgu", self.b, pr)
        return torch.einsum("rtgu,rtgv->ruv", pb, pa)

    def _project_ungrouped(self, p: Projection) -> torch.Tensor:
        """[R, u, v] = Σ_t (rows b_t)(cols a_t)ᵀ for a single group, on views of A and B as
        they are laid out (unfolded patches are position-minor: no copy of them is made);
        inputs shared by every row are projected once."""
        a, b = self.a[:, :, 0], self.b[:, :, 0]  # [Ra, T, din], [R, T, dout]
        pa = a if p.cols is None else torch.matmul(a, self._in_a_order(p.cols).T)
        pb = b if p.rows is None else torch.matmul(b, p.rows.T)
        return torch.matmul(pb.transpose(1, 2), pa.expand(self.rows, -1, -1))


class EmbeddingRows(Factor):
    """G_r = Σ_t e_{idx[r,t]} B[r,t]ᵀ: an embedding table [V, D] read at ``idx``.

    idx: [Ra, T] (Ra = R or 1); B: [R, T, D] (positions to ignore already zeroed).
    """

    def __init__(self, idx: torch.Tensor, b: torch.Tensor, shape: torch.Size) -> None:
        self.idx, self.b = idx, b
        self.shapes = [shape]
        self.rows, self.positions, self.width_d = b.shape
        self.vocab = shape[0]
        self.dtype = b.dtype
        self._read: tuple[torch.Tensor, torch.Tensor] | None = None

    def _full_idx(self) -> torch.Tensor:
        return self.idx.expand(self.rows, self.positions)

    def add_kernel(self, out: torch.Tensor) -> None:
        rows, positions = self.rows, self.positions
        b2 = self.b.reshape(rows * positions, -1)
        i2 = self._full_idx().reshape(-1)
        step = max(1, BLOCK // max(1, positions * positions * rows))
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            part = slice(start * positions, stop * positions)
            same = (i2[part, None] == i2[None, :]).to(self.dtype)
            prod = (b2[part] @ b2.T) * same
            add_into(
                out[start:stop], prod.view(stop - start, positions, rows, positions).sum((1, 3))
            )

    def kernel_cost(self) -> float:
        n = float(self.rows * self.positions)
        return n * n * (self.width_d + 1 + 2 * MEMORY)

    def _flat_index(self, column: torch.Tensor, size: int, idx: torch.Tensor) -> torch.Tensor:
        return (column.view(-1, 1) * size + idx).reshape(-1)

    def per_source(self, column: torch.Tensor, width: int) -> torch.Tensor:
        out = torch.zeros(width * self.vocab, self.width_d, dtype=self.dtype, device=self.b.device)
        flat = self._flat_index(column, self.vocab, self._full_idx())
        out.index_add_(0, flat, self.b.reshape(-1, self.width_d))
        return out.view(width, -1)

    def _rows_read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(for each position of ``idx``, which of the table rows read this step it reads;
        how often each of those rows is read over all rows' positions), from one ``unique``."""
        if self._read is None:
            _, inverse, counts = torch.unique(self.idx, return_inverse=True, return_counts=True)
            if self.idx.shape[0] == 1 and self.rows > 1:
                counts = counts * self.rows
            self._read = (inverse, counts)
        return self._read

    def _token_counts(self) -> torch.Tensor:
        return self._rows_read()[1]

    def _same_token_pairs(self) -> int:
        """Σ_v n_v² over the step's token counts n_v: a bound on the (source, token) pairs of
        per-source sums that meet on a table row."""
        return int((self._token_counts().to(torch.float64) ** 2).sum())

    def _dense_table(self, width: int) -> bool:
        """Per-source sums as a dense [width, rows read, D] table while it is at most a few
        times the size of B (a handful of operations); beyond, the sparse pair route."""
        return width * int(self._token_counts().numel()) <= 4 * self.rows * self.positions

    def source_cost(self, width: int, full: bool = True) -> float:
        n = self.rows * self.positions
        if self._dense_table(width):
            products = _products(width, full) * int(self._token_counts().numel())
        else:
            products = self._same_token_pairs() if full else 2 * n
        return OVERHEAD + 4 * MEMORY * n * self.width_d + products * (self.width_d + MEMORY)

    def source_gram(self, column: torch.Tensor, width: int, full: bool = True) -> torch.Tensor:
        """The Gram of the per-source sums over the table rows this step reads: a dense
        [width, rows read, D] table when small (see :meth:`_dense_table`), else from the
        (source, row) pairs the step touches: a source's sum on row v meets another's only on
        the same v, so the cost is ~pairs·D (row and norms), Σ_v n_v²·D (whole matrix)."""
        device = self.b.device
        if self._dense_table(width):
            inverse, counts = self._rows_read()
            read = int(counts.numel())
            table = torch.zeros(width * read, self.width_d, dtype=self.dtype, device=device)
            flat = self._flat_index(column, read, inverse.expand(self.rows, self.positions))
            table.index_add_(0, flat, self.b.reshape(-1, self.width_d))
            return gram_of([table.view(width, -1)], full)
        keys = self._flat_index(column, self.vocab, self._full_idx())
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(unique.numel(), self.width_d, dtype=self.dtype, device=device)
        sums.index_add_(0, inverse, self.b.reshape(-1, self.width_d))
        source, token = unique // self.vocab, unique % self.vocab  # sorted by source, token
        out = torch.zeros(width, width, dtype=self.dtype, device=device)
        if not full:
            out.diagonal().index_add_(0, source, (sums * sums).sum(1))
            first = source == 0  # the first column's pairs, tokens ascending
            tokens, vectors = token[first], sums[first]
            if tokens.numel():
                at = torch.searchsorted(tokens, token).clamp_max(tokens.numel() - 1)
                dots = (sums * vectors[at]).sum(1) * (tokens[at] == token).to(self.dtype)
                row = torch.zeros(width, dtype=self.dtype, device=device).index_add_(
                    0, source, dots
                )
                out[0] = row
                out[:, 0] = row
            return out
        # Every pair of pairs on the same token: group them by token, enumerate within groups.
        order = torch.argsort(token, stable=True)
        source, sums = source[order], sums[order]
        _, counts = torch.unique_consecutive(token[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        size = torch.repeat_interleave(counts, counts)  # group size of each pair
        begin = torch.repeat_interleave(starts, counts)
        left = torch.repeat_interleave(torch.arange(size.numel(), device=device), size)
        offset = torch.arange(left.numel(), device=device) - torch.repeat_interleave(
            torch.cumsum(size, 0) - size, size
        )
        right = begin[left] + offset
        dots = (sums[left] * sums[right]).sum(1)
        out.view(-1).index_add_(0, source[left] * width + source[right], dots)
        return out

    def combine(self, c: torch.Tensor) -> list[torch.Tensor]:
        out = torch.zeros(self.shapes[0], dtype=self.dtype, device=self.b.device)
        values = (self.b * c.view(-1, 1, 1)).reshape(-1, self.width_d)
        return [out.index_add_(0, self._full_idx().reshape(-1), values)]

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        return (vectors[0].to(self.dtype)[self.idx] * self.b).sum((1, 2))

    def project(self, projections: Sequence[Projection]) -> list[torch.Tensor]:
        p = projections[0]
        if p.identity:
            return [self.per_source(torch.arange(self.rows, device=self.b.device), self.rows)]
        idx = self._full_idx()
        if p.rows is None:
            pr = torch.nn.functional.one_hot(idx, self.vocab).to(self.dtype)
        else:
            pr = p.rows.T[idx]  # [R, T, u]
        pb = self.b if p.cols is None else self.b @ p.cols.T
        return [p.keep(torch.einsum("rtu,rtv->ruv", pr, pb))]


class PerSample(Factor):
    """Gradients materialised per row: norm affines, the ``torch.func`` fallback."""

    def __init__(self, grads: Sequence[torch.Tensor], shapes: Sequence[torch.Size]) -> None:
        self.rows = int(grads[0].shape[0])
        flat = [g.reshape(self.rows, -1) for g in grads]
        self.g = flat[0] if len(flat) == 1 else torch.cat(flat, 1)
        self.shapes = list(shapes)
        self.sizes = [math.prod(s) for s in shapes]
        self.dtype = self.g.dtype

    def add_kernel(self, out: torch.Tensor) -> None:
        if out.dtype == self.dtype:
            out.addmm_(self.g, self.g.T)
        else:
            add_into(out, self.g @ self.g.T)

    def kernel_cost(self) -> float:
        return float(self.rows * self.rows * self.numel + MEMORY * self.rows * self.rows)

    def per_source(self, column: torch.Tensor, width: int) -> torch.Tensor:
        out = torch.zeros(width, self.numel, dtype=self.dtype, device=self.g.device)
        return out.index_add_(0, column, self.g)

    def combine(self, c: torch.Tensor) -> list[torch.Tensor]:
        total = c @ self.g
        parts = torch.split(total, self.sizes)
        return [t.reshape(s) for t, s in zip(parts, self.shapes, strict=True)]

    def dots(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        v = torch.cat([x.to(self.dtype).reshape(-1) for x in vectors])
        return self.g @ v

    def project(self, projections: Sequence[Projection]) -> list[torch.Tensor]:
        parts = torch.split(self.g, self.sizes, 1)
        return [
            p.vector(g.reshape(self.rows, *s))
            for p, g, s in zip(projections, parts, self.shapes, strict=True)
        ]
