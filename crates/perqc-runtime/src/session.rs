//! The execution plan and its interpreter.
//!
//! Plan invariants:
//! - `steps` are the non-constant nodes in the graph's (topological) node order; each input
//!   is a slot (the value's arena index) filled either by a graph input, an earlier step,
//!   or `consts`.
//! - `consts` holds initializers, Constant results and every node whose inputs are all
//!   constant, computed once in [`Session::new`]; entries no step or output reads are
//!   dropped.
//! - `steps[k].free` lists the slots whose last reader is step `k` (or which step `k`
//!   produces and nobody reads); they are dropped right after step `k`, so peak memory is the
//!   live set, not the sum of all intermediates. Graph outputs are never freed. Values a
//!   node's subgraphs capture count as read by that node.
//! - A subgraph (If/Loop/Scan body) is planned as a session of its own whose inputs are the
//!   body's inputs plus the values it reads from enclosing graphs.

use perqc_ir::{DType, Dim, Graph, Model, Node, ValueDef};
use perqc_ops::{self as ops, KernelCtx, KernelError, KernelFn, RtTensor, SubgraphRunner};
use std::fmt;
use std::sync::Arc;

/// Executor settings.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Threads for GEMM and batched kernels (default: all available cores).
    pub threads: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// A node the runtime cannot execute.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsupported {
    pub node: String,
    pub op_type: String,
    pub domain: String,
    pub opset: Option<i64>,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dom = if self.domain.is_empty() {
            "ai.onnx"
        } else {
            &self.domain
        };
        write!(f, "node `{}`: {}::{}", self.node, dom, self.op_type)?;
        match self.opset {
            Some(v) => write!(f, " (opset {v})"),
            None => write!(f, " (domain not imported)"),
        }
    }
}

/// The unsupported nodes grouped by (domain, op type, opset) in order of first appearance:
/// "2 op types have no native kernel: com.microsoft::Foo (opset 1, 12 nodes, e.g. `a`),
/// ai.onnx::Bar (opset 21, 1 node, e.g. `b`)".
fn unsupported_summary(list: &[Unsupported]) -> String {
    let mut groups: Vec<(&Unsupported, usize)> = Vec::new();
    for u in list {
        let same = |g: &&mut (&Unsupported, usize)| {
            (&g.0.domain, &g.0.op_type, g.0.opset) == (&u.domain, &u.op_type, u.opset)
        };
        match groups.iter_mut().find(same) {
            Some(g) => g.1 += 1,
            None => groups.push((u, 1)),
        }
    }
    let items: Vec<String> = groups
        .iter()
        .map(|(u, n)| {
            let dom = if u.domain.is_empty() {
                "ai.onnx"
            } else {
                &u.domain
            };
            let opset = match u.opset {
                Some(v) => format!("opset {v}"),
                None => "domain not imported".to_string(),
            };
            let nodes = if *n == 1 { "node" } else { "nodes" };
            format!(
                "{dom}::{} ({opset}, {n} {nodes}, e.g. `{}`)",
                u.op_type, u.node
            )
        })
        .collect();
    let types = if groups.len() == 1 {
        "op type has"
    } else {
        "op types have"
    };
    format!(
        "{} {types} no native kernel: {}",
        groups.len(),
        items.join(", ")
    )
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "{}; run them in ONNX Runtime or add a kernel to the op table",
        unsupported_summary(.0)
    )]
    Unsupported(Vec<Unsupported>),
    #[error("node `{node}` ({op_type}): {source}")]
    Kernel {
        node: String,
        op_type: String,
        source: KernelError,
    },
    #[error("node `{node}` ({op_type}) returned {got} result(s), the graph uses {want}")]
    ResultCount {
        node: String,
        op_type: String,
        got: usize,
        want: usize,
    },
    #[error("initializer `{name}`: {source}")]
    Constant { name: String, source: KernelError },
    #[error("no value `{0}` to observe")]
    UnknownValue(String),
    #[error("observing `{name}`: {detail}")]
    Observe { name: String, detail: String },
    #[error("graph input `{0}` was not given")]
    MissingInput(String),
    #[error("`{0}` is not a graph input")]
    UnknownInput(String),
    #[error("graph input `{name}`: expected {want}, got {got}")]
    InputType {
        name: String,
        want: String,
        got: String,
    },
    #[error("value `{0}` is read before anything defines it")]
    Undefined(String),
    #[error("cannot start the thread pool: {0}")]
    ThreadPool(String),
}

