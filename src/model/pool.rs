//! The blocking inference pool.
//!
//! Decoding and inference are CPU-bound, so they never run on the async
//! executor: [`InferencePool`] is a fixed set of OS threads fed through
//! channels, and async callers await a oneshot reply. STAT work has its own
//! channel that every thread checks first. Each thread keeps its own tract
//! state and reads the served model from a [`ModelSlot`] per job.

use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwapOption;
use crossbeam_channel::{select_biased, Receiver, Sender};

use super::analyse::{analyse_on, AnalyseError, ThreadState, Verdict};
use super::engine::Engine;
use crate::scan::Limits;
use crate::wire::Priority;

/// The model currently served. Readers take a snapshot per job, so a job
/// finishes on the model it started with even if the slot changes meanwhile.
pub type ModelSlot = Arc<ArcSwapOption<Engine>>;

/// Creates an empty model slot.
pub fn empty_slot() -> ModelSlot {
    Arc::new(ArcSwapOption::empty())
}

struct Task {
    bytes: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Result<Verdict, AnalyseError>>,
}

/// Asks one inference thread to drop its state if it belongs to a model
/// that is no longer in the slot, and to say when it has.
struct Retire {
    done: tokio::sync::oneshot::Sender<()>,
}

/// A fixed pool of inference threads, each with its own tract state.
pub struct InferencePool {
    stat: Option<Sender<Task>>,
    routine: Option<Sender<Task>>,
    /// One per thread: a broadcast needs every thread to get its own copy.
    controls: Vec<Sender<Retire>>,
    threads: Vec<JoinHandle<()>>,
    model: ModelSlot,
}

impl InferencePool {
    /// Starts `threads` inference threads serving whatever model is in `model`.
    pub fn new(model: ModelSlot, threads: usize, limits: Limits) -> InferencePool {
        let (stat_tx, stat_rx) = crossbeam_channel::unbounded::<Task>();
        let (routine_tx, routine_rx) = crossbeam_channel::unbounded::<Task>();
        let mut controls = Vec::new();
        let threads = (0..threads.max(1))
            .map(|i| {
                let (stat_rx, routine_rx, model) =
                    (stat_rx.clone(), routine_rx.clone(), model.clone());
                let (control_tx, control_rx) = crossbeam_channel::unbounded::<Retire>();
                controls.push(control_tx);
                std::thread::Builder::new()
                    .name(format!("pleura-infer-{i}"))
                    .spawn(move || inference_thread(stat_rx, routine_rx, control_rx, model, limits))
                    .expect("spawn inference thread")
            })
            .collect();
        InferencePool {
            stat: Some(stat_tx),
            routine: Some(routine_tx),
            controls,
            threads,
            model,
        }
    }

    /// Makes every thread drop a state built for a model that is no longer
    /// in the slot, and resolves once all have (each finishes its current
    /// job first). Without this an idle thread would keep a swapped-out
    /// model alive until its next job: after a reload, memory would hold two
    /// or three models instead of one.
    pub async fn retire_stale(&self) {
        let mut waits = Vec::new();
        for control in &self.controls {
            let (done, wait) = tokio::sync::oneshot::channel();
            if control.send(Retire { done }).is_ok() {
                waits.push(wait);
            }
        }
        for wait in waits {
            let _ = wait.await;
        }
    }

    /// The slot this pool serves from.
    pub fn model(&self) -> &ModelSlot {
        &self.model
    }

    /// Number of inference threads.
    pub fn size(&self) -> usize {
        self.threads.len()
    }

    /// Classifies a scan on the pool. STAT scans jump every routine one that
    /// is still waiting for a thread.
    pub async fn analyse(
        &self,
        bytes: Vec<u8>,
        priority: Priority,
    ) -> Result<Verdict, AnalyseError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let lane = match priority {
            Priority::Stat => &self.stat,
            Priority::Routine => &self.routine,
        };
        lane.as_ref()
            .ok_or(AnalyseError::PoolClosed)?
            .send(Task { bytes, reply })
            .map_err(|_| AnalyseError::PoolClosed)?;
        rx.await.map_err(|_| AnalyseError::PoolClosed)?
    }
}

