//! Measuring an engine on this machine, for `pleura bench engine` and
//! `make bench`: throughput with a given number of threads (one state per
//! thread, as the pool runs it), and where the time goes per operation.
//!
//! These are measurements, not tests: nothing here asserts a speed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tract_onnx::prelude::*;

use super::engine::{Engine, EngineError, Graph};

/// Engine-only throughput: inference alone, no decoding, no broker.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Inference threads, each with its own state.
    pub threads: usize,
    /// Images run.
    pub images: usize,
    /// Wall time of the run, seconds.
    pub seconds: f64,
    /// Images per second over all threads.
    pub images_per_second: f64,
    /// Median time of one inference, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile of one inference, milliseconds.
    pub p99_ms: f64,
}

/// Runs `images` inferences of `inputs` (cycled) on `threads` threads, each
/// with its own state, after one warm-up run per thread.
pub fn throughput(
    engine: &Arc<Engine>,
    inputs: &[Vec<f32>],
    threads: usize,
    images: usize,
) -> Result<Throughput, EngineError> {
    assert!(!inputs.is_empty(), "no inputs to run");
    let threads = threads.max(1);
    let next = Arc::new(AtomicUsize::new(0));
    let inputs = Arc::new(inputs.to_vec());
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (engine, inputs, next, barrier) = (
                engine.clone(),
                inputs.clone(),
                next.clone(),
                barrier.clone(),
            );
            std::thread::spawn(move || -> Result<Vec<f64>, EngineError> {
                let mut state = engine.new_state()?;
                engine.run(&mut state, &inputs[0])?;
                barrier.wait();
                let mut times = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= images {
                        return Ok(times);
                    }
                    let t = Instant::now();
                    engine.run(&mut state, &inputs[i % inputs.len()])?;
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            })
        })
        .collect();
    barrier.wait();
    let t0 = Instant::now();
    let mut times = Vec::with_capacity(images);
    for w in workers {
        times.extend(w.join().expect("bench thread panicked")?);
    }
    let seconds = t0.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    Ok(Throughput {
        threads,
        images,
        seconds,
        images_per_second: images as f64 / seconds,
        p50_ms: percentile(&times, 0.5),
        p99_ms: percentile(&times, 0.99),
    })
}

/// The `q` quantile of sorted values (nearest rank); 0 for none.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Time spent in one kind of operation of the optimised plan.
#[derive(Debug, Clone, Serialize)]
pub struct OpTime {
    /// tract's operation name (`Conv`, `MaxPool`, `EinSum`, ...).
    pub op: String,
    /// Nodes of that kind in the plan.
    pub nodes: usize,
    /// Milliseconds per image spent in them.
    pub ms_per_image: f64,
    /// Share of the summed node time.
    pub share: f64,
}

/// Where one image's inference goes in tract, per operation kind, averaged
/// over `runs` runs on one thread (after a warm-up run). The summed node
/// time is within a few percent of a plain run's.
pub fn profile(graph: &Graph, input: &[f32], runs: usize) -> Result<Vec<OpTime>, EngineError> {
    let plan = graph.plan();
    let mut state = plan.spawn()?;
    let size = graph.input_size();
    let tensor = || Tensor::from_shape(&[1, 1, size, size], input).map(|t| tvec![t.into_tvalue()]);
    state.run(tensor()?)?;
    let mut per_node: BTreeMap<usize, Duration> = BTreeMap::new();
    let runs = runs.max(1);
    for _ in 0..runs {
        state.run_plan_with_eval(tensor()?, |ctx, op_state, node, inputs| {
            let t = Instant::now();
            let out = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
            *per_node.entry(node.id).or_default() += t.elapsed();
            out
        })?;
    }
    let model = plan.model();
    let mut by_op: BTreeMap<String, (usize, Duration)> = BTreeMap::new();
    for (id, d) in &per_node {
        let entry = by_op
            .entry(model.node(*id).op().name().to_string())
            .or_default();
        entry.0 += 1;
        entry.1 += *d;
    }
    let total: f64 = by_op.values().map(|(_, d)| d.as_secs_f64()).sum();
    let mut out: Vec<OpTime> = by_op
        .into_iter()
        .map(|(op, (nodes, d))| OpTime {
            op,
            nodes,
            ms_per_image: d.as_secs_f64() * 1e3 / runs as f64,
            share: d.as_secs_f64() / total.max(f64::MIN_POSITIVE),
        })
        .collect();
    out.sort_by(|a, b| b.ms_per_image.total_cmp(&a.ms_per_image));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{golden_input, init_model, ResNetSpec};

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn throughput_counts_every_image_and_profile_covers_the_plan() {
        let engine =
            Arc::new(Engine::from_files(init_model(&ResNetSpec::tiny(), 1).unwrap()).unwrap());
        let inputs = vec![golden_input(1, 32), golden_input(2, 32)];
        let t = throughput(&engine, &inputs, 2, 20).unwrap();
        assert_eq!((t.threads, t.images), (2, 20));
        assert!(t.images_per_second > 0.0 && t.p50_ms <= t.p99_ms);
        let ops = profile(engine.tract_graph().unwrap(), &inputs[0], 3).unwrap();
        // tract lowers every convolution to im2col and a matrix product.
        assert!(ops.iter().any(|o| o.op.contains("MatMul")), "{ops:?}");
        let share: f64 = ops.iter().map(|o| o.share).sum();
        assert!((share - 1.0).abs() < 1e-9);
    }
}