/// Sees chosen values while a session runs (calibration statistics, debugging).
pub trait Observer: Send {
    /// Names of the values to watch.
    fn watched(&self) -> &[String];
    /// Called once per run for each watched value, with its full tensor.
    fn observe(&mut self, name: &str, value: &RtTensor) -> Result<(), RuntimeError>;
}

/// Wall time per op type: (seconds, calls), summed over profiled runs. With the environment
/// variable `PERQC_PROFILE_SHAPES` set, the key is the op type followed by its input shapes.
#[derive(Debug, Default, Clone)]
pub struct Profile {
    pub by_op: std::collections::BTreeMap<String, (f64, usize)>,
}

impl Profile {
    /// Op types by total time, slowest first.
    pub fn sorted(&self) -> Vec<(&str, f64, usize)> {
        let mut v: Vec<_> = self
            .by_op
            .iter()
            .map(|(k, &(t, n))| (k.as_str(), t, n))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }
}

pub(crate) struct Step {
    pub(crate) node: Node,
    pub(crate) opset: i64,
    pub(crate) kernel: KernelFn,
    pub(crate) inputs: Vec<Option<usize>>,
    pub(crate) outputs: Vec<Option<usize>>,
    /// Slots the node's subgraphs read by name.
    pub(crate) captures: Vec<usize>,
    free: Vec<usize>,
}

struct InputSpec {
    name: String,
    slot: usize,
    dtype: Option<DType>,
    /// Declared dims (`None` for a symbolic or unknown dim); `None` if the rank is unknown.
    dims: Option<Vec<Option<usize>>>,
}

/// A planned model, ready to run any number of times.
pub struct Session {
    steps: Vec<Step>,
    consts: Vec<Option<RtTensor>>,
    /// Names of the slots (for errors).
    names: Vec<String>,
    inputs: Vec<InputSpec>,
    outputs: Vec<(String, usize)>,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    /// Opset per (canonical) domain, to plan subgraphs.
    opsets: Vec<(String, i64)>,
    /// Keep the pool's workers spinning while a run lasts (top-level sessions only; a
    /// body session runs inside its parent's run).
    spin: bool,
}

/// Busy-waiting workers for the duration of one run.
///
/// Between two parallel regions of a run (a serial kernel, the executor's bookkeeping)
/// rayon's idle workers go to sleep, and waking one on this VM took long enough that a
/// 512 x 576 x 192 product split over 2 threads went from 0.32 to 0.37 ms and a
/// 512 x 576 x 1536 one from 2.30 to 2.58 ms after 300 us of idleness (median of 40,
/// a throwaway micro-benchmark; in the model `--profile` showed gate/up 146 -> 136 ms and
/// q/o 57 -> 52 ms per run with this). So each run parks `threads - 1` jobs on the pool that poll for
/// stealable work (`rayon::yield_now`) until the run ends, as ONNX Runtime's spinning
/// intra-op pool does by default. They stop when this guard drops, also on an error.
struct KeepAwake(Arc<std::sync::atomic::AtomicBool>);

