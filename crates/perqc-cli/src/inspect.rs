//! `perqc inspect`: what the analyses see in a model.

use anyhow::{Context, Result};
use clap::Args;
use perqc_passes::regions::Regions;
use std::path::PathBuf;

#[derive(Args)]
pub struct InspectArgs {
    /// The ONNX model to inspect (canonicalized first, as the compiler does).
    model: PathBuf,
    /// The permutation-equivariant regions: kind, dimension, heads, sources and sinks, and
    /// which transforms are legal (with the reason where one is not).
    #[arg(long, required = true)]
    regions: bool,
    /// Print the regions as JSON.
    #[arg(long, conflicts_with = "dot")]
    json: bool,
    /// Print the regions as a Graphviz graph.
    #[arg(long)]
    dot: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let mut model = crate::load(&args.model, false)?;
    perqc_passes::canonicalize(&mut model)
        .with_context(|| format!("{}: canonicalizing", args.model.display()))?;
    let shapes = perqc_ops::infer_model(&model)
        .with_context(|| format!("{}: shape inference", args.model.display()))?;
    let regions = Regions::find(&model, &shapes);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&regions.to_json())?);
    } else if args.dot {
        print!("{}", regions.to_dot());
    } else {
        print!("{}", regions.summary());
    }
    Ok(())
}