impl Drop for InferencePool {
    fn drop(&mut self) {
        // Closing the senders ends each thread's loop once queued work is done.
        // The control channels stay open until the threads are joined: a
        // disconnected one would always be ready and spin the select.
        self.stat.take();
        self.routine.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn inference_thread(
    stat: Receiver<Task>,
    routine: Receiver<Task>,
    control: Receiver<Retire>,
    model: ModelSlot,
    limits: Limits,
) {
    let mut slot: Option<ThreadState> = None;
    loop {
        // STAT first whenever both lanes have work.
        let task = match stat.try_recv() {
            Ok(t) => t,
            Err(_) => select_biased! {
                recv(control) -> r => {
                    if let Ok(Retire { done }) = r {
                        let current = model.load();
                        let stale = slot.as_ref().is_some_and(|w| {
                            current.as_ref().is_none_or(|c| !Arc::ptr_eq(&w.engine, c))
                        });
                        if stale {
                            slot = None;
                        }
                        let _ = done.send(());
                    }
                    continue;
                },
                recv(stat) -> t => match t { Ok(t) => t, Err(_) => match routine.recv() { Ok(t) => t, Err(_) => return } },
                recv(routine) -> t => match t { Ok(t) => t, Err(_) => match stat.recv() { Ok(t) => t, Err(_) => return } },
            },
        };
        if task.reply.is_closed() {
            continue; // the caller gave up (shutdown); don't burn CPU on it
        }
        let result = match model.load_full() {
            Some(engine) => analyse_on(&mut slot, &engine, &task.bytes, &limits),
            None => Err(AnalyseError::NoModel),
        };
        let _ = task.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::model::{init_model, ResNetSpec};

    /// A pool of `threads` serving a fresh tiny model (seed `seed`).
    fn pool(threads: usize, seed: u64) -> (InferencePool, Arc<Engine>) {
        let engine =
            Arc::new(Engine::from_files(init_model(&ResNetSpec::tiny(), seed).unwrap()).unwrap());
        let slot = empty_slot();
        slot.store(Some(engine.clone()));
        (InferencePool::new(slot, threads, Limits::default()), engine)
    }

    /// A gradient PNG big enough that decoding it takes a few milliseconds.
    fn scan() -> Vec<u8> {
        let img =
            image::GrayImage::from_fn(768, 768, |x, y| image::Luma([((x + 2 * y) % 251) as u8]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[tokio::test]
    async fn answers_with_the_served_model_and_refuses_without_one() {
        let (pool, engine) = pool(1, 1);
        let v = pool.analyse(scan(), Priority::Routine).await.unwrap();
        assert_eq!(v.classification.model_version, engine.version());
        assert!((0.0..=1.0).contains(&v.classification.p_effusion));
        pool.model().store(None);
        assert!(matches!(
            pool.analyse(scan(), Priority::Routine).await,
            Err(AnalyseError::NoModel)
        ));
        assert!(matches!(
            pool.analyse(Vec::new(), Priority::Stat).await,
            Err(AnalyseError::NoModel)
        ));
    }

    #[tokio::test]
    async fn a_stat_scan_overtakes_the_routine_ones_waiting() {
        // One thread; six routine scans queue up behind the first, then a
        // STAT one arrives. Tasks on this (current-thread) runtime first run
        // in the order they were spawned, so the STAT scan is queued last.
        let (pool, _) = pool(1, 2);
        let pool = Arc::new(pool);
        let done = Arc::new(AtomicUsize::new(0));
        let bytes = scan();
        let mut tasks = Vec::new();
        for i in 0..7 {
            let priority = if i == 6 {
                Priority::Stat
            } else {
                Priority::Routine
            };
            let (pool, done, bytes) = (pool.clone(), done.clone(), bytes.clone());
            tasks.push(tokio::spawn(async move {
                pool.analyse(bytes, priority).await.unwrap();
                (priority, done.fetch_add(1, Ordering::SeqCst))
            }));
        }
        let mut ranks = Vec::new();
        for t in tasks {
            ranks.push(t.await.unwrap());
        }
        let stat_rank = ranks.iter().find(|(p, _)| *p == Priority::Stat).unwrap().1;
        // At most the routine scan already on the thread finishes first.
        assert!(
            stat_rank <= 1,
            "STAT finished as number {stat_rank} of 7: {ranks:?}"
        );
    }

    #[tokio::test]
    async fn retiring_lets_idle_threads_drop_a_swapped_out_model() {
        let (pool, old) = pool(2, 3);
        // Both threads build a state on the old model.
        let (a, b) = tokio::join!(
            pool.analyse(scan(), Priority::Routine),
            pool.analyse(scan(), Priority::Routine)
        );
        a.unwrap();
        b.unwrap();
        let weak = Arc::downgrade(&old);
        drop(old);
        let new =
            Arc::new(Engine::from_files(init_model(&ResNetSpec::tiny(), 4).unwrap()).unwrap());
        let swapped_out = pool.model().swap(Some(new.clone()));
        drop(swapped_out);
        assert!(
            weak.upgrade().is_some(),
            "idle threads still hold the old model"
        );
        pool.retire_stale().await;
        assert!(
            weak.upgrade().is_none(),
            "retired threads let go of the old model"
        );
        // ...and serve the new one.
        let v = pool.analyse(scan(), Priority::Routine).await.unwrap();
        assert_eq!(v.classification.model_version, new.version());
    }
}
