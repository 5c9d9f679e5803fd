use perqc_onnx::{ExternalPolicy, SaveOptions};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let input = PathBuf::from(&args[1]);
    let output = PathBuf::from(&args[2]);
    let t = std::time::Instant::now();
    let loaded = match perqc_onnx::load(&input) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("loaded in {:?}", t.elapsed());
    let opts = SaveOptions {
        external: if args.len() > 3 {
            ExternalPolicy::All
        } else {
            ExternalPolicy::Keep
        },
        ..Default::default()
    };
    let t = std::time::Instant::now();
    match perqc_onnx::save(&loaded.model, &output, &opts) {
        Ok(s) => eprintln!("saved {s:?} in {:?}", t.elapsed()),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
