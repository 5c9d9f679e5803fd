//! The channel-axis column of the op table: how an axis carrying channels passes through
//! an op, and which channel transforms commute with it there.
//!
//! A channel transform `T` acts on one axis of a tensor: a permutation `P`, an orthogonal
//! rotation `R` (a Hadamard), or a positive diagonal scale `S`. The region analysis follows
//! an axis from the weights that write it to the weights that read it, asking each op on
//! the way for its [`ChannelFlow`]: `op(T x) == T op(x)` (the axis goes *through*), the op
//! *contracts* the axis against a weight (`x W` reads it: a sink, `T⁻¹` folds into `W`),
//! the result is *invariant* under `T` (a mean of squares, a shape), each result gets a
//! *part* of the axis (Split or Slice along it: the region analysis traces the parts'
//! channels as their own regions), or a *barrier*.
//!
//! Like the shape rule, the channel rule is a function of the node's attributes and the
//! facts (shapes, small values) of its operands; it never reads tensor names or weights.
//! Every row with a kernel declares one (a unit test checks); ops without a rule are
//! barriers.

use crate::facts::{Facts, Mono, norm_axis};
use perqc_ir::{DType, Dim, Node};

/// Which kinds of channel transform commute with an op along an axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commutes {
    pub permutation: bool,
    /// Any orthogonal matrix (rotations, Hadamards): the op is linear along the axis (or,
    /// for [`ChannelFlow::Invariant`], depends on the axis only through norms).
    pub rotation: bool,
    /// Positive diagonal scales: the op is positively homogeneous along the axis.
    pub positive_scale: bool,
    /// Every diagonal scale, signs included (linear ops; a norm's gamma).
    pub signed_scale: bool,
    /// The op is linear in this operand by itself: a diagonal scale (any sign) of this
    /// operand alone, every other operand left as it is, scales the result the same way (a
    /// factor of `x · y`, the dividend of `x / y`). It matters where other operands carry
    /// the channels too (`with`) and the kinds above, which apply to all of them together,
    /// rule scales out: the region analysis then sends a scale through one factor
    /// (smoothing `silu(gate) · up` through `up`).
    pub factor: bool,
}

/// Permutations only (elementwise non-linear ops).
pub const PERM: Commutes = Commutes {
    permutation: true,
    rotation: false,
    positive_scale: false,
    signed_scale: false,
    factor: false,
};
/// Permutations and positive scales (ReLU).
pub const PERM_SCALE: Commutes = Commutes {
    positive_scale: true,
    ..PERM
};
/// Every linear map along the axis.
pub const LINEAR: Commutes = Commutes {
    permutation: true,
    rotation: true,
    positive_scale: true,
    signed_scale: true,
    factor: false,
};
/// Permutations and rotations, not scales (norms over the axis).
pub const ORTHOGONAL: Commutes = Commutes {
    positive_scale: false,
    signed_scale: false,
    ..LINEAR
};

/// An axis of one operand or result: `(index, axis)`.
pub type Port = (usize, usize);

/// How the channels on one input axis pass through an op.
#[derive(Clone, Debug, PartialEq)]
pub enum ChannelFlow {
    /// `op(T x, T y..) == T op(x, y..)` for the kinds in `commutes`: the channels reappear
    /// on each port of `outputs`. The inputs in `with` carry the same channels on the given
    /// axis and take the same `T` (a residual Add's other operand, Concat's other parts).
    /// The inputs in `uniform` are left as they are and must be constant along the given
    /// axis for rotations and scales to commute (a norm's gamma before it is folded).
    Through {
        outputs: Vec<Port>,
        commutes: Commutes,
        with: Vec<Port>,
        uniform: Vec<Port>,
    },
    /// The op contracts the axis with input `weight` on `weight_axis` (`x W` reads it):
    /// `op(T x, W) == op(x, T' W)`, so the transform ends here and its inverse folds into
    /// that axis of the weight.
    Contracted { weight: usize, weight_axis: usize },
    /// The results do not carry the axis and do not change when `T` of the listed kinds is
    /// applied to this input and to the inputs in `with` (a query/key product over the head
    /// dim, a mean of squares, `Shape`).
    Invariant { commutes: Commutes, with: Vec<Port> },
    /// The op keeps its input's elements in row-major order and only regroups the axes
    /// (Reshape, Flatten, Squeeze, Unsqueeze): the channels on a run of consecutive input
    /// axes land on the run of result axes that covers the same element offsets, possibly
    /// split (`[.., H·D] -> [.., H, D]`: heads) or merged. The region analysis does that
    /// stride arithmetic on the known shapes; the op has one result (port 0).
    Regroup,
    /// The axis indexes independent slices (attention heads): no transform may mix indices
    /// along it, but every index may carry its own transform of the other channel axes.
    /// Index `j` of an output port relates to this axis as its [`Fanout`] says; the inputs in
    /// `with` are indexed along their axis the same way and take the transforms of the
    /// indices they pair with (a query head takes the transform of its key head).
    Heads {
        outputs: Vec<(Port, Fanout)>,
        with: Vec<(Port, Fanout)>,
    },
    /// The op hands each result a part of the axis (Split along it, Slice): index `k` of
    /// the result's axis of each port of `outputs` is index [`Part::index`]`(k)` of this
    /// one; the other indices do not reach that result. Every transform that maps each
    /// part's channels among themselves commutes (selecting elements is linear and moves
    /// none). The region analysis does the index arithmetic and traces each part's channels
    /// on their own: channels that travel through different values are different regions
    /// (the query and key part of a fused projection meet a rotary embedding, the value
    /// part does not), so what one part meets does not block another.
    Parts { outputs: Vec<(Port, Part)> },
    /// Nothing passes; the reason, for the region's `blocked_by`.
    Barrier(&'static str),
}

/// A strided part of an axis (a Slice's `start`, `step` and length, or one result of a
/// Split: a contiguous range): index `k < len` of the result is index `start + k·step` of
/// the operand, `step` may be negative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    pub start: usize,
    pub step: isize,
    pub len: usize,
}

impl Part {
    /// A contiguous range `start..start + len`.
    pub fn range(start: usize, len: usize) -> Part {
        Part {
            start,
            step: 1,
            len,
        }
    }

    /// The operand index of result index `k` (`k < len`).
    pub fn index(&self, k: usize) -> usize {
        (self.start as isize + k as isize * self.step) as usize
    }

    /// Whether the part is every index of an axis of `n`, in order.
    pub fn is_whole(&self, n: usize) -> bool {
        self.start == 0 && self.step == 1 && self.len == n
    }
}

/// How indices along a heads axis of another port pair with this port's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fanout {
    /// Index `j` there is index `j` here.
    Same,
    /// Index `j` there is index `j / r` here: each index here serves `r` there (a key/value
    /// head read by `r` query heads).
    Repeat(usize),
    /// Index `j` there is indices `j·r .. j·r + r` here, which must therefore share one
    /// transform (the query heads of one key/value head).
    Group(usize),
}

