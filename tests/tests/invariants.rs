//! Architectural invariants checked on the built artefacts.

use pleura_tests::bin;

#[test]
fn the_worker_and_the_cli_never_link_libtorch() {
    for name in ["pleura-worker", "pleura"] {
        let out = std::process::Command::new("ldd")
            .arg(bin(name))
            .output()
            .expect("ldd runs");
        let libs = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ldd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !libs.contains("torch") && !libs.contains("c10"),
            "{name} links libtorch:\n{libs}"
        );
    }
    // ...while the trainer does, so the check above is not vacuous.
    let out = std::process::Command::new("ldd")
        .arg(bin("pleura-trainer"))
        .output()
        .expect("ldd runs");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("libtorch"),
        "the trainer links libtorch"
    );
}
