//! Background loading: decoded-image cache, bounded prefetch, augmentation,
//! batches reassembled in order.

use std::collections::HashMap;
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use pleura::scan::{load_scan, Limits};

use super::dataset::Sample;
use super::error::DataError;
use super::seeds::{seeded, shuffle, STREAM_EPOCH_ORDER};
use crate::augment::{self, AugmentConfig};

/// Decoded, preprocessed images by sample index, filled lazily and kept for later epochs.
///
/// Holds the output of `load_scan` (`size`×`size` `f32`, before augmentation), so each file
/// is decoded once per training run rather than once per epoch: at 256² that is 256 KiB an
/// image, about 250 MiB per thousand images. Slots are write-once; shared between the loader
/// and its worker threads through an `Arc`.
pub struct ImageCache {
    slots: Vec<OnceLock<Arc<[f32]>>>,
    decodes: AtomicUsize,
}

impl ImageCache {
    fn new(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| OnceLock::new()).collect(),
            decodes: AtomicUsize::new(0),
        }
    }

    /// Number of slots, one per sample.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no slots (a loader without samples).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The cached image of sample `index`, if it has been decoded.
    pub fn get(&self, index: usize) -> Option<Arc<[f32]>> {
        self.slots.get(index)?.get().cloned()
    }

    /// How many samples are cached.
    pub fn cached(&self) -> usize {
        self.slots.iter().filter(|s| s.get().is_some()).count()
    }

    /// How many decodes have run in total. Equal to [`ImageCache::cached`] unless two
    /// threads raced on one image; a later epoch that adds nothing here was served
    /// entirely from the cache.
    pub fn decoded_count(&self) -> usize {
        self.decodes.load(Ordering::Relaxed)
    }

    /// Memory held by cached pixels, in bytes.
    pub fn bytes(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.get())
            .map(|img| std::mem::size_of_val(&**img))
            .sum()
    }
}

impl std::fmt::Debug for ImageCache {
    // Summarised: the derived form would print every cached pixel.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCache")
            .field("slots", &self.len())
            .field("cached", &self.cached())
            .field("decoded", &self.decoded_count())
            .finish()
    }
}

/// One batch of model input.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `B * size * size` values, row-major, one channel per image, image after image.
    pub images: Vec<f32>,
    /// Class per image ([`Sample::class`]).
    pub labels: Vec<i64>,
    /// Index of each image in the loader's sample list.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// What the loader and its workers share.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) samples: Vec<Sample>,
    size: u32,
    limits: Limits,
    cache: ImageCache,
}

impl Shared {
    /// The preprocessed image of sample `index`, from the cache or decoded now.
    pub(super) fn image(&self, index: usize) -> Result<Arc<[f32]>, DataError> {
        let slot = &self.cache.slots[index];
        if let Some(img) = slot.get() {
            return Ok(img.clone());
        }
        let path = &self.samples[index].path;
        let bytes = fs::read(path).map_err(|error| DataError::Io {
            path: path.clone(),
            error,
        })?;
        let img: Arc<[f32]> = load_scan(&bytes, &self.limits, self.size)
            .map_err(|error| DataError::Decode {
                path: path.clone(),
                code: error.code(),
                error,
            })?
            .into();
        self.cache.decodes.fetch_add(1, Ordering::Relaxed);
        // If another thread won a race to fill the slot, its copy is identical; keep one.
        Ok(slot.get_or_init(|| img).clone())
    }

    /// The image as it goes into a batch: cached, then augmented if asked.
    fn batch_image(
        &self,
        index: usize,
        augment: Option<&(AugmentConfig, u64)>,
    ) -> Result<Pixels, DataError> {
        let img = self.image(index)?;
        Ok(match augment {
            None => Pixels::Shared(img),
            Some((cfg, seed)) => {
                let mut rng = augment::image_rng(*seed, index);
                Pixels::Owned(augment::augment(&img, self.size as usize, cfg, &mut rng))
            }
        })
    }
}

/// An image on its way into a batch; un-augmented images are not copied until assembly.
enum Pixels {
    Shared(Arc<[f32]>),
    Owned(Vec<f32>),
}