impl ChannelFlow {
    /// The axis reappears on `outputs` (same axis of output 0 by default), nothing else.
    fn through(outputs: Vec<Port>, commutes: Commutes) -> ChannelFlow {
        ChannelFlow::Through {
            outputs,
            commutes,
            with: Vec::new(),
            uniform: Vec::new(),
        }
    }
}

/// A channel rule: the flow of channels on `ctx.axis` of input `ctx.input`.
pub type ChannelFn = fn(&ChannelCtx<'_>) -> ChannelFlow;

/// A result axis of an op that holds attention heads (`head_dim` consecutive channels
/// per head) which no channel transform of the op's inputs reaches, for `reason` (the
/// heads are packed with the queries and keys, the values leave as a cache): the channel
/// rule is a barrier there, and the only per-head transform is one computed on the result
/// before the weights that read it (the region analysis reports them as an online-only
/// region).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResultHeads {
    pub output: usize,
    pub axis: usize,
    pub head_dim: usize,
    pub reason: &'static str,
}

/// The op table's result-heads column: asked with `input = axis = 0`.
pub type ResultHeadsFn = fn(&ChannelCtx<'_>) -> Option<ResultHeads>;

/// What a channel rule sees.
pub struct ChannelCtx<'a> {
    pub node: &'a Node,
    pub opset: i64,
    /// Facts of the node's inputs (`None`: omitted or unknown).
    pub inputs: Vec<Option<&'a Facts>>,
    /// Facts of the node's results.
    pub outputs: Vec<Option<&'a Facts>>,
    /// The input carrying the channels, and its axis (non-negative).
    pub input: usize,
    pub axis: usize,
}

impl ChannelCtx<'_> {
    fn rank(&self, i: usize) -> Option<usize> {
        self.inputs.get(i).copied().flatten()?.rank()
    }

    fn out_shape(&self, k: usize) -> Option<&[Dim]> {
        self.outputs.get(k).copied().flatten()?.shape.as_deref()
    }

    fn in_shape(&self, i: usize) -> Option<&[Dim]> {
        self.inputs.get(i).copied().flatten()?.shape.as_deref()
    }

    /// An integer list from attribute `name` or the known value of input `i`.
    fn ints(&self, name: &str, i: usize) -> Option<Vec<i64>> {
        match self.node.attr_ints(name) {
            Some(v) => Some(v.to_vec()),
            None => self.inputs.get(i).copied().flatten()?.known_ints(),
        }
    }

    fn int(&self, name: &str, default: i64) -> i64 {
        self.node.attr_int(name).unwrap_or(default)
    }
}

/// The default of rows that declare nothing: a barrier.
pub fn undeclared(_: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::Barrier("the op table declares no channel rule for this op")
}

/// Elementwise ops with numpy broadcasting, given what commutes when every other operand
/// carries the channels too (`shared`) and when they all broadcast along the axis
/// (`broadcast`). Operands carrying the axis go in `with`.
fn broadcasting(ctx: &ChannelCtx<'_>, shared: Commutes, broadcast: Commutes) -> ChannelFlow {
    let Some(out) = ctx.out_shape(0) else {
        return ChannelFlow::Barrier("result rank unknown");
    };
    let Some(rank) = ctx.rank(ctx.input) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    let out_axis = ctx.axis + out.len() - rank;
    let mut with = Vec::new();
    let mut all_carry = true;
    for (j, f) in ctx.inputs.iter().enumerate() {
        if j == ctx.input {
            continue;
        }
        let Some(shape) = f.and_then(|f| f.shape.as_deref()) else {
            if f.is_some() {
                return ChannelFlow::Barrier("operand rank unknown");
            }
            continue; // omitted optional input
        };
        let lead = out.len() - shape.len();
        match out_axis.checked_sub(lead).map(|a| (a, &shape[a])) {
            Some((_, Dim::Known(1))) | None => all_carry = false,
            Some((a, _)) => with.push((j, a)),
        }
    }
    ChannelFlow::Through {
        outputs: vec![(0, out_axis)],
        commutes: if all_carry { shared } else { broadcast },
        with,
        uniform: Vec::new(),
    }
}

/// Ops linear in all operands together (Add, Sub): `T x + T y == T (x + y)`; an operand
/// that broadcasts along the axis adds the same value to every channel, which only
/// permutations leave in place.
pub fn add_sub(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    broadcasting(ctx, LINEAR, PERM)
}

/// Products and quotients: channels of both operands multiply elementwise (only a common
/// permutation commutes with both), but the product is linear in each factor alone, so a
/// scale may go through one of them: `D (x · y) == (D x) · y`; a factor broadcast along the
/// axis (a per-row scalar such as an RMS) commutes with every linear map: `T (x · r) ==
/// (T x) · r`. A divisor carrying the channels is non-linear in them.
pub fn mul_div(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    if ctx.node.op_type == "Div" && ctx.input == 1 {
        return broadcasting(ctx, PERM, PERM);
    }
    let factor = Commutes {
        factor: true,
        ..PERM
    };
    broadcasting(ctx, factor, LINEAR)
}

/// Elementwise ops that are not linear (Max, Pow, Where, comparisons, ...): permutations.
pub fn pointwise_many(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    broadcasting(ctx, PERM, PERM)
}

/// Unary elementwise, non-linear (Exp, Sigmoid, SiLU, GELU, ...): permutations.
pub fn pointwise(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::through(vec![(0, ctx.axis)], PERM)
}

/// ReLU: also positively homogeneous, `relu(s x) == s relu(x)` for `s > 0`.
pub fn relu(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::through(vec![(0, ctx.axis)], PERM_SCALE)
}

/// Linear unary ops (Identity, Neg): everything commutes.
pub fn linear_unary(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::through(vec![(0, ctx.axis)], LINEAR)
}

/// Cast: between float types it only rounds (linear up to round-off); to anything else
/// the channels become another kind of value.
pub fn cast(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let to = ctx
        .node
        .attr_int("to")
        .and_then(|t| DType::from_code(t as i32));
    let from = ctx.inputs.first().copied().flatten().and_then(|f| f.dtype);
    let float = |d: Option<DType>| d.is_some_and(DType::is_float);
    if ctx.node.op_type == "CastLike" || (float(to) && float(from)) {
        ChannelFlow::through(vec![(0, ctx.axis)], LINEAR)
    } else {
        ChannelFlow::through(vec![(0, ctx.axis)], PERM)
    }
}

/// `MatMul(a, b)`, numpy semantics: a's last axis is contracted with b's second-to-last;
/// b's last axis becomes the result's last; other axes are rows or batch dims, on which
/// the product is linear.
pub fn matmul(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let (Some(ra), Some(rb)) = (ctx.rank(0), ctx.rank(1)) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    if ra < 2 || rb < 2 {
        return ChannelFlow::Barrier("1-d MatMul operand");
    }
    let r = ra.max(rb);
    let (rank, axis) = (if ctx.input == 0 { ra } else { rb }, ctx.axis);
    match (ctx.input, axis) {
        (0, a) if a == ra - 1 => ChannelFlow::Contracted {
            weight: 1,
            weight_axis: rb - 2,
        },
        (1, a) if a == rb - 2 => ChannelFlow::Contracted {
            weight: 0,
            weight_axis: ra - 1,
        },
        (1, a) if a == rb - 1 => ChannelFlow::through(vec![(0, r - 1)], LINEAR),
        (0, a) if a == ra - 2 => ChannelFlow::through(vec![(0, r - 2)], LINEAR),
        // A batch axis: linear, but a broadcast batch dim of the other operand would be
        // shared by every channel.
        _ => broadcasting_batch(ctx, rank, r),
    }
}

