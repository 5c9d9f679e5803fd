//! Passes, the pass registry, pipelines and the pass manager.
//!
//! - A [`Pass`] is a small named type: it states the [`Property`]s it requires and
//!   guarantees and rewrites a [`Model`] in place, reporting a [`PassOutcome`] (whether the
//!   IR changed, plus counters).
//! - A [`PassRegistry`] maps pass names to descriptions and factories that build a pass from
//!   its options; the concrete list lives in `perqc_passes::registry()`.
//! - A pipeline string such as `dce,topo-sort` or `fold(mode=fast,limit=3),dce` is parsed
//!   into [`PassSpec`]s ([`parse_pipeline`]) and built into a [`Pipeline`] by the registry,
//!   which rejects unknown passes and options and checks that every required property is
//!   established by an earlier pass.
//! - The [`PassManager`] runs a pipeline: it times each pass, optionally verifies the IR
//!   after each ([`RunOptions::verify_each`]), dumps the textual IR after selected passes
//!   ([`RunOptions::print_ir_after`]) and enforces a rewrite budget for bisecting a
//!   miscompile ([`RunOptions::rewrite_budget`]). It returns a [`Report`].

mod context;
mod core;
mod manager;
mod options;
mod registry;
mod syntax;

pub use self::core::*;
pub use context::{Analysis, PassContext};
pub use manager::*;
pub use options::*;
pub use registry::*;
pub use syntax::*;

#[cfg(test)]
mod tests {
    use super::registry::edit_distance;
    use super::*;
    use crate::graph::{Graph, NodeSpec};
    use crate::{DType, Model, Tensor, Type};

    /// A spec; `opts` are (name, value, column).
    fn spec(name: &str, opts: &[(&str, &str, usize)], column: usize) -> PassSpec {
        PassSpec {
            name: name.into(),
            options: opts
                .iter()
                .map(|(k, v, _)| (k.to_string(), v.to_string()))
                .collect(),
            column,
            option_columns: opts.iter().map(|o| o.2).collect(),
        }
    }

    #[test]
    fn parses_good_pipelines() {
        assert_eq!(parse_pipeline("").unwrap(), vec![]);
        assert_eq!(parse_pipeline("  none ").unwrap(), vec![]);
        assert_eq!(
            parse_pipeline("a,b(opt=1,mode=fast),c").unwrap(),
            vec![
                spec("a", &[], 1),
                spec("b", &[("opt", "1", 5), ("mode", "fast", 11)], 3),
                spec("c", &[], 22),
            ]
        );
        assert_eq!(
            parse_pipeline(" dce , topo-sort ( verbose , path = \"a,b \\\"c\\\"\" ) ").unwrap(),
            vec![
                spec("dce", &[], 2),
                spec(
                    "topo-sort",
                    &[("verbose", "true", 20), ("path", "a,b \"c\"", 30)],
                    8
                ),
            ]
        );
        assert_eq!(
            parse_pipeline("x(scale=-1.5e-3)").unwrap(),
            vec![spec("x", &[("scale", "-1.5e-3", 3)], 1)]
        );
    }

    #[test]
    fn display_round_trips() {
        for s in ["a", "a,b(opt=1,mode=fast),c", "p(path=\"a b,c\",q=\"\")"] {
            let specs = parse_pipeline(s).unwrap();
            let back: Vec<String> = specs.iter().map(|p| p.to_string()).collect();
            assert_eq!(back.join(","), s);
        }
    }

    fn syntax_err(s: &str) -> (usize, String) {
        match parse_pipeline(s).unwrap_err() {
            PipelineError::Syntax {
                column, message, ..
            } => (column, message),
            e => panic!("not a syntax error: {e}"),
        }
    }

    #[test]
    fn rejects_bad_pipelines_with_columns() {
        assert_eq!(
            syntax_err("a,,b"),
            (3, "expected a pass name, found `,`".into())
        );
        assert_eq!(
            syntax_err("a,"),
            (3, "expected a pass name after `,`, found the end".into())
        );
        assert_eq!(
            syntax_err("a,b(opt=1"),
            (
                10,
                "expected `)` to close the options of `b`, found the end".into()
            )
        );
        assert_eq!(
            syntax_err("a b"),
            (3, "expected `,` between passes, found `b`".into())
        );
        assert_eq!(
            syntax_err("b(opt=)"),
            (7, "expected an option value, found `)`".into())
        );
        assert_eq!(
            syntax_err("b(x=1,x=2)"),
            (7, "option `x` of `b` is given twice".into())
        );
        assert_eq!(syntax_err("b(x=\"abc").0, 5);
        assert_eq!(syntax_err("b()").0, 3);
        assert_eq!(syntax_err("b(x=1 y=2)").0, 7);
        assert_eq!(syntax_err("dce,none").0, 5);
        assert_eq!(syntax_err("a;b").0, 2);
        let e = parse_pipeline("a,b(opt=1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pipeline `a,b(opt=1`, column 10: expected `)` to close the options of `b`, found the end"
        );
        assert_eq!(e.caret().unwrap(), "a,b(opt=1\n         ^");
    }