impl KeepAwake {
    fn start(pool: &rayon::ThreadPool, threads: usize) -> KeepAwake {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for _ in 1..threads {
            let stop = stop.clone();
            pool.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        KeepAwake(stop)
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Session {
    pub fn new(model: &Model) -> Result<Session, RuntimeError> {
        Session::with_options(model, &SessionOptions::default())
    }

    pub fn with_options(model: &Model, opts: &SessionOptions) -> Result<Session, RuntimeError> {
        Session::with_release(model, opts, &|_| {})
    }

    /// [`Session::with_options`], calling `release` on each initializer once the session has
    /// its own copy, so a caller can drop the source's memory (e.g. `Loaded::release` of
    /// perqc-onnx gives back the mapped pages) and peak memory stays near one copy of the
    /// weights.
    pub fn with_release(
        model: &Model,
        opts: &SessionOptions,
        release: &dyn Fn(&perqc_ir::Tensor),
    ) -> Result<Session, RuntimeError> {
        let threads = opts.threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| RuntimeError::ThreadPool(e.to_string()))?;
        let opsets: Vec<(String, i64)> = model
            .opset_imports
            .iter()
            .filter_map(|o| {
                let d = ops::canonical_domain(o.domain.as_deref().unwrap_or(""));
                Some((d.to_string(), o.version?))
            })
            .collect();
        let mut s = Session::build(&model.graph, opsets, threads, Arc::new(pool), release)?;
        s.spin = threads > 1;
        Ok(s)
    }

    /// Plans `g`. Values `g` reads from enclosing graphs (`Outer`) become inputs, fed by name.
    fn build(
        g: &Graph,
        opsets: Vec<(String, i64)>,
        threads: usize,
        pool: Arc<rayon::ThreadPool>,
        release: &dyn Fn(&perqc_ir::Tensor),
    ) -> Result<Session, RuntimeError> {
        let opset_of = |domain: &str| {
            let d = ops::canonical_domain(domain);
            opsets.iter().find(|(k, _)| k == d).map(|&(_, v)| v)
        };
        let n = g.value_capacity();
        // Removed values keep no name, so nothing can ask for them.
        let names: Vec<String> = (0..n)
            .map(|i| g.value(perqc_ir::ValueId::from_index(i)))
            .map(|v| match v.def() {
                ValueDef::Removed => String::new(),
                _ => v.name.clone(),
            })
            .collect();

        // 1. Every node, subgraphs included, needs a kernel; report them all before doing
        //    any work.
        let mut missing = Vec::new();
        let mut kernels = Vec::with_capacity(g.node_order().len());
        fn check(
            g: &Graph,
            opset_of: &dyn Fn(&str) -> Option<i64>,
            missing: &mut Vec<Unsupported>,
            mut found: Option<&mut Vec<(perqc_ir::NodeId, KernelFn, i64)>>,
        ) {
            for &id in g.node_order() {
                let node = g.node(id);
                let opset = opset_of(&node.domain);
                let k = opset
                    .and_then(|v| ops::lookup(&node.domain, &node.op_type, v))
                    .and_then(|d| d.kernel);
                match (k, opset) {
                    (Some(k), Some(v)) => {
                        if let Some(f) = found.as_deref_mut() {
                            f.push((id, k, v));
                        }
                    }
                    _ => missing.push(Unsupported {
                        node: node.name.clone(),
                        op_type: node.op_type.clone(),
                        domain: node.domain.clone(),
                        opset,
                    }),
                }
                for sub in node.subgraphs() {
                    check(sub, opset_of, missing, None);
                }
            }
        }
        check(g, &opset_of, &mut missing, Some(&mut kernels));
        if !missing.is_empty() {
            return Err(RuntimeError::Unsupported(missing));
        }

        // 2. Constants: initializers (graph inputs with defaults stay overridable, so they
        //    are not folded through), then fold every node whose inputs are all constant.
        let mut consts: Vec<Option<RtTensor>> = vec![None; n];
        let mut foldable = vec![false; n];
        for (vid, v) in g.values() {
            if let (ValueDef::Initializer, Some(t)) = (v.def(), v.tensor.as_ref()) {
                let rt = RtTensor::from_tensor(t).map_err(|source| RuntimeError::Constant {
                    name: v.name.clone(),
                    source,
                })?;
                consts[vid.index()] = Some(rt);
                foldable[vid.index()] = true;
                release(t);
            }
        }
        let mut inputs = Vec::new();
        for &vid in &g.inputs {
            let v = g.value(vid);
            if let Some(t) = &v.tensor {
                // An overridable default: used when the caller does not feed the input.
                consts[vid.index()] =
                    Some(
                        RtTensor::from_tensor(t).map_err(|source| RuntimeError::Constant {
                            name: v.name.clone(),
                            source,
                        })?,
                    );
                foldable[vid.index()] = false;
            }
            let ty = v.ty.as_ref();
            inputs.push(InputSpec {
                name: v.name.clone(),
                slot: vid.index(),
                dtype: ty.and_then(|t| t.elem()),
                dims: ty.and_then(|t| t.shape()).map(|s| {
                    s.iter()
                        .map(|d| match d {
                            Dim::Known(k) => usize::try_from(*k).ok(),
                            _ => None,
                        })
                        .collect()
                }),
            });
        }
        for (vid, v) in g.values() {
            if v.def() == ValueDef::Outer {
                inputs.push(InputSpec {
                    name: v.name.clone(),
                    slot: vid.index(),
                    dtype: None,
                    dims: None,
                });
            }
        }
        let mut steps = Vec::new();
        pool.install(|| -> Result<(), RuntimeError> {
            for (id, kernel, opset) in kernels {
                let node = g.node(id);
                let ins: Vec<Option<usize>> =
                    node.inputs().iter().map(|v| v.map(|v| v.index())).collect();
                let outs: Vec<Option<usize>> = node
                    .outputs()
                    .iter()
                    .map(|v| v.map(|v| v.index()))
                    .collect();
                let all_const =
                    node.subgraphs().next().is_none() && ins.iter().flatten().all(|&s| foldable[s]);
                if all_const {
                    let args: Vec<Option<&RtTensor>> = ins
                        .iter()
                        .map(|s| s.and_then(|s| consts[s].as_ref()))
                        .collect();
                    let ctx = KernelCtx {
                        node,
                        opset,
                        threads,
                        subgraphs: None,
                    };
                    let res = run_kernel(kernel, &ctx, &args, &outs)?;
                    for (slot, t) in outs.iter().zip(res) {
                        if let Some(s) = slot {
                            consts[*s] = Some(t);
                            foldable[*s] = true;
                        }
                    }
                } else {
                    steps.push(Step {
                        node: node.clone(),
                        opset,
                        kernel,
                        inputs: ins,
                        outputs: outs,
                        captures: node.captures().iter().map(|v| v.index()).collect(),
                        free: Vec::new(),
                    });
                }
            }
            Ok(())
        })?;
        let outputs: Vec<(String, usize)> = g
            .outputs
            .iter()
            .map(|&v| (g.value(v).name.clone(), v.index()))
            .collect();

        let mut is_output = vec![false; n];
        for &(_, s) in &outputs {
            is_output[s] = true;
        }

        // 3. Memory plan. `last[s]` = index of the last step reading slot `s`.
        let mut needed_const = is_output.clone();
        let mut last: Vec<Option<usize>> = vec![None; n];
        for (k, st) in steps.iter().enumerate() {
            for &s in st.inputs.iter().flatten().chain(&st.captures) {
                last[s] = Some(k);
                needed_const[s] = true;
            }
        }
        for (k, st) in steps.iter_mut().enumerate() {
            let produced = st.outputs.iter().flatten().filter(|&&s| last[s].is_none());
            let mut free: Vec<usize> = produced.copied().collect();
            free.extend(
                st.inputs
                    .iter()
                    .flatten()
                    .chain(&st.captures)
                    .copied()
                    .filter(|&s| last[s] == Some(k)),
            );
            free.retain(|&s| !is_output[s] && !foldable[s]);
            free.sort_unstable();
            free.dedup();
            st.free = free;
        }
        // Unread constants are dropped; folded view-like results (a transposed weight) are
        // made row-major once so kernels such as MatMul read contiguous memory per call.
        let input_slots: Vec<usize> = inputs.iter().map(|i| i.slot).collect();
        for (s, c) in consts.iter_mut().enumerate() {
            if !needed_const[s] && !input_slots.contains(&s) {
                *c = None;
            } else if let Some(t) = c.as_mut() {
                *t = perqc_ops::rt_map!(&*t, a => if a.is_standard_layout() {
                    a.clone()
                } else {
                    a.as_standard_layout().into_owned().into_shared()
                });
            }
        }
        Ok(Session {
            steps,
            consts,
            names,
            inputs,
            outputs,
            pool,
            threads,
            opsets,
            spin: false,
        })
    }

    /// Graph input names, in order.
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.inputs.iter().map(|i| i.name.as_str())
    }

    /// Nodes left to run per call after constant folding.
    pub fn step_count(&self) -> usize {
        self.steps.len()
    }

    /// The op type of each step, in run order.
    pub fn step_ops(&self) -> impl Iterator<Item = &str> {
        self.steps.iter().map(|s| s.node.op_type.as_str())
    }

    /// Runs the graph. Every graph input without a default must be given; the result lists
    /// the graph outputs in order.
    pub fn run(&self, feeds: &[(&str, RtTensor)]) -> Result<Vec<(String, RtTensor)>, RuntimeError> {
        self.run_profiled(feeds, None)
    }

    /// [`Session::run`], adding each step's wall time to `profile` (by op type) if given.
    pub fn run_profiled(
        &self,
        feeds: &[(&str, RtTensor)],
        profile: Option<&mut Profile>,
    ) -> Result<Vec<(String, RtTensor)>, RuntimeError> {
        self.run_inner(feeds, profile, None)
    }

    /// [`Session::run`], showing `observer` every value it watches as soon as it exists
    /// (inputs and constants first, then each node result). Values are not kept beyond
    /// their planned lifetime, so streaming observers add no activation memory.
    pub fn run_observed(
        &self,
        feeds: &[(&str, RtTensor)],
        observer: &mut dyn Observer,
    ) -> Result<Vec<(String, RtTensor)>, RuntimeError> {
        self.run_inner(feeds, None, Some(observer))
    }

    fn run_inner(
        &self,
        feeds: &[(&str, RtTensor)],
        mut profile: Option<&mut Profile>,
        mut observer: Option<&mut dyn Observer>,
    ) -> Result<Vec<(String, RtTensor)>, RuntimeError> {
        // watched[slot]: the observer wants this value.
        let mut watched = vec![false; self.consts.len()];
        if let Some(o) = observer.as_deref() {
            for name in o.watched() {
                let slot = self
                    .names
                    .iter()
                    .position(|n| n == name && !name.is_empty())
                    .ok_or_else(|| RuntimeError::UnknownValue(name.clone()))?;
                watched[slot] = true;
            }
        }
        let mut vals: Vec<Option<RtTensor>> = vec![None; self.consts.len()];
        for (name, t) in feeds {
            let spec = self
                .inputs
                .iter()
                .find(|i| i.name == *name)
                .ok_or_else(|| RuntimeError::UnknownInput(name.to_string()))?;
            check_input(spec, t)?;
            vals[spec.slot] = Some(t.clone());
        }
        for spec in &self.inputs {
            if vals[spec.slot].is_none() && self.consts[spec.slot].is_none() {
                return Err(RuntimeError::MissingInput(spec.name.clone()));
            }
        }
        if let Some(o) = observer.as_deref_mut() {
            for (slot, _) in watched.iter().enumerate().filter(|(_, w)| **w) {
                if let Some(t) = vals[slot].as_ref().or(self.consts[slot].as_ref()) {
                    o.observe(&self.names[slot], t)?;
                }
            }
        }
        let _awake = self
            .spin
            .then(|| KeepAwake::start(&self.pool, self.threads));
        self.pool.install(|| -> Result<(), RuntimeError> {
            for st in &self.steps {
                let mut args = Vec::with_capacity(st.inputs.len());
                for s in &st.inputs {
                    args.push(match s {
                        None => None,
                        Some(s) => Some(
                            vals[*s]
                                .as_ref()
                                .or(self.consts[*s].as_ref())
                                .ok_or_else(|| RuntimeError::Undefined(self.names[*s].clone()))?,
                        ),
                    });
                }
                let runner = Bodies {
                    session: self,
                    captured: st
                        .captures
                        .iter()
                        .map(|&s| {
                            vals[s]
                                .as_ref()
                                .or(self.consts[s].as_ref())
                                .map(|t| (self.names[s].as_str(), t))
                                .ok_or_else(|| RuntimeError::Undefined(self.names[s].clone()))
                        })
                        .collect::<Result<_, _>>()?,
                };
                let ctx = KernelCtx {
                    node: &st.node,
                    opset: st.opset,
                    threads: self.threads,
                    subgraphs: Some(&runner),
                };
                let t0 = profile.as_ref().map(|_| std::time::Instant::now());
                let res = run_kernel(st.kernel, &ctx, &args, &st.outputs)?;
                if let (Some(p), Some(t0)) = (profile.as_deref_mut(), t0) {
                    let key = if std::env::var_os("PERQC_PROFILE_SHAPES").is_some() {
                        format!(
                            "{} {:?}",
                            st.node.op_type,
                            args.iter()
                                .map(|a| a.map(|a| a.shape().to_vec()))
                                .collect::<Vec<_>>()
                        )
                    } else {
                        st.node.op_type.clone()
                    };
                    let e = p.by_op.entry(key).or_default();
                    e.0 += t0.elapsed().as_secs_f64();
                    e.1 += 1;
                }
                drop(args);
                for (slot, t) in st.outputs.iter().zip(res) {
                    if let Some(s) = slot {
                        if watched[*s]
                            && let Some(o) = observer.as_deref_mut()
                        {
                            o.observe(&self.names[*s], &t)?;
                        }
                        vals[*s] = Some(t);
                    }
                }
                for &s in &st.free {
                    if let Some(t) = vals[s].take() {
                        perqc_ops::pool::recycle(t);
                    }
                }
            }
            Ok(())
        })?;
        self.outputs
            .iter()
            .map(|(name, s)| {
                vals[*s]
                    .clone()
                    .or_else(|| self.consts[*s].clone())
                    .map(|t| (name.clone(), t))
                    .ok_or_else(|| RuntimeError::Undefined(name.clone()))
            })
            .collect()
    }
}

/// Keeps freed kernel buffers in the process (glibc only; idempotent). A process-wide
/// setting, so the library never calls it itself: programs that run sessions repeatedly
/// (the CLI, benchmarks) opt in at start-up.
///
/// Every step allocates its results and frees dead values; glibc serves buffers above its
/// (dynamic, initially 128 KiB) mmap threshold with fresh mappings and trims the heap top
/// eagerly, so each run would page-fault and zero its activations again (about 15% of a
/// SmolLM2 forward). Raising the mmap threshold to 32 MiB (glibc's maximum) and the trim
/// threshold to 512 MiB makes the heap reuse them. Peak RSS is unchanged (the live set
/// still bounds it); freed memory below 512 MiB is kept for the next run.
///
/// Buffers above 32 MiB (a causal LM's logits) are mapped fresh by glibc whatever the
/// threshold; the f32 ones go to [`perqc_ops::pool`] instead when a run frees them or the
/// caller gives them back with [`recycle`].
pub fn tune_allocator() {
    set_allocator(32 << 20, 512 << 20);
    perqc_ops::pool::enable(true);
}

/// Gives the memory of tensors the caller is done with (a run's outputs) to the next run,
/// after [`tune_allocator`]: a large f32 output that no other handle shares is kept for the
/// next kernel output of the same size instead of being unmapped and faulted in again (about
/// 50 ms of a SmolLM2 forward for its 100 MB logits). Anything else is simply dropped.
pub fn recycle(tensors: impl IntoIterator<Item = RtTensor>) {
    tensors.into_iter().for_each(perqc_ops::pool::recycle);
}

/// Undoes [`tune_allocator`] for work that is not a session (the compiler's passes between
/// calibration and quantization): buffers from 1 MiB up are mapped and unmapped on their
/// own, and the heap is trimmed above 32 MiB free, so transient copies (weights being
/// rewritten, a probe's products on several threads' arenas) do not stay in the process
/// and add up to the peak. [`tune_allocator`] turns the reuse back on.
pub fn untune_allocator() {
    set_allocator(1 << 20, 32 << 20);
    perqc_ops::pool::enable(false);
}

/// Makes every thread allocate from glibc's one main arena (a process-wide setting; call it
/// before the program starts threads). By default each thread that meets contention gets
/// an arena of its own, and memory freed in one arena serves only its threads: a program
/// that alternates sessions (the pool threads allocate their buffers) with other parallel
/// work (the compiler's rounding on rayon's global threads) keeps every arena's free
/// memory resident unless it trims, and after a trim the next session page-faults its
/// buffers in again. The compiler alternates 120 times on SmolLM2: with one arena it
/// needs no trim between stages (measured on the default recipe, AMD EPYC, 2 vCPUs:
/// system time 9.0 s -> 3.7 s against trimming after every group; without trims but with
/// the default arenas the peak RSS rose from 887 MB to 981 MB; quantization.md). Kernels
/// allocate once per step, so the shared lock is not contended.
pub fn share_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only changes allocator parameters; it is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn set_allocator(mmap_threshold: i32, trim_threshold: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only changes allocator parameters; it is thread-safe in glibc.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_threshold);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim_threshold);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (mmap_threshold, trim_threshold);
}