fn broadcasting_batch(ctx: &ChannelCtx<'_>, rank: usize, r: usize) -> ChannelFlow {
    let out_axis = ctx.axis + r - rank;
    let other = 1 - ctx.input;
    let Some(shape) = ctx.in_shape(other) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    let lead = r - shape.len();
    match out_axis.checked_sub(lead).map(|a| (a, &shape[a])) {
        Some((_, Dim::Known(1))) | None => ChannelFlow::through(vec![(0, out_axis)], LINEAR),
        Some((a, _)) => ChannelFlow::Through {
            outputs: vec![(0, out_axis)],
            commutes: PERM,
            with: vec![(other, a)],
            uniform: Vec::new(),
        },
    }
}

/// `Gemm(A, B, C) = alpha op(A) op(B) + beta C` with `op` transposing on transA / transB.
pub fn gemm(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let (ta, tb) = (ctx.int("transA", 0) != 0, ctx.int("transB", 0) != 0);
    let (a_k, a_m) = if ta { (0, 1) } else { (1, 0) };
    let (b_k, b_n) = if tb { (1, 0) } else { (0, 1) };
    let bias = ctx.inputs.get(2).copied().flatten();
    match (ctx.input, ctx.axis) {
        (0, a) if a == a_k => ChannelFlow::Contracted {
            weight: 1,
            weight_axis: b_k,
        },
        (1, a) if a == b_k => ChannelFlow::Contracted {
            weight: 0,
            weight_axis: a_k,
        },
        (0, a) if a == a_m => {
            // Rows: a bias broadcast over rows is the same in every row.
            let c = if bias.is_some() { PERM } else { LINEAR };
            ChannelFlow::through(vec![(0, 0)], c)
        }
        (1, a) if a == b_n => {
            let mut with = Vec::new();
            let mut commutes = LINEAR;
            if let Some(shape) = bias.and_then(|f| f.shape.as_deref()) {
                match shape.last() {
                    Some(Dim::Known(1)) | None => commutes = PERM,
                    Some(_) => with.push((2, shape.len() - 1)),
                }
            }
            ChannelFlow::Through {
                outputs: vec![(0, 1)],
                commutes,
                with,
                uniform: Vec::new(),
            }
        }
        (2, a)
            if bias.and_then(Facts::rank).is_some_and(|r| a + 1 == r)
                && bias
                    .and_then(|f| f.shape.as_deref()?.last().cloned())
                    .is_some_and(|d| d != Dim::Known(1)) =>
        {
            ChannelFlow::Through {
                outputs: vec![(0, 1)],
                commutes: LINEAR,
                with: vec![(1, b_n)],
                uniform: Vec::new(),
            }
        }
        _ => ChannelFlow::Barrier("Gemm bias broadcast over rows"),
    }
}

/// `ai.perqc::Linear(x, W, bias)`: x's last axis is contracted with W's input axis (0, or
/// 1 with transB); W's output axis becomes the result's last, with the bias; x's other
/// axes are rows.
pub fn linear(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rx) = ctx.rank(0) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    let t = ctx.int("transB", 0) != 0;
    let (w_in, w_out) = if t { (1, 0) } else { (0, 1) };
    let bias = ctx.inputs.get(2).copied().flatten();
    match (ctx.input, ctx.axis) {
        (0, a) if a + 1 == rx => ChannelFlow::Contracted {
            weight: 1,
            weight_axis: w_in,
        },
        (1, a) if a == w_in => ChannelFlow::Contracted {
            weight: 0,
            weight_axis: rx - 1,
        },
        (1, a) if a == w_out => {
            let with = bias
                .and_then(Facts::rank)
                .map(|r| vec![(2, r - 1)])
                .unwrap_or_default();
            ChannelFlow::Through {
                outputs: vec![(0, rx - 1)],
                commutes: LINEAR,
                with,
                uniform: Vec::new(),
            }
        }
        // Rows: a bias is the same in every row.
        (0, a) => ChannelFlow::through(vec![(0, a)], if bias.is_some() { PERM } else { LINEAR }),
        // The bias is added to W's output channels: it takes their transform.
        (2, a) if bias.and_then(Facts::rank).is_some_and(|r| a + 1 == r) => ChannelFlow::Through {
            outputs: vec![(0, rx - 1)],
            commutes: LINEAR,
            with: vec![(1, w_out)],
            uniform: Vec::new(),
        },
        _ => ChannelFlow::Barrier("Linear bias broadcast over rows"),
    }
}

/// `com.microsoft::MatMulNBits(a, B packed, scales, ..)`: a's last axis is contracted
/// with the packed weight's input (K) axis, stored as axis 1 of `[N, blocks, blob]`; the
/// packing groups K in blocks, so only the region analysis's block-aware transforms apply.
pub fn matmul_nbits(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    match (ctx.input, ctx.rank(0)) {
        (0, Some(r)) if ctx.axis + 1 == r => ChannelFlow::Contracted {
            weight: 1,
            weight_axis: 1,
        },
        (0, Some(_)) => ChannelFlow::through(vec![(0, ctx.axis)], LINEAR),
        _ => ChannelFlow::Barrier("packed weight"),
    }
}

/// `com.microsoft::SkipSimplifiedLayerNormalization(x, skip, gamma, bias?)`: the channels
/// of x and skip are added (result 3 is the sum) and RMS-normalized with gamma. Only
/// permutations are declared: canonicalization splits the op into an Add and an RMS norm,
/// whose rules are finer.
pub fn skip_norm(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rank) = ctx.rank(0) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    if ctx.input > 1 {
        return ChannelFlow::Barrier("norm parameters");
    }
    if ctx.axis + 1 != rank {
        return ChannelFlow::through(vec![(0, ctx.axis), (3, ctx.axis)], PERM);
    }
    let mut with = vec![(1 - ctx.input, ctx.axis), (2, 0)];
    if ctx.inputs.get(3).copied().flatten().is_some() {
        with.push((3, 0));
    }
    ChannelFlow::Through {
        outputs: vec![(0, ctx.axis), (3, ctx.axis)],
        commutes: PERM,
        with,
        uniform: Vec::new(),
    }
}

/// Rotary embeddings rotate channel pairs of each head by position-dependent angles: a
/// barrier for channel transforms (the region analysis moves rotary pairs together).
pub fn rotary(_: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::Barrier("rotary embedding mixes channel pairs per position")
}

