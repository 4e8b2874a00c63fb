//! The poison corpus (`pleura_tests::poison`) through one real worker process.
//!
//! Every one of the >1000 malformed bodies must end as exactly one result:
//! an error result that is also dead-lettered, or an ok result when the body
//! is in fact a valid image; never a crash, a hang or a lost job. The worker
//! must answer /readyz with 200 throughout, survive to shut down cleanly, and
//! keep its peak RSS bounded. The worker's verdict must also agree with the
//! library's (`scan::load_scan` in this process, same limits): the fleet may
//! not be more or less lenient than the code the trainer uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pleura::scan::{load_scan, Limits};
use pleura::wire::Priority;
use pleura_tests::poison::{self, Expect};
use pleura_tests::{
    data_dir, free_port, http_get, proc_status_kib, skip, spawn_worker_process, wait_ready,
    wait_until, Fleet,
};

/// Small limits keep the corpus small in memory: oversize bodies are
/// `MAX_BYTES` and a little more, bombs declare more than `MAX_PIXELS`.
const MAX_BYTES: usize = 3 << 20;
const MAX_PIXELS: u64 = 8_000_000;
/// The model's input side (`Fleet` models are 256²).
const SIZE: u32 = 256;
/// Peak RSS allowed for the worker over the whole corpus. Two inference
/// threads each hold at most one decode: the decoder budget is
/// `MAX_PIXELS` × 8 B + 16 MiB (80 MiB), its f32 gray copy 32 MiB, plus
/// the body, the resize and the model; the idle worker is about 45 MiB.
/// Measured: 134 MiB. Before the DICOM length walk followed the parser past
/// the pixel data, one body of this corpus took the worker to 4.1 GiB.
const MAX_PEAK_RSS_KIB: u64 = 384 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_corpus_ends_in_results_and_dead_letters_without_a_crash() {
    let started = Instant::now();
    let data = data_dir();
    if data.is_none() {
        skip(
            "poison (real-sample part)",
            "no ../shared/data (PLEURA_DATA): synthetic corpus only",
        );
    }
    let corpus = poison::generate(&poison::Options {
        max_bytes: MAX_BYTES,
        max_pixels: MAX_PIXELS,
        seed: 0x9015_0fa1,
        data: data.clone(),
    });
    if data.is_some() {
        assert_eq!(
            corpus.skipped_real, None,
            "real samples present but unusable"
        );
    }
    let cases = Arc::new(corpus.cases);
    assert!(cases.len() >= 1000, "only {} cases", cases.len());

    // What the library says of each body, computed here while the worker works.
    let limits = Limits {
        max_bytes: MAX_BYTES,
        max_pixels: MAX_PIXELS,
    };
    let in_process = {
        let cases = cases.clone();
        tokio::task::spawn_blocking(move || {
            cases
                .iter()
                .map(|c| {
                    load_scan(&c.body, &limits, SIZE)
                        .map(|_| ())
                        .map_err(|e| e.code())
                })
                .collect::<Vec<_>>()
        })
    };

    let fleet = Fleet::new("poison", 4);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = fleet.tmp().join("worker.log");
    let (max_bytes, max_pixels, http) = (
        MAX_BYTES.to_string(),
        MAX_PIXELS.to_string(),
        addr.to_string(),
    );
    let mut child = spawn_worker_process(
        &fleet,
        &[
            ("PLEURA_WORKER_ID", "poison"),
            ("PLEURA_INFERENCE_THREADS", "2"),
            ("PLEURA_HTTP_ADDR", &http),
            ("PLEURA_MAX_IMAGE_BYTES", &max_bytes),
            ("PLEURA_MAX_IMAGE_PIXELS", &max_pixels),
        ],
        &log,
    );
    let pid = child.id().expect("worker pid");
    wait_ready(addr).await;
    let idle_hwm = proc_status_kib(pid, "VmHWM").expect("VmHWM");

    // /readyz every 100 ms until the reconciliation is done.
    let stop = Arc::new(AtomicBool::new(false));
    let (polls, not_ready) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let monitor = {
        let (stop, polls, not_ready) = (stop.clone(), polls.clone(), not_ready.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let ok = tokio::time::timeout(Duration::from_secs(5), http_get(addr, "/readyz"))
                    .await
                    .is_ok_and(|r| r.is_ok_and(|(status, _)| status == 200));
                polls.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    not_ready.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let ids: Vec<String> = (0..cases.len()).map(|i| format!("poison-{i:05}")).collect();
    let t_submit = Instant::now();
    let (_conn, publisher) = fleet.publisher().await;
    for (i, (id, case)) in ids.iter().zip(cases.iter()).enumerate() {
        let priority = if i % 4 == 0 {
            Priority::Stat
        } else {
            Priority::Routine
        };
        fleet.submit(&publisher, id, &case.body, priority).await;
    }
    let results = fleet.wait_results(&ids, Duration::from_secs(300)).await;
    let processing = t_submit.elapsed();
    let in_process = tokio::time::timeout(Duration::from_secs(300), in_process)
        .await
        .expect("in-process decoding finishes")
        .expect("in-process decoding");

    // Every error result is dead-lettered (after its result is written), once.
    let errors: HashSet<&str> = results
        .iter()
        .filter(|r| !r.is_ok())
        .map(|r| r.job_id.as_str())
        .collect();
    let dead_queue = fleet.names.dead_queue();
    wait_until(
        "every error dead-lettered",
        Duration::from_secs(60),
        || async { fleet.ready_count(&dead_queue).await as usize >= errors.len() },
    )
    .await;
    let dead = fleet.drain(&dead_queue).await;
    let dead_ids: Vec<String> = dead.into_iter().filter_map(|(id, _)| id).collect();
    let dead_set: HashSet<&str> = dead_ids.iter().map(String::as_str).collect();
    assert_eq!(dead_ids.len(), dead_set.len(), "a job dead-lettered twice");
    assert_eq!(dead_set, errors, "dead letters and error results differ");

    // Exactly one stream entry per job.
    let mut entries: HashMap<String, usize> = HashMap::new();
    for id in fleet.stream_job_ids().await {
        *entries.entry(id).or_default() += 1;
    }
    let mut wrong = Vec::new();
    let mut by_code: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_category: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (((id, case), result), library) in
        ids.iter().zip(cases.iter()).zip(&results).zip(&in_process)
    {
        assert_eq!(&result.job_id, id);
        assert_eq!(entries.get(id), Some(&1), "{id}: stream entries");
        let outcome = match &result.error {
            None if result.is_ok() => "ok".to_string(),
            Some(e) if !result.is_ok() => e.code.clone(),
            _ => panic!("{id}: status and error disagree: {result:?}"),
        };
        let fine = match (case.expect, library) {
            (Expect::Error(code), _) => outcome == code,
            (Expect::AnyError, _) => outcome != "ok",
            (Expect::Either, Ok(())) => outcome == "ok",
            (Expect::Either, Err(code)) => outcome == *code,
        } && library.map_or_else(|code| outcome == code, |()| outcome == "ok");
        if !fine {
            wrong.push(format!(
                "{id} {} from {}: expected {:?}, library {:?}, worker {outcome}",
                case.category, case.source, case.expect, library
            ));
        }
        *by_code.entry(outcome.clone()).or_default() += 1;
        let family = case
            .category
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        *by_category.entry((family, outcome)).or_default() += 1;
    }

    // Still running, still ready, memory bounded.
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the worker exited during the corpus"
    );
    let peak = proc_status_kib(pid, "VmHWM").expect("VmHWM");
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(10), monitor)
        .await
        .expect("monitor stops")
        .expect("monitor");
    let (polls, not_ready) = (
        polls.load(Ordering::Relaxed),
        not_ready.load(Ordering::Relaxed),
    );

    // The report.
    eprintln!(
        "\npoison corpus: {} cases{}",
        cases.len(),
        corpus
            .skipped_real
            .as_ref()
            .map(|w| format!(" (synthetic only: {w})"))
            .unwrap_or_default()
    );
    eprintln!("{:<28} {:>6}", "outcome", "count");
    for (code, n) in &by_code {
        eprintln!("{code:<28} {n:>6}");
    }
    eprintln!("\n{:<20} {:<20} {:>6}", "family", "outcome", "count");
    for ((family, outcome), n) in &by_category {
        eprintln!("{family:<20} {outcome:<20} {n:>6}");
    }
    eprintln!(
        "\ndead-lettered {} = error results {}; /readyz polls {polls}, not ready {not_ready}",
        dead_set.len(),
        errors.len()
    );
    eprintln!(
        "worker RSS: idle peak {} MiB, peak over the corpus {} MiB (bound {} MiB)",
        idle_hwm / 1024,
        peak / 1024,
        MAX_PEAK_RSS_KIB / 1024
    );
    eprintln!(
        "corpus processed in {:.1} s; test wall time so far {:.1} s",
        processing.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    assert!(
        wrong.is_empty(),
        "{} wrong outcomes:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert!(polls >= 10, "readiness polled only {polls} times");
    assert_eq!(
        not_ready, 0,
        "/readyz was not 200 on {not_ready} of {polls} polls"
    );
    assert!(
        peak <= MAX_PEAK_RSS_KIB,
        "peak RSS {} MiB over the bound",
        peak / 1024
    );

    // And it still shuts down cleanly.
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the worker exits after SIGTERM")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "worker exit after the corpus");
    eprintln!(
        "poison test wall time {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
