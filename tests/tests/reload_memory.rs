//! Fifty reloads in a row must not leak: a `pleura-worker` process's RSS
//! stays within 2x its steady state with one model. Uses the seed's full
//! width (64), so a leaked model would show up as tens of megabytes.

use std::time::Duration;

use pleura::wire::Priority;
use pleura_tests::{
    model_variant, phantoms, proc_status_kib, spawn_registry_worker_process, Fleet, Keys,
};

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS").expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_do_not_grow_rss_beyond_twice_the_steady_state() {
    if !std::path::Path::new("/proc/self/status").exists() {
        pleura_tests::skip("fifty_reloads", "needs /proc to read a process's RSS");
        return;
    }
    let fleet = Fleet::new("memory", 8);
    let keys = Keys::generate(fleet.tmp(), "ops");
    let a = model_variant(31, 64);
    let b = model_variant(32, 64);
    let (va, vb) = (a.manifest.version.clone(), b.manifest.version.clone());
    fleet.publish(&a, Some(&keys), true).await;
    fleet.publish(&b, Some(&keys), false).await;
    let mut settings = fleet.registry_settings(&keys, "mem-worker");
    settings.inference_threads = 2;
    let mut worker =
        spawn_registry_worker_process(&fleet, &settings, &[], &fleet.tmp().join("worker.log"));
    let pid = worker.id().expect("worker pid");
    fleet
        .wait_fleet_on(&["mem-worker"], &va, Duration::from_secs(120))
        .await;

    let (_conn, publisher) = fleet.publisher().await;
    let scans = phantoms(4, 256);
    let mut n = 0;
    let mut classify = async |tag: &str| {
        let mut ids = Vec::new();
        for scan in &scans {
            let id = format!("{tag}-{n}");
            n += 1;
            fleet.submit(&publisher, &id, scan, Priority::Routine).await;
            ids.push(id);
        }
        for r in fleet.wait_results(&ids, Duration::from_secs(60)).await {
            assert!(r.is_ok());
        }
    };
    // Steady state: one model, both inference threads warmed by real jobs.
    for _ in 0..5 {
        classify("steady").await;
    }
    let steady = rss_kib(pid);

    let mut peak = steady;
    for i in 0..50 {
        let target = if i % 2 == 0 { &vb } else { &va };
        fleet.activate(target).await;
        fleet
            .wait_fleet_on(&["mem-worker"], target, Duration::from_secs(60))
            .await;
        if i % 10 == 9 {
            classify("between").await;
        }
        peak = peak.max(rss_kib(pid));
    }
    classify("after").await;
    let after = rss_kib(pid);
    peak = peak.max(after);
    let high_water = proc_status_kib(pid, "VmHWM").expect("VmHWM");
    eprintln!(
        "reload memory: steady {} MiB, after 50 reloads {} MiB, largest after a reload {} MiB \
         ({:.2}x steady); high-water mark while loading {} MiB",
        steady / 1024,
        after / 1024,
        peak / 1024,
        peak as f64 / steady as f64,
        high_water / 1024
    );
    assert!(
        peak <= 2 * steady,
        "RSS grew from {steady} KiB to {peak} KiB over 50 reloads"
    );
    let _ = worker.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
}