/// No transform commutes (an op that mixes the channels of its axis non-uniformly).
const NOTHING: Commutes = Commutes {
    permutation: false,
    rotation: false,
    positive_scale: false,
    signed_scale: false,
    factor: false,
};

/// `ai.perqc::Rotary(x, cos, sin) = x ⊙ c + r(x) ⊙ s`, `r` swapping and negating the halves
/// of the last axis: linear in x, so on another axis of x every linear map commutes when
/// cos and sin are constant along it, permutations when they carry it too; on the last
/// axis nothing does (pairs `(j, j + D/2)` turn by their own angles), but the channels
/// reach the result (the query/key region ends at attention, blocked here). The angles
/// themselves are a barrier.
pub fn rotate_half(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rank) = ctx.rank(0) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    if ctx.input != 0 {
        return ChannelFlow::Barrier("rotary angles");
    }
    if ctx.axis + 1 == rank {
        return ChannelFlow::through(vec![(0, ctx.axis)], NOTHING);
    }
    let mut with = Vec::new();
    for j in [1, 2] {
        let Some(shape) = ctx.in_shape(j) else {
            return ChannelFlow::Barrier("operand rank unknown");
        };
        match (ctx.axis + shape.len())
            .checked_sub(rank)
            .map(|a| (a, &shape[a]))
        {
            Some((_, Dim::Known(1))) | None => {}
            Some((a, _)) => with.push((j, a)),
        }
    }
    ChannelFlow::Through {
        outputs: vec![(0, ctx.axis)],
        commutes: if with.is_empty() { LINEAR } else { PERM },
        with,
        uniform: Vec::new(),
    }
}

/// Attention with packed or cached heads (GroupQueryAttention): heads, rotary and the cache
/// are structure the region analysis handles itself.
pub fn packed_attention(_: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::Barrier("packed attention heads")
}

/// The attention output of GroupQueryAttention, `[B, S, Hq·D]`: query head `j`'s result
/// (a mix of key/value head `j / g`'s values) on channels `j·D .. (j + 1)·D`. The heads
/// reach it from packed or cached inputs (a barrier above), so a per-head transform of
/// the values can only be computed on the result (R2 online).
pub fn packed_attention_heads(ctx: &ChannelCtx<'_>) -> Option<ResultHeads> {
    let hq = ctx.int("num_heads", 0);
    let out = ctx.out_shape(0)?;
    let width = out.last()?.known()?;
    if out.len() != 3 || hq <= 0 || width % hq != 0 {
        return None;
    }
    Some(ResultHeads {
        output: 0,
        axis: 2,
        head_dim: (width / hq) as usize,
        reason: "packed attention heads",
    })
}

/// Attention over 4-d `q [B, Hq, S, D]`, `k [B, Hkv, L, D]`, `v [B, Hkv, L, Dv]`: the
/// value head dim passes to the result's last axis (`y = P v` is linear in v); the query
/// and key head dims meet only in `q · k`, unchanged by the same orthogonal map on both.
/// Heads and positions are structure the region analysis handles itself.
pub fn attention(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    if ctx
        .inputs
        .iter()
        .take(3)
        .any(|f| f.and_then(Facts::rank) != Some(4))
    {
        return ChannelFlow::Barrier("attention operands are not 4-d");
    }
    match (ctx.input, ctx.axis) {
        (2, 3) => ChannelFlow::through(vec![(0, 3)], LINEAR),
        (0, 3) => ChannelFlow::Invariant {
            commutes: ORTHOGONAL,
            with: vec![(1, 3)],
        },
        (1, 3) => ChannelFlow::Invariant {
            commutes: ORTHOGONAL,
            with: vec![(0, 3)],
        },
        (input @ 0..=2, 1) => {
            let heads = |i: usize| ctx.in_shape(i).and_then(|s| s[1].known());
            let (Some(hq), Some(hkv)) = (heads(0), heads(1)) else {
                return ChannelFlow::Barrier("head counts unknown");
            };
            if hkv <= 0 || hq % hkv != 0 || heads(2) != Some(hkv) {
                return ChannelFlow::Barrier("query heads are not a multiple of key/value heads");
            }
            let g = (hq / hkv) as usize;
            match input {
                // Query head j scores against key head j / g.
                0 => ChannelFlow::Heads {
                    outputs: Vec::new(),
                    with: vec![((1, 1), Fanout::Group(g))],
                },
                1 => ChannelFlow::Heads {
                    outputs: Vec::new(),
                    with: vec![((0, 1), Fanout::Repeat(g))],
                },
                // Result head j averages the values of key/value head j / g.
                _ => ChannelFlow::Heads {
                    outputs: vec![((0, 1), Fanout::Repeat(g))],
                    with: Vec::new(),
                },
            }
        }
        _ => ChannelFlow::Barrier("attention mixes positions"),
    }
}

/// Reductions over `axes` (attribute or input) with keepdims: over the channel axis the
/// result no longer carries it (a sum is invariant under permutations); over other axes it
/// passes (sums and means are linear, Max only permutes).
pub fn reduce(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rank) = ctx.rank(0) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    let axes: Vec<usize> = match ctx.ints("axes", 1) {
        Some(a) if !a.is_empty() => match a.iter().map(|&x| norm_axis(x, rank)).collect() {
            Some(v) => v,
            None => return ChannelFlow::Barrier("reduction axis out of range"),
        },
        // No axes: all of them, unless noop_with_empty_axes.
        _ if ctx.node.inputs().get(1).is_some_and(Option::is_some)
            && ctx.ints("axes", 1).is_none() =>
        {
            return ChannelFlow::Barrier("reduction axes not known");
        }
        _ if ctx.int("noop_with_empty_axes", 0) != 0 => Vec::new(),
        _ => (0..rank).collect(),
    };
    let linear = matches!(ctx.node.op_type.as_str(), "ReduceSum" | "ReduceMean");
    if axes.contains(&ctx.axis) {
        return ChannelFlow::Invariant {
            commutes: PERM,
            with: Vec::new(),
        };
    }
    let keep = ctx.int("keepdims", 1) != 0;
    let out_axis = if keep {
        ctx.axis
    } else {
        ctx.axis - axes.iter().filter(|&&a| a < ctx.axis).count()
    };
    ChannelFlow::through(vec![(0, out_axis)], if linear { LINEAR } else { PERM })
}

/// Softmax: each slice along its axis is normalized on its own; channels on any axis may
/// be permuted, nothing more (exp is not linear).
pub fn softmax(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::through(vec![(0, ctx.axis)], PERM)
}