impl Pixels {
    fn as_slice(&self) -> &[f32] {
        match self {
            Pixels::Shared(a) => a,
            Pixels::Owned(v) => v,
        }
    }
}

/// Loads samples into batches on background threads, with a decoded-image cache.
///
/// Cheap to keep for a whole run: threads exist only while an [`Epoch`] (or
/// [`Loader::preload`]) runs, and the cache persists across epochs.
#[derive(Debug)]
pub struct Loader {
    pub(super) shared: Arc<Shared>,
    threads: usize,
    prefetch_batches: usize,
}

impl Loader {
    /// A loader for `samples`, producing `size`×`size` images via `load_scan` with
    /// `limits`, decoding on `threads` background threads (at least 1) and keeping up to
    /// `prefetch_batches` batches (at least 1) in flight ahead of the consumer.
    pub fn new(
        samples: Vec<Sample>,
        size: u32,
        limits: Limits,
        threads: usize,
        prefetch_batches: usize,
    ) -> Loader {
        let cache = ImageCache::new(samples.len());
        Loader {
            shared: Arc::new(Shared {
                samples,
                size,
                limits,
                cache,
            }),
            threads: threads.max(1),
            prefetch_batches: prefetch_batches.max(1),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.shared.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.shared.samples.is_empty()
    }

    /// The samples, in the order that [`Batch::indices`] refers to.
    pub fn samples(&self) -> &[Sample] {
        &self.shared.samples
    }

    /// Side length of the produced images.
    pub fn size(&self) -> u32 {
        self.shared.size
    }

    /// Number of batches an epoch yields for `batch_size` (the last one may be short).
    pub fn num_batches(&self, batch_size: usize) -> usize {
        self.len().div_ceil(batch_size.max(1))
    }

    /// The decoded-image cache.
    pub fn cache(&self) -> &ImageCache {
        &self.shared.cache
    }

    /// Total decodes so far (see [`ImageCache::decoded_count`]).
    pub fn decoded_count(&self) -> usize {
        self.shared.cache.decoded_count()
    }

    /// Iterates over one epoch of batches of `batch_size` (the last may be smaller; every
    /// sample appears exactly once).
    ///
    /// The order is a shuffle seeded by `shuffle_seed` (training) or the sample order when
    /// `None` (validation). With `augment` set, each image is augmented with a generator
    /// seeded from the given seed and its sample index (`augment::image_rng`). Background
    /// threads decode (or take from the cache) and augment; batches are reassembled in
    /// order, so the batches are the same for a seed whatever the thread timing.
    ///
    /// Bounded prefetch: work is handed to the threads one batch at a time, and at most
    /// `prefetch_batches` batches are queued, in progress or finished ahead of the one the
    /// caller holds, which bounds memory however slow the consumer is.
    ///
    /// The first failure (an undecodable file, in batch order) is yielded as an error and
    /// ends the epoch. Dropping the iterator stops and joins its threads.
    pub fn epoch(
        &self,
        batch_size: usize,
        shuffle_seed: Option<u64>,
        augment: Option<(AugmentConfig, u64)>,
    ) -> Epoch {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if let Some(seed) = shuffle_seed {
            shuffle(&mut order, &mut seeded(seed, STREAM_EPOCH_ORDER));
        }
        let invalid = if batch_size == 0 {
            Some(DataError::InvalidArgument(
                "batch size must be at least 1".into(),
            ))
        } else if let Some(Err(e)) = augment.as_ref().map(|(cfg, _)| cfg.validate()) {
            Some(DataError::InvalidArgument(e.to_string()))
        } else {
            None
        };
        Epoch::start(self, order, batch_size.max(1), augment, invalid)
    }

    /// Decodes every sample not yet cached, on the loader's threads.
    ///
    /// Use it to fail fast on a bad file before training starts, and to take decoding out
    /// of the first epoch's timing.
    ///
    /// # Errors
    /// The first failure by sample index among those found; decoding stops soon after the
    /// first failure.
    pub fn preload(&self) -> Result<(), DataError> {
        let n = self.len();
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let errors: Mutex<Vec<(usize, DataError)>> = Mutex::new(Vec::new());
        let started = std::time::Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..self.threads.min(n) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || failed.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = self.shared.image(i) {
                        failed.store(true, Ordering::Relaxed);
                        errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((i, e));
                        break;
                    }
                });
            }
        });
        let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Some((_, e)) = errors.into_iter().min_by_key(|(i, _)| *i) {
            return Err(e);
        }
        tracing::info!(
            images = n,
            cached_mib = self.cache().bytes() / (1024 * 1024),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "preloaded images"
        );
        Ok(())
    }
}

