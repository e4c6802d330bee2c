"""Pallas GPU (Triton lowering) kernels for the chunked GKA state pass and the chunked simple-GLA output.

Per (batch, query head h) with keys k_t, values v_t (kv head h // group, both times beta_t[h]), chunks of C
tokens, G_t the within-chunk inclusive cumsum of the log-decay and G_last its value at the chunk's last token:

    state pass:  X_{n+1} = exp(G_last) X_n + sum_s exp(G_last - G_s) k_s w_s^T
                 with X = h_kk (w = k, decay g_kk) and X = h_kv (w = v, decay g); X_0 the initial state.
    output:      o_t = scale * (exp(G_t) S_n^T q_t + sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s)
                 with S_n = h_kv at the start of the token's chunk n.

``state_pass`` follows fla's ``chunk_fwd_h``: one program per (column block of [h_kk | h_kv], row block, head,
batch) walks the N chunks in a ``lax.fori_loop`` with its fp32 state block in registers, storing it as each
chunk's start (``kk_only``: h_kk alone; ``starts_dtype`` bf16 halves the starts' traffic). With
``segment_chunks`` (``state_pass_segmented``) segments of chunks are walked in parallel from zero and a short
XLA scan gives each segment's true starting state; consumers fix each start block up as they load it
(``Segmented``). ``gla_output`` runs one program per (column block of o, chunk, head, batch) from those stored
h_kv starts. ``gla_fused`` does both
halves for h_kv in one kernel: one program per (column block of o, head, batch) walks the chunks, writes each
chunk's output from the h_kv block it carries in registers, then advances that block; the h_kv starts never
reach memory. A sequence whose length is not a multiple of the chunk is zero-padded in the wrapper (zero k,
v, g change no state).

Triton lowering constraints honoured here: every loaded/stored/computed block has power-of-2 sizes, every dot
is 2-D with dims >= 16 and an explicit precision, no scratch memory, no slicing of values.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # The Triton lowering is deprecated upstream; a jax without it still imports this module.
    from jax.experimental.pallas import triton as pltriton
    AVAILABLE = True
except ImportError:  # pragma: no cover
    pltriton = None
    AVAILABLE = False

HIGHEST = jax.lax.Precision.HIGHEST
F32 = jnp.float32


# ----------------------------------------------------------------------------- helpers
def _compiler_params(num_warps, num_stages, interpret):
    if pltriton is None:
        if not interpret:
            raise RuntimeError("jax.experimental.pallas.triton is unavailable: only interpret=True works")
        return None
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _check_block(name: str, size: int, *extents: int):
    if size < 16 or size & (size - 1) or any(e % size for e in extents):
        raise ValueError(f"{name}={size} must be a power of 2 >= 16 dividing {extents}")


def _pad_time(x: jax.Array | None, length: int) -> jax.Array | None:
    """Zero-pad axis 1 (time) of x to ``length``."""
    if x is None or x.shape[1] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def _last(x: jax.Array) -> jax.Array:
    """x[-1] of a 1-D value without slicing it (value slices do not lower to Triton); exact."""
    idx = jnp.arange(x.shape[0])
    return jnp.sum(jnp.where(idx == x.shape[0] - 1, x, 0.0))


def _dot(a, b, precision, operand_dtype=F32):
    """a @ b with operands cast to ``operand_dtype`` (float32: TF32/IEEE by ``precision``; bfloat16) and
    float32 accumulation."""
    return jnp.dot(a.astype(operand_dtype), b.astype(operand_dtype), precision=precision,
                   preferred_element_type=F32)


# ----------------------------------------------------------------------------- state pass
@functools.partial(jax.tree_util.register_dataclass, data_fields=["starts", "carry", "decay"],
                   meta_fields=["segment_chunks", "num_chunks"])
@dataclasses.dataclass(frozen=True)
class Segmented:
    """Chunk-start states of one state (h_kk or h_kv) from a segmented pass, before the segment fix-up.

    The N chunks are cut into P segments of L chunks (the time axis zero-padded to P * L chunks). Segment 0
    starts from the initial state, every other segment from zero, all in parallel; the true start of chunk n
    in segment s = n // L is
        starts[n] + decay[n] * carry[s]
    with carry[s] the true state at segment s's start (carry[0] = 0) and decay[n] = exp(sum of the gate from
    segment s's start to chunk n's start). Consumers (``gla_output``, ``pallas_solve.chebyshev_solve``)
    apply this fix-up to each chunk-start block they load; ``resolved`` applies it in XLA.
    """
    starts: jax.Array        # [B, H, P * L, D, W] local chunk starts (starts_dtype)
    carry: jax.Array | None  # [B, H, P, D, W] float32 (None when P == 1: nothing to fix)
    decay: jax.Array | None  # [B, H, P * L] float32
    segment_chunks: int      # L
    num_chunks: int          # N

    @staticmethod
    def of(starts) -> "Segmented":
        """``starts`` (true chunk starts [B, H, N, D, W], or already a Segmented) as a Segmented."""
        return starts if isinstance(starts, Segmented) else Segmented(starts, None, None, starts.shape[2],
                                                                      starts.shape[2])

    def resolved(self) -> jax.Array:
        """The true chunk starts [B, H, N, D, W] in the starts' dtype."""
        starts = self.starts[:, :, :self.num_chunks]
        if self.carry is None:
            return starts
        carry = jnp.repeat(self.carry, self.segment_chunks, axis=2)[:, :, :self.num_chunks]
        decay = self.decay[:, :, :self.num_chunks, None, None]
        return (starts.astype(F32) + decay * carry).astype(starts.dtype)

    def kernel_inputs(self, block_rows: int, block_cols: int, index):
        """Arrays and BlockSpecs for a kernel that loads the [block_rows, block_cols] start block of chunk n:
        ``index(*grid_indices) -> (batch, head, chunk, row block, column block)``. The kernel receives the
        local start block, then (when there is a fix-up) the carry block and the chunk's decay scalar, and
        calls ``fixed_start`` on those refs."""
        def block(shape, pick):
            return pl.BlockSpec(shape, lambda *ids: pick(*index(*ids)))

        arrays = [self.starts]
        specs = [block((None, None, None, block_rows, block_cols), lambda b, h, n, i, j: (b, h, n, i, j))]
        if self.carry is not None:
            length = self.segment_chunks
            arrays += [self.carry, self.decay]
            specs += [block((None, None, None, block_rows, block_cols),
                            lambda b, h, n, i, j: (b, h, n // length, i, j)),
                      block((None, None, None), lambda b, h, n, i, j: (b, h, n))]
        return arrays, specs


def fixed_start(start_ref, carry_ref=None, decay_ref=None):
    """A chunk-start block from ``Segmented.kernel_inputs``' refs: local start + decay * carry (float32), or
    the start as stored when there is no fix-up."""
    start = start_ref[...]
    if carry_ref is None:
        return start
    return start.astype(F32) + decay_ref[...] * carry_ref[...]


def _state_pass_kernel(*refs, chunk, segment_chunks, block_k, block_v, num_kk_blocks, kk_only, has_g_kk,
                       precision, operand_dtype):
    refs = list(refs)
    k_ref = refs.pop(0)                             # [Tp, D] (this kv head)
    v_ref = None if kk_only else refs.pop(0)        # [Tp, Dv]
    weight_ref, decay_ref = refs.pop(0), refs.pop(0)          # [Tp], [Np] of the h_kv gate (kk_only: h_kk's)
    kk_weight_ref, kk_decay_ref = (refs.pop(0), refs.pop(0)) if has_g_kk else (weight_ref, decay_ref)
    num_states = 1 if kk_only else 2                # then: initial, starts, segment-end refs of h_kk [, h_kv]
    init_refs, starts_refs, end_refs = refs[:num_states], refs[num_states:-num_states], refs[-num_states:]
    col_block = pl.program_id(0)
    row0 = pl.program_id(1) * block_k
    segment = pl.program_id(4)

    def run(values_ref, col0, weight_ref, decay_ref, init_ref, starts_ref, end_ref):
        def body(i, state):                          # state [BK, BV] f32; chunk n = segment * L + i
            n = segment * segment_chunks + i
            rows = pl.ds(n * chunk, chunk)
            starts_ref[i] = state.astype(starts_ref.dtype)
            keys = k_ref[rows, pl.ds(row0, block_k)].astype(F32) * weight_ref[rows][:, None]   # [C, BK]
            values = values_ref[rows, pl.ds(col0, block_v)].astype(F32)                      # [C, BV]
            decay = jnp.sum(decay_ref[pl.ds(n, 1)])                  # exp(chunk gate sum), a scalar
            return decay * state + _dot(keys.T, values, precision, operand_dtype)

        init = jnp.where(segment == 0, init_ref[...].astype(F32), 0.0)   # later segments start from zero
        end_ref[...] = jax.lax.fori_loop(0, segment_chunks, body, init)

    run_kk = functools.partial(run, k_ref, col_block * block_v, kk_weight_ref, kk_decay_ref, init_refs[0],
                               starts_refs[0], end_refs[0])
    if kk_only:
        run_kk()
        return
    pl.when(col_block < num_kk_blocks)(run_kk)

    @pl.when(col_block >= num_kk_blocks)
    def _():
        run(v_ref, (col_block - num_kk_blocks) * block_v, weight_ref, decay_ref, init_refs[1], starts_refs[1],
            end_refs[1])


def _chunk_weights(gate, beta, chunk_size):
    """(weight [B, Tp, H], decay [B, Np, H]) of the state update S' = decay_n S + sum_s weight_s k_s v_s^T
    over chunk n, from the log-decay gate [B, Tp, H] (Tp = Np * C) and beta (k and v are both scaled by
    beta): weight_s = beta_s^2 exp(G_last - G_s), decay_n = exp(G_last), G the in-chunk inclusive cumsum."""
    b, tp, num_heads = gate.shape
    gcum = jnp.cumsum(gate.astype(F32).reshape(b, tp // chunk_size, chunk_size, num_heads), axis=2)
    last = gcum[:, :, -1:]
    weight = jnp.exp(last - gcum).reshape(b, tp, num_heads)
    if beta is not None:
        weight = weight * jnp.square(beta.astype(F32))
    return weight, jnp.exp(last[:, :, 0])


def state_pass(k, v, beta, g, g_kk, h_kk0, h_kv0, *, chunk_size=64, precision=HIGHEST, interpret=False,
               block_v=None, block_k=None, num_warps=None, num_stages=None, kk_only=False, starts_dtype=F32,
               segment_chunks=None):
    """Chunk-start and final states of h_kk and h_kv (``reference.chunk_state_pass`` on expanded heads).

    k [B, T, Hkv, D], v [B, T, Hkv, Dv] (unexpanded; query head h reads kv head h // (H // Hkv));
    beta [B, T, H] multiplier of k and v, or None; g [B, T, H] log-decay of h_kv; g_kk [B, T, H] that of
    h_kk, or None (= g); h_kk0 [B, H, D, D], h_kv0 [B, H, D, Dv] initial states.
    Returns (h_kk_starts [B, H, N, D, D], h_kv_starts [B, H, N, D, Dv], h_kk_final [B, H, D, D],
    h_kv_final [B, H, D, Dv]), N = ceil(T / chunk_size); the starts in ``starts_dtype`` (float32, or
    bfloat16 to halve their write and read traffic), the finals float32 (accumulation is always float32).
    ``kk_only``: h_kk alone, returning (h_kk_starts, h_kk_final); v and h_kv0 are then ignored (may be None)
    and g only serves as the h_kk decay when g_kk is None (h_kv comes from ``gla_fused``).
    The update dot takes float32 operands (TF32 or IEEE by ``precision``): the carried state keeps that
    accuracy in every mode (bf16 operands, as fla's, measured 10x larger final-state errors on CPU).
    ``segment_chunks`` (see ``state_pass_segmented``) runs segments of that many chunks in parallel and
    fixes their starts up here in XLA.
    """
    states, finals = state_pass_segmented(
        k, v, beta, g, g_kk, h_kk0, h_kv0, chunk_size=chunk_size, precision=precision, interpret=interpret,
        block_v=block_v, block_k=block_k, num_warps=num_warps, num_stages=num_stages, kk_only=kk_only,
        starts_dtype=starts_dtype, segment_chunks=segment_chunks)
    return tuple(state.resolved() for state in states) + tuple(finals)


def state_pass_segmented(k, v, beta, g, g_kk, h_kk0, h_kv0, *, chunk_size=64, precision=HIGHEST,
                         interpret=False, block_v=None, block_k=None, num_warps=None, num_stages=None,
                         kk_only=False, starts_dtype=F32, segment_chunks=None, operand_dtype=F32):
    """``state_pass`` with its chunk walk cut into segments that run in parallel.

    Arguments as ``state_pass``. Returns ((Segmented of h_kk[, Segmented of h_kv]), (h_kk_final[,
    h_kv_final])). A program walks the chunks of one segment in order, so the pass takes L serial steps
    instead of N: at B = 1 and T = 16K (N = 256) the unsegmented pass is latency-bound on its 256 steps.
    ``segment_chunks`` L: None or >= N gives one segment (no fix-up needed); otherwise P = ceil(N / L)
    segments of ceil(N / P) chunks. The carries (true states at the segment starts) come from a P-step scan
    in XLA over the segment-end states: carry[s + 1] = exp(segment gate sum) carry[s] + end[s].

    Grid ((D + Dv) / block_v, D / block_k, H, B, P) (kk_only: (D / block_v, ...)): each program owns a
    [block_k, block_v] block of the concatenated state [h_kk | h_kv] (the first D / block_v column blocks are
    h_kk's) in one segment. The per-token update weights beta_s^2 exp(G_last - G_s) and the per-chunk decays
    exp(G_last) come from XLA (``_chunk_weights``), so the chunk loop needs no in-kernel cumsum: 6 barriers
    per step instead of 13 (offline sm_90a compile), 0.89 against 1.05 ms at T = 16K on an H200.
    Tunables (defaults are untuned starting points): block_v (default
    min(64, D, Dv)), block_k (default D; D / 2 doubles the programs), num_warps (default 4), num_stages
    (default 2; software pipelining of the chunk loop's loads). ``operand_dtype`` of the update dot: float32
    (default; TF32 or IEEE by ``precision``, the carried state keeps that accuracy) or bfloat16 (the weighted
    keys and the values rounded to bf16 as the reference's chunk kernels do; fp32 accumulation).
    """
    b, t, num_kv_heads, d = k.shape
    dv = d if kk_only else v.shape[-1]
    num_heads = g.shape[2]
    group = num_heads // num_kv_heads
    block_v = block_v or min(64, d, dv)
    block_k = block_k or d
    num_warps, num_stages = num_warps or 4, num_stages or 2
    _check_block("block_v", block_v, d, dv)
    _check_block("block_k", block_k, d)
    _check_block("chunk_size", chunk_size)
    num_chunks = -(-t // chunk_size)
    num_segments = 1 if not segment_chunks or segment_chunks >= num_chunks else -(-num_chunks // segment_chunks)
    seg_len = -(-num_chunks // num_segments)
    tp = num_segments * seg_len * chunk_size
    num_kk_blocks = d // block_v
    grid = (num_kk_blocks + (0 if kk_only else dv // block_v), d // block_k, num_heads, b, num_segments)

    def kk_col(j):  # column block of h_kk (clamped for the h_kv programs, which do not touch it)
        return jnp.minimum(j, num_kk_blocks - 1)

    def kv_col(j):
        return jnp.maximum(j - num_kk_blocks, 0)

    def init_spec(col):
        return pl.BlockSpec((None, None, block_k, block_v), lambda j, i, h, bi, s: (bi, h, i, col(j)))

    def end_spec(col):
        return pl.BlockSpec((None, None, None, block_k, block_v), lambda j, i, h, bi, s: (bi, h, s, i, col(j)))

    def starts_spec(col):
        return pl.BlockSpec((None, None, seg_len, block_k, block_v), lambda j, i, h, bi, s: (bi, h, s, i, col(j)))

    seq_spec = pl.BlockSpec((None, tp, None), lambda j, i, h, bi, s: (bi, 0, h))
    inputs = [_pad_time(k, tp)]
    in_specs = [pl.BlockSpec((None, tp, None, d), lambda j, i, h, bi, s: (bi, 0, h // group, 0))]
    if not kk_only:
        inputs.append(_pad_time(v, tp))
        in_specs.append(pl.BlockSpec((None, tp, None, dv), lambda j, i, h, bi, s: (bi, 0, h // group, 0)))
    gates = [g if g_kk is None else g_kk] if kk_only else [g, g_kk]
    chunk_spec = pl.BlockSpec((None, tp // chunk_size, None), lambda j, i, h, bi, s: (bi, 0, h))
    for gate in gates:  # per-token update weights and per-chunk decays of each gate
        if gate is not None:
            inputs += _chunk_weights(_pad_time(gate, tp), _pad_time(beta, tp), chunk_size)
            in_specs += [seq_spec, chunk_spec]
    cols = [kk_col] if kk_only else [kk_col, kv_col]
    widths = [d] if kk_only else [d, dv]
    inputs += [h_kk0] if kk_only else [h_kk0, h_kv0]
    in_specs += [init_spec(col) for col in cols]
    out_specs = [starts_spec(col) for col in cols] + [end_spec(col) for col in cols]
    out_shape = ([jax.ShapeDtypeStruct((b, num_heads, num_segments * seg_len, d, w), starts_dtype) for w in widths]
                 + [jax.ShapeDtypeStruct((b, num_heads, num_segments, d, w), F32) for w in widths])
    kernel = functools.partial(
        _state_pass_kernel, chunk=chunk_size, segment_chunks=seg_len, block_k=block_k, block_v=block_v,
        num_kk_blocks=num_kk_blocks, kk_only=kk_only, has_g_kk=not kk_only and g_kk is not None,
        precision=precision, operand_dtype=jnp.dtype(operand_dtype))
    outs = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=_compiler_params(num_warps, num_stages, interpret), interpret=interpret,
        name="gka_state_pass_kk" if kk_only else "gka_state_pass",
    )(*inputs)
    num_states = len(widths)
    starts, ends = outs[:num_states], outs[num_states:]
    state_gates = [gates[0]] if kk_only else [g if g_kk is None else g_kk, g]
    states, finals = [], []
    for local_starts, seg_ends, gate in zip(starts, ends, state_gates):
        if num_segments == 1:
            states.append(Segmented(local_starts, None, None, seg_len, num_chunks))
            finals.append(seg_ends[:, :, 0])
            continue
        carry, final, decay = _segment_carries(seg_ends, _pad_time(gate, tp), num_segments, seg_len, chunk_size)
        states.append(Segmented(local_starts, carry, decay, seg_len, num_chunks))
        finals.append(final)
    return tuple(states), tuple(finals)


def _segment_carries(seg_ends, gate, num_segments, seg_len, chunk_size):
    """(carry [B, H, P, D, W], final [B, H, D, W], decay [B, H, P * L]) from the segment-end states
    [B, H, P, D, W] and the padded gate [B, P * L * C, H]; see ``Segmented``."""
    b, _, num_heads = gate.shape
    chunk_sums = gate.astype(F32).reshape(b, num_segments, seg_len, chunk_size, num_heads).sum(axis=3)
    chunk_sums = jnp.moveaxis(chunk_sums, -1, 1)                                   # [B, H, P, L]
    before = jnp.cumsum(chunk_sums, axis=-1) - chunk_sums                        # exclusive, within segment
    decay = jnp.exp(before).reshape(b, num_heads, num_segments * seg_len)        # [B, H, P * L]
    segment_decay = jnp.exp(jnp.sum(chunk_sums, axis=-1))                         # [B, H, P]

    def step(carry, inputs):                                                      # carry [B, H, D, W]
        seg_decay, seg_end = inputs
        return seg_decay[..., None, None] * carry + seg_end, carry

    final, carries = jax.lax.scan(step, jnp.zeros_like(seg_ends[:, :, 0]),   # unrolled: one XLA fusion
                                  (jnp.moveaxis(segment_decay, 2, 0), jnp.moveaxis(seg_ends, 2, 0)),
                                  unroll=True)
    return jnp.moveaxis(carries, 0, 2), final, decay


# ----------------------------------------------------------------------------- GLA output
def _output_kernel(*refs, scale, has_beta, precision, operand_dtype):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs.pop(0), refs.pop(0), refs.pop(0)   # [C, D], [C, D], [C, BV]
    beta_ref = refs.pop(0) if has_beta else None                  # [C]
    g_ref, o_ref = refs.pop(0), refs.pop()                        # [C], [C, BV]
    s0 = fixed_start(*refs)                                       # [D, BV] h_kv at the chunk start
    q = q_ref[...]
    gcum = jnp.cumsum(g_ref[...].astype(F32))                     # [C]
    idx = jnp.arange(gcum.shape[0])
    causal = idx[:, None] >= idx[None, :]
    decay = jnp.exp(jnp.where(causal, gcum[:, None] - gcum[None, :], -jnp.inf))   # [C, C]
    if beta_ref is not None:
        beta = beta_ref[...].astype(F32)
        decay = decay * (beta * beta)[None, :]                    # beta of k_s and of v_s
    scores = _dot(q, k_ref[...].T, precision, operand_dtype) * decay              # [C, C]
    inter = _dot(q, s0, precision, operand_dtype) * jnp.exp(gcum)[:, None]         # [C, BV]
    intra = _dot(scores, v_ref[...], precision, operand_dtype)
    o_ref[...] = (scale * (inter + intra)).astype(o_ref.dtype)


def gla_output(q, k, v, beta, g, h_kv_starts, *, scale, chunk_size=64, precision=HIGHEST, interpret=False,
               block_v=None, num_warps=None, num_stages=None, operand_dtype=F32, out_dtype=F32):
    """Chunked gated-linear-attention output (``reference.gla_chunked`` on expanded heads).

    q [B, T, H, D] (mixed queries q'); k [B, T, Hkv, D], v [B, T, Hkv, Dv] unexpanded; beta [B, T, H] or
    None; g [B, T, H] log-decay of h_kv; h_kv_starts [B, H, N, D, Dv] from ``state_pass``, or the
    ``Segmented`` h_kv starts of ``state_pass_segmented`` (each start block is fixed up as it is loaded).
    Returns o [B, T, H, Dv] in ``out_dtype`` (computed in float32).

    Grid (Dv / block_v, N, H, B), one program per [chunk, block_v] output tile:
    o = scale * (exp(G) * (Q @ S0) + ((Q @ K^T) * M * beta_s^2) @ V), M[t, s] = exp(G_t - G_s) for s <= t.
    ``operand_dtype``: the dots' operands, float32 (TF32 or IEEE by ``precision``) or bfloat16 (as fla's
    chunk_simple_gla); accumulation float32.
    Tunables (untuned starting points): block_v (default Dv), num_warps (default 8 for 128-wide tiles, else
    4), num_stages (no loop here: little effect).
    """
    b, t, num_heads, d = q.shape
    num_kv_heads, dv = v.shape[2], v.shape[3]
    group = num_heads // num_kv_heads
    block_v = block_v or dv
    num_warps = num_warps or (8 if max(d, block_v) >= 128 else 4)
    _check_block("block_v", block_v, dv)
    _check_block("chunk_size", chunk_size)
    starts = Segmented.of(h_kv_starts)
    num_chunks = starts.num_chunks
    tp = num_chunks * chunk_size
    if tp < t or tp - t >= chunk_size or starts.starts.shape[2] < num_chunks:
        raise ValueError(f"h_kv_starts has {num_chunks} chunks, T={t} needs {-(-t // chunk_size)}")
    c = chunk_size
    inputs = [_pad_time(q, tp), _pad_time(k, tp), _pad_time(v, tp)]
    in_specs = [pl.BlockSpec((None, c, None, d), lambda j, n, h, bi: (bi, n, h, 0)),
                pl.BlockSpec((None, c, None, d), lambda j, n, h, bi: (bi, n, h // group, 0)),
                pl.BlockSpec((None, c, None, block_v), lambda j, n, h, bi: (bi, n, h // group, j))]
    if beta is not None:
        inputs.append(_pad_time(beta, tp))
        in_specs.append(pl.BlockSpec((None, c, None), lambda j, n, h, bi: (bi, n, h)))
    start_arrays, start_specs = starts.kernel_inputs(d, block_v, lambda j, n, h, bi: (bi, h, n, 0, j))
    inputs += [_pad_time(g, tp)] + start_arrays
    in_specs += [pl.BlockSpec((None, c, None), lambda j, n, h, bi: (bi, n, h))] + start_specs
    kernel = functools.partial(_output_kernel, scale=scale, has_beta=beta is not None, precision=precision,
                               operand_dtype=jnp.dtype(operand_dtype))
    o = pl.pallas_call(
        kernel, grid=(dv // block_v, num_chunks, num_heads, b), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, c, None, block_v), lambda j, n, h, bi: (bi, n, h, j)),
        out_shape=jax.ShapeDtypeStruct((b, tp, num_heads, dv), out_dtype),
        compiler_params=_compiler_params(num_warps, num_stages, interpret), interpret=interpret,
        name="gka_gla_output",
    )(*inputs)
    return o[:, :t]


# ----------------------------------------------------------------------------- fused h_kv pass + GLA output
def _fused_kernel(*refs, chunk, num_chunks, scale, has_beta, precision, operand_dtype):
    refs = list(refs)
    q_ref, k_ref, v_ref = refs.pop(0), refs.pop(0), refs.pop(0)   # [Tp, D], [Tp, D], [Tp, BV]
    beta_ref = refs.pop(0) if has_beta else None                  # [Tp]
    g_ref, h_kv0_ref, o_ref, h_kv_final_ref = refs                # [Tp], [D, BV], [Tp, BV], [D, BV]
    idx = jnp.arange(chunk)
    causal = idx[:, None] >= idx[None, :]                         # [C, C]

    def body(n, state):                                           # state [D, BV] f32: h_kv at chunk n's start
        rows = pl.ds(n * chunk, chunk)
        q = q_ref[rows, :]                                        # [C, D]
        k = k_ref[rows, :]                                        # [C, D]
        v = v_ref[rows, :]                                        # [C, BV]
        gcum = jnp.cumsum(g_ref[rows].astype(F32))                # [C]
        g_last = _last(gcum)
        decay = jnp.exp(jnp.where(causal, gcum[:, None] - gcum[None, :], -jnp.inf))   # [C, C]
        weight = jnp.exp(g_last - gcum)                           # [C]
        if beta_ref is not None:
            beta = beta_ref[rows].astype(F32)
            decay = decay * (beta * beta)[None, :]                # beta of k_s and of v_s
            weight = weight * beta * beta
        scores = _dot(q, k.T, precision, operand_dtype) * decay   # [C, C]
        inter = _dot(q, state, precision, operand_dtype) * jnp.exp(gcum)[:, None]   # [C, BV]
        o_ref[rows, :] = (scale * (inter + _dot(scores, v, precision, operand_dtype))).astype(o_ref.dtype)
        decayed_keys = k.astype(F32) * weight[:, None]            # [C, D]
        return jnp.exp(g_last) * state + _dot(decayed_keys.T, v, precision)   # fp32 operands: exact state

    h_kv_final_ref[...] = jax.lax.fori_loop(0, num_chunks, body, h_kv0_ref[...].astype(F32))


def gla_fused(q, k, v, beta, g, h_kv0, *, scale, chunk_size=64, precision=HIGHEST, interpret=False,
              block_v=None, num_warps=None, num_stages=None, operand_dtype=F32, out_dtype=F32):
    """GLA output and final h_kv in one pass: ``gla_output(q, k, v, beta, g, state_pass(...)[1])`` and
    ``state_pass(...)[3]`` without materialising the h_kv chunk starts.

    q [B, T, H, D] (mixed queries q'); k [B, T, Hkv, D], v [B, T, Hkv, Dv] unexpanded; beta [B, T, H] or
    None; g [B, T, H] log-decay of h_kv; h_kv0 [B, H, D, Dv] initial state.
    Returns (o [B, T, H, Dv] in ``out_dtype``, h_kv_final [B, H, D, Dv] float32).

    Grid (Dv / block_v, H, B): each program carries S = its [D, block_v] block of h_kv (fp32, registers)
    through the chunks in order; per chunk (Q, K, V with beta, G the in-chunk cumulative decay, M the
    causal decay mask, M[t, s] = exp(G_t - G_s) for s <= t):
        o = scale * (exp(G) * (Q @ S) + ((Q @ K^T) * M) @ V),
        then S = exp(G_last) S + (K * exp(G_last - G))^T @ V.
    ``operand_dtype`` as in ``gla_output`` for the two output dots (a bf16 copy of S feeds Q @ S); the state
    update keeps float32 operands (TF32 or IEEE), so S and the final h_kv keep that accuracy in every mode.
    Each program recomputes Q @ K^T (Dv / block_v times per chunk in all). Tunables (untuned starting
    points): block_v (default min(64, Dv); smaller gives more programs at small B * H), num_warps (default
    4), num_stages (default 2; software pipelining of the chunk loop's loads).
    """
    b, t, num_heads, d = q.shape
    num_kv_heads, dv = v.shape[2], v.shape[3]
    group = num_heads // num_kv_heads
    block_v = block_v or min(64, dv)
    num_warps, num_stages = num_warps or 4, num_stages or 2
    _check_block("block_v", block_v, dv)
    _check_block("chunk_size", chunk_size)
    num_chunks = -(-t // chunk_size)
    tp = num_chunks * chunk_size
    seq_spec = pl.BlockSpec((None, tp, None), lambda j, h, bi: (bi, 0, h))
    inputs = [_pad_time(q, tp), _pad_time(k, tp), _pad_time(v, tp)]
    in_specs = [pl.BlockSpec((None, tp, None, d), lambda j, h, bi: (bi, 0, h, 0)),
                pl.BlockSpec((None, tp, None, d), lambda j, h, bi: (bi, 0, h // group, 0)),
                pl.BlockSpec((None, tp, None, block_v), lambda j, h, bi: (bi, 0, h // group, j))]
    if beta is not None:
        inputs.append(_pad_time(beta, tp))
        in_specs.append(seq_spec)
    inputs += [_pad_time(g, tp), h_kv0]
    state_spec = pl.BlockSpec((None, None, d, block_v), lambda j, h, bi: (bi, h, 0, j))
    in_specs += [seq_spec, state_spec]
    kernel = functools.partial(_fused_kernel, chunk=chunk_size, num_chunks=num_chunks, scale=scale,
                               has_beta=beta is not None, precision=precision, operand_dtype=jnp.dtype(operand_dtype))
    o, h_kv_final = pl.pallas_call(
        kernel, grid=(dv // block_v, num_heads, b), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, tp, None, block_v), lambda j, h, bi: (bi, 0, h, j)), state_spec],
        out_shape=[jax.ShapeDtypeStruct((b, tp, num_heads, dv), out_dtype),
                   jax.ShapeDtypeStruct((b, num_heads, d, dv), F32)],
        compiler_params=_compiler_params(num_warps, num_stages, interpret), interpret=interpret,
        name="gka_gla_fused",
    )(*inputs)
    return o[:, :t], h_kv_final