/// Normalizations over the trailing axes from `axis`: per row, `y = n(x) · gamma (+ beta)`.
/// An RMS norm's `n(x) = x / rms(x)` commutes with every orthogonal map of the normalized
/// axes (`rms(R x) == rms(x)`), so the op does once gamma (and beta) are uniform; a
/// LayerNorm subtracts the mean, which only permutations keep. Gamma and beta are
/// permuted with the channels. Rows (leading axes) are independent: permutations.
pub fn norm(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rank) = ctx.rank(0) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    let Some(first) = norm_axis(ctx.int("axis", -1), rank) else {
        return ChannelFlow::Barrier("normalization axis out of range");
    };
    if ctx.input != 0 {
        return norm_param(ctx, rank, first);
    }
    if ctx.axis < first {
        return ChannelFlow::through(vec![(0, ctx.axis)], PERM);
    }
    let params: Vec<Port> = (1..ctx.inputs.len().min(3))
        .filter_map(|j| {
            let r = ctx.inputs[j]?.rank()?;
            // Parameters broadcast from the right over the normalized shape.
            (ctx.axis + r).checked_sub(rank).map(|a| (j, a))
        })
        .collect();
    let rms = ctx.node.op_type.contains("RMS") || ctx.node.op_type.starts_with("Simplified");
    if rms {
        ChannelFlow::Through {
            outputs: vec![(0, ctx.axis)],
            commutes: ORTHOGONAL,
            with: Vec::new(),
            uniform: params,
        }
    } else {
        ChannelFlow::Through {
            outputs: vec![(0, ctx.axis)],
            commutes: PERM,
            with: params,
            uniform: Vec::new(),
        }
    }
}

/// A norm's gamma (input 1) or beta (input 2), broadcast from the right over the
/// normalized axes: `y = n(x) · gamma + beta` is linear in each parameter per channel, so
/// a diagonal scale of gamma scales y (`n(x) · (s gamma) == s (n(x) · gamma)`, what folding
/// gamma into the readers uses); beta only shifts. A LayerNorm's parameters carry its
/// channels for permutations with x.
fn norm_param(ctx: &ChannelCtx<'_>, rank: usize, first: usize) -> ChannelFlow {
    let Some(r) = ctx.rank(ctx.input) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    let out_axis = rank + ctx.axis - r.min(rank + ctx.axis);
    if r > rank || out_axis < first || ctx.input > 2 {
        return ChannelFlow::Barrier("norm parameters");
    }
    let rms = ctx.node.op_type.contains("RMS") || ctx.node.op_type.starts_with("Simplified");
    if rms {
        return ChannelFlow::through(
            vec![(0, out_axis)],
            Commutes {
                permutation: false,
                rotation: false,
                positive_scale: true,
                signed_scale: true,
                factor: false,
            },
        );
    }
    let mut with = vec![(0, out_axis)];
    let other = 3 - ctx.input;
    if let Some(ro) = ctx
        .inputs
        .get(other)
        .copied()
        .flatten()
        .and_then(Facts::rank)
        && let Some(a) = (out_axis + ro).checked_sub(rank)
    {
        with.push((other, a));
    }
    ChannelFlow::Through {
        outputs: vec![(0, out_axis)],
        commutes: PERM,
        with,
        uniform: Vec::new(),
    }
}

/// Gather(data, indices, axis): data axes other than `axis` pass (rows are copied whole),
/// shifted by the rank of the indices after it; the gathered axis and the indices are
/// barriers.
pub fn gather(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let (Some(rank), Some(ri)) = (ctx.rank(0), ctx.rank(1)) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    let Some(g) = norm_axis(ctx.int("axis", 0), rank) else {
        return ChannelFlow::Barrier("gather axis out of range");
    };
    match (ctx.input, ctx.axis) {
        (0, a) if a < g => ChannelFlow::through(vec![(0, a)], LINEAR),
        (0, a) if a > g => ChannelFlow::through(vec![(0, a + ri - 1)], LINEAR),
        (0, _) => ChannelFlow::Barrier("gathers along the channel axis"),
        _ => ChannelFlow::Barrier("indices"),
    }
}

/// Transpose: axis `a` moves to where `perm` names it.
pub fn transpose(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rank) = ctx.rank(0) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    let perm: Vec<i64> = match ctx.node.attr_ints("perm") {
        Some(p) => p.to_vec(),
        None => (0..rank as i64).rev().collect(),
    };
    match perm.iter().position(|&p| p == ctx.axis as i64) {
        Some(o) => ChannelFlow::through(vec![(0, o)], LINEAR),
        None => ChannelFlow::Barrier("perm does not name the axis"),
    }
}

/// Reshape-like ops (Reshape, Flatten, Squeeze, Unsqueeze): the axis passes to the result
/// axis of the same size whose trailing elements (the product of the dims after it) are as
/// many as the input's: then every element keeps its channel index. An axis split into
/// several (`[.., H·D] -> [.., H, D]`, heads) or merged with another is a
/// [`ChannelFlow::Regroup`]: the region analysis follows runs of axes by their strides.
pub fn reshape(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let (Some(inp), Some(out)) = (ctx.in_shape(0), ctx.out_shape(0)) else {
        return ChannelFlow::Barrier("shapes unknown");
    };
    let size = &inp[ctx.axis];
    let Some(tail) = Mono::product(&inp[ctx.axis + 1..]) else {
        return ChannelFlow::Barrier("shapes unknown");
    };
    if matches!(size, Dim::Unknown) {
        return ChannelFlow::Barrier("shapes unknown");
    }
    for o in 0..out.len() {
        if &out[o] == size && Mono::product(&out[o + 1..]).as_ref() == Some(&tail) {
            // A new size-1 axis in front (`[.., D] -> [.., 1, D]`: one key/value head) is
            // a heads axis for what reads the result: let the analysis regroup the run.
            let one = Dim::Known(1);
            if o > 0 && out[o - 1] == one && (ctx.axis == 0 || inp[ctx.axis - 1] != one) {
                return ChannelFlow::Regroup;
            }
            return ChannelFlow::through(vec![(0, o)], LINEAR);
        }
    }
    ChannelFlow::Regroup
}

/// Concat along another axis: every part carries the channels and takes the same `T`;
/// along the channel axis the parts' channels are appended (a barrier).
pub fn concat(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rank) = ctx.rank(ctx.input) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    let Some(c) = norm_axis(ctx.int("axis", 1), rank) else {
        return ChannelFlow::Barrier("concat axis out of range");
    };
    if c == ctx.axis {
        return ChannelFlow::Barrier("concatenates along the channel axis");
    }
    ChannelFlow::Through {
        outputs: vec![(0, ctx.axis)],
        commutes: LINEAR,
        with: (0..ctx.inputs.len())
            .filter(|&j| j != ctx.input)
            .map(|j| (j, ctx.axis))
            .collect(),
        uniform: Vec::new(),
    }
}