    // ---- test passes ----

    /// Does nothing; options `level` (integer) and `mode` (fast|slow).
    struct Noop;
    impl Pass for Noop {
        fn name(&self) -> &'static str {
            "noop"
        }
        fn description(&self) -> &'static str {
            "does nothing"
        }
        fn run(&mut self, _: &mut Model, _: &mut PassContext) -> Result<PassOutcome, PassError> {
            Ok(PassOutcome::unchanged())
        }
    }
    fn noop_factory(o: &PassOptions) -> Result<Box<dyn Pass>, OptionError> {
        o.allow_only(&["level", "mode"])?;
        o.parse_or::<u32>("level", "a non-negative integer", 0)?;
        o.choice_or("mode", &["fast", "slow"], "fast")?;
        Ok(Box::new(Noop))
    }

    /// Test-only: corrupts the graph by making the first node read an undefined value.
    struct Corrupt;
    impl Pass for Corrupt {
        fn name(&self) -> &'static str {
            "corrupt"
        }
        fn description(&self) -> &'static str {
            "breaks an invariant (test only)"
        }
        fn run(&mut self, m: &mut Model, _: &mut PassContext) -> Result<PassOutcome, PassError> {
            let g = &mut m.graph;
            let ghost = g.value_named("ghost");
            let first = g.node_order()[0];
            g.set_input(first, 0, Some(ghost));
            Ok(PassOutcome::changed().with("corruptions", 1))
        }
    }

    /// Establishes / requires / invalidates a test property.
    struct Prop {
        name: &'static str,
        requires: &'static [Property],
        guarantees: &'static [Property],
        invalidates: &'static [Property],
    }
    impl Pass for Prop {
        fn name(&self) -> &'static str {
            self.name
        }
        fn description(&self) -> &'static str {
            "property test pass"
        }
        fn requires(&self) -> &[Property] {
            self.requires
        }
        fn guarantees(&self) -> &[Property] {
            self.guarantees
        }
        fn invalidates(&self) -> &[Property] {
            self.invalidates
        }
        fn run(&mut self, _: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
            let mut n = 0;
            while n < 3 && ctx.rewrite() {
                n += 1;
            }
            Ok(PassOutcome::from_changed(n > 0).with("rewrites", n))
        }
    }
    const FACT: Property = Property("fact");

    /// Test analysis: the node count, counting how often it is computed.
    struct NodeCount(usize);
    static COMPUTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    impl Analysis for NodeCount {
        fn compute(m: &Model) -> Result<NodeCount, PassError> {
            COMPUTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(NodeCount(m.graph.node_count()))
        }
    }
    /// Test resource, as calibration statistics would be.
    struct Calibrated(u64);

    /// Asks for [`NodeCount`] twice and reports it and the [`Calibrated`] resource.
    struct Ask;
    impl Pass for Ask {
        fn name(&self) -> &'static str {
            "ask"
        }
        fn description(&self) -> &'static str {
            "reads an analysis and a resource"
        }
        fn run(&mut self, m: &mut Model, ctx: &mut PassContext) -> Result<PassOutcome, PassError> {
            let a = ctx.analysis::<NodeCount>(m)?;
            let b = ctx.analysis::<NodeCount>(m)?;
            assert!(std::sync::Arc::ptr_eq(&a, &b));
            let calib = ctx.resource::<Calibrated>().map_or(0, |c| c.0);
            Ok(PassOutcome::unchanged()
                .with("nodes", a.0 as u64)
                .with("calibrated", calib))
        }
    }

    /// Runs only on models of at most `max` nodes, which its check says.
    struct Fits(usize);
    impl Pass for Fits {
        fn name(&self) -> &'static str {
            "fits"
        }
        fn description(&self) -> &'static str {
            "checks the model's size"
        }
        fn check(&self, m: &Model, _: &mut PassContext) -> Result<(), PassError> {
            let n = m.graph.node_count();
            if n > self.0 {
                return Err(PassError::msg(format!("{n} nodes, more than {}", self.0)));
            }
            Ok(())
        }
        fn run(&mut self, _: &mut Model, _: &mut PassContext) -> Result<PassOutcome, PassError> {
            Ok(PassOutcome::unchanged())
        }
    }

    fn registry() -> PassRegistry {
        let mut r = PassRegistry::new();
        r.register("noop", "does nothing", noop_factory)
            .register("corrupt", "breaks an invariant", |o| {
                o.allow_only(&[])?;
                Ok(Box::new(Corrupt))
            })
            .register("make-fact", "establishes `fact`", |o| {
                o.allow_only(&[])?;
                Ok(Box::new(Prop {
                    name: "make-fact",
                    requires: &[],
                    guarantees: &[FACT],
                    invalidates: &[],
                }))
            })
            .register("use-fact", "requires `fact`", |o| {
                o.allow_only(&[])?;
                Ok(Box::new(Prop {
                    name: "use-fact",
                    requires: &[FACT],
                    guarantees: &[],
                    invalidates: &[],
                }))
            })
            .register("break-fact", "invalidates `fact`", |o| {
                o.allow_only(&[])?;
                Ok(Box::new(Prop {
                    name: "break-fact",
                    requires: &[],
                    guarantees: &[],
                    invalidates: &[FACT],
                }))
            })
            .register("ask", "reads an analysis and a resource", |o| {
                o.allow_only(&[])?;
                Ok(Box::new(Ask))
            })
            .register("fits", "checks the model's size", |o| {
                o.allow_only(&["max"])?;
                Ok(Box::new(Fits(o.parse_or("max", "a node count", 0)?)))
            });
        r
    }

    #[test]
    fn unknown_pass_suggests_the_closest() {
        let r = registry();
        let e = r.build("noop,corupt").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pipeline `noop,corupt`, column 6: unknown pass `corupt`; did you mean `corrupt`?"
        );
        let e = r.build("zzzzzz").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pipeline `zzzzzz`, column 1: unknown pass `zzzzzz`; known passes: noop, corrupt, \
             make-fact, use-fact, break-fact, ask, fits"
        );
    }

    #[test]
    fn unknown_and_invalid_options() {
        let r = registry();
        let e = r.build("noop(levle=2)").unwrap_err();
        assert_eq!(
            e.to_string(),
            "pipeline `noop(levle=2)`, column 6: pass `noop` has no option `levle` (valid \
             options: level, mode)"
        );
        let e = r.build("noop, corrupt(x=1)").unwrap_err();
        assert!(e.to_string().ends_with("(valid options: none)"), "{e}");
        assert_eq!(e.column(), Some(15));
        let e = r.build("noop(mode=medium)").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("pass `noop` option `mode`: `medium` is not one of fast, slow"),
            "{e}"
        );
        let e = r.build("noop(level=-1)").unwrap_err();
        assert!(
            e.to_string().ends_with("is not a non-negative integer"),
            "{e}"
        );
        let p = r.build("noop(level=2,mode=slow),noop").unwrap();
        assert_eq!(p.to_string(), "noop(level=2,mode=slow),noop");
        assert_eq!(r.build("none").unwrap().len(), 0);
    }

    #[test]
    fn properties_are_checked_at_build_time() {
        let r = registry();
        r.build("make-fact,use-fact").unwrap();
        r.build_with("use-fact", &[FACT]).unwrap();
        assert_eq!(
            r.build("use-fact,make-fact").unwrap_err().to_string(),
            "pass `use-fact` (#1) requires `fact`, which only the later pass `make-fact` (#2) \
             establishes; move it before `use-fact`"
        );
        assert_eq!(
            r.build("noop,use-fact").unwrap_err().to_string(),
            "pass `use-fact` (#2) requires `fact`, which no earlier pass establishes; add \
             `make-fact` before it"
        );
        assert_eq!(
            r.build("make-fact,break-fact,use-fact")
                .unwrap_err()
                .to_string(),
            "pass `use-fact` (#3) requires `fact`, which `make-fact` (#1) established but \
             `break-fact` (#2) invalidated"
        );
        r.build("make-fact,break-fact,make-fact,use-fact").unwrap();
    }

    fn model() -> Model {
        let mut g = Graph::new("main");
        let x = g
            .add_input("x", Some(Type::tensor(DType::F32, Some(vec![]))))
            .unwrap();
        let w = g
            .add_initializer("w", Tensor::from_f32(vec![], &[2.0]))
            .unwrap();
        g.add_node(
            NodeSpec::new("Mul").named("mul"),
            &[Some(x), Some(w)],
            &["y"],
        )
        .unwrap();
        g.outputs = vec![g.find("y").unwrap()];
        Model {
            ir_version: Some(10),
            graph: g,
            ..Default::default()
        }
    }

    #[test]
    fn verify_each_names_the_breaking_pass() {
        let r = registry();
        let mut p = r.build("noop,corrupt,noop").unwrap();
        let mut m = model();
        // Without verification the run "succeeds".
        PassManager::new()
            .run(&mut m.clone(), &mut p, &mut RunOptions::default())
            .unwrap();
        let mut opts = RunOptions {
            verify_each: true,
            ..Default::default()
        };
        let e = PassManager::new()
            .run(&mut m, &mut p, &mut opts)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pass `corrupt` (#2) broke an IR invariant: graph `main`: node `mul` (Mul) input 0 \
             reads `ghost`, which nothing defines (a forward reference never defined)"
        );
        // And a broken input is blamed on the input, not on the first pass.
        let e = PassManager::new()
            .run(&mut m, &mut p, &mut opts)
            .unwrap_err();
        assert!(matches!(e, RunError::InvalidInput(_)), "{e}");
    }

    #[test]
    fn checks_name_the_step_before_anything_runs() {
        let r = registry();
        let m = model();
        let n = m.graph.node_count();
        r.build(&format!("noop,fits(max={n})"))
            .unwrap()
            .check(&m)
            .unwrap();
        let e = r
            .build(&format!("corrupt,fits(max={})", n - 1))
            .unwrap()
            .check(&m)
            .unwrap_err();
        assert!(matches!(e, RunError::Check { index: 2, .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "pass `fits` (#2) cannot run on this model: {n} nodes, more than {}",
                n - 1
            )
        );
    }

    #[test]
    fn print_ir_after_dumps_numbered_ir() {
        let r = registry();
        let mut p = r.build("noop,make-fact,noop").unwrap();
        let mut m = model();
        let mut buf = Vec::new();
        let report = PassManager::new()
            .run(
                &mut m,
                &mut p,
                &mut RunOptions {
                    verify_each: true,
                    print_ir_after: vec!["noop".into()],
                    print_sink: Some(&mut buf),
                    ..Default::default()
                },
            )
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        let ir = crate::print::print_model(&m);
        assert_eq!(
            text,
            format!("// IR after noop (1)\n{ir}// IR after noop (3)\n{ir}")
        );
        insta::assert_snapshot!(text);
        assert_eq!(report.passes.len(), 3);
        assert!(report.changed());
        assert_eq!(report.counter("make-fact", "rewrites"), 3);
        let table = report.to_string();
        assert!(table.starts_with("#  pass"), "{table}");
        assert!(table.contains("make-fact"), "{table}");

        let e = PassManager::new()
            .run(
                &mut m,
                &mut p,
                &mut RunOptions {
                    print_ir_after: vec!["dce".into()],
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "print-ir-after names `dce`, which is not in the pipeline `noop,make-fact,noop`"
        );
    }

    #[test]
    fn rewrite_budget_is_shared_across_passes() {
        let r = registry();
        let mut p = r.build("make-fact,make-fact,make-fact").unwrap();
        let report = PassManager::new()
            .run(
                &mut model(),
                &mut p,
                &mut RunOptions {
                    rewrite_budget: Some(4),
                    ..Default::default()
                },
            )
            .unwrap();
        let used: Vec<usize> = report.passes.iter().map(|p| p.rewrites).collect();
        assert_eq!(used, vec![3, 1, 0]);
        assert!(!report.passes[2].changed);
        assert_eq!(report.budget_exhausted_in, Some((2, "make-fact")));
    }

    fn counter(r: &PassRecord, name: &str) -> u64 {
        r.counters
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |c| c.1)
    }

    #[test]
    fn analyses_are_cached_until_a_change_and_resources_reach_passes() {
        use std::sync::atomic::Ordering;
        let r = registry();
        let mut p = r.build("ask,ask,make-fact,ask").unwrap();
        let mut pm = PassManager::new();
        pm.provide(Calibrated(7));
        let before = COMPUTED.load(Ordering::SeqCst);
        let report = pm
            .run(&mut model(), &mut p, &mut RunOptions::default())
            .unwrap();
        // Computed once for the first two passes, again after make-fact changed the IR.
        assert_eq!(COMPUTED.load(Ordering::SeqCst) - before, 2);
        for i in [0, 1, 3] {
            assert_eq!(counter(&report.passes[i], "calibrated"), 7);
            assert_eq!(counter(&report.passes[i], "nodes"), 1);
        }
        // Resources outlive a run; analyses do not.
        let mut p = r.build("ask").unwrap();
        let report = pm
            .run(&mut model(), &mut p, &mut RunOptions::default())
            .unwrap();
        assert_eq!(counter(&report.passes[0], "calibrated"), 7);
        assert_eq!(COMPUTED.load(Ordering::SeqCst) - before, 3);
    }

    #[test]
    fn registry_help_lists_passes() {
        let help = registry().help();
        assert!(help.starts_with("noop        does nothing\n"), "{help}");
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("dce", "dce"), 0);
        assert_eq!(edit_distance("dec", "dce"), 2);
        assert_eq!(edit_distance("topo-srot", "topo-sort"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
