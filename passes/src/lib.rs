//! perqc's passes and their registry.
//!
//! One module per pass; each pass type carries its registry name (`NAME`), a one-line
//! `DESCRIPTION` and a `from_options` factory, and [`registry`] lists them all, so
//! `--list-passes` and pipeline validation come from a single static list.

pub mod calibration;
pub mod canonicalize;
pub mod cat;
pub mod center_stream;
pub mod dce;
pub mod fold_norms;
pub mod fuse_int_linear;
pub mod infer_shapes;
pub mod lower;
pub mod online_hadamard;
pub mod opset;
pub mod permutation;
pub mod permute;
pub mod probe;
pub mod quantize;
pub mod regions;
pub mod rotate;
pub mod smooth;
pub mod smooth_train;
pub mod tie_head;
pub mod topo_sort;
pub mod transform;
pub mod upcast_half;

pub use canonicalize::Canonicalize;
pub use cat::Cat;
pub use center_stream::CenterStream;
pub use dce::Dce;
pub use fold_norms::FoldNorms;
pub use fuse_int_linear::FuseIntLinear;
pub use infer_shapes::InferShapes;
pub use lower::Lower;
pub use online_hadamard::OnlineHadamard;
pub use permute::Permute;
pub use quantize::Quantize;
pub use rotate::Rotate;
pub use smooth::Smooth;
pub use tie_head::TieHead;
pub use topo_sort::TopoSort;
pub use upcast_half::UpcastHalf;

use perqc_ir::{Model, Pass, PassContext, PassError, PassOutcome, PassRegistry};

/// Runs `lower` on `model` if it has canonical `ai.perqc` ops: what every writer of an
/// ONNX file runs last, so the file uses only ops of the model's declared opsets.
pub fn lower_for_export(model: &mut Model) -> Result<PassOutcome, PassError> {
    if model.opset(perqc_ops::PERQC_DOMAIN).is_none() {
        return Ok(PassOutcome::unchanged());
    }
    Lower.run(model, &mut PassContext::new(None))
}

/// Runs `canonicalize` on `model`: the form the native runtime plans fastest and the
/// transforms match on.
pub fn canonicalize(model: &mut Model) -> Result<PassOutcome, PassError> {
    Canonicalize.run(model, &mut PassContext::new(None))
}

/// Runs `fuse-int-linear` on `model` (after `canonicalize`): the quantized linears the
/// native runtime's integer kernels run.
pub fn fuse_int_linear(model: &mut Model) -> Result<PassOutcome, PassError> {
    FuseIntLinear::default().run(model, &mut PassContext::new(None))
}

/// The passes that rewrite weights by channel transforms: exact up to float round-off (not
/// bit for bit), and run once per model (see [`transform::APPLIED_KEY`]).
pub const TRANSFORM_PASSES: [&str; 6] = [
    Cat::NAME,
    FoldNorms::NAME,
    Smooth::NAME,
    Permute::NAME,
    Rotate::NAME,
    OnlineHadamard::NAME,
];