/// Split: along another axis every result carries the channels on the same axis; along
/// the channel axis each result gets its contiguous range of them ([`ChannelFlow::Parts`]),
/// with the sizes the shape rule gave the results (explicit `split` sizes, equal parts,
/// Split-18's smaller last part).
pub fn split(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rank) = ctx.rank(0) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    if ctx.input != 0 {
        return ChannelFlow::Barrier("split sizes");
    }
    let Some(s) = norm_axis(ctx.int("axis", 0), rank) else {
        return ChannelFlow::Barrier("split axis out of range");
    };
    if s != ctx.axis {
        let outputs = (0..ctx.node.outputs().len())
            .map(|k| (k, ctx.axis))
            .collect();
        return ChannelFlow::through(outputs, LINEAR);
    }
    let Some(n) = ctx.in_shape(0).and_then(|d| d[s].known()) else {
        return ChannelFlow::Barrier("splits a channel axis of unknown size");
    };
    let mut outputs = Vec::new();
    let mut at = 0usize;
    for k in 0..ctx.node.outputs().len() {
        let Some(len) = ctx
            .out_shape(k)
            .and_then(|d| d.get(s)?.known())
            .and_then(|l| usize::try_from(l).ok())
        else {
            return ChannelFlow::Barrier("split sizes not known");
        };
        if len > 0 && ctx.node.output(k).is_some() {
            outputs.push(((k, s), Part::range(at, len)));
        }
        at += len;
    }
    if at as i64 != n {
        return ChannelFlow::Barrier("split sizes do not add up to the channel axis");
    }
    ChannelFlow::Parts { outputs }
}

/// Slice: an axis no slice touches passes; a sliced one hands the result the strided part
/// `starts`, `ends`, `steps` select (ONNX's clamping, negative indices and steps), which
/// needs the bounds and the axis's size known.
pub fn slice(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rank) = ctx.rank(0) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    if ctx.input != 0 {
        return ChannelFlow::Barrier("slice bounds");
    }
    let known = |i: usize| {
        ctx.inputs
            .get(i)
            .copied()
            .flatten()
            .and_then(Facts::known_ints)
    };
    let axes = if ctx.opset < 10 {
        match ctx.node.attr_ints("axes") {
            Some(a) => Some(a.to_vec()),
            None => ctx
                .node
                .attr_ints("starts")
                .map(|s| (0..s.len() as i64).collect()),
        }
    } else if ctx.node.inputs().get(3).is_some_and(Option::is_some) {
        known(3)
    } else {
        // Default: the first len(starts) axes.
        ctx.inputs
            .get(1)
            .copied()
            .flatten()
            .and_then(|f| f.shape.as_deref()?.first()?.known())
            .map(|n| (0..n).collect())
    };
    let Some(axes) = axes else {
        return ChannelFlow::Barrier("slice axes not known");
    };
    let Some(k) = axes
        .iter()
        .position(|&a| norm_axis(a, rank) == Some(ctx.axis))
    else {
        return ChannelFlow::through(vec![(0, ctx.axis)], LINEAR);
    };
    let (starts, ends, steps) = if ctx.opset < 10 {
        let attr = |n: &str| ctx.node.attr_ints(n).map(<[i64]>::to_vec);
        (attr("starts"), attr("ends"), None)
    } else {
        let steps = match ctx.node.inputs().get(4) {
            Some(Some(_)) => match known(4) {
                Some(s) => Some(s),
                None => return ChannelFlow::Barrier("slice steps not known"),
            },
            _ => None,
        };
        (known(1), known(2), steps)
    };
    let (Some(starts), Some(ends)) = (starts, ends) else {
        return ChannelFlow::Barrier("slice bounds not known");
    };
    let step = steps.as_ref().map_or(Some(1), |s| s.get(k).copied());
    let (Some(&start), Some(&end), Some(step)) = (starts.get(k), ends.get(k), step) else {
        return ChannelFlow::Barrier("slice bounds not known");
    };
    let Some(n) = ctx.in_shape(0).and_then(|d| d[ctx.axis].known()) else {
        return ChannelFlow::Barrier("slices a channel axis of unknown size");
    };
    let Some(part) = slice_part(n, start, end, step) else {
        return ChannelFlow::Barrier("slices none of the channel axis");
    };
    // The shape rule's length, where it knows one, agrees.
    if let Some(len) = ctx.out_shape(0).and_then(|d| d.get(ctx.axis)?.known())
        && len != part.len as i64
    {
        return ChannelFlow::Barrier("slice length disagrees with the result's shape");
    }
    ChannelFlow::Parts {
        outputs: vec![((0, ctx.axis), part)],
    }
}

/// The part `x[start:end:step]` of an axis of `n` selects, ONNX's way: negative bounds
/// count from the end, bounds are clamped (to `[0, n]` going forward, `[-1, n - 1]`
/// going back), huge values mean "to the end". `None` if it selects nothing or `step` is 0.
pub fn slice_part(n: i64, start: i64, end: i64, step: i64) -> Option<Part> {
    if step == 0 || n <= 0 {
        return None;
    }
    let wrap = |x: i64| if x < 0 { x.saturating_add(n) } else { x };
    let (s, e) = (wrap(start), wrap(end));
    let (s, e) = if step > 0 {
        (s.clamp(0, n), e.clamp(0, n))
    } else {
        (s.clamp(0, n - 1), e.clamp(-1, n - 1))
    };
    let (s128, e128, st) = (i128::from(s), i128::from(e), i128::from(step));
    let len = if st > 0 {
        (e128 - s128 + st - 1) / st
    } else {
        (s128 - e128 - st - 1) / -st
    };
    (len > 0).then_some(Part {
        start: s as usize,
        step: step as isize,
        len: len as usize,
    })
}

/// Expand: broadcasting to a shape; an axis that is not broadcast keeps its channels.
pub fn expand(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let (Some(inp), Some(out)) = (ctx.in_shape(0), ctx.out_shape(0)) else {
        return ChannelFlow::Barrier("shapes unknown");
    };
    if ctx.input != 0 || matches!(inp[ctx.axis], Dim::Known(1)) {
        return ChannelFlow::Barrier("broadcasts the channel axis");
    }
    ChannelFlow::through(vec![(0, ctx.axis + out.len() - inp.len())], LINEAR)
}

/// Shape (and Size): the result depends on no element.
pub fn shape_of(_: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::Invariant {
        commutes: LINEAR,
        with: Vec::new(),
    }
}

/// Ops on the last two axes that depend on positions (Trilu): leading axes pass.
pub fn matrix_positions(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    match ctx.rank(0) {
        Some(r) if ctx.input == 0 && ctx.axis + 2 < r => {
            ChannelFlow::through(vec![(0, ctx.axis)], LINEAR)
        }
        _ => ChannelFlow::Barrier("masks by position on this axis"),
    }
}

/// Quantize / dequantize: rounding per element; scales and zero points along the axis
/// (per-axis quantization) are permuted with the channels.
pub fn quantize(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    if ctx.input != 0 {
        return ChannelFlow::Barrier("quantization parameters");
    }
    let blocked = ctx.int("block_size", 0) != 0;
    let per_axis = ctx
        .inputs
        .get(1)
        .copied()
        .flatten()
        .and_then(Facts::rank)
        .is_some_and(|r| r > 0);
    if blocked {
        return ChannelFlow::Barrier("blocked quantization groups channels");
    }
    let mut with = Vec::new();
    if per_axis {
        let rank = ctx.rank(0).unwrap_or(0);
        if norm_axis(ctx.int("axis", 1), rank) == Some(ctx.axis) {
            with = (1..ctx.inputs.len().min(3))
                .filter(|&j| ctx.inputs[j].is_some())
                .map(|j| (j, 0))
                .collect();
        }
    }
    ChannelFlow::Through {
        outputs: vec![(0, ctx.axis)],
        commutes: PERM,
        with,
        uniform: Vec::new(),
    }
}