/// Frees the buffer pool and gives the allocator's free memory back to the system (glibc's `malloc_trim(0)`; a no-op
/// elsewhere). After [`tune_allocator`], memory a dropped session freed stays in the
/// process for the next run; a program that moves on to other work (the CLI after
/// calibrating) calls this so that the freed weights and activations do not add to what
/// that work allocates.
pub fn trim_allocator() {
    perqc_ops::pool::clear();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: malloc_trim only returns free memory to the system; it is thread-safe in glibc.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs a node's body graphs: plans each body as a session sharing this one's thread pool,
/// and feeds it the body's inputs plus the values it captures from the running graph.
/// (Bodies are planned per call; caching the plan across Loop iterations is future work.)
struct Bodies<'a> {
    session: &'a Session,
    captured: Vec<(&'a str, &'a RtTensor)>,
}

impl SubgraphRunner for Bodies<'_> {
    fn run(&self, g: &Graph, inputs: &[RtTensor]) -> Result<Vec<RtTensor>, KernelError> {
        let s = self.session;
        let fail = |e: RuntimeError| KernelError::Invalid(format!("in body `{}`: {e}", g.name));
        let body = Session::build(g, s.opsets.clone(), s.threads, s.pool.clone(), &|_| {})
            .map_err(fail)?;
        if inputs.len() != g.inputs.len() {
            return Err(KernelError::Invalid(format!(
                "body `{}` takes {} inputs, got {}",
                g.name,
                g.inputs.len(),
                inputs.len()
            )));
        }
        let mut feeds: Vec<(&str, RtTensor)> = g
            .inputs
            .iter()
            .zip(inputs)
            .map(|(&v, t)| (g.value(v).name.as_str(), t.clone()))
            .collect();
        for spec in &body.inputs {
            if let Some(&(name, t)) = self.captured.iter().find(|(n, _)| *n == spec.name) {
                feeds.push((name, t.clone()));
            }
        }
        let out = body.run(&feeds).map_err(fail)?;
        Ok(out.into_iter().map(|(_, t)| t).collect())
    }
}

