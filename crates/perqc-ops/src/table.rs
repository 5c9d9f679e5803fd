//! The op table. One row per (domain, op type, opset range); ranges of one op must not
//! overlap (a unit test checks). Rows are split where an op's signature changed in a way
//! the rule sees (an attribute became an input, broadcasting semantics changed, ...) and
//! where the meaning of the same node changed (Softmax's flattening before 13, TopK's `k`
//! attribute before 10, GroupNormalization's per-group scale before 21): versions inside
//! one row differ only by what they add (types, optional attributes and inputs), which
//! is what the opset upgrade (`perqc_passes::opset`) relies on to move a node between
//! them.

use crate::OpDef;
use crate::channel as ch;
use crate::kernels::control as kc;
use crate::kernels::{
    attention as katt, elementwise as kew, hadamard as khad, igemm as kigemm, index as kix,
    linalg as kla, misc as kmisc, movement as kmv, norm as knorm, reduce as krd, rotary as krot,
};
use crate::rules::elementwise as ew;
use crate::rules::{index as ix, linalg as la, misc, movement as mv, reduce as rd};

const fn op(op_type: &'static str, since: i64, infer: crate::InferFn) -> OpDef {
    OpDef::onnx(op_type, since, infer)
}

const MS: &str = "com.microsoft";
const PERQC: &str = crate::PERQC_DOMAIN;