/// Generators, constants and control flow: no channels pass.
pub fn opaque(_: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::Barrier("no channel semantics (generator, constant or control flow)")
}

/// The channel flow of `axis` of input `input` of node `id`, from the op table, with the
/// facts of an inferred [`crate::ShapeMap`]. Unknown ops are barriers.
pub fn flow(
    graph: &perqc_ir::Graph,
    id: perqc_ir::NodeId,
    shapes: &crate::ShapeMap,
    opset: &dyn Fn(&str) -> Option<i64>,
    input: usize,
    axis: usize,
) -> ChannelFlow {
    let node = graph.node(id);
    let Some(def) = crate::lookup_node(node, opset) else {
        return ChannelFlow::Barrier("op unknown to the op table");
    };
    let ctx = context(node, def, shapes, opset, input, axis);
    if ctx.rank(input).is_some_and(|r| axis >= r) {
        return ChannelFlow::Barrier("axis out of range");
    }
    (def.channel)(&ctx)
}

/// The result axis of node `id` that holds attention heads no input transform reaches,
/// if the op table declares one ([`ResultHeads`]).
pub fn result_heads(
    graph: &perqc_ir::Graph,
    id: perqc_ir::NodeId,
    shapes: &crate::ShapeMap,
    opset: &dyn Fn(&str) -> Option<i64>,
) -> Option<ResultHeads> {
    let node = graph.node(id);
    let def = crate::lookup_node(node, opset)?;
    let rule = def.result_heads?;
    rule(&context(node, def, shapes, opset, 0, 0))
}

/// What the op table's rules see of `node`: its operands' and results' facts, and `axis`
/// of input `input`.
fn context<'a>(
    node: &'a Node,
    def: &crate::OpDef,
    shapes: &'a crate::ShapeMap,
    opset: &dyn Fn(&str) -> Option<i64>,
    input: usize,
    axis: usize,
) -> ChannelCtx<'a> {
    let facts = |vs: &[Option<perqc_ir::ValueId>]| -> Vec<Option<&'a Facts>> {
        vs.iter().map(|v| v.and_then(|v| shapes.get(v))).collect()
    };
    ChannelCtx {
        node,
        opset: opset(&node.domain).unwrap_or(def.since_version),
        inputs: facts(node.inputs()),
        outputs: facts(node.outputs()),
        input,
        axis,
    }
}

/// `ai.perqc::Hadamard(x, H)`: `y_blk = x_blk · H` on every block of `b` consecutive
/// channels of x's last axis. The leading axes are rows, on which the op is linear:
/// `(T x) H == T (x H)` for any linear `T`. The last axis is mixed within each block, and H
/// is the rotation itself: barriers.
pub fn hadamard(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    let Some(rank) = ctx.rank(0) else {
        return ChannelFlow::Barrier("operand rank unknown");
    };
    match (ctx.input, ctx.axis) {
        (0, a) if a + 1 < rank => ChannelFlow::through(vec![(0, a)], LINEAR),
        (0, _) => ChannelFlow::Barrier("mixes the channels of each block"),
        _ => ChannelFlow::Barrier("the block rotation matrix"),
    }
}

/// `ai.perqc::FakeQuantize(x)`: every row of the last axis is rounded with a scale (and
/// zero point) computed from the row's max and min, which a permutation of the row does
/// not change, so permutations of the last axis commute; rows are independent, so do
/// permutations of a leading axis. Rotations and scales change the row's extremes and the
/// rounding grid: they do not commute on any axis (the one form that says this is
/// [`pointwise`]'s permutations-only `Through`).
pub fn fake_quantize(ctx: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::through(vec![(0, ctx.axis)], PERM)
}

/// `ai.perqc::QuantizeTokens` and `QuantizedLinear`: the runtime's integer linears. Their
/// values are integer codes and packed weights, which no transform folds into, so every
/// axis is a barrier; the transforms run on the graph before quantization.
pub fn quantized_linear(_: &ChannelCtx<'_>) -> ChannelFlow {
    ChannelFlow::Barrier("packed integer weights (the runtime's fused quantized linear)")
}

#[cfg(test)]
mod tests {
    use super::{ChannelFlow as F, LINEAR, Part, flow, slice_part};
    use perqc_ir::graph::{AttrValue, Graph, NodeSpec, ValueId};
    use perqc_ir::{DType, Dim, Tensor, Type};

    /// A graph with input `x` of `dims` (`"b"` symbolic) and one node reading it.
    struct G {
        g: Graph,
        opset: i64,
    }

    impl G {
        fn new(opset: i64, dims: &[&str]) -> (G, ValueId) {
            let mut g = Graph::new("t");
            let shape = dims
                .iter()
                .map(|d| d.parse().map_or_else(|_| Dim::Sym((*d).into()), Dim::Known))
                .collect();
            let x = g
                .add_input("x", Some(Type::tensor(DType::F32, Some(shape))))
                .unwrap();
            (G { g, opset }, x)
        }

        fn ints(&mut self, name: &str, v: &[i64]) -> Option<ValueId> {
            let t = Tensor::from_i64(vec![v.len() as i64], v);
            Some(self.g.add_initializer(name, t).unwrap())
        }

        /// The flows of `axis` of input 0 of a node `spec(inputs) -> n_out results`.
        fn flow(
            mut self,
            spec: NodeSpec,
            inputs: &[Option<ValueId>],
            n_out: usize,
            axis: usize,
        ) -> F {
            let outs: Vec<String> = (0..n_out).map(|k| format!("y{k}")).collect();
            let outs: Vec<&str> = outs.iter().map(String::as_str).collect();
            let spec = spec.named("n");
            self.g.add_node(spec, inputs, &outs).unwrap();
            let v = self.opset;
            let map = crate::infer_graph(&self.g, &|d: &str| {
                if d.is_empty() { Some(v) } else { Some(1) }
            })
            .unwrap();
            let id = self
                .g
                .value(self.g.find("y0").unwrap())
                .producer()
                .unwrap()
                .0;
            let opset = |d: &str| if d.is_empty() { Some(v) } else { None };
            flow(&self.g, id, &map, &opset, 0, axis)
        }
    }

    /// `(port, (start, step, len))` per result.
    type Parts<'a> = &'a [((usize, usize), (usize, isize, usize))];

    fn parts(v: Parts<'_>) -> F {
        F::Parts {
            outputs: v
                .iter()
                .map(|&(p, (start, step, len))| (p, Part { start, step, len }))
                .collect(),
        }
    }