/// Runs one kernel and checks it returned every result the graph reads.
fn run_kernel(
    kernel: KernelFn,
    ctx: &KernelCtx<'_>,
    args: &[Option<&RtTensor>],
    outs: &[Option<usize>],
) -> Result<Vec<RtTensor>, RuntimeError> {
    let node = ctx.node;
    let res = kernel(ctx, args).map_err(|source| RuntimeError::Kernel {
        node: node.name.clone(),
        op_type: node.op_type.clone(),
        source,
    })?;
    let want = outs.iter().rposition(Option::is_some).map_or(0, |p| p + 1);
    if res.len() < want {
        return Err(RuntimeError::ResultCount {
            node: node.name.clone(),
            op_type: node.op_type.clone(),
            got: res.len(),
            want,
        });
    }
    Ok(res)
}

fn check_input(spec: &InputSpec, t: &RtTensor) -> Result<(), RuntimeError> {
    let bad = |want: String| RuntimeError::InputType {
        name: spec.name.clone(),
        want,
        got: format!("{}{:?}", t.dtype(), t.shape()),
    };
    if let Some(d) = spec.dtype
        && d != t.dtype()
    {
        return Err(bad(d.to_string()));
    }
    if let Some(dims) = &spec.dims {
        let fits = dims.len() == t.shape().len()
            && dims
                .iter()
                .zip(t.shape())
                .all(|(d, &s)| d.is_none_or(|d| d == s));
        if !fits {
            let want: Vec<String> = dims
                .iter()
                .map(|d| d.map_or("?".into(), |d| d.to_string()))
                .collect();
            return Err(bad(format!("shape [{}]", want.join(", "))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod unsupported_tests {
    use super::{RuntimeError, Unsupported};

    #[test]
    fn unsupported_nodes_are_grouped_by_op_type() {
        let u = |node: String, domain: &str, op: &str, opset| Unsupported {
            node,
            op_type: op.into(),
            domain: domain.into(),
            opset,
        };
        let mut list: Vec<Unsupported> = (0..12)
            .map(|l| {
                u(
                    format!("/m/layers.{l}/foo"),
                    "com.microsoft",
                    "Foo",
                    Some(1),
                )
            })
            .collect();
        list.insert(3, u("bar_0".into(), "", "Bar", Some(21)));
        list.extend((0..78).map(|i| u(format!("baz_{i}"), "x.test", "Baz", None)));
        let msg = RuntimeError::Unsupported(list).to_string();
        assert_eq!(
            msg,
            "3 op types have no native kernel: com.microsoft::Foo (opset 1, 12 nodes, e.g. \
             `/m/layers.0/foo`), ai.onnx::Bar (opset 21, 1 node, e.g. `bar_0`), x.test::Baz \
             (domain not imported, 78 nodes, e.g. `baz_0`); run them in ONNX Runtime or add a \
             kernel to the op table"
        );
        assert!(
            !msg.contains("layers.1/"),
            "one node name per op type: {msg}"
        );
        let one = RuntimeError::Unsupported(vec![u("n".into(), "", "Qux", Some(7))]).to_string();
        assert!(
            one.starts_with("1 op type has no native kernel: ai.onnx::Qux (opset 7, 1 node"),
            "{one}"
        );
    }
}
