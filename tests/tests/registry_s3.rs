//! The `s3://` registry path against a real S3-compatible HTTP server
//! (moto's server mode, from the project's Python environment), with the
//! real `pleura` CLI publishing and a real `pleura-worker` process serving.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use pleura::config::Settings;
use pleura::wire::Priority;
use pleura_tests::{
    model_variant, phantoms, skip, spawn_registry_worker_process, wait_until, Fleet, Keys,
};

/// The project's Python (`PLEURA_PYTHON`, set by `make test`) if it has moto.
fn python_with_moto() -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var_os("PLEURA_PYTHON")?);
    let ok = std::process::Command::new(&python)
        .args(["-c", "import moto.server, boto3"])
        .stderr(Stdio::null())
        .status()
        .ok()?
        .success();
    ok.then_some(python)
}

/// A moto S3 server on a free port, killed on drop.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_s3(python: &PathBuf, log: &std::path::Path) -> S3Server {
    let port = StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start moto");
    let server = S3Server {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    wait_until(
        "the S3 server listens",
        Duration::from_secs(60),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
    server
}

fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "pleura-test".into()),
        ("AWS_SECRET_ACCESS_KEY", "pleura-test-secret".into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s3_registry_publishes_verifies_and_serves() {
    let Some(python) = python_with_moto() else {
        skip(
            "an_s3_registry_publishes_verifies_and_serves",
            "PLEURA_PYTHON with moto[server] is not available (make test provides it)",
        );
        return;
    };
    let fleet = Fleet::new("s3", 8);
    let s3 = start_s3(&python, &fleet.tmp().join("moto.log")).await;
    let env = aws_env(&s3.endpoint);
    let bucket = "pleura-models";
    let made = std::process::Command::new(&python)
        .args([
            "-c",
            &format!(
                "import boto3; boto3.client('s3', endpoint_url='{}').create_bucket(Bucket='{bucket}')",
                s3.endpoint
            ),
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .unwrap();
    assert!(made.success(), "create the bucket");
    let registry_url = format!("s3://{bucket}/models");

    let keys = Keys::generate(fleet.tmp(), "ops");
    let model = model_variant(21, 8);
    let version = model.manifest.version.clone();
    let dir = fleet.tmp().join("publish");
    model.write_dir(&dir).unwrap();
    let public = keys.public.display().to_string();
    let mut cli_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    cli_env.push(("PLEURA_REGISTRY_URL", &registry_url));
    cli_env.push(("PLEURA_TRUSTED_KEYS", &public));
    let key = keys.private.display().to_string();
    let published = fleet
        .cli(
            [
                "models",
                "publish",
                dir.to_str().unwrap(),
                "--key",
                &key,
                "--force",
                "--reason",
                "s3 test",
            ],
            &cli_env,
        )
        .await
        .expect_ok();
    assert!(
        published
            .stdout
            .contains(&format!("s3://{bucket}/models/{version}/")),
        "{}",
        published.stdout
    );
    fleet
        .cli(["models", "verify", &version], &cli_env)
        .await
        .expect_ok();

    // A worker process with the same S3 settings picks the model up.
    let settings = Settings {
        registry_url: registry_url.clone(),
        ..fleet.registry_settings(&keys, "s3-worker")
    };
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut worker =
        spawn_registry_worker_process(&fleet, &settings, &extra, &fleet.tmp().join("worker.log"));
    fleet
        .wait_fleet_on(&["s3-worker"], &version, Duration::from_secs(60))
        .await;
    let (_conn, publisher) = fleet.publisher().await;
    let scans = phantoms(3, 128);
    let ids: Vec<String> = (0..scans.len()).map(|i| format!("s3-{i}")).collect();
    for (id, scan) in ids.iter().zip(&scans) {
        fleet.submit(&publisher, id, scan, Priority::Routine).await;
    }
    for r in fleet.wait_results(&ids, Duration::from_secs(60)).await {
        assert!(r.is_ok());
        assert_eq!(r.model_version.as_deref(), Some(version.as_str()));
    }
    let _ = worker.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
}

/// The training service with S3 on both sides: the dataset is an `s3://`
/// prefix (checked at submission, fetched by the trainer) and the run's
/// checkpoints go to an `s3://` runs store, then are deleted at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_run_reads_s3_data_and_checkpoints_to_s3() {
    use pleura_tests::trainer::{phantom_dataset, run_store, wait_run, TrainerEnv, TrainerProc};
    let Some(python) = python_with_moto() else {
        skip(
            "a_training_run_reads_s3_data_and_checkpoints_to_s3",
            "PLEURA_PYTHON with moto[server] is not available (make test provides it)",
        );
        return;
    };
    let fleet = Fleet::new("s3-train", 8);
    let s3 = start_s3(&python, &fleet.tmp().join("moto.log")).await;
    let env = aws_env(&s3.endpoint);
    let data = fleet.tmp().join("data");
    phantom_dataset(&data, 40, 64, 0.3).await;
    let script = format!(
        "import boto3, os\n\
         s3 = boto3.client('s3', endpoint_url='{ep}')\n\
         s3.create_bucket(Bucket='pleura-train')\n\
         root = '{root}'\n\
         for d, _, fs in os.walk(root):\n\
         \x20   for f in fs:\n\
         \x20       p = os.path.join(d, f)\n\
         \x20       s3.upload_file(p, 'pleura-train', 'datasets/ph/' + os.path.relpath(p, root))\n",
        ep = s3.endpoint,
        root = data.display()
    );
    let up = std::process::Command::new(&python)
        .args(["-c", &script])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .unwrap();
    assert!(up.success(), "upload the dataset");

    let keys = Keys::generate(fleet.tmp(), "k");
    let mut tenv = TrainerEnv::new(&fleet);
    tenv.runs_url = "s3://pleura-train/runs".into();
    tenv.extra = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let _trainer = TrainerProc::start(&fleet, &keys, &tenv, "trainer-s3").await;
    let cli_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let missing = fleet
        .cli(
            [
                "train",
                "submit",
                "--data",
                "s3://pleura-train/datasets/nothing-here",
                "--epochs",
                "1",
            ],
            &cli_env,
        )
        .await
        .expect_code(2);
    assert!(missing.stderr.contains("no images"), "{}", missing.stderr);
    let out = fleet
        .cli(
            [
                "train",
                "submit",
                "--data",
                "s3://pleura-train/datasets/ph",
                "--epochs",
                "2",
                "--width",
                "8",
                "--image-size",
                "64",
                "--batch-size",
                "8",
                "--wait",
            ],
            &cli_env,
        )
        .await
        .expect_ok();
    let id = out.stdout.lines().next().unwrap().trim().to_string();
    let runs = run_store(&fleet).await;
    let r = wait_run(&runs, &id, "ended", Duration::from_secs(120), |r| {
        r.state.is_terminal()
    })
    .await;
    assert_eq!(r.state, pleura::wire::RunState::Succeeded, "{r:#?}");
    assert_eq!(r.checkpoint_epoch, Some(2), "both checkpoints reached S3");
    let fetched = fleet.tmp().join("trainer-work/trainer-s3/datasets");
    let n = walk(&fetched);
    assert_eq!(n, 41, "40 images and labels.csv fetched into the work dir");
    let left = std::process::Command::new(&python)
        .args([
            "-c",
            &format!(
                "import boto3; r = boto3.client('s3', endpoint_url='{}').list_objects_v2(Bucket='pleura-train', Prefix='runs/'); print(r.get('KeyCount', 0))",
                s3.endpoint
            ),
        ])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&left.stdout).trim(),
        "0",
        "checkpoints deleted at the end"
    );
}

fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}
