//! Validates the seed model with the reference ONNX checker.
//!
//! tract is forgiving; other runtimes (onnxruntime, netron, the trainer's
//! tooling) are not. `onnx.checker.check_model(full_check=True)` runs the
//! ONNX spec's own structural checks and shape inference over what
//! `pleura::model::write_onnx` produced, so a malformed attribute or a wrong
//! IR/opset pairing fails here rather than at an integrator's site.
//!
//! Needs a Python with the `onnx` package, named by `PLEURA_PYTHON`
//! (`make test` sets it). Unset: the test skips. Set: a missing interpreter,
//! a missing `onnx` package or a failed check all fail the test.

use std::process::Command;

use pleura::model::manifest::{init_model, ModelFiles, ONNX_FILE};
use pleura::model::onnx::{ResNetSpec, INPUT_NAME, OPSET_VERSION, OUTPUT_NAME};

/// Runs the checker and prints a few facts back for Rust to compare, so the
/// expectations stay defined on this side.
const CHECK_SCRIPT: &str = r#"
import sys
import onnx
path = sys.argv[1]
onnx.checker.check_model(path, full_check=True)
m = onnx.load(path)
g = m.graph
init = {t.name for t in g.initializer}
print("inputs=" + ",".join(i.name for i in g.input if i.name not in init))
print("outputs=" + ",".join(o.name for o in g.output))
print("opset=" + ",".join("%s:%d" % (o.domain, o.version) for o in m.opset_import))
print("ir=%d" % m.ir_version)
print("input_dims=" + ",".join(d.dim_param or str(d.dim_value) for d in g.input[0].type.tensor_type.shape.dim))
print("output_dims=" + ",".join(d.dim_param or str(d.dim_value) for d in g.output[0].type.tensor_type.shape.dim))
"#;

#[test]
fn default_model_passes_onnx_checker() {
    let Some(python) = std::env::var_os("PLEURA_PYTHON") else {
        println!("SKIP: onnx checker needs PLEURA_PYTHON (make test sets it)");
        return;
    };

    let spec = ResNetSpec::default();
    let files = init_model(&spec, 0).expect("init_model for the default spec");
    let dir = tempfile::tempdir().expect("tempdir");
    files.write_dir(dir.path()).expect("write_dir");
    // The written directory must also read back cleanly.
    ModelFiles::read_dir(dir.path()).expect("read_dir");
    let path = dir.path().join(ONNX_FILE);

    let out = Command::new(&python)
        .arg("-c")
        .arg(CHECK_SCRIPT)
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run PLEURA_PYTHON={}: {e}", python.to_string_lossy()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "onnx checker failed ({}):\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}",
        out.status
    );

    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("checker printed no {key}:\n{stdout}\n{stderr}"))
            .to_string()
    };
    assert_eq!(
        field("inputs"),
        INPUT_NAME,
        "initializers must not be graph inputs"
    );
    assert_eq!(field("outputs"), OUTPUT_NAME);
    assert_eq!(field("opset"), format!(":{OPSET_VERSION}"));
    assert_eq!(OPSET_VERSION, 17);
    assert_eq!(field("ir"), "8");
    let size = spec.image_size;
    assert_eq!(field("input_dims"), format!("N,1,{size},{size}"));
    assert_eq!(field("output_dims"), "N,2");
}