    #[test]
    fn split_hands_each_result_its_range() {
        // Explicit sizes (input, opset 13+): q 64, k 32, v 32 of a fused projection.
        let (mut g, x) = G::new(18, &["b", "s", "128"]);
        let sizes = g.ints("sizes", &[64, 32, 32]);
        let spec = NodeSpec::new("Split").attr("axis", AttrValue::Int(2));
        assert_eq!(
            g.flow(spec, &[Some(x), sizes], 3, 2),
            parts(&[
                ((0, 2), (0, 1, 64)),
                ((1, 2), (64, 1, 32)),
                ((2, 2), (96, 1, 32))
            ])
        );
        // Equal parts (num_outputs), negative axis.
        let (g, x) = G::new(18, &["b", "s", "384"]);
        let spec = NodeSpec::new("Split")
            .attr("axis", AttrValue::Int(-1))
            .attr("num_outputs", AttrValue::Int(2));
        assert_eq!(
            g.flow(spec, &[Some(x)], 2, 2),
            parts(&[((0, 2), (0, 1, 192)), ((1, 2), (192, 1, 192))])
        );
        // Split-18's smaller last part.
        let (g, x) = G::new(18, &["b", "10"]);
        let spec = NodeSpec::new("Split")
            .attr("axis", AttrValue::Int(1))
            .attr("num_outputs", AttrValue::Int(3));
        assert_eq!(
            g.flow(spec, &[Some(x)], 3, 1),
            parts(&[
                ((0, 1), (0, 1, 4)),
                ((1, 1), (4, 1, 4)),
                ((2, 1), (8, 1, 2))
            ])
        );
        // Sizes from the attribute (opset 11), per head: [B, H, S, 3·D] on axis 3.
        let (g, x) = G::new(11, &["b", "4", "s", "48"]);
        let spec = NodeSpec::new("Split")
            .attr("axis", AttrValue::Int(3))
            .attr("split", AttrValue::Ints(vec![16, 16, 16]));
        assert_eq!(
            g.flow(spec, &[Some(x)], 3, 3),
            parts(&[
                ((0, 3), (0, 1, 16)),
                ((1, 3), (16, 1, 16)),
                ((2, 3), (32, 1, 16))
            ])
        );
        // Another axis: every result carries the channels.
        let (g, x) = G::new(18, &["4", "8"]);
        let spec = NodeSpec::new("Split")
            .attr("axis", AttrValue::Int(0))
            .attr("num_outputs", AttrValue::Int(2));
        assert_eq!(
            g.flow(spec, &[Some(x)], 2, 1),
            F::Through {
                outputs: vec![(0, 1), (1, 1)],
                commutes: LINEAR,
                with: vec![],
                uniform: vec![]
            }
        );
        // The channel axis of unknown size cannot be cut.
        let (g, x) = G::new(18, &["b", "n"]);
        let spec = NodeSpec::new("Split")
            .attr("axis", AttrValue::Int(1))
            .attr("num_outputs", AttrValue::Int(2));
        assert!(matches!(g.flow(spec, &[Some(x)], 2, 1), F::Barrier(_)));
    }

    /// `x[.., start:end:step]` on the channel axis of 16.
    fn sliced(start: i64, end: i64, step: Option<i64>, axis: i64) -> F {
        let (mut g, x) = G::new(18, &["b", "s", "16"]);
        let starts = g.ints("starts", &[start]);
        let ends = g.ints("ends", &[end]);
        let axes = g.ints("axes", &[axis]);
        let mut inputs = vec![Some(x), starts, ends, axes];
        if let Some(st) = step {
            let st = g.ints("steps", &[st]);
            inputs.push(st);
        }
        g.flow(NodeSpec::new("Slice"), &inputs, 1, 2)
    }

    #[test]
    fn slice_hands_the_result_its_strided_part() {
        let part = |start, step, len| parts(&[((0, 2), (start, step, len))]);
        assert_eq!(sliced(0, 8, None, 2), part(0, 1, 8));
        assert_eq!(sliced(8, i64::MAX, None, -1), part(8, 1, 8));
        // Negative bounds count from the end; out-of-range ones are clamped.
        assert_eq!(sliced(-4, -1, None, 2), part(12, 1, 3));
        assert_eq!(sliced(-100, 100, None, 2), part(0, 1, 16));
        // Steps: every other channel, and backwards.
        assert_eq!(sliced(1, 16, Some(2), 2), part(1, 2, 8));
        assert_eq!(sliced(-1, i64::MIN, Some(-1), 2), part(15, -1, 16));
        assert_eq!(sliced(10, 2, Some(-3), -1), part(10, -3, 3));
        // Nothing selected: a barrier.
        assert!(matches!(sliced(8, 8, None, 2), F::Barrier(_)));
        // Another axis sliced: the channels pass whole.
        assert_eq!(
            sliced(0, 1, None, 1),
            F::Through {
                outputs: vec![(0, 2)],
                commutes: LINEAR,
                with: vec![],
                uniform: vec![]
            }
        );
        // Slice-1's attributes.
        let (g, x) = G::new(9, &["b", "16"]);
        let spec = NodeSpec::new("Slice")
            .attr("starts", AttrValue::Ints(vec![4]))
            .attr("ends", AttrValue::Ints(vec![12]))
            .attr("axes", AttrValue::Ints(vec![1]));
        assert_eq!(
            g.flow(spec, &[Some(x)], 1, 1),
            parts(&[((0, 1), (4, 1, 8))])
        );
        // Bounds computed at run time: a barrier.
        let (mut g, x) = G::new(18, &["b", "16"]);
        let starts =
            g.g.add_input(
                "st",
                Some(Type::tensor(DType::I64, Some(vec![Dim::Known(1)]))),
            )
            .ok();
        let ends = g.ints("ends", &[8]);
        let axes = g.ints("axes", &[1]);
        assert!(matches!(
            g.flow(NodeSpec::new("Slice"), &[Some(x), starts, ends, axes], 1, 1),
            F::Barrier(_)
        ));
    }

    #[test]
    fn slice_parts_follow_the_onnx_spec() {
        for n in [1i64, 5, 16] {
            for start in -20..20 {
                for end in -20..20 {
                    for step in [-3i64, -2, -1, 1, 2, 5] {
                        // x[start:end:step] on range(n).
                        let want: Vec<usize> = numpy_slice(n, start, end, step);
                        let got: Vec<usize> = slice_part(n, start, end, step)
                            .map(|p| (0..p.len).map(|k| p.index(k)).collect())
                            .unwrap_or_default();
                        assert_eq!(got, want, "n {n} [{start}:{end}:{step}]");
                    }
                }
            }
        }
    }

    /// The reference: the ONNX spec's slice, written out (numpy's, except that going back a
    /// start before the first index is clamped to it, where numpy selects nothing).
    fn numpy_slice(n: i64, start: i64, end: i64, step: i64) -> Vec<usize> {
        let adj = |x: i64, lo: i64, hi: i64| {
            let x = if x < 0 { x + n } else { x };
            x.clamp(lo, hi)
        };
        let mut out = Vec::new();
        if step > 0 {
            let (mut i, e) = (adj(start, 0, n), adj(end, 0, n));
            while i < e {
                out.push(i as usize);
                i += step;
            }
        } else {
            let (mut i, e) = (adj(start, 0, n - 1), adj(end, -1, n - 1));
            while i > e {
                out.push(i as usize);
                i += step;
            }
        }
        out
    }
}
