//! The README's Python submitter, run as written against a live worker, so
//! the documented contract cannot drift from the real one.

use std::time::Duration;

use pleura_tests::*;

fn readme_python() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("```python\n")
        .expect("README has a python example")
        + "```python\n".len();
    let len = readme[start..].find("```").unwrap();
    readme[start..start + len].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_python_example_submits_and_reads_a_result() {
    let Ok(python) = std::env::var("PLEURA_PYTHON") else {
        return skip(
            "the_readme_python_example",
            "needs PLEURA_PYTHON with pika and redis (make test sets it)",
        );
    };
    let fleet = Fleet::new("readme", 8);
    let worker = fleet.spawn_ready_worker(fleet.settings()).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("submit.py");
    std::fs::write(&script, readme_python()).unwrap();
    let scan = dir.path().join("scan.png");
    std::fs::write(&scan, &phantoms(1, 256)[0]).unwrap();

    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(&script).arg(&scan);
    for (k, v) in fleet.env() {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("example finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "example failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(fields[0], "ok", "{stdout}");
    assert!(matches!(fields[1], "effusion" | "nofinding"), "{stdout}");
    let p: f64 = fields[2].parse().unwrap();
    assert!((0.0..=1.0).contains(&p));
    assert!(fields[3].starts_with("init-"));
    worker.stop().await.unwrap();
}