/// Every pass, by name, in the order `--list-passes` shows them.
pub fn registry() -> PassRegistry {
    let mut r = PassRegistry::new();
    r.register(
        Canonicalize::NAME,
        Canonicalize::DESCRIPTION,
        Canonicalize::from_options,
    );
    for (p, f) in canonicalize::PATTERNS.iter().zip(canonicalize::FACTORIES) {
        r.register(p.name, p.description, f);
    }
    r.register(Cat::NAME, Cat::DESCRIPTION, Cat::from_options);
    r.register(
        CenterStream::NAME,
        CenterStream::DESCRIPTION,
        CenterStream::from_options,
    );
    r.register(Dce::NAME, Dce::DESCRIPTION, Dce::from_options)
        .register(
            FoldNorms::NAME,
            FoldNorms::DESCRIPTION,
            FoldNorms::from_options,
        )
        .register(
            FuseIntLinear::NAME,
            FuseIntLinear::DESCRIPTION,
            FuseIntLinear::from_options,
        )
        .register(
            InferShapes::NAME,
            InferShapes::DESCRIPTION,
            InferShapes::from_options,
        )
        .register(Lower::NAME, Lower::DESCRIPTION, Lower::from_options)
        .register(
            OnlineHadamard::NAME,
            OnlineHadamard::DESCRIPTION,
            OnlineHadamard::from_options,
        )
        .register(Permute::NAME, Permute::DESCRIPTION, Permute::from_options)
        .register(
            Quantize::NAME,
            Quantize::DESCRIPTION,
            Quantize::from_options,
        )
        .register(Rotate::NAME, Rotate::DESCRIPTION, Rotate::from_options)
        .register(Smooth::NAME, Smooth::DESCRIPTION, Smooth::from_options)
        .register(TieHead::NAME, TieHead::DESCRIPTION, TieHead::from_options)
        .register(
            TopoSort::NAME,
            TopoSort::DESCRIPTION,
            TopoSort::from_options,
        )
        .register(
            UpcastHalf::NAME,
            UpcastHalf::DESCRIPTION,
            UpcastHalf::from_options,
        );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use perqc_ir::PassOptions;

    #[test]
    fn registered_names_match_the_passes() {
        let r = registry();
        assert!(!r.list().is_empty());
        for info in r.list() {
            let pass = (info.factory)(&PassOptions::none(info.name)).unwrap();
            assert_eq!(pass.name(), info.name);
            assert_eq!(pass.description(), info.description);
            assert!(
                info.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "pass names are kebab-case: {}",
                info.name
            );
        }
    }

    #[test]
    fn list_passes() {
        insta::assert_snapshot!(registry().help(), @"
        canonicalize        upcast-half, then rewrite exported spellings (attention, linear, norms, SiLU, GELU, block Hadamard rotations, per-token fake quantization) into canonical ops, then dce
        fuse-attention      MatMul(Softmax(scale * q kᵀ + mask), v) -> ai.perqc::Attention (reads grouped K/V heads directly)
        fuse-linear         MatMul / Gemm with a constant weight (+ bias Add) -> ai.perqc::Linear
        fuse-rms-norm       x / sqrt(mean(x²) + eps) * gamma in any exported spelling -> ai.perqc::RMSNormalization
        fuse-rotary         Add(Mul(x, cos), Mul(Concat(Neg(x[.., h:]), x[.., :h]), sin)) -> ai.perqc::Rotary
        fuse-skip-rms-norm  com.microsoft::SkipSimplifiedLayerNormalization -> Add + ai.perqc::RMSNormalization
        fuse-layer-norm     (x - mean) / sqrt(var + eps) * gamma + beta, or LayerNormalization -> ai.perqc::LayerNormalization
        fuse-silu           Mul(x, Sigmoid(x)) -> ai.perqc::Swish(alpha = 1)
        fuse-gelu           GELU (erf or tanh form, com.microsoft Gelu/FastGelu, ONNX Gelu) -> ai.perqc::Gelu
        fuse-hadamard       Reshape(MatMul(Reshape(x, [.., f/b, b]), H [b, b] constant), [.., f]) -> ai.perqc::Hadamard
        fuse-fake-quantize  per-token dynamic Q/DQ (row max/min scale, blocked QuantizeLinear -> DequantizeLinear, or its float form) -> ai.perqc::FakeQuantize
        gather-table        Gather(Transpose(W), ids) of a constant 2-d W -> Gather(Wᵀ stored, ids)
        forward-identity    Identity(x), Cast(x) to x's own type -> x (the readers read x)
        cat                 block concentration-alignment transform on each mlp region's sink input: M = (S_x^-1 # S_w)^1/2 per k x k block, then the block Hadamard, computed online with the inverse folded into the sink (exact); options k=64, block=32|full|none, damp=0.01, and for the probed error wbits=4, abits=4|none
        center-stream       center every writer of a LayerNorm residual stream and turn its LayerNorms into RMS norms with beta folded into the readers' biases (exact where the stream is read only through its norms), so that fold-norms and R1 apply
        dce                 remove nodes and initializers whose results nothing reads
        fold-norms          fold RMS norm gammas into the linear layers that read the norms (exact); rotatable-only=true folds a region's gammas only when all of them fold, so that a rotation can follow
        fuse-int-linear     MatMul or Linear(FakeQuantize(x), DequantizeLinear(int4 W, per-column or grouped scale)) -> ai.perqc::QuantizeTokens (once per activation) + QuantizedLinear, the native runtime's integer product; with weight-only=true (default) also float-activation linears on 4-bit weights and MatMulNBits, on 8-bit per-token activation codes (not bit-exact; no ONNX lowering)
        infer-shapes        infer symbolic shapes and element types of every value from the op table
        lower               turn canonical ai.perqc ops back into ops of the model's opset (before export)
        online-hadamard     rotate each mlp region's sink input by a block Hadamard computed in the graph, its transpose folded into the sink (exact); options block=B|full, signs=SEED
        permute             fold calibrated channel permutations into the weights (exact); options method=massdiff|tokenmax|zigzag|absmax|random|identity, seed=N, block=B, mlp=true, residual=false, heads=false
        quantize            quantize linear weights (packed codes + DequantizeLinear, or MatMulNBits) and their inputs per token (FakeQuantize); options wbits=4, wsym=true, wgroup=channel|tensor|G, wscale=mse|max, format=int|fp4|mxfp4|mxint8, abits=4|none, asym=true, aclip=1, head=false, embed=false, skip=PAT|PAT, rounding=rtn|gptq, gptqerr=none|online|all, gptqridge=1, target=qdq|ort
        rotate              fold Hadamard rotations into the residual stream (R1) and per-head value/output weights (R2) (exact); options residual=full|block|none, block=B, heads=full|block|none, signs=SEED, core=M
        smooth              divide each mlp region's sink input by calibrated channel scales a^alpha / w^(1-alpha), folded into up_proj and down_proj (exact); method=search picks (alpha, statistic) per region by the down_proj's quantized error on sampled rows; train=STEPS refines log s by Adam (lr=0.01) with a straight-through estimator on half the sampled rows, within 8x of the start, keeping the scales best on the other half; options method=max|quantile|search, alpha=0.5, q=0.999, train=0, lr=0.01, and for the error: permute=massdiff, block=32|full|none, wbits=4, abits=4|none
        tie-head            let the LM head read the embedding table when its weight is M E^T for a small M (a tied embedding stored twice, or untied by the norm fold and residual rotation): Linear(x, M) then Linear(E, transB=1), the head's own table dropped (exact to f32 round-off)
        topo-sort           order every graph's nodes topologically (stable)
        upcast-half         compute a float16/bfloat16 model in float32: half initializers and constants become f32, casts to half cast to f32, half graph inputs and outputs keep their type through Casts at the boundary
        ");
    }

    #[test]
    fn pipeline_errors() {
        let r = registry();
        assert_eq!(
            r.build("topo-sort,dec").unwrap_err().to_string(),
            "pipeline `topo-sort,dec`, column 11: unknown pass `dec`; did you mean `dce`?"
        );
        assert_eq!(
            r.build("dce(agressive=1)").unwrap_err().to_string(),
            "pipeline `dce(agressive=1)`, column 5: pass `dce` has no option `agressive` \
             (valid options: initializers)"
        );
        assert_eq!(
            r.build("dce,topo-sort").unwrap().to_string(),
            "dce,topo-sort"
        );
        // The fit to the float output names where, the ridge is its own option.
        assert!(
            r.build("quantize(rounding=gptq,gptqerr=online,gptqridge=0.5)")
                .is_ok()
        );
        for (bad, want) in [
            ("quantize(rounding=gptq,gptqerr=1)", "none, online, all"),
            (
                "quantize(rounding=gptq,gptqerr=all,gptqridge=0)",
                "a ridge > 0",
            ),
            ("quantize(gptqerr=online)", "needs GPTQ rounding"),
        ] {
            let err = r.build(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