/// One unit of work: the image at `position` of batch `batch`, which is sample `index`.
struct Job {
    batch: usize,
    position: usize,
    index: usize,
}

struct JobResult {
    batch: usize,
    position: usize,
    result: Result<Pixels, DataError>,
}

/// A batch being assembled from out-of-order results.
struct Pending {
    slots: Vec<Option<Result<Pixels, DataError>>>,
    filled: usize,
}

/// The iterator returned by [`Loader::epoch`]; owns the epoch's worker threads.
pub struct Epoch {
    shared: Arc<Shared>,
    order: Vec<usize>,
    batch_size: usize,
    n_batches: usize,
    /// Next batch to yield.
    next_batch: usize,
    /// Next batch to hand to the workers.
    next_enqueue: usize,
    prefetch_batches: usize,
    jobs: Option<Sender<Job>>,
    results: Receiver<JobResult>,
    pending: HashMap<usize, Pending>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    /// An argument error to report on the first call.
    invalid: Option<DataError>,
    done: bool,
}

impl Epoch {
    fn start(
        loader: &Loader,
        order: Vec<usize>,
        batch_size: usize,
        augment: Option<(AugmentConfig, u64)>,
        invalid: Option<DataError>,
    ) -> Epoch {
        let n_batches = if invalid.is_some() {
            0
        } else {
            order.len().div_ceil(batch_size)
        };
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        // Never blocks in practice: outstanding jobs are bounded by the prefetch window.
        let (result_tx, result_rx) = crossbeam_channel::unbounded::<JobResult>();
        let stop = Arc::new(AtomicBool::new(false));
        let n_threads = if n_batches == 0 {
            0
        } else {
            loader.threads.min(order.len())
        };
        let mut workers = Vec::with_capacity(n_threads);
        for t in 0..n_threads {
            let (shared, jobs, results, stop) = (
                loader.shared.clone(),
                job_rx.clone(),
                result_tx.clone(),
                stop.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("pleura-loader-{t}"))
                .spawn(move || worker(&shared, &jobs, &results, &stop, augment.as_ref()));
            match spawned {
                Ok(handle) => workers.push(handle),
                // Fewer threads only slow the epoch down; none at all is reported below.
                Err(e) => tracing::warn!(error = %e, "could not start a loader thread"),
            }
        }
        let invalid = match invalid {
            None if n_batches > 0 && workers.is_empty() => Some(DataError::Worker(
                "could not start any loader thread".into(),
            )),
            other => other,
        };
        let mut epoch = Epoch {
            shared: loader.shared.clone(),
            order,
            batch_size,
            n_batches,
            next_batch: 0,
            next_enqueue: 0,
            prefetch_batches: loader.prefetch_batches,
            jobs: Some(job_tx),
            results: result_rx,
            pending: HashMap::new(),
            stop,
            workers,
            invalid,
            done: false,
        };
        while epoch.next_enqueue < epoch.n_batches.min(epoch.prefetch_batches) {
            epoch.enqueue_next();
        }
        epoch
    }

    /// Number of batches this epoch yields when nothing fails.
    pub fn num_batches(&self) -> usize {
        self.n_batches
    }

    fn batch_range(&self, batch: usize) -> std::ops::Range<usize> {
        let start = batch * self.batch_size;
        start..(start + self.batch_size).min(self.order.len())
    }

