//! The op table. One row per (domain, op type, opset range); ranges of one op must not
//! overlap (a unit test checks). Rows are split where an op's signature changed in a way
//! the rule sees (an attribute became an input, broadcasting semantics changed, ...).

use crate::OpDef;
use crate::kernels::control as kc;
use crate::kernels::{
    attention as katt, elementwise as kew, index as kix, linalg as kla, misc as kmisc,
    movement as kmv, norm as knorm, reduce as krd, rotary as krot,
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
    op("Sqrt", 1, ew::unary).kernel(kew::sqrt),
    op("Reciprocal", 1, ew::unary).kernel(kew::reciprocal),
    op("Exp", 1, ew::unary).kernel(kew::exp),
    op("Log", 1, ew::unary),
    op("Tanh", 1, ew::unary).kernel(kew::tanh),
    op("Sigmoid", 1, ew::unary).kernel(kew::sigmoid),
    op("Swish", 24, ew::unary).kernel(kew::swish),
    op("Relu", 1, ew::unary).kernel(kew::relu),
    op("LeakyRelu", 1, ew::unary),
    op("PRelu", 1, ew::unary),
    op("Elu", 1, ew::unary),
    op("Selu", 1, ew::unary),
    op("Celu", 12, ew::unary),
    op("ThresholdedRelu", 10, ew::unary),
    op("HardSigmoid", 1, ew::unary),
    op("HardSwish", 14, ew::unary),
    op("Softplus", 1, ew::unary),
    op("Softsign", 1, ew::unary),
    op("Mish", 18, ew::unary),
    op("Gelu", 20, ew::unary).kernel(kew::gelu),
    op("Erf", 9, ew::unary).kernel(kew::erf),
    op("Cos", 7, ew::unary).kernel(kew::cos),
    op("Sin", 7, ew::unary).kernel(kew::sin),
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
    op("Clip", 1, ew::unary).until(11), // min / max attributes
    op("Clip", 11, ew::unary),          // min / max inputs
    op("Trilu", 14, ew::unary).kernel(kmisc::trilu),
    op("CumSum", 11, ew::unary),
    op("ScatterND", 11, ew::unary),
    op("ScatterElements", 11, ew::unary),
    op("Scatter", 9, ew::unary).until(11),
    op("LpNormalization", 1, ew::unary),
    op("MeanVarianceNormalization", 9, ew::unary),
    // unary with exact integer values
    op("Neg", 1, ew::neg).kernel(kew::neg),
    op("Abs", 1, ew::abs),
    op("Not", 1, ew::not).kernel(kew::not),
    op("Sign", 9, ew::sign),
    op("Floor", 1, ew::integral),
    op("Ceil", 1, ew::integral),
    op("Round", 11, ew::integral),
    op("Identity", 1, mv::identity).kernel(kmv::identity),
    op("IsNaN", 9, ew::unary_bool),
    op("IsInf", 10, ew::unary_bool),
    // ---- binary / variadic, numpy broadcasting (legacy `broadcast` attr before 7) ----
    op("Add", 1, ew::unary).until(7),
    op("Add", 7, ew::add).kernel(kew::add),
    op("Sub", 1, ew::unary).until(7),
    op("Sub", 7, ew::sub).kernel(kew::sub),
    op("Mul", 1, ew::unary).until(7),
    op("Mul", 7, ew::mul).kernel(kew::mul),
    op("Div", 1, ew::unary).until(7),
    op("Div", 7, ew::div).kernel(kew::div),
    op("Pow", 1, ew::unary).until(7),
    op("Pow", 7, ew::pow).kernel(kew::pow),
    op("Mod", 10, ew::modulo),
    op("BitShift", 11, ew::broadcast_same),
    op("BitwiseAnd", 18, ew::broadcast_same),
    op("BitwiseOr", 18, ew::broadcast_same),
    op("BitwiseXor", 18, ew::broadcast_same),
    op("Max", 1, ew::max).kernel(kew::max),
    op("Min", 1, ew::min).kernel(kew::min),
    op("Sum", 1, ew::sum),
    op("Mean", 1, ew::mean),
    op("Where", 9, ew::where_).kernel(kew::where_),
    // comparisons and logic: bool results
    op("Equal", 1, ew::unary_bool).until(7),
    op("Equal", 7, ew::equal).kernel(kew::equal),
    op("Less", 1, ew::unary_bool).until(7),
    op("Less", 7, ew::less).kernel(kew::less),
    op("Greater", 1, ew::unary_bool).until(7),
    op("Greater", 7, ew::greater).kernel(kew::greater),
    op("LessOrEqual", 12, ew::less_or_equal).kernel(kew::less_or_equal),
    op("GreaterOrEqual", 12, ew::greater_or_equal).kernel(kew::greater_or_equal),
    op("And", 1, ew::unary_bool).until(7),
    op("And", 7, ew::and).kernel(kew::and),
    op("Or", 1, ew::unary_bool).until(7),
    op("Or", 7, ew::or).kernel(kew::or),
    op("Xor", 1, ew::unary_bool).until(7),
    op("Xor", 7, ew::xor).kernel(kew::xor),
    // ---- contractions ----
    op("MatMul", 1, la::matmul).kernel(kla::matmul),
    op("Gemm", 1, la::gemm).kernel(kla::gemm),
    op("MatMulInteger", 10, la::matmul_integer),
    op("Einsum", 12, la::einsum),
    op("Attention", 23, la::attention).kernel(katt::attention),
    OpDef::custom(MS, "MatMulNBits", 1, la::matmul_nbits).kernel(kla::matmul_nbits),
    // ---- reductions (axes attribute, then input) ----
    op("ReduceSum", 1, rd::reduce_sum_attr)
        .until(13)
        .kernel(krd::reduce_sum),
    op("ReduceSum", 13, rd::reduce_sum_input).kernel(krd::reduce_sum),
    op("ReduceMean", 1, rd::reduce_attr)
        .until(18)
        .kernel(krd::reduce_mean),
    op("ReduceMean", 18, rd::reduce_input).kernel(krd::reduce_mean),
    op("ReduceMax", 1, rd::reduce_max_attr)
        .until(18)
        .kernel(krd::reduce_max),
    op("ReduceMax", 18, rd::reduce_max_input).kernel(krd::reduce_max),
    op("ReduceMin", 1, rd::reduce_min_attr).until(18),
    op("ReduceMin", 18, rd::reduce_min_input),
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
    op("Softmax", 1, rd::softmax).kernel(krd::softmax),
    op("LogSoftmax", 1, rd::softmax),
    op("Hardmax", 1, rd::softmax),
    // ---- normalizations ----
    op("LayerNormalization", 17, misc::layer_norm).kernel(knorm::layer_norm),
    // ONNX Runtime's RMS norm, registered in the default domain.
    op(
        "SimplifiedLayerNormalization",
        1,
        misc::simplified_layer_norm,
    )
    .kernel(knorm::simplified_layer_norm),
    op("RMSNormalization", 23, misc::batch_norm).kernel(knorm::rms_norm),
    op("BatchNormalization", 1, misc::batch_norm),
    op("InstanceNormalization", 1, misc::batch_norm),
    op("GroupNormalization", 18, misc::batch_norm),
    // ---- shape queries and indexing ----
    op("Shape", 1, ix::shape).kernel(kmv::shape), // start / end from 15
    op("Size", 1, ix::size),
    op("Gather", 1, ix::gather).kernel(kix::gather),
    op("GatherElements", 11, ix::gather_elements),
    op("GatherND", 11, ix::gather_nd).kernel(kix::gather_nd),
    op("NonZero", 9, ix::non_zero),
    op("OneHot", 9, ix::one_hot),
    op("TopK", 1, ix::top_k), // k attribute before 10, K input after
    op("Resize", 10, ix::same_rank),
    // ---- data movement ----
    op("Reshape", 1, mv::reshape_attr)
        .until(5)
        .kernel(kmv::reshape),
    op("Reshape", 5, mv::reshape).kernel(kmv::reshape), // allowzero from 14
    op("Flatten", 1, mv::flatten).kernel(kmv::flatten),
    op("Transpose", 1, mv::transpose).kernel(kmv::transpose),
    op("Squeeze", 1, mv::squeeze_attr)
        .until(13)
        .kernel(kmv::squeeze),
    op("Squeeze", 13, mv::squeeze_input).kernel(kmv::squeeze),
    op("Unsqueeze", 1, mv::unsqueeze_attr)
        .until(13)
        .kernel(kmv::unsqueeze),
    op("Unsqueeze", 13, mv::unsqueeze_input).kernel(kmv::unsqueeze),
    op("Concat", 1, mv::concat).kernel(kmv::concat), // axis optional (default 1) before 4
    op("Slice", 1, mv::slice_attr).until(10).kernel(kmv::slice),
    op("Slice", 10, mv::slice_input).kernel(kmv::slice),
    op("Split", 1, mv::split_attr).until(13).kernel(kmv::split),
    op("Split", 13, mv::split_input)
        .until(18)
        .kernel(kmv::split),
    op("Split", 18, mv::split_18).kernel(kmv::split),
    op("Expand", 8, mv::expand).kernel(kmv::expand),
    op("Tile", 6, mv::tile),
    op("Pad", 1, mv::pad_attr).until(11),
    op("Pad", 11, mv::pad_input), // axes input from 18
    // ---- constants, generators, casts ----
    op("Constant", 1, misc::constant).kernel(kmisc::constant),
    op("ConstantOfShape", 9, misc::constant_of_shape).kernel(kmisc::constant_of_shape),
    op("Range", 11, misc::range).kernel(kmisc::range),
    op("Cast", 6, misc::cast).kernel(kmisc::cast),
    op("CastLike", 15, misc::cast_like).kernel(kmisc::cast_like),
    op("Dropout", 1, misc::dropout),
    // ---- quantization ----
    op("QuantizeLinear", 10, misc::quantize_linear)
        .until(13)
        .kernel(kmisc::quantize_linear),
    op("QuantizeLinear", 13, misc::quantize_linear)
        .until(19)
        .kernel(kmisc::quantize_linear), // axis
    op("QuantizeLinear", 19, misc::quantize_linear)
        .until(21)
        .kernel(kmisc::quantize_linear), // float8, saturate
    op("QuantizeLinear", 21, misc::quantize_linear).kernel(kmisc::quantize_linear), // block_size, output_dtype, int4
    op("DequantizeLinear", 10, misc::dequantize_linear)
        .until(13)
        .kernel(kmisc::dequantize_linear),
    op("DequantizeLinear", 13, misc::dequantize_linear)
        .until(19)
        .kernel(kmisc::dequantize_linear), // axis
    op("DequantizeLinear", 19, misc::dequantize_linear)
        .until(21)
        .kernel(kmisc::dequantize_linear), // scale type = output type
    op("DequantizeLinear", 21, misc::dequantize_linear)
        .until(25)
        .kernel(kmisc::dequantize_linear), // block_size, int4
    op("DequantizeLinear", 25, misc::dequantize_linear).kernel(kmisc::dequantize_linear), // output_dtype
    op("DynamicQuantizeLinear", 11, misc::dynamic_quantize_linear),
    // ---- control flow: subgraphs inferred with the node's inputs ----
    op("If", 1, misc::if_).kernel(kc::if_),
    op("Loop", 1, misc::loop_).kernel(kc::loop_),
    op("Scan", 8, misc::opaque).until(9), // batch axis and sequence_lens
    op("Scan", 9, misc::scan).kernel(kc::scan),
    // ---- ai.perqc: canonical forms of exported chains (passes/src/canonicalize) ----
    OpDef::custom(PERQC, "Attention", 1, la::attention).kernel(katt::attention),
    OpDef::custom(PERQC, "RMSNormalization", 1, misc::batch_norm).kernel(knorm::rms_norm),
    OpDef::custom(PERQC, "Swish", 1, ew::unary).kernel(kew::swish),
    // ---- com.microsoft ----
    OpDef::custom(MS, "Gelu", 1, ew::unary),
    OpDef::custom(MS, "FastGelu", 1, ew::unary),
    OpDef::custom(
        MS,
        "SkipSimplifiedLayerNormalization",
        1,
        misc::skip_layer_norm,
    )
    .kernel(knorm::skip_simplified_layer_norm),
    OpDef::custom(MS, "RotaryEmbedding", 1, ew::unary).kernel(krot::rotary_embedding),
    OpDef::custom(MS, "GroupQueryAttention", 1, la::group_query_attention)
        .kernel(katt::group_query_attention),
];