/// Every op perqc knows, by domain and opset range.
pub static OPS: &[OpDef] = &[
    // ---- unary elementwise: same type and shape ----
    op("Sqrt", 1, ew::unary)
        .kernel(kew::sqrt)
        .channel(ch::pointwise),
    op("Reciprocal", 1, ew::unary)
        .kernel(kew::reciprocal)
        .channel(ch::pointwise),
    op("Exp", 1, ew::unary)
        .kernel(kew::exp)
        .channel(ch::pointwise),
    op("Log", 1, ew::unary).channel(ch::pointwise),
    op("Tanh", 1, ew::unary)
        .kernel(kew::tanh)
        .channel(ch::pointwise),
    op("Sigmoid", 1, ew::unary)
        .kernel(kew::sigmoid)
        .channel(ch::pointwise),
    op("Swish", 24, ew::unary)
        .kernel(kew::swish)
        .channel(ch::pointwise),
    op("Relu", 1, ew::unary).kernel(kew::relu).channel(ch::relu),
    op("LeakyRelu", 1, ew::unary).channel(ch::relu),
    op("PRelu", 1, ew::unary),
    op("Elu", 1, ew::unary).channel(ch::pointwise),
    op("Selu", 1, ew::unary).channel(ch::pointwise),
    op("Celu", 12, ew::unary).channel(ch::pointwise),
    op("ThresholdedRelu", 10, ew::unary),
    op("HardSigmoid", 1, ew::unary).channel(ch::pointwise),
    op("HardSwish", 14, ew::unary).channel(ch::pointwise),
    op("Softplus", 1, ew::unary).channel(ch::pointwise),
    op("Softsign", 1, ew::unary).channel(ch::pointwise),
    op("Mish", 18, ew::unary).channel(ch::pointwise),
    op("Gelu", 20, ew::unary)
        .kernel(kew::gelu)
        .channel(ch::pointwise),
    op("Erf", 9, ew::unary)
        .kernel(kew::erf)
        .channel(ch::pointwise),
    op("Cos", 7, ew::unary)
        .kernel(kew::cos)
        .channel(ch::pointwise),
    op("Sin", 7, ew::unary)
        .kernel(kew::sin)
        .channel(ch::pointwise),
    op("Tan", 7, ew::unary),
    op("Acos", 7, ew::unary),
    op("Asin", 7, ew::unary),
    op("Atan", 7, ew::unary),
    op("Cosh", 9, ew::unary),
    op("Sinh", 9, ew::unary),
    op("Acosh", 9, ew::unary),
    op("Asinh", 9, ew::unary),
    op("Atanh", 9, ew::unary),
    op("BitwiseNot", 18, ew::unary),
    op("Clip", 1, ew::unary)
        .until(11)
        .kernel(kew::clip)
        .channel(ch::pointwise), // min / max attributes
    op("Clip", 11, ew::unary)
        .kernel(kew::clip)
        .channel(ch::pointwise), // min / max inputs
    op("Trilu", 14, ew::unary)
        .kernel(kmisc::trilu)
        .channel(ch::matrix_positions),
    // Opset 14 adds f16 / bf16 only; the axis is an input from 11 on.
    op("CumSum", 11, ew::unary)
        .kernel(krd::cumsum)
        .channel(ch::opaque),
    op("ScatterND", 11, ew::unary),
    op("ScatterElements", 11, ew::unary),
    op("Scatter", 9, ew::unary).until(11),
    op("LpNormalization", 1, ew::unary),
    op("MeanVarianceNormalization", 9, ew::unary),
    // unary with exact integer values
    op("Neg", 1, ew::neg)
        .kernel(kew::neg)
        .channel(ch::linear_unary),
    op("Abs", 1, ew::abs)
        .kernel(kew::abs)
        .channel(ch::pointwise),
    op("Not", 1, ew::not)
        .kernel(kew::not)
        .channel(ch::pointwise),
    op("Sign", 9, ew::sign).channel(ch::pointwise),
    op("Floor", 1, ew::integral).channel(ch::pointwise),
    op("Ceil", 1, ew::integral).channel(ch::pointwise),
    op("Round", 11, ew::integral)
        .kernel(kew::round)
        .channel(ch::pointwise),
    op("Identity", 1, mv::identity)
        .kernel(kmv::identity)
        .channel(ch::linear_unary),
    op("IsNaN", 9, ew::unary_bool)
        .kernel(kew::is_nan)
        .channel(ch::pointwise),
    op("IsInf", 10, ew::unary_bool)
        .kernel(kew::is_inf)
        .channel(ch::pointwise),
    // ---- binary / variadic, numpy broadcasting (legacy `broadcast` attr before 7) ----
    op("Add", 1, ew::unary).until(7),
    op("Add", 7, ew::add).kernel(kew::add).channel(ch::add_sub),
    op("Sub", 1, ew::unary).until(7),
    op("Sub", 7, ew::sub).kernel(kew::sub).channel(ch::add_sub),
    op("Mul", 1, ew::unary).until(7),
    op("Mul", 7, ew::mul).kernel(kew::mul).channel(ch::mul_div),
    op("Div", 1, ew::unary).until(7),
    op("Div", 7, ew::div).kernel(kew::div).channel(ch::mul_div),
    op("Pow", 1, ew::unary).until(7),
    op("Pow", 7, ew::pow)
        .kernel(kew::pow)
        .channel(ch::pointwise_many),
    op("Mod", 10, ew::modulo),
    op("BitShift", 11, ew::broadcast_same),
    op("BitwiseAnd", 18, ew::broadcast_same),
    op("BitwiseOr", 18, ew::broadcast_same),
    op("BitwiseXor", 18, ew::broadcast_same),
    op("Max", 1, ew::max)
        .kernel(kew::max)
        .channel(ch::pointwise_many),
    op("Min", 1, ew::min)
        .kernel(kew::min)
        .channel(ch::pointwise_many),
    op("Sum", 1, ew::sum),
    op("Mean", 1, ew::mean),
    op("Where", 9, ew::where_)
        .kernel(kew::where_)
        .channel(ch::pointwise_many),
    // comparisons and logic: bool results
    op("Equal", 1, ew::unary_bool).until(7),
    op("Equal", 7, ew::equal)
        .kernel(kew::equal)
        .channel(ch::pointwise_many),
    op("Less", 1, ew::unary_bool).until(7),
    op("Less", 7, ew::less)
        .kernel(kew::less)
        .channel(ch::pointwise_many),
    op("Greater", 1, ew::unary_bool).until(7),
    op("Greater", 7, ew::greater)
        .kernel(kew::greater)
        .channel(ch::pointwise_many),
    op("LessOrEqual", 12, ew::less_or_equal)
        .kernel(kew::less_or_equal)
        .channel(ch::pointwise_many),
    op("GreaterOrEqual", 12, ew::greater_or_equal)
        .kernel(kew::greater_or_equal)
        .channel(ch::pointwise_many),
    op("And", 1, ew::unary_bool).until(7),
    op("And", 7, ew::and)
        .kernel(kew::and)
        .channel(ch::pointwise_many),
    op("Or", 1, ew::unary_bool).until(7),
    op("Or", 7, ew::or)
        .kernel(kew::or)
        .channel(ch::pointwise_many),
    op("Xor", 1, ew::unary_bool).until(7),
    op("Xor", 7, ew::xor)
        .kernel(kew::xor)
        .channel(ch::pointwise_many),
    // ---- contractions ----
    op("MatMul", 1, la::matmul)
        .kernel(kla::matmul)
        .channel(ch::matmul),
    op("Gemm", 1, la::gemm).kernel(kla::gemm).channel(ch::gemm),
    op("MatMulInteger", 10, la::matmul_integer),
    op("Einsum", 12, la::einsum),
    op("Attention", 23, la::attention)
        .kernel(katt::attention)
        .channel(ch::attention),
    OpDef::custom(MS, "MatMulNBits", 1, la::matmul_nbits)
        .kernel(kla::matmul_nbits)
        .channel(ch::matmul_nbits),
    // ---- reductions (axes attribute, then input) ----
    op("ReduceSum", 1, rd::reduce_sum_attr)
        .until(13)
        .kernel(krd::reduce_sum)
        .channel(ch::reduce),
    op("ReduceSum", 13, rd::reduce_sum_input)
        .kernel(krd::reduce_sum)
        .channel(ch::reduce),
    op("ReduceMean", 1, rd::reduce_attr)
        .until(18)
        .kernel(krd::reduce_mean)
        .channel(ch::reduce),
    op("ReduceMean", 18, rd::reduce_input)
        .kernel(krd::reduce_mean)
        .channel(ch::reduce),
    op("ReduceMax", 1, rd::reduce_max_attr)
        .until(18)
        .kernel(krd::reduce_max)
        .channel(ch::reduce),
    op("ReduceMax", 18, rd::reduce_max_input)
        .kernel(krd::reduce_max)
        .channel(ch::reduce),
    op("ReduceMin", 1, rd::reduce_min_attr)
        .until(18)
        .kernel(krd::reduce_min)
        .channel(ch::reduce),
    op("ReduceMin", 18, rd::reduce_min_input)
        .kernel(krd::reduce_min)
        .channel(ch::reduce),
    op("ReduceProd", 1, rd::reduce_prod_attr).until(18),
    op("ReduceProd", 18, rd::reduce_prod_input),
    op("ReduceL1", 1, rd::reduce_attr).until(18),
    op("ReduceL1", 18, rd::reduce_input),
    op("ReduceL2", 1, rd::reduce_attr).until(18),
    op("ReduceL2", 18, rd::reduce_input),
    op("ReduceLogSum", 1, rd::reduce_attr).until(18),
    op("ReduceLogSum", 18, rd::reduce_input),
    op("ReduceLogSumExp", 1, rd::reduce_attr).until(18),
    op("ReduceLogSumExp", 18, rd::reduce_input),
    op("ReduceSumSquare", 1, rd::reduce_attr).until(18),
    op("ReduceSumSquare", 18, rd::reduce_input),
    op("ArgMax", 1, rd::arg_reduce),
    op("ArgMin", 1, rd::arg_reduce),
    // Before 13 over the flattened [prod(shape[..axis]), prod(shape[axis..])] matrix.
    op("Softmax", 1, rd::softmax)
        .until(13)
        .kernel(krd::softmax)
        .channel(ch::softmax),
    op("Softmax", 13, rd::softmax)
        .kernel(krd::softmax)
        .channel(ch::softmax),
    op("LogSoftmax", 1, rd::softmax).until(13),
    op("LogSoftmax", 13, rd::softmax),
    op("Hardmax", 1, rd::softmax).until(13),
    op("Hardmax", 13, rd::softmax),
    // ---- normalizations ----
    op("LayerNormalization", 17, misc::layer_norm)
        .kernel(knorm::layer_norm)
        .channel(ch::norm),
    // ONNX Runtime's RMS norm, registered in the default domain.
    op(
        "SimplifiedLayerNormalization",
        1,
        misc::simplified_layer_norm,
    )
    .kernel(knorm::simplified_layer_norm)
    .channel(ch::norm),
    op("RMSNormalization", 23, misc::batch_norm)
        .kernel(knorm::rms_norm)
        .channel(ch::norm),
    op("BatchNormalization", 1, misc::batch_norm),
    op("InstanceNormalization", 1, misc::batch_norm),
    op("GroupNormalization", 18, misc::batch_norm).until(21), // scale and bias per group
    op("GroupNormalization", 21, misc::batch_norm),           // per channel
    // ---- shape queries and indexing ----
    op("Shape", 1, ix::shape)
        .kernel(kmv::shape)
        .channel(ch::shape_of), // start / end from 15
    op("Size", 1, ix::size).channel(ch::shape_of),
    op("Gather", 1, ix::gather)
        .kernel(kix::gather)
        .channel(ch::gather),
    op("GatherElements", 11, ix::gather_elements)
        .kernel(kix::gather_elements)
        .channel(ch::opaque),
    op("GatherND", 11, ix::gather_nd)
        .kernel(kix::gather_nd)
        .channel(ch::opaque),
    op("NonZero", 9, ix::non_zero),
    op("OneHot", 9, ix::one_hot),
    op("TopK", 1, ix::top_k).until(10), // k attribute
    op("TopK", 10, ix::top_k),          // K input
    op("Resize", 10, ix::same_rank),
    // ---- data movement ----
    op("Reshape", 1, mv::reshape_attr)
        .until(5)
        .kernel(kmv::reshape)
        .channel(ch::reshape),
    op("Reshape", 5, mv::reshape)
        .kernel(kmv::reshape)
        .channel(ch::reshape), // allowzero from 14
    op("Flatten", 1, mv::flatten)
        .kernel(kmv::flatten)
        .channel(ch::reshape),
    op("Transpose", 1, mv::transpose)
        .kernel(kmv::transpose)
        .channel(ch::transpose),
    op("Squeeze", 1, mv::squeeze_attr)
        .until(13)
        .kernel(kmv::squeeze)
        .channel(ch::reshape),
    op("Squeeze", 13, mv::squeeze_input)
        .kernel(kmv::squeeze)
        .channel(ch::reshape),
    op("Unsqueeze", 1, mv::unsqueeze_attr)
        .until(13)
        .kernel(kmv::unsqueeze)
        .channel(ch::reshape),
    op("Unsqueeze", 13, mv::unsqueeze_input)
        .kernel(kmv::unsqueeze)
        .channel(ch::reshape),
    op("Concat", 1, mv::concat)
        .kernel(kmv::concat)
        .channel(ch::concat), // axis optional (default 1) before 4
    op("Slice", 1, mv::slice_attr)
        .until(10)
        .kernel(kmv::slice)
        .channel(ch::slice),
    op("Slice", 10, mv::slice_input)
        .kernel(kmv::slice)
        .channel(ch::slice),
    op("Split", 1, mv::split_attr)
        .until(13)
        .kernel(kmv::split)
        .channel(ch::split),
    op("Split", 13, mv::split_input)
        .until(18)
        .kernel(kmv::split)
        .channel(ch::split),
    op("Split", 18, mv::split_18)
        .kernel(kmv::split)
        .channel(ch::split),
    op("Expand", 8, mv::expand)
        .kernel(kmv::expand)
        .channel(ch::expand),
    op("Tile", 6, mv::tile),
    op("Pad", 1, mv::pad_attr).until(11),
    op("Pad", 11, mv::pad_input), // axes input from 18
    // ---- constants, generators, casts ----
    op("Constant", 1, misc::constant)
        .kernel(kmisc::constant)
        .channel(ch::opaque),
    op("ConstantOfShape", 9, misc::constant_of_shape)
        .kernel(kmisc::constant_of_shape)
        .channel(ch::opaque),
    op("Range", 11, misc::range)
        .kernel(kmisc::range)
        .channel(ch::opaque),
    op("Cast", 6, misc::cast)
        .kernel(kmisc::cast)
        .channel(ch::cast),
    op("CastLike", 15, misc::cast_like)
        .kernel(kmisc::cast_like)
        .channel(ch::cast),
    op("Dropout", 1, misc::dropout),
    // ---- quantization ----
    op("QuantizeLinear", 10, misc::quantize_linear)
        .until(13)
        .kernel(kmisc::quantize_linear)
        .channel(ch::quantize),
    op("QuantizeLinear", 13, misc::quantize_linear)
        .until(19)
        .kernel(kmisc::quantize_linear)
        .channel(ch::quantize), // axis
    op("QuantizeLinear", 19, misc::quantize_linear)
        .until(21)
        .kernel(kmisc::quantize_linear)
        .channel(ch::quantize), // float8, saturate
    op("QuantizeLinear", 21, misc::quantize_linear)
        .kernel(kmisc::quantize_linear)
        .channel(ch::quantize), // block_size, output_dtype, int4
    op("DequantizeLinear", 10, misc::dequantize_linear)
        .until(13)
        .kernel(kmisc::dequantize_linear)
        .channel(ch::quantize),
    op("DequantizeLinear", 13, misc::dequantize_linear)
        .until(19)
        .kernel(kmisc::dequantize_linear)
        .channel(ch::quantize), // axis
    op("DequantizeLinear", 19, misc::dequantize_linear)
        .until(21)
        .kernel(kmisc::dequantize_linear)
        .channel(ch::quantize), // scale type = output type
    op("DequantizeLinear", 21, misc::dequantize_linear)
        .until(25)
        .kernel(kmisc::dequantize_linear)
        .channel(ch::quantize), // block_size, int4
    op("DequantizeLinear", 25, misc::dequantize_linear)
        .kernel(kmisc::dequantize_linear)
        .channel(ch::quantize), // output_dtype
    op("DynamicQuantizeLinear", 11, misc::dynamic_quantize_linear),
    // ---- control flow: subgraphs inferred with the node's inputs ----
    op("If", 1, misc::if_).kernel(kc::if_).channel(ch::opaque),
    op("Loop", 1, misc::loop_)
        .kernel(kc::loop_)
        .channel(ch::opaque),
    op("Scan", 8, misc::opaque).until(9).channel(ch::opaque), // batch axis and sequence_lens
    op("Scan", 9, misc::scan)
        .kernel(kc::scan)
        .channel(ch::opaque),
    // ---- ai.perqc: canonical forms of exported chains (passes/src/canonicalize) ----
    OpDef::custom(PERQC, "Linear", 1, la::linear)
        .kernel(kla::linear)
        .channel(ch::linear),
    OpDef::custom(PERQC, "Attention", 1, la::attention)
        .kernel(katt::attention)
        .channel(ch::attention),
    OpDef::custom(PERQC, "RMSNormalization", 1, misc::batch_norm)
        .kernel(knorm::rms_norm)
        .channel(ch::norm),
    OpDef::custom(PERQC, "Gelu", 1, ew::unary)
        .kernel(kew::gelu)
        .channel(ch::pointwise),
    OpDef::custom(PERQC, "LayerNormalization", 1, misc::layer_norm)
        .kernel(knorm::layer_norm)
        .channel(ch::norm),
    OpDef::custom(PERQC, "Swish", 1, ew::unary)
        .kernel(kew::swish)
        .channel(ch::pointwise),
    // Shape: x's (the pattern and the kernel check that cos and sin broadcast to it).
    OpDef::custom(PERQC, "Rotary", 1, ew::unary)
        .kernel(krot::rotate_half)
        .channel(ch::rotate_half),
    OpDef::custom(PERQC, "Hadamard", 1, la::hadamard)
        .kernel(khad::hadamard)
        .channel(ch::hadamard),
    OpDef::custom(PERQC, "FakeQuantize", 1, misc::fake_quantize)
        .kernel(kmisc::fake_quantize)
        .channel(ch::fake_quantize),
    OpDef::custom(PERQC, "QuantizeTokens", 1, misc::quantize_tokens)
        .kernel(kigemm::quantize_tokens)
        .channel(ch::quantized_linear),
    OpDef::custom(PERQC, "QuantizedLinear", 1, misc::quantized_linear)
        .kernel(kigemm::quantized_linear)
        .channel(ch::quantized_linear),
    // ---- com.microsoft ----
    OpDef::custom(MS, "Gelu", 1, ew::unary).channel(ch::pointwise),
    OpDef::custom(MS, "FastGelu", 1, ew::unary),
    OpDef::custom(
        MS,
        "SkipSimplifiedLayerNormalization",
        1,
        misc::skip_layer_norm,
    )
    .kernel(knorm::skip_simplified_layer_norm)
    .channel(ch::skip_norm),
    OpDef::custom(MS, "RotaryEmbedding", 1, ew::unary)
        .kernel(krot::rotary_embedding)
        .channel(ch::rotary),
    OpDef::custom(MS, "GroupQueryAttention", 1, la::group_query_attention)
        .kernel(katt::group_query_attention)
        .channel(ch::packed_attention)
        .result_heads(ch::packed_attention_heads),
];