    /// Hands the next batch's images to the workers.
    fn enqueue_next(&mut self) {
        let batch = self.next_enqueue;
        if batch >= self.n_batches {
            return;
        }
        self.next_enqueue += 1;
        let range = self.batch_range(batch);
        self.pending.insert(
            batch,
            Pending {
                slots: (0..range.len()).map(|_| None).collect(),
                filled: 0,
            },
        );
        if let Some(jobs) = &self.jobs {
            for (position, &index) in self.order[range].iter().enumerate() {
                // Cannot fail: this side holds a receiver clone via the workers until
                // `finish`, and if they all died `next` reports it.
                let _ = jobs.send(Job {
                    batch,
                    position,
                    index,
                });
            }
        }
    }

    /// Stops the workers and waits for them; idempotent.
    fn finish(&mut self) {
        self.done = true;
        self.stop.store(true, Ordering::Relaxed);
        // Closing the job channel wakes idle workers; busy ones see `stop` after their
        // current image.
        self.jobs = None;
        for handle in self.workers.drain(..) {
            // A worker that panicked outside its guarded section has nothing left to say.
            let _ = handle.join();
        }
        self.pending.clear();
    }

    fn assemble(&self, batch: usize, pending: Pending) -> Result<Batch, DataError> {
        let indices: Vec<usize> = self.order[self.batch_range(batch)].to_vec();
        let pixels = (self.shared.size as usize).pow(2);
        let mut images = Vec::with_capacity(indices.len() * pixels);
        for slot in pending.slots {
            // All slots are filled when this is called.
            let px = slot.ok_or_else(|| DataError::Worker("batch assembled early".into()))??;
            images.extend_from_slice(px.as_slice());
        }
        let labels = indices
            .iter()
            .map(|&i| self.shared.samples[i].class())
            .collect();
        Ok(Batch {
            images,
            labels,
            indices,
        })
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(e) = self.invalid.take() {
            self.finish();
            return Some(Err(e));
        }
        if self.next_batch >= self.n_batches {
            self.finish();
            return None;
        }
        loop {
            let complete = self
                .pending
                .get(&self.next_batch)
                .is_some_and(|p| p.filled == p.slots.len());
            if complete {
                let batch = self.next_batch;
                let pending = self.pending.remove(&batch)?;
                self.next_batch += 1;
                let result = self.assemble(batch, pending);
                if result.is_err() {
                    self.finish();
                } else {
                    // The caller now holds `batch`; keep the window full behind it.
                    self.enqueue_next();
                }
                return Some(result);
            }
            match self.results.recv() {
                Ok(r) => {
                    if let Some(p) = self.pending.get_mut(&r.batch) {
                        if p.slots[r.position].replace(r.result).is_none() {
                            p.filled += 1;
                        }
                    }
                }
                Err(_) => {
                    self.finish();
                    return Some(Err(DataError::Worker(
                        "loader threads stopped before the epoch was complete".into(),
                    )));
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            (0, Some(0))
        } else {
            let left = self.n_batches - self.next_batch + usize::from(self.invalid.is_some());
            (0, Some(left))
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epoch")
            .field("batch_size", &self.batch_size)
            .field("n_batches", &self.n_batches)
            .field("next_batch", &self.next_batch)
            .field("threads", &self.workers.len())
            .finish_non_exhaustive()
    }
}

fn worker(
    shared: &Shared,
    jobs: &Receiver<Job>,
    results: &Sender<JobResult>,
    stop: &AtomicBool,
    augment: Option<&(AugmentConfig, u64)>,
) {
    while let Ok(job) = jobs.recv() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // A panic (a bug in augmentation, say) becomes this image's error instead of a
        // batch that never completes.
        let result = catch_unwind(AssertUnwindSafe(|| shared.batch_image(job.index, augment)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(DataError::Worker(format!(
                    "panic while loading {}: {what}",
                    shared.samples[job.index].path.display()
                )))
            });
        let sent = results.send(JobResult {
            batch: job.batch,
            position: job.position,
            result,
        });
        if sent.is_err() {
            break;
        }
    }
}
